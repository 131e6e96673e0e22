"""Run Etsy's StatsD daemon (from node_modules) for the tests, and read back what it received.

The daemon keeps counters, timers and gauges in memory until it flushes
them to its backends; with no backends and an hour between flushes, its
management port shows exactly what arrived since the last ``reset()``.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.azurite import ROOT, free_port
from tests.service_process import stop_gracefully, wait_until_up

STATS_JS = ROOT / "node_modules" / "statsd" / "stats.js"
# The daemon counts its own packets under these names.
OWN_COUNTERS = ("statsd.bad_lines_seen", "statsd.packets_received", "statsd.metrics_received")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StatsDDaemon:
    """One ``node stats.js`` on loopback ports (UDP for metrics, TCP for management).

    Stopped by PID (SIGTERM, then SIGKILL) in ``stop()``. ``settings`` are
    added to its config (e.g. the graphite backend's).
    """

    def __init__(self, **settings: object) -> None:
        if not STATS_JS.exists():
            raise RuntimeError(f"{STATS_JS} is missing: run `make test` (it runs npm ci)")
        self.port = free_udp_port()
        self.mgmt_port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="mv-statsd-"))
        self.log = self.folder / "statsd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        config = {
            "port": self.port,
            "address": "127.0.0.1",
            "mgmt_port": self.mgmt_port,
            "mgmt_address": "127.0.0.1",
            "backends": [],
            "flushInterval": 3_600_000,  # no flush (which zeroes counters) during a test
            "percentThreshold": [50, 99],
            **self.settings,
        }
        config_file = self.folder / "config.js"
        config_file.write_text(f"({json.dumps(config)})\n")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["node", str(STATS_JS), str(config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        wait_until_up(
            self.process,
            lambda: b"server is up" in self.log.read_bytes(),
            name="statsd",
            log=self.log,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.process is None:
            return
        stop_gracefully(self.process, timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def management(self, command: str, timeout: float = 10.0) -> str:
        """Send one management command; its answer up to (not including) the ``END`` line."""
        with socket.create_connection(("127.0.0.1", self.mgmt_port), timeout=timeout) as sock:
            sock.sendall(command.encode() + b"\n")
            answer = b""
            deadline = time.monotonic() + timeout
            while b"\nEND\n" not in b"\n" + answer:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"statsd answered {command!r} with no END: {answer!r}")
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"statsd closed during {command!r}: {answer!r}")
                answer += chunk
        text = answer.decode()
        return text[: text.rindex("END\n")]

    def counters(self) -> dict[str, float]:
        return _dump(self.management("counters"))

    def gauges(self) -> dict[str, float]:
        return _dump(self.management("gauges"))

    def timers(self) -> dict[str, list[float]]:
        return _dump(self.management("timers"))

    def reset(self) -> None:
        """Forget every metric received so far.

        The daemon's own counters stay: it would count on from NaN.
        """
        for kind in ("counters", "timers", "gauges"):
            for name in _dump(self.management(kind)):
                if name not in OWN_COUNTERS:
                    self.management(f"del{kind} {name}")

    def wait_for(self, kind: str, name: str, expected: object, timeout: float = 10.0) -> Any:
        """Poll ``kind`` (counters, gauges, timers) until ``name`` is ``expected``; its last value.

        UDP packets may still be on their way (or in a client's buffer until
        its next flush) when a test looks.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = _dump(self.management(kind)).get(name)
            if value == expected or time.monotonic() > deadline:
                return value
            time.sleep(0.05)


# util.inspect leaves names that are JavaScript identifiers unquoted.
_BARE_NAME = re.compile(r"(?<=[{,\s])([A-Za-z_$][\w$]*)(?=: )")
_MORE_ITEMS = re.compile(r"\.\.\. \d+ more items?")


def _dump(text: str) -> dict[str, Any]:
    """The daemon's ``util.inspect`` dump of an object (names to numbers or lists) as a dict."""
    text = text.strip()
    if _MORE_ITEMS.search(text):
        raise ValueError("statsd cut a list short (over 100 values): keep tests smaller")
    if not text or text == "{}":
        return {}
    value = ast.literal_eval(_BARE_NAME.sub(r"'\1'", text))
    if not isinstance(value, dict):
        raise ValueError(f"not a statsd dump: {text[:200]!r}")
    return value
