"""``messagevault serve`` as a child process on a fresh data folder, stopped by PID.

The stress command's ``--embedded`` server and the benchmarks' server. The
data folder gets one user before the server starts, so no admin password is
printed. The child runs in its own session: a Ctrl-C at the terminal reaches
the stress command alone, which then finishes its in-flight batches against
a server that is still up, and stops the server itself. It runs on a leash
(``messagevault.leash``): if the parent dies without stopping it
(SIGKILL, a crash), the server stops by itself and removes the temporary
folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from messagevault.server.auth import Users, save_users
from messagevault.storage.file import FileStorage

USER = "stress"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class ServerFailed(RuntimeError):
    """The embedded server did not come up (its log's tail is in the message)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stress_users(password: str, user: str = USER) -> Users:
    """One admin user; argon2 hashing is slow on purpose, so callers of many servers reuse it."""
    users = Users()
    users.set_password(user, password)
    users.grant(user, ["admin"])
    return users


class EmbeddedServer:
    """``messagevault serve --fsync FSYNC`` on file storage under ``folder`` (or a temp folder).

    Use as a context manager, or call ``wait_until_up()`` and ``stop()``.
    A temporary folder (no ``folder`` given) is removed by ``stop()``.
    ``users`` (holding ``user`` with ``password``) saves hashing them again.
    ``profile`` runs the server under cProfile, writing that file on stop.
    The access log is off unless ``access_log``: a load run would otherwise
    measure, and fill its folder with, a log line per request (~15 us each,
    docs/OPERATIONS.md), which none of the earlier figures carried.
    """

    def __init__(
        self,
        *,
        fsync: str = "always",
        folder: Path | None = None,
        parent: Path | None = None,
        user: str = USER,
        password: str | None = None,
        users: Users | None = None,
        profile: Path | None = None,
        access_log: bool = False,
    ) -> None:
        self.owns_folder = folder is None
        # A Ctrl-C, SIGTERM or SIGHUP while the folder is made and the child
        # started waits until both are known: landing inside Popen (after the
        # fork) it would lose the child, which the caller could then not stop
        # (the leash would, but only after this process had gone).
        with _SignalsDeferred() as deferred:
            self.folder = folder or Path(tempfile.mkdtemp(prefix="mv-stress-", dir=parent))
            try:
                self.password = password or secrets.token_urlsafe(18)
                self.user = user
                self.fsync = fsync
                self.port = free_port()
                self.data = self.folder / "data"
                save_users(FileStorage(self.data), users or stress_users(self.password, user))
                command = [sys.executable]
                if profile is not None:
                    # serve stops gracefully on SIGTERM, so cProfile gets to write its file.
                    command += ["-m", "cProfile", "-o", str(profile)]
                command += [
                    *("-m", "messagevault.leash"),
                    *(("--remove", str(self.folder)) if self.owns_folder else ()),
                    *("serve", "--host", "127.0.0.1"),
                    *("--port", str(self.port), "--storage", f"file:{self.data}"),
                    *("--fsync", fsync),
                    *(() if access_log else ("--no-access-log",)),
                ]
                self.log = self.folder / "server.log"
                environment = {
                    k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")
                }
                with self.log.open("wb") as log:
                    self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                        command,
                        cwd=self.folder,
                        stdin=subprocess.PIPE,  # the leash: closed when this process ends
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=environment,
                        start_new_session=True,
                    )
            except BaseException:
                if self.owns_folder:
                    shutil.rmtree(self.folder, ignore_errors=True)
                raise
            if deferred.received:
                self.stop()  # before the signal is delivered, on leaving this block

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_up(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"the embedded server exited early: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.05)
        raise ServerFailed(f"the embedded server did not come up in {timeout:g} s")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (all its threads); Linux only."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        """SIGTERM by PID (SIGKILL if it lingers); remove a temporary folder. The exit code.

        Ctrl-C, SIGTERM and SIGHUP are held off meanwhile (in the main
        thread): a second Ctrl-C must not leave a server or its folder behind.
        """
        held = _hold_signals()
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=30)
        finally:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                if self.owns_folder:
                    shutil.rmtree(self.folder, ignore_errors=True)
            finally:
                for signum, handler in held.items():
                    if handler is not None:  # None: set outside Python, cannot be put back
                        signal.signal(signum, handler)
        return self.process.returncode

    def __enter__(self) -> EmbeddedServer:
        try:
            self.wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _SignalsDeferred:
    """Hold the stopping signals back in a block, then deliver them as they came.

    Unlike blocking them (``pthread_sigmask``), which a child started in the
    block would inherit, this keeps a handler that notes them. Outside the
    main thread, where handlers cannot be set, nothing is held.
    """

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _SignalsDeferred:
        if threading.current_thread() is threading.main_thread():
            for signum in _HELD_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum))

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            # None: set outside Python, cannot be put back; default is the closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in self.received:
            signal.raise_signal(signum)


def _hold_signals() -> dict[signal.Signals, Any]:
    """Ignore the stopping signals; their handlers, to put back (none outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in _HELD_SIGNALS}
