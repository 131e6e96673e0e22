"""Starting and stopping the services the tests run (Azurite, StatsD): the shared parts."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_until_up(
    process: subprocess.Popen[bytes],
    is_up: Callable[[], bool],
    *,
    name: str,
    log: Path,
    timeout: float,
) -> None:
    """Poll ``is_up`` until it holds; stop ``process`` and raise if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not is_up():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            stop_gracefully(process, timeout=10)
            raise RuntimeError(f"{name} did not come up within {timeout} s")
        time.sleep(0.05)


def stop_gracefully(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; reaped either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
