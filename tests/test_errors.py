"""One error tree: every code the server sends is a class, documented, and described in OpenAPI.

docs/HTTP.md's error table, the OpenAPI document and ``messagevault.errors``
must list the same codes with the same statuses, and the statuses must be
what a real server answers: a new code, or a changed status, cannot be
forgotten in one of them.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import errors
from messagevault.errors import (
    CorruptData,
    MessageVaultError,
    StreamNotFound,
    UnknownError,
    for_code,
)
from messagevault.server import Limits, StreamHub, create_app
from messagevault.server.app import _status_for
from messagevault.server.openapi import openapi_document
from messagevault.storage import MemoryStorage
from messagevault.wire import error_body, error_from_body

HTTP_MD = Path(__file__).resolve().parent.parent / "docs" / "HTTP.md"
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

# Codes the server answers without raising their class (aiohttp's own
# answers, the content-type check, /ready, the catch-all for bugs); their
# statuses are checked against a live server below.
ANSWERED_DIRECTLY = {
    "not_found",
    "method_not_allowed",
    "request_entity_too_large",
    "unsupported_media_type",
    "not_ready",
    "internal_error",
}


def _documented() -> dict[str, int]:
    """code -> status, from the error table of docs/HTTP.md."""
    text = HTTP_MD.read_text()
    table = text[text.index("| status | `error` codes |") :].split("\n\n", 1)[0]
    codes: dict[str, int] = {}
    for line in table.splitlines()[2:]:
        status, listed = re.fullmatch(r"\| (\d{3}) \| (.*) \|", line).groups()  # type: ignore[union-attr]
        # Codes are the backquoted words outside parentheses (notes may quote words too).
        outside = re.sub(r"\([^)]*\)", "", listed)
        for code in re.findall(r"`([a-z_]+)`", outside):
            assert code not in codes, f"{code} listed twice"
            codes[code] = int(status)
    return codes


def _in_openapi() -> dict[str, int]:
    document = openapi_document()
    codes: dict[str, int] = {}
    for name, response in document["components"]["responses"].items():
        status = int(name.removeprefix("Error"))
        schema = response["content"]["application/json"]["schema"]
        for code in schema["properties"]["error"]["enum"]:
            assert code not in codes, f"{code} listed twice"
            codes[code] = status
    every = document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert sorted(every) == sorted(codes)
    return codes


# Raised by the client itself, never sent by a server.
CLIENT_SIDE = {errors.ServerUnreachable, errors.ProducerClosed, errors.ClientClosed, UnknownError}


def _tree() -> dict[str, type[MessageVaultError]]:
    return {cls.code: cls for cls in errors.error_classes() if cls not in CLIENT_SIDE}


def test_the_error_table_the_openapi_document_and_the_tree_list_the_same_codes() -> None:
    documented = _documented()
    assert documented == _in_openapi()
    assert set(documented) == set(_tree())


def test_each_raised_error_gets_the_documented_status() -> None:
    documented = _documented()
    for code, cls in _tree().items():
        if code not in ANSWERED_DIRECTLY:
            assert _status_for(cls("x")) == documented[code], code


class FailingStorage(MemoryStorage):
    """Memory storage whose stream listing fails with ``failure``, when set."""

    failure: BaseException | None = None

    def list_streams(self) -> list[str]:
        if self.failure is not None:
            raise self.failure
        return super().list_streams()


@pytest.mark.parametrize(
    ("code", "method", "path", "headers", "failure"),
    [
        ("not_found", "GET", "/no-such-route", {}, None),
        ("method_not_allowed", "DELETE", "/streams", {}, None),
        ("request_entity_too_large", "POST", "/streams/orders", {"Content-Length": "5000"}, None),
        ("unsupported_media_type", "POST", "/streams/orders", {"Content-Type": "text/plain"}, None),
        ("not_ready", "GET", "/ready", {}, errors.StorageError("disk gone")),
        ("internal_error", "GET", "/streams", {}, RuntimeError("a bug")),
    ],
)
async def test_codes_answered_directly_come_with_their_documented_status(
    aiohttp_client: MakeClient,
    code: str,
    method: str,
    path: str,
    headers: dict[str, str],
    failure: BaseException | None,
) -> None:
    storage = FailingStorage()
    storage.failure = failure
    client = await aiohttp_client(create_app(StreamHub(storage), Limits(max_body=1024)))
    body = b"x" * 5000 if "Content-Length" in headers else b"text"
    response = await client.request(method, path, data=body, headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (_documented()[code], code)
    error = error_from_body(response.status, await response.read())
    assert type(error) is for_code(code)
    assert error.status == response.status


def test_for_code_gives_back_every_class_of_the_tree() -> None:
    for cls in errors.error_classes():
        if cls is not UnknownError:
            assert for_code(cls.code) is cls
    assert for_code("stream_not_found") is StreamNotFound
    assert issubclass(StreamNotFound, errors.NotFound)  # not found is always NotFound


def test_an_unknown_code_keeps_its_code_and_status() -> None:
    error = error_from_body(418, error_body("teapot", "short and stout"))
    assert isinstance(error, UnknownError)
    assert (error.code, error.status, str(error)) == ("teapot", 418, "short and stout")
    assert for_code("teapot") is type(error)  # one class per code
    assert "teapot" not in _tree()


@pytest.mark.parametrize(
    ("status", "body"),
    [(502, b"<html>Bad Gateway</html>"), (500, b""), (400, b'{"error": 7, "detail": "x"}')],
)
def test_an_answer_not_in_the_error_shape_becomes_an_unknown_error(
    status: int, body: bytes
) -> None:
    error = error_from_body(status, body)
    assert isinstance(error, UnknownError)
    assert (error.code, error.status) == (f"http_{status}", status)
    assert str(error).startswith(f"HTTP {status}")


def test_error_body_round_trips_the_class_and_its_detail() -> None:
    error = error_from_body(400, error_body("corrupt_data", "frame body CRC mismatch at 64"))
    assert type(error) is CorruptData
    assert (str(error), error.status, error.position) == (
        "frame body CRC mismatch at 64",
        400,
        None,
    )
