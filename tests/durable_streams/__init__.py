"""The official Durable Streams conformance suite and reference server, driven from Python.

``run_conformance(url, work_dir)`` runs the suite (npm
``@durable-streams/server-conformance-tests``, pinned in package.json) under
vitest against the server at ``url`` and returns each test's outcome;
``reference_server()`` runs the protocol's Node reference server
(``@durable-streams/server``), file-backed, on a free loopback port.

The suite creates its streams under ``<url>/v1/stream/...`` and sends no
credentials, so a MessageVault server under test must grant anonymous access.

Long polls: five of the suite's tests wait for a long poll's timeout for the
server's hold plus a second, assuming 20 s unless told (``long_poll_timeout_ms``).
Two more (``offset=now`` with long-poll: "waits for data" and "on empty stream")
have only vitest's default 5 s, whatever the suite is told: a server must end
an idle long poll well within 5 s to pass them. The reference server's
maintainers run it with 500 ms holds (``REFERENCE_LONG_POLL_MS``); with its
default, 30 s, it fails those two.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.service_process import stop_gracefully

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
VITEST = ROOT / "node_modules" / ".bin" / "vitest"
SUITE = HERE / "conformance.test.mjs"
REFERENCE_SCRIPT = HERE / "reference_server.mjs"

# The suite took 27 s against the reference server (500 ms long polls), 40 s
# when it held them 30 s, 85 s against a first MessageVault; 240 s means it hangs.
SUITE_TIMEOUT = 240.0
START_TIMEOUT = 30.0
# What the reference server's maintainers give it in their own conformance run
# (packages/server/test/conformance.test.ts); with its default, 30 s, two
# offset=now long-poll tests time out (see above).
REFERENCE_LONG_POLL_MS = 500

Status = Literal["passed", "failed", "skipped"]
TIMEOUT_STACK = "Error: STACK_TRACE_ERROR"  # what vitest reports for a test that timed out


class ConformanceError(RuntimeError):
    """The suite could not run against the server, or did not finish."""


@dataclass(frozen=True)
class Outcome:
    status: Status
    message: str = ""  # a failed test's failure message (first of them), else empty

    @property
    def first_line(self) -> str:
        return self.message.strip().splitlines()[0] if self.message.strip() else ""


@dataclass(frozen=True)
class Results:
    """One run of the suite: each test's full name (describe blocks and title) and outcome."""

    base_url: str
    outcomes: Mapping[str, Outcome]

    def names(self, status: Status) -> list[str]:
        return [name for name, outcome in self.outcomes.items() if outcome.status == status]

    @property
    def passed(self) -> list[str]:
        return self.names("passed")

    @property
    def failed(self) -> list[str]:
        return self.names("failed")

    @property
    def skipped(self) -> list[str]:
        return self.names("skipped")

    def to_json(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "outcomes": {
                name: {"status": outcome.status, "message": outcome.message}
                for name, outcome in self.outcomes.items()
            },
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Results:
        outcomes = {
            name: Outcome(value["status"], value["message"])
            for name, value in document["outcomes"].items()
        }
        return cls(document["base_url"], outcomes)


def parse_report(report: Mapping[str, Any], base_url: str) -> Results:
    """Results from vitest's JSON reporter output; todo and pending tests count as skipped."""
    outcomes: dict[str, Outcome] = {}
    for test_file in report["testResults"]:
        for test in test_file["assertionResults"]:
            status: Status = test["status"] if test["status"] in ("passed", "failed") else "skipped"
            messages = test.get("failureMessages") or []
            message = messages[0] if messages else ""
            if message.startswith(TIMEOUT_STACK):
                # vitest's JSON report gives a timed-out test's stack without the message.
                duration = test.get("duration") or 0
                message = f"timed out after {duration / 1000:.1f} s\n{message}"
            outcomes[test["fullName"]] = Outcome(status, message)
    return Results(base_url, outcomes)


def check_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash; ValueError unless it is http(s)://host[:port][/path]."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"server URL must be http(s)://host[:port], not {base_url!r}")
    return base_url.rstrip("/")


def check_answers(base_url: str) -> None:
    """Raise ConformanceError unless something answers HTTP at ``base_url`` (any status will do)."""
    try:
        with urllib.request.urlopen(base_url, timeout=10):
            pass
    except urllib.error.HTTPError:
        pass  # an HTTP answer, even 404 or 401: a server is there
    except OSError as error:
        raise ConformanceError(f"nothing answers at {base_url}: {error}") from None


def run_conformance(
    base_url: str,
    work_dir: Path,
    *,
    long_poll_timeout_ms: int | None = None,
    test_timeout_ms: int | None = None,
    timeout: float = SUITE_TIMEOUT,
) -> Results:
    """Run the whole suite against the server at ``base_url``; each test's outcome.

    ``work_dir`` gets vitest's JSON report (``conformance.json``) and its
    console output (``vitest.log``). ``long_poll_timeout_ms``: how long the
    server holds a long poll (the suite's default assumption is 20 s).
    ``test_timeout_ms``: vitest's limit per test (its default is 5 s), for
    servers whose storage is round trips away.
    Failed tests are results, not errors; ConformanceError if the suite cannot
    start, reports no tests, or runs past ``timeout`` seconds (then it is
    stopped, with the workers it started).
    """
    base_url = check_base_url(base_url)
    if long_poll_timeout_ms is not None and long_poll_timeout_ms <= 0:
        raise ValueError(f"long_poll_timeout_ms must be positive, not {long_poll_timeout_ms}")
    if not VITEST.exists():
        raise ConformanceError(f"{VITEST} is missing: run `make node_modules/.installed` (npm ci)")
    check_answers(base_url)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = work_dir / "conformance.json"
    report.unlink(missing_ok=True)
    log = work_dir / "vitest.log"
    env = {**os.environ, "DS_URL": base_url, "NO_COLOR": "1", "FORCE_COLOR": "0"}
    env.pop("DS_LONG_POLL_TIMEOUT_MS", None)
    if long_poll_timeout_ms is not None:
        env["DS_LONG_POLL_TIMEOUT_MS"] = str(long_poll_timeout_ms)
    command = [
        str(VITEST),
        "run",
        SUITE.name,  # a filter: only this file, whatever else lies beside it
        "--root",
        str(HERE),
        "--no-cache",
        "--reporter=json",
        f"--outputFile={report}",
    ]
    if test_timeout_ms is not None:
        command.append(f"--testTimeout={test_timeout_ms}")
    with log.open("wb") as output:
        # Its own session, so a timeout stops vitest's worker processes with it.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConformanceError(
                f"the suite ran past {timeout:.0f} s against {base_url}; see {log}"
            ) from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    if not report.exists():
        tail = log.read_text(errors="replace")[-2000:]
        raise ConformanceError(f"vitest wrote no report (exit {process.returncode}): {tail}")
    results = parse_report(json.loads(report.read_text()), base_url)
    if not results.outcomes:
        raise ConformanceError(f"vitest reported no tests; see {log}")
    return results


