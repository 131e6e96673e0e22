"""`messagevault serve` as a benchmark's subprocess: fresh data folder, one user, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.azurite import free_port

from messagevault import FileStorage
from messagevault.server.auth import Users, save_users

USER, PASSWORD = "bench", "bench-password"


class Server:
    """`messagevault serve --fsync always` on file storage; optionally under cProfile.

    The data folder gets the benchmark's user (all:write) before the server
    starts, so no admin password is printed.
    """

    def __init__(
        self, folder: Path, profile: Path | None = None, users: Users | None = None
    ) -> None:
        self.folder = folder
        self.port = free_port()
        data = folder / "data"
        if users is None:  # argon2 is slow on purpose: a benchmark of many cases hashes once
            users = Users()
            users.set_password(USER, PASSWORD)
            users.grant(USER, ["all:write"])
        save_users(FileStorage(data), users)
        command = [sys.executable]
        if profile is not None:
            # serve stops gracefully on SIGTERM, so cProfile gets to write its file.
            command += ["-m", "cProfile", "-o", str(profile)]
        command += [
            *("-m", "messagevault.cli", "serve", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--storage", f"file:{data}"),
            *("--fsync", "always"),
        ]
        self.log = folder / "server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=folder, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("server did not come up")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (all its threads); Linux only."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process.returncode not in (0, -signal.SIGKILL):
            print(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
