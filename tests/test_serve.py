"""`messagevault serve` as a real process: starts, answers, logs JSON, stops cleanly."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from messagevault import FileStorage, Reader
from messagevault.storage.azure import SYSTEM_CONTAINER, AzureStorage
from tests.azurite import Azurite, free_port


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


class _Server:
    """``messagevault serve`` as a subprocess on a free port; stopped (by PID) on exit.

    ``password`` is the new admin's, printed once on the first start;
    ``log`` holds the JSON log lines once the process has ended.
    """

    def __init__(self, cwd: Path, *arguments: str, **variables: str) -> None:
        self.port = free_port()
        env = {**os.environ, "MESSAGEVAULT_PORT": str(self.port), **variables}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "messagevault.cli", "serve", *arguments],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.log: list[dict[str, Any]] = []
        self.stderr = ""  # all of it, once the server has exited
        assert self.process.stderr is not None
        # The first start prints the new admin's password once, before listening.
        self.first_line = self.process.stderr.readline().decode()
        self.password = self.first_line.rsplit(": ", 1)[-1].strip()
        # Read as it comes: the access log writes a line per request, and a
        # full pipe would block the server.
        self._rest: list[bytes] = []
        self._reader = threading.Thread(
            target=self._rest.extend, args=(self.process.stderr,), daemon=True
        )
        self._reader.start()

    def __enter__(self) -> _Server:
        _wait_until_up(self.port, self.process)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        # The process has exited: the reader gets the rest, then end of file.
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        stderr = self.first_line + b"".join(self._rest).decode()
        self.stderr = stderr
        self.process.stderr.close()
        self.log = [json.loads(line) for line in stderr.splitlines() if line[:1] == "{"]

    def stop(self) -> int:
        """SIGTERM, then the exit code (within 20 s: aiohttp's own grace period is 30 s)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    def get(self, path: str, accept: str = "application/json") -> Any:
        token = base64.b64encode(f"admin:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Basic {token}", "Accept": accept},
        )
        return urllib.request.urlopen(request, timeout=120)


def test_serve_defaults_logs_and_sigterm(tmp_path: Path) -> None:
    with _Server(tmp_path) as server:  # the default storage is ./data
        assert server.first_line.startswith("Created user 'admin' with password: ")
        answer = _post(server.port, "orders", ["one", "two"], server.password)
        assert answer["stream"] == "orders"
        assert server.stop() == 0
    lines = server.log
    assert any(line["message"] == "listening" and line["port"] == server.port for line in lines)
    viewer = f"http://127.0.0.1:{server.port}/ui/"
    assert any(line.get("viewer") == viewer for line in lines)
    assert f"Browse the streams at {viewer} (log in as admin)." in server.stderr
    assert lines[-1]["message"] == "stopped"
    values = [m.value for m in Reader.open(FileStorage(tmp_path / "data"), "orders").read()]
    assert values == [b"one", b"two"]
    users = (tmp_path / "data" / "_system" / "users.json").read_bytes()
    assert server.password.encode() not in users


def test_serve_limits_from_the_environment(tmp_path: Path) -> None:
    """Limits set by MESSAGEVAULT_* variables are in force and in the "listening" log line."""
    limits = {
        "MESSAGEVAULT_MAX_BODY": "2048",
        "MESSAGEVAULT_MAX_READ_MESSAGES": "2",
        "MESSAGEVAULT_LINGER_MS": "2.5",
        "MESSAGEVAULT_CHECKPOINT_FLUSH_INTERVAL": "0.25",
    }
    with _Server(tmp_path, **limits) as server:
        assert _post(server.port, "orders", ["one", "two", "three"], server.password)
        with pytest.raises(urllib.error.HTTPError) as too_big:
            _post(server.port, "orders", ["x" * 3000], server.password)
        assert too_big.value.code == 413
        too_big.value.close()
        with server.get("/streams/orders/messages?limit=2") as response:
            assert len(json.loads(response.read())["messages"]) == 2
        with pytest.raises(urllib.error.HTTPError) as over_limit:
            server.get("/streams/orders/messages?limit=3")
        assert over_limit.value.code == 400
        over_limit.value.close()
        assert server.stop() == 0
    (listening,) = [line for line in server.log if line["message"] == "listening"]
    assert listening["max_body"] == 2048
    assert listening["max_read_messages"] == 2
    assert listening["linger_ms"] == 2.5
    assert listening["fsync"] == "always"
    assert listening["checkpoint_flush_interval"] == 0.25
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
    with _Server(tmp_path) as server, ThreadPoolExecutor(1) as pool:
        end = _post(server.port, "orders", ["one"], server.password)["position"]
        path = f"/streams/orders/messages?from={end}"
        tail = server.get(path, accept="text/event-stream")  # answers at once, then streams
        poll = pool.submit(lambda: server.get(f"{path}&wait=60").read())  # answers at the end
        deadline = time.monotonic() + 30
        while _waiting_reads(server.port) < 2:  # both have reached the server and wait
            assert time.monotonic() < deadline, "the reads never started waiting"
            time.sleep(0.05)
        assert server.stop() == 0  # within 20 s, not the 30 s grace period
        assert json.loads(poll.result(timeout=20))["messages"] == []
        assert tail.read() == b": keep-alive\n\n"
        tail.close()