@contextlib.contextmanager
def reference_server(
    work_dir: Path | None = None, *, long_poll_timeout_ms: int = REFERENCE_LONG_POLL_MS
) -> Iterator[str]:
    """The Node reference server, file-backed in ``work_dir`` (a temp folder if None); its URL.

    Stopped by PID on exit (SIGTERM, then SIGKILL if it lingers). Its log
    lines go to ``reference.log`` in the work folder.
    """
    if long_poll_timeout_ms <= 0:
        raise ValueError(f"long_poll_timeout_ms must be positive, not {long_poll_timeout_ms}")
    node = shutil.which("node")
    if node is None:
        raise ConformanceError("node is not on PATH; the reference server runs under Node")
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="ds-reference-")
            work_dir = Path(stack.enter_context(temporary))
        work_dir.mkdir(parents=True, exist_ok=True)
        log = work_dir / "reference.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [node, str(REFERENCE_SCRIPT), str(work_dir / "data"), str(long_poll_timeout_ms)],
                cwd=ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            yield _wait_for_url(process, log)
        finally:
            stop_gracefully(process, timeout=10)


def _wait_for_url(process: subprocess.Popen[bytes], log: Path) -> str:
    """The URL line the reference server prints once it listens (its log lines come first)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("http://"):
                return line.strip()
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise ConformanceError(f"the reference server exited ({process.returncode}): {tail}")
        if time.monotonic() > deadline:
            raise ConformanceError(f"the reference server printed no URL within {START_TIMEOUT} s")
        time.sleep(0.05)


def run_reference(work_dir: Path) -> Results:
    """The suite's results against a fresh reference server (data and reports in ``work_dir``)."""
    with reference_server(work_dir / "server") as url:
        return run_conformance(url, work_dir, long_poll_timeout_ms=REFERENCE_LONG_POLL_MS)


def shared_reference_results(directory: Path) -> Results:
    """The reference server's results, run once for all processes sharing ``directory``.

    The first caller runs the suite (about 30 s) and saves the results as
    JSON; callers meanwhile wait on a file lock, and later ones read the file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    saved = directory / "ds-reference-results.json"
    with (directory / "ds-reference.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if saved.exists():
            return Results.from_json(json.loads(saved.read_text()))
        results = run_reference(directory / "ds-reference")
        saved.write_text(json.dumps(results.to_json(), indent=1))
        return results


def regressions(baseline: Results, candidate: Results) -> list[str]:
    """The tests ``baseline`` passed that ``candidate`` did not pass, in the suite's order."""
    return [
        name
        for name in baseline.passed
        if candidate.outcomes.get(name, Outcome("skipped")).status != "passed"
    ]


def summary(runs: Mapping[str, Results]) -> str:
    """A table of passed/failed/skipped per server, then each server's failed tests and why."""
    width = max(len(label) for label in runs)
    lines = [f"{'server':<{width}}  passed  failed  skipped"]
    for label, results in runs.items():
        lines.append(
            f"{label:<{width}}  {len(results.passed):>6}  {len(results.failed):>6}"
            f"  {len(results.skipped):>7}"
        )
    for label, results in runs.items():
        if results.failed:
            lines.append(f"\n{label} fails {len(results.failed)}:")
            lines.extend(
                f"  {name}\n      {results.outcomes[name].first_line}" for name in results.failed
            )
    return "\n".join(lines)
