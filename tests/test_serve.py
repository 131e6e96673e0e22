"""`messagevault serve` as a real process: starts, answers, logs JSON, stops cleanly."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from messagevault import FileStorage, Reader
from tests.azurite import free_port


def _wait_until_up(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not come up")


def _post(port: int, stream: str, values: list[str], password: str) -> dict[str, object]:
    body = json.dumps({"messages": [{"key": "k", "value": v} for v in values]}).encode()
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/streams/{stream}",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_serve_defaults_logs_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MESSAGEVAULT_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve"],
        cwd=tmp_path,  # the default storage is ./data
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        # The first start prints the new admin's password once, before listening.
        first_line = process.stderr.readline().decode()
        assert first_line.startswith("Created user 'admin' with password: ")
        password = first_line.rsplit(": ", 1)[1].strip()
        _wait_until_up(port, process)
        answer = _post(port, "orders", ["one", "two"], password)
        assert answer["stream"] == "orders"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        # The process has exited: read() returns the rest, including what
        # readline() above already buffered. communicate() reads the raw
        # descriptor and would lose that (the "listening" line, at times).
        assert process.stderr is not None and process.stdout is not None
        stderr = process.stderr.read()
        process.stderr.close()
        process.stdout.close()
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(line["message"] == "listening" and line["port"] == port for line in lines)
    assert lines[-1]["message"] == "stopped"
    values = [m.value for m in Reader.open(FileStorage(tmp_path / "data"), "orders").read()]
    assert values == [b"one", b"two"]
    assert password.encode() not in (tmp_path / "data" / "_system" / "users.json").read_bytes()


def test_serve_limits_from_the_environment(tmp_path: Path) -> None:
    """Limits set by MESSAGEVAULT_* variables are in force and in the "listening" log line."""
    port = free_port()
    env = {
        **os.environ,
        "MESSAGEVAULT_PORT": str(port),
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path / 'data'}",
        "MESSAGEVAULT_MAX_BODY": "2048",
        "MESSAGEVAULT_MAX_READ_MESSAGES": "2",
        "MESSAGEVAULT_LINGER_MS": "2.5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        password = process.stderr.readline().decode().rsplit(": ", 1)[1].strip()
        _wait_until_up(port, process)
        assert _post(port, "orders", ["one", "two", "three"], password)["stream"] == "orders"
        try:
            _post(port, "orders", ["x" * 3000], password)
        except urllib.error.HTTPError as exc:
            assert exc.code == 413
        else:
            raise AssertionError("a 3 KB body passed a 2 KB limit")
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        for limit, status in ((2, 200), (3, 400)):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/streams/orders/messages?limit={limit}",
                headers={"Authorization": f"Basic {token}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert (response.status, len(json.loads(response.read())["messages"])) == (
                        status,
                        2,
                    )
            except urllib.error.HTTPError as exc:
                assert exc.code == status
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        assert process.stderr is not None and process.stdout is not None
        stderr = process.stderr.read()
        process.stderr.close()
        process.stdout.close()
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    (listening,) = [line for line in lines if line["message"] == "listening"]
    assert listening["max_body"] == 2048
    assert listening["max_read_messages"] == 2
    assert listening["linger_ms"] == 2.5
    assert listening["fsync"] == "always"
    values = [m.value for m in Reader.open(FileStorage(tmp_path / "data"), "orders").read()]
    assert values == [b"one", b"two", b"three"]


def _waiting_reads(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("messagevault_waiting_reads{"):
                return float(line.rsplit(" ", 1)[1])
    return 0


def test_sigterm_ends_tails_and_long_polls_at_once(tmp_path: Path) -> None:
    """A following client must not hold the shutdown until the grace period runs out."""
    port = free_port()
    env = {
        **os.environ,
        "MESSAGEVAULT_PORT": str(port),
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path / 'data'}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    responses = []
    try:
        assert process.stderr is not None
        password = process.stderr.readline().decode().rsplit(": ", 1)[1].strip()
        _wait_until_up(port, process)
        end = _post(port, "orders", ["one"], password)["position"]
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        for accept, query in (("text/event-stream", ""), ("application/json", "&wait=60")):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/streams/orders/messages?from={end}{query}",
                headers={"Authorization": f"Basic {token}", "Accept": accept},
            )
            # The SSE answer starts at once; the long poll's only when it ends.
            responses.append(
                urllib.request.urlopen(request, timeout=120)
                if accept == "text/event-stream"
                else ThreadPoolExecutor(1).submit(
                    lambda r=request: urllib.request.urlopen(r, timeout=120).read()
                )
            )
        deadline = time.monotonic() + 30
        while _waiting_reads(port) < 2:  # both have reached the server and wait
            assert time.monotonic() < deadline, "the reads never started waiting"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        # aiohttp's grace period is 30 s; the waits must end well before it.
        assert process.wait(timeout=20) == 0
        tail, poll = responses
        assert json.loads(poll.result(timeout=20))["messages"] == []
        assert tail.read() == b": keep-alive\n\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.read()
        process.stderr.close()
