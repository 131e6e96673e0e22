"""``messagevault serve`` as a subprocess on file storage, for tests that need a real server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from messagevault.server.auth import Users, save_users
from messagevault.storage import open_storage
from tests.azurite import free_port

START_TIMEOUT = 30.0


@contextlib.contextmanager
def serve_process(
    root: Path,
    user: str,
    password: str,
    fsync: str = "never",
    arguments: Sequence[str] = (),
    *,
    storage: str | None = None,
    log: Path | None = None,
    launcher: Sequence[str] = ("-m", "messagevault.cli"),
) -> Iterator[str]:
    """Serve ``root`` on a free loopback port with one admin user; yield the URL.

    ``arguments`` go after ``serve --port PORT`` (e.g. ``["--statsd", address]``).
    ``storage``: a storage URL to serve instead of ``file:root``; ``log``: a
    file that gets the server's stderr (its JSON log lines); ``launcher``:
    what follows ``python`` to run the CLI (``-c CODE`` that patches a seam,
    then runs ``messagevault.cli``).

    Stopped by PID on exit (SIGTERM, then SIGKILL if it lingers).
    """
    users = Users()
    users.set_password(user, password)
    users.grant(user, ["admin"])
    storage = storage or f"file:{root}"
    save_users(open_storage(storage), users)  # type: ignore[arg-type]
    port = free_port()
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, *launcher, "serve", "--port", str(port), *arguments],
            env={**os.environ, "MESSAGEVAULT_STORAGE": storage, "MESSAGEVAULT_FSYNC": fsync},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("messagevault serve did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
