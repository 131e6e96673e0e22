"""Request ids, the access log, and no secret in any log line or answer: a real ``serve``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from messagevault.server.logs import request_id
from messagevault.storage.azure import CONTAINER_PREFIX, SYSTEM_CONTAINER, AzureStorage
from tests.azurite import Azurite
from tests.serve_process import serve_process

USER, PASSWORD = "admin", "s3cret-Passw0rd-xyz"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SIG = "sIgNaTuRe0123456789abcdefXYZ%3D"


class Answer:
    def __init__(self, status: int, headers: Message, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _call(
    url: str,
    path: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    auth: str | None = TOKEN,
) -> Answer:
    """One request; the answer whatever its status."""
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = f"Basic {auth}"
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, error.headers, error.read())


def _append(url: str, stream: str, *values: str, headers: dict[str, str] | None = None) -> Answer:
    body = json.dumps({"messages": [{"value": v} for v in values]}).encode()
    return _call(url, f"/streams/{stream}", data=body, headers=headers)


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _access(log: Path) -> list[dict[str, Any]]:
    return [line for line in _lines(log) if line["logger"] == "messagevault.access"]


@contextlib.contextmanager
def _serving(tmp_path: Path, *arguments: str, storage: str | None = None) -> Iterator[str]:
    with serve_process(
        tmp_path / "data", USER, PASSWORD, arguments=arguments, storage=storage, log=_log(tmp_path)
    ) as url:
        yield url


def _log(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


def _tail_headers(url: str, identity: str, auth: str = TOKEN) -> str:
    """Start a Server-Sent-Event tail, take its answer's head, and leave."""
    address = urllib.parse.urlsplit(url)
    assert address.hostname is not None and address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=30) as tail:
        tail.sendall(
            f"GET /streams/orders/messages HTTP/1.1\r\nHost: {address.hostname}\r\n"
            f"Accept: text/event-stream\r\nX-Request-Id: {identity}\r\n"
            f"Authorization: Basic {auth}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:  # bounded by the socket's timeout
            chunk = tail.recv(65536)
            assert chunk, "the tail closed before its headers"
            head += chunk
    return head.decode()


def test_request_ids_sent_are_kept_when_sane() -> None:
    for sane in ("abc", "4bf92f3577b34da6a3ce929d0e0e4736", "trace:1/span=2+x@y.z_-", "a" * 128):
        assert request_id(sane) == sane
    made = {request_id(None) for _ in range(1000)}
    assert len(made) == 1000
    for insane in ("", "a" * 129, "two words", "new\nline", 'quote"', "naïve", "<script>"):
        replaced = request_id(insane)
        assert replaced != insane
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", replaced)


def test_every_answer_carries_its_request_id_and_the_access_log_says_it(tmp_path: Path) -> None:
    with _serving(tmp_path, "--max-body", "4096") as url:
        appended = _append(url, "orders", "one", "two", headers={"X-Request-Id": "trace-42"})
        read = _call(url, "/streams/orders/messages?from=0&limit=1")
        refused_body = b'{"messages": [{"value": "never read"}]}'
        wrong = _call(
            url,
            "/streams/orders",
            data=refused_body,
            auth=base64.b64encode(b"admin:nope").decode(),
        )
        missing = _call(url, "/streams/absent", headers={"X-Request-Id": "bad id"})
        no_route = _call(url, "/nowhere?x=1")
        too_big = _call(url, "/streams/orders", data=b"x" * 5000)
        head = _tail_headers(url, "tail-7")
        assert "\r\nX-Request-Id: tail-7\r\n" in head
    answers = [appended, read, wrong, missing, no_route, too_big]
    assert [a.status for a in answers] == [200, 200, 401, 404, 404, 413]
    assert appended.headers["X-Request-Id"] == "trace-42"
    ids = [a.headers["X-Request-Id"] for a in answers]
    assert len(set(ids)) == len(ids)
    assert all(ids), ids
    assert missing.headers["X-Request-Id"] != "bad id"

    lines = {line["request_id"]: line for line in _access(_log(tmp_path))}
    assert set(ids) | {"tail-7"} <= set(lines)
    append = lines["trace-42"]
    assert append["message"] == "POST /streams/orders 200"
    assert append["level"] == "info"
    expected = {
        "method": "POST",
        "path": "/streams/orders",
        "route": "/streams/{stream}",
        "stream": "orders",
        "status": 200,
        "error": None,
        "messages": 2,
        "user": USER,
        "remote": "127.0.0.1",
        "response_bytes": len(appended.body),
    }
    assert {key: append[key] for key in expected} == expected
    assert append["request_bytes"] == len(b'{"messages": [{"value": "one"}, {"value": "two"}]}')
    assert append["ms"] > 0
    assert lines[ids[1]]["kind"] == "read"
    assert (lines[ids[2]]["status"], lines[ids[2]]["error"], lines[ids[2]]["user"]) == (
        401,
        "unauthenticated",
        None,
    )
    # Refused before their bodies were read: their Content-Length.
    assert lines[ids[2]]["request_bytes"] == len(refused_body)
    assert lines[ids[5]]["request_bytes"] == 5000
    assert lines[ids[4]]["path"] == "/nowhere"  # never the query string
    assert lines[ids[4]]["route"] == "?"
    assert lines[ids[5]]["error"] == "request_entity_too_large"
    assert lines["tail-7"]["kind"] == "tail"


@pytest.mark.parametrize(
    ("arguments", "variables"),
    [
        (("--no-access-log",), {}),
        ((), {"MESSAGEVAULT_ACCESS_LOG": "false"}),
        (("--log-level", "warning"), {}),
    ],
)
def test_the_access_log_can_be_turned_off(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arguments: tuple[str, ...],
    variables: dict[str, str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with _serving(tmp_path, *arguments) as url:
        assert _append(url, "orders", "one").status == 200
    assert _access(_log(tmp_path)) == []
    if "--log-level" not in arguments:
        listening = [line for line in _lines(_log(tmp_path)) if line["message"] == "listening"]
        assert listening[0]["access_log"] is False


def test_a_bad_access_log_setting_is_a_usage_error(tmp_path: Path) -> None:
    for arguments, variables in (
        (["--access-log=yes"], {}),
        ([], {"MESSAGEVAULT_ACCESS_LOG": "perhaps"}),
        (["--metrics-streams", "-1"], {}),
        (["--metrics-streams", "many"], {}),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "messagevault.cli", "serve", *arguments],
            cwd=tmp_path,
            env={**os.environ, **variables},
            capture_output=True,
            timeout=60,
            check=False,
        )
        stderr = done.stderr.decode()
        assert done.returncode == 2, (arguments, stderr)
        assert "Traceback" not in stderr
        assert "--access-log" in stderr or "--metrics-streams" in stderr, stderr
    assert not (tmp_path / "data").exists()


# Secrets ------------------------------------------------------------------------------

WRONG = "wr0ng-Passw0rd-abc"
BOB, BOB_PASSWORD = "bob", "b0b-Passw0rd-qrs"


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _try_everything(url: str) -> list[Answer]:
    """Credentials right, wrong and garbled, and secrets where a careless log would see them."""
    return [
        _append(url, "orders", "one"),
        _call(url, "/streams/orders", auth=_basic(USER, WRONG)),
        _call(url, "/streams/orders", auth=_basic("nobody", WRONG)),
        _call(url, "/streams/orders", auth=None, headers={"Authorization": f"Basic {PASSWORD}"}),
        _call(url, "/streams/orders", auth=None, headers={"Authorization": f"Bearer {PASSWORD}"}),
        _call(url, "/streams/orders", auth=f"{TOKEN}!!"),
        _call(url, "/streams/orders", auth=base64.b64encode(PASSWORD.encode()).decode()),
        _call(url, f"/streams/orders/messages?from=0&password={PASSWORD}"),
        _call(url, f"/streams/orders/messages?from=0&sv=2024&sig={SIG}&se=2030"),
        _call(url, f"/streams?sig={SIG}", auth=_basic(USER, WRONG)),
        _call(url, "/streams/orders"),  # its read access: a folder here, a SAS URL on Azure
    ]


def _secrets() -> list[str]:
    return [
        PASSWORD,
        TOKEN,
        WRONG,
        _basic(USER, WRONG),
        _basic("nobody", WRONG),
        base64.b64encode(PASSWORD.encode()).decode(),
        BOB_PASSWORD,
        _basic(BOB, BOB_PASSWORD),
        SIG,
    ]


def _assert_nowhere(secrets: list[str], log: str, answers: list[Answer]) -> None:
    for secret in secrets:
        assert secret not in log, f"{secret!r} is in the server's log"
        for answer in answers:
            assert secret.encode() not in answer.body, f"{secret!r} in {answer.body!r}"
            assert secret not in str(answer.headers), f"{secret!r} in {answer.headers}"


def test_no_password_or_signature_in_any_log_line_or_answer(tmp_path: Path) -> None:
    """At debug level, with the access log on: every way a secret could leak."""
    with _serving(tmp_path, "--log-level", "debug") as url:
        answers = _try_everything(url)
        add_bob = ["users", "add", BOB, "--claim", "orders:read"]
        added = subprocess.run(
            [sys.executable, "-m", "messagevault.cli", *add_bob],
            input=f"{BOB_PASSWORD}\n".encode(),
            env={**os.environ, "MESSAGEVAULT_STORAGE": f"file:{tmp_path / 'data'}"},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert added.returncode == 0, added.stderr
        for _ in range(100):  # the server reads the users file again within a second
            bob = _call(url, "/streams/orders", auth=_basic(BOB, BOB_PASSWORD))
            if bob.status == 200:
                break
            time.sleep(0.1)
        answers += [bob, _call(url, "/streams/orders", auth=_basic(BOB, WRONG))]
        assert "tail-9" in _tail_headers(url, "tail-9")
        # The tail's leaving is logged at debug, with the tail's request id.
        for _ in range(100):
            if any(
                line.get("request_id") == "tail-9" and "away" in line["message"]
                for line in _lines(_log(tmp_path))
            ):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the tail's leaving was not logged with its request id")
    statuses = [a.status for a in answers]
    assert statuses == [200, 401, 401, 401, 401, 401, 401, 200, 200, 401, 200, 200, 401]
    log = _log(tmp_path).read_text()
    assert len(_access(_log(tmp_path))) >= len(answers)  # the lines were written at all
    _assert_nowhere(_secrets(), log, answers)
    _assert_nowhere([BOB_PASSWORD], added.stdout.decode() + added.stderr.decode(), [])


def test_no_sas_signature_or_account_key_in_the_log_on_azure(
    tmp_path: Path, azurite: Azurite
) -> None:
    storage = f"azure:{azurite.connection_string}"
    account_key = dict(
        part.split("=", 1) for part in azurite.connection_string.split(";") if "=" in part
    )["AccountKey"]
    try:
        with _serving(tmp_path, "--log-level", "debug", storage=storage) as url:
            answers = _try_everything(url)
    finally:  # other tests expect an empty account
        service = AzureStorage.from_connection_string(azurite.connection_string).service
        for container in service.list_containers(name_starts_with=CONTAINER_PREFIX):
            service.delete_container(container.name)
        with contextlib.suppress(ResourceNotFoundError):
            service.delete_container(SYSTEM_CONTAINER)
    info = json.loads(answers[-1].body)
    sas = urllib.parse.parse_qs(urllib.parse.urlsplit(info["read_access"]["location"]).query)
    signature = sas["sig"][0]
    log = _log(tmp_path).read_text()
    sdk_lines = [line for line in _lines(_log(tmp_path)) if line["logger"].startswith("azure.")]
    # A read's storage requests are logged with the id of the request they serve.
    ids = {answer.headers["X-Request-Id"] for answer in answers}
    assert {line.get("request_id") for line in sdk_lines} & ids
    assert signature not in log
    assert urllib.parse.quote(signature, safe="") not in log
    assert account_key not in log
    _assert_nowhere(_secrets(), log, answers)
