"""``Client.read_records`` and ``AsyncClient.read_records``: the JSON read path, against a server.

The records must be the HTTP API's, field for field (``wire.message_record``
of what ``read`` gives), across pages (the page size is made small here so
that a few messages take several), with ``limit``, and when the caller stops
early; bad arguments and answers raise before anything is handed out.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from messagevault import CorruptData, FileStorage, InvalidPosition, Message, StreamNotFound
from messagevault.client import AsyncClient, Client
from messagevault.client import base as client_base
from messagevault.client.base import Answer, records_ahead, records_of
from messagevault.errors import InvalidInput
from messagevault.server import Limits, StreamHub, create_app
from messagevault.wire import error_body, message_record
from tests.served import ServedApp

PAGE = 4  # records a page, instead of 10,000


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedApp]:
    monkeypatch.setattr(client_base, "RECORDS_PAGE", PAGE)
    server = ServedApp(create_app(StreamHub(FileStorage(tmp_path, fsync="never")))).start()
    yield server
    server.stop()


@pytest.fixture
def stored(served: ServedApp) -> list[Message]:
    """11 messages in frames of 3, 5 and 3: text, a key and a value that are not UTF-8."""
    with Client(served.url) as client:
        client.publish("orders", [(b"k%d" % i, b"caf\xc3\xa9 %d" % i) for i in range(3)])
        client.publish("orders", [(b"\xff\xfe", b"\x00\xff binary"), *[(b"", b"v")] * 4])
        client.publish("orders", [(b"last", b'{"id": %d}' % i) for i in range(3)])
        messages = list(client.read("orders"))
    assert len(messages) == 11
    return messages


def _records(messages: list[Message]) -> list[list[tuple[str, Any]]]:
    # As item lists: equal only with the same fields in the same order.
    return [list(message_record(m).items()) for m in messages]


def _items(records: list[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    return [list(record.items()) for record in records]


def test_records_are_the_http_records_across_pages_and_limits(
    served: ServedApp, stored: list[Message]
) -> None:
    positions = [m.position for m in stored] + [stored[-1].next_position]
    with Client(served.url) as client:
        for start, position in enumerate(positions):
            got = list(client.read_records("orders", position))
            assert _items(got) == _records(stored[start:]), position
            for limit in (0, 1, PAGE, PAGE + 1, 100):
                got = list(client.read_records("orders", position, limit=limit))
                assert _items(got) == _records(stored[start : start + limit]), (position, limit)


async def test_async_records_are_the_http_records_across_pages_and_limits(
    served: ServedApp, stored: list[Message]
) -> None:
    async with AsyncClient(served.url) as client:
        for start in (0, 3, 10, 11):
            position = stored[start].position if start < len(stored) else stored[-1].next_position
            got = [r async for r in client.read_records("orders", position)]
            assert _items(got) == _records(stored[start:]), position
            for limit in (0, 1, PAGE + 1, 100):
                got = [r async for r in client.read_records("orders", position, limit=limit)]
                assert _items(got) == _records(stored[start : start + limit]), (position, limit)


def test_stopping_early_leaves_the_client_usable(served: ServedApp, stored: list[Message]) -> None:
    with Client(served.url) as client:
        records = client.read_records("orders")
        first = next(records)  # the next page is on its way meanwhile
        records.close()
        assert first == message_record(stored[0])
        # The answer asked for ahead was read to its end: its connection is back, not leaked.
        assert not any(pool._busy for pool in client._pools.values())
        assert len(list(client.read_records("orders"))) == len(stored)


async def test_async_stopping_early_leaves_the_client_usable(
    served: ServedApp, stored: list[Message]
) -> None:
    async with AsyncClient(served.url) as client:
        records = client.read_records("orders")
        first = await anext(records)
        await records.aclose()
        assert first == message_record(stored[0])
        assert len([r async for r in client.read_records("orders")]) == len(stored)


def test_read_records_errors_come_before_iteration(
    served: ServedApp, stored: list[Message]
) -> None:
    with Client(served.url) as client:
        with pytest.raises(InvalidPosition):
            client.read_records("orders", stored[0].position + 1)  # no message starts there
        with pytest.raises(StreamNotFound):
            client.read_records("no-such-stream")
        for bad_position in (-1, "0", 1.5):
            with pytest.raises(InvalidInput, match="position must be"):
                client.read_records("orders", bad_position)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="limit must be"):
            client.read_records("orders", limit=-1)


async def test_async_read_records_errors(served: ServedApp, stored: list[Message]) -> None:
    async with AsyncClient(served.url) as client:
        with pytest.raises(InvalidPosition):
            [r async for r in client.read_records("orders", stored[0].position + 1)]
        with pytest.raises(StreamNotFound):
            [r async for r in client.read_records("no-such-stream")]
        with pytest.raises(InvalidInput, match="limit must be"):
            [r async for r in client.read_records("orders", limit=-1)]


@pytest.mark.parametrize(
    ("headers", "body", "match"),
    [
        ({}, b'{"position": 0}\n', "lacks its X-Next"),
        ({"X-Next": "x"}, b'{"position": 0}\n', "lacks its X-Next"),
        ({"X-Next": "9"}, b'{"position": 0}\nnot json\n', "NDJSON answer is not JSON"),
        ({"X-Next": "9"}, b'{"position": 0}\n[1]\n', "a line that is not a record"),
    ],
)
def test_answers_that_are_not_records_raise_corrupt_data(
    headers: dict[str, str], body: bytes, match: str
) -> None:
    answer = Answer(200, headers, body)
    with pytest.raises(CorruptData, match=match):
        records_ahead(answer)
        records_of(answer)


def test_a_page_asked_ahead_that_fails_is_asked_again_with_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_base, "RECORDS_PAGE", PAGE)
    reads: list[int] = []

    @web.middleware
    async def second_read_overloaded(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.headers.get("Accept") == "application/x-ndjson":
            reads.append(int(request.query["from"]))
            if len(reads) == 2:  # the page asked for ahead
                return web.Response(
                    status=503,
                    body=error_body("overloaded", "busy"),
                    content_type="application/json",
                    headers={"Retry-After": "0"},
                )
        return await handler(request)

    app = create_app(StreamHub(FileStorage(tmp_path, fsync="never")))
    app.middlewares.insert(0, second_read_overloaded)
    with ServedApp(app) as served, Client(served.url) as client:
        client.publish("orders", [(b"k", b"%d" % i) for i in range(10)])
        expected = [message_record(m) for m in client.read("orders")]
        assert list(client.read_records("orders")) == expected
    assert reads[1] == reads[2]  # the failed page, asked again
    assert len(reads) == 5  # pages of 4, 4 (twice), 2, and the empty end


def test_a_server_that_allows_smaller_pages_is_read_in_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_base, "RECORDS_PAGE", PAGE)
    hub = StreamHub(FileStorage(tmp_path, fsync="never"))
    with ServedApp(create_app(hub, Limits(max_read_messages=PAGE - 1))) as server:
        with Client(server.url) as client:
            client.publish("orders", [(b"k", b"%d" % i) for i in range(11)])
            values = [record["value"] for record in client.read_records("orders")]
            assert values == [str(i) for i in range(11)]
            assert len(list(client.read_records("orders", limit=PAGE + 1))) == PAGE + 1
        # Asked for no limit, the server's page stays within its maximum.
        with urllib.request.urlopen(f"{server.url}/streams/orders/messages") as answer:
            assert len(json.loads(answer.read())["messages"]) == PAGE - 1


async def test_async_a_server_that_allows_smaller_pages_is_read_in_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_base, "RECORDS_PAGE", PAGE)
    hub = StreamHub(FileStorage(tmp_path, fsync="never"))
    with ServedApp(create_app(hub, Limits(max_read_messages=PAGE - 1))) as server:
        async with AsyncClient(server.url) as client:
            await client.publish("orders", [(b"k", b"%d" % i) for i in range(11)])
            values = [record["value"] async for record in client.read_records("orders")]
            assert values == [str(i) for i in range(11)]
            records = [r async for r in client.read_records("orders", limit=PAGE + 1)]
            assert len(records) == PAGE + 1
