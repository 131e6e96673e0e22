"""The server's log output never holds up requests: a thread writes it, through a bounded queue."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from messagevault.server import logs
from messagevault.server.auth import Users, save_users
from messagevault.server.logs import REQUEST_ID, LogPipe
from messagevault.storage import open_storage
from tests.azurite import free_port

USER, PASSWORD = "admin", "s3cret-Passw0rd-xyz"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity
APPENDS = 400  # their access lines (~450 bytes each) fill the pipe nearly three times


def _append(url: str, value: str) -> int:
    request = urllib.request.Request(
        f"{url}/streams/orders",
        data=json.dumps({"messages": [{"value": value}]}).encode(),
        headers={"Authorization": f"Basic {TOKEN}", "Content-Type": "application/json"},
    )
    # Bounded: a server stuck writing its log would never answer.
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(answer.status)


@contextlib.contextmanager
def _serving_into_unread_pipe(root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``messagevault serve`` whose stderr is a pipe that nobody reads (until the test does)."""
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(open_storage(f"file:{root}"), users)  # type: ignore[arg-type]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve", "--port", str(port)],
        env={**os.environ, "MESSAGEVAULT_STORAGE": f"file:{root}", "MESSAGEVAULT_FSYNC": "never"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 30 s to come up
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                assert process.poll() is None, "messagevault serve exited"
                time.sleep(0.05)
        else:
            raise AssertionError("messagevault serve did not start")
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=30)


def _read_all(stream: IO[bytes], into: list[bytes]) -> threading.Thread:
    reader = threading.Thread(target=lambda: into.append(stream.read()), daemon=True)
    reader.start()
    return reader


def test_appends_are_answered_while_nobody_reads_the_servers_stderr(tmp_path: Path) -> None:
    with _serving_into_unread_pipe(tmp_path / "data") as (url, process):
        # More access lines than the pipe holds: a server writing them on its
        # event loop would block on the full pipe, and these would time out.
        statuses = [_append(url, f"value-{i}") for i in range(APPENDS)]
        assert statuses == [200] * APPENDS
        assert process.stderr is not None
        read: list[bytes] = []
        reader = _read_all(process.stderr, read)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        reader.join(timeout=30)
    assert not reader.is_alive()
    text = read[0].decode()
    assert len(text) > PIPE_BUFFER
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    appends = [
        line
        for line in lines
        if line["logger"] == "messagevault.access" and line["method"] == "POST"
    ]
    assert len(appends) == APPENDS  # queued while the pipe was full, none lost
    assert lines[-1]["message"] == "stopped"  # written out before the process exits


def _logger(pipe: LogPipe, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [pipe.handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_full_queue_drops_lines_counts_them_and_says_so() -> None:
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    pipe = LogPipe(stream, max_queued=50)
    logger = _logger(pipe, "tests.logs.full")
    try:
        lines = 5000  # ~600 kB of JSON lines: far more than the pipe and the queue hold

        def log_them() -> None:
            for i in range(lines):
                logger.info("line %d", i, extra={"padding": "x" * 100})

        logging_thread = threading.Thread(target=log_them, daemon=True)
        logging_thread.start()
        logging_thread.join(timeout=60)
        assert not logging_thread.is_alive(), "logging waited for the unread pipe"
        assert pipe.dropped > 0
        read: list[bytes] = []
        pipe_out = io.FileIO(read_end, "r")
        reader = _read_all(pipe_out, read)
        pipe.stop()
        stream.close()
        reader.join(timeout=30)
        assert not reader.is_alive()
        pipe_out.close()
    finally:
        logger.handlers[:] = []
        with contextlib.suppress(OSError):
            stream.close()
    written = [json.loads(line) for line in read[0].decode().splitlines()]
    said = [line for line in written if "log lines dropped" in line["message"]]
    assert said, "the drops were never reported"
    assert said[-1]["dropped_total"] == pipe.dropped
    kept = [line for line in written if line["message"].startswith("line ")]
    assert len(kept) + pipe.dropped == lines


def test_a_line_carries_the_request_id_it_was_logged_under() -> None:
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    pipe = LogPipe(stream)
    logger = _logger(pipe, "tests.logs.request_id")
    try:
        token = REQUEST_ID.set("req-17")
        try:
            seen: list[Any] = ["before"]
            logger.info("seen %s", seen)
            seen[0] = "after"  # the message was made when logged, not when written
        finally:
            REQUEST_ID.reset(token)
        logger.info("outside")
        pipe.stop()
    finally:
        logger.handlers[:] = []
        stream.close()
    with io.FileIO(read_end, "r") as reader:
        written = [json.loads(line) for line in reader.read().decode().splitlines()]
    assert [(line["message"], line.get("request_id")) for line in written] == [
        ("seen ['before']", "req-17"),
        ("outside", None),
    ]


def test_stopping_gives_up_on_a_stream_nobody_will_ever_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "DRAIN_TIMEOUT", 0.2)
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    pipe = LogPipe(stream, max_queued=100)
    logger = _logger(pipe, "tests.logs.stuck")
    try:
        for i in range(1000):  # the writer blocks in a write to the full pipe
            logger.info("line %d", i, extra={"padding": "x" * 200})
        stopping = threading.Thread(target=pipe.stop, daemon=True)
        stopping.start()
        stopping.join(timeout=30)
        # A server exits even if its stderr is never read again.
        assert not stopping.is_alive(), "stop() waited for the stuck writer"
    finally:
        logger.handlers[:] = []
        os.close(read_end)  # the stuck write fails now, and the writer thread ends
        with contextlib.suppress(OSError):
            stream.close()