def _request_counts(port: int) -> dict[tuple[str, str], float]:
    """``messagevault_requests_total`` by (route, status)."""
    counts = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("messagevault_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                route = labels.split('route="', 1)[1].split('"', 1)[0]
                status = labels.split('status="', 1)[1].split('"', 1)[0]
                counts[route, status] = float(value)
    return counts


def test_a_reader_leaving_a_tail_is_neither_an_error_nor_a_500(tmp_path: Path) -> None:
    """The tail ends as the 200 it was answered with; nothing is logged as an error."""
    tail_route = "/streams/{stream}/messages"
    with _Server(tmp_path) as server:
        _post(server.port, "orders", ["one"], server.password)
        token = base64.b64encode(f"admin:{server.password}".encode()).decode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as reader:
            reader.sendall(
                b"GET /streams/orders/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Accept: text/event-stream\r\nAuthorization: Basic %b\r\n\r\n" % token.encode()
            )
            received = b""
            while b"\ndata: " not in received:  # the first event (bounded by the timeout)
                chunk = reader.recv(65536)
                assert chunk, "the server closed the tail"
                received += chunk
        # The reader is gone; the server finds out when it next writes to it.
        deadline = time.monotonic() + 30
        while not any(route == tail_route for route, _ in _request_counts(server.port)):
            assert time.monotonic() < deadline, "the tail never ended"
            _post(server.port, "orders", ["more"], server.password)
            time.sleep(0.05)
        counts = _request_counts(server.port)
        assert server.stop() == 0
    assert counts[tail_route, "200"] == 1
    assert [status for _, status in counts if status != "200"] == []
    assert [line for line in server.log if line["level"] not in ("info", "debug")] == []


def _serve_exits(cwd: Path, *arguments: str, **variables: str) -> tuple[int, str]:
    """Run ``messagevault serve`` expecting it to exit at once: (exit code, stderr).

    If it does not, subprocess.run kills it (by PID) after 60 s and the test fails.
    """
    done = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "serve", *arguments],
        cwd=cwd,
        env={**os.environ, **variables},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr.decode()


def test_a_second_server_on_the_same_folder_refuses_to_start(tmp_path: Path) -> None:
    """Both would run and split the streams between them; the second must say so and stop."""
    with _Server(tmp_path) as first:
        code, stderr = _serve_exits(tmp_path, "--port", str(free_port()))
        assert code == 1
        folder = (tmp_path / "data").resolve()
        assert stderr == (
            f"error: another messagevault server (pid {first.process.pid}) already serves the "
            f"data folder {folder}; stop that server first, or serve another folder\n"
        )
        assert _post(first.port, "orders", ["still served"], first.password)["stream"] == "orders"
        assert first.stop() == 0
    with _Server(tmp_path) as again:  # the first one's lock went with it
        assert _post(again.port, "orders", ["after"], first.password)["stream"] == "orders"
        assert again.stop() == 0


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = _serve_exits(tmp_path, "--port", str(port))
    assert code == 1
    assert stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "stop what uses it, or choose another --port\n"
    )
    assert not (tmp_path / "data" / "_system" / "users.json").exists()  # nothing created


@pytest.mark.parametrize(
    ("arguments", "variables", "named"),
    [
        (("--port", "99999"), {}, "'--port'"),
        (("--port", "-1"), {}, "'--port'"),
        ((), {"MESSAGEVAULT_PORT": "99999"}, "'--port'"),
        (("--log-level", "loud"), {}, "'--log-level'"),
    ],
)
def test_serve_with_a_bad_port_or_level_is_a_usage_error(
    tmp_path: Path, arguments: tuple[str, ...], variables: dict[str, str], named: str
) -> None:
    code, stderr = _serve_exits(tmp_path, *arguments, **variables)
    assert code == 2
    assert f"Invalid value for {named}" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("level", ["info", "debug"])
def test_the_azure_sdk_logs_its_requests_only_when_asked(
    tmp_path: Path, azurite: Azurite, level: str
) -> None:
    storage = f"azure:{azurite.connection_string}"
    try:
        with _Server(
            tmp_path, MESSAGEVAULT_STORAGE=storage, MESSAGEVAULT_LOG_LEVEL=level
        ) as server:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ready", timeout=30):
                pass  # lists the containers: one more SDK request
            assert server.stop() == 0
    finally:  # the users the server created: other tests expect an empty account
        service = AzureStorage.from_connection_string(azurite.connection_string).service
        with contextlib.suppress(ResourceNotFoundError):
            service.delete_container(SYSTEM_CONTAINER)
    assert any(line["message"] == "listening" for line in server.log)
    sdk_lines = [line for line in server.log if line["logger"].startswith("azure.")]
    if level == "debug":
        assert any("Request URL" in line["message"] for line in sdk_lines)
    else:
        assert sdk_lines == []


def test_serve_on_port_0_listens_on_a_free_port_and_says_which(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        # The new admin's password, the listening line and where the viewer is, in some
        # order (log lines go out through a queue): the first JSON line is the one.
        lines = [process.stderr.readline().decode() for _ in range(4)]
        listening = next(json.loads(line) for line in lines if line.startswith("{"))
        assert listening["message"] == "listening"
        assert listening["port"] != 0
        _wait_until_up(listening["port"], process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()
