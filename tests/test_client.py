"""The client library against real servers: in process (a thread's loop), and `messagevault serve`.

Sync ``Client`` and asyncio ``AsyncClient`` do the same things; each path is
run through both where the two differ in code (requests, paging, follow and
its ways of stopping, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiohttp import web

from messagevault import (
    MAX_BATCH_COUNT,
    AccessDenied,
    CorruptData,
    FileStorage,
    InvalidBatch,
    InvalidPosition,
    InvalidStreamName,
    MemoryStorage,
    Message,
    Reader,
    StreamNotFound,
)
from messagevault.client import AsyncClient, Client
from messagevault.client import base as client_base
from messagevault.errors import (
    Forbidden,
    InternalError,
    InvalidInput,
    MessageVaultError,
    Overloaded,
    RequestTooLarge,
    SequenceGap,
    ServerUnreachable,
    StaleSequence,
    StaleWriter,
    StorageError,
    StreamLocked,
    Unauthenticated,
)
from messagevault.server import Limits, StreamHub, create_app
from messagevault.server.app import HUB
from messagevault.server.auth import Authenticator, Users, save_users
from messagevault.storage.base import ReadAccess, Storage
from messagevault.wire import BATCH_CONTENT_TYPE, error_body
from tests.azurite import Azurite, free_port
from tests.prometheus_text import sample
from tests.serve_process import serve_process as serving
from tests.served import ServedApp
from tests.test_server import GatedStorage

Pairs = list[tuple[bytes, bytes]]


def _serve(
    storage: Storage, limits: Limits | None = None, authenticator: Authenticator | None = None
) -> ServedApp:
    return ServedApp(create_app(StreamHub(storage), limits, authenticator)).start()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedApp]:
    """A server on file storage whose binary reads come in pages of ~1 KB (paging exercised)."""
    server = _serve(FileStorage(tmp_path / "data", fsync="never"), Limits(max_read_bytes=1024))
    yield server
    server.stop()


def _stored(storage: Storage, stream: str) -> list[Message]:
    with Reader.open(storage, stream) as reader:
        return list(reader.read())


def _pairs(messages: list[Message]) -> Pairs:
    return [(m.key, m.value) for m in messages]


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def _async_wait_for(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# Publishing --------------------------------------------------------------------------

BATCHES: list[Pairs] = [
    [(b"OrderPlaced", b'{"id": 1}')],
    [(b"k%d" % i, b"v" * i) for i in range(40)],
    [(b"", b""), (b"\xff\xfe", b"\x00\xff")],
]


def test_publish_returns_the_receipts_a_reader_sees(served: ServedApp, tmp_path: Path) -> None:
    with Client(served.url) as client:
        results = [client.publish("orders", batch) for batch in BATCHES]
    stored = _stored(FileStorage(tmp_path / "data"), "orders")
    receipts = [receipt for result in results for receipt in result]
    assert [(r.position, r.sequence, r.id) for r in receipts] == [
        (m.position, m.sequence, m.id) for m in stored
    ]
    assert _pairs(stored) == [pair for batch in BATCHES for pair in batch]
    assert results[-1].committed_length == stored[-1].next_position
    assert [r.timestamp for r in results] == [
        stored[0].timestamp,
        stored[1].timestamp,
        stored[-1].timestamp,
    ]


async def test_async_publish_returns_the_receipts_a_reader_sees(
    served: ServedApp, tmp_path: Path
) -> None:
    async with AsyncClient(served.url) as client:
        results = [await client.publish("orders", batch) for batch in BATCHES]
    stored = _stored(FileStorage(tmp_path / "data"), "orders")
    receipts = [receipt for result in results for receipt in result]
    assert [(r.position, r.sequence, r.id) for r in receipts] == [
        (m.position, m.sequence, m.id) for m in stored
    ]


class Event(NamedTuple):
    key: str
    value: str


SHAPES: list[tuple[list[Any], Pairs]] = [
    ([(b"k", b"v"), ("text", "caf\u00e9")], [(b"k", b"v"), (b"text", "caf\u00e9".encode())]),
    (
        [b"bare", "bare text", bytearray(b"ba"), memoryview(b"mv")],
        [(b"", b"bare"), (b"", b"bare text"), (b"", b"ba"), (b"", b"mv")],
    ),
    (
        [Message(0, 0, 0, b"copied", b"from a read", 68), Event("ev", "ent")],
        [(b"copied", b"from a read"), (b"ev", b"ent")],
    ),
    (
        [[b"a", b"list"], (b"k", "str value"), b"ab"],
        [(b"a", b"list"), (b"k", b"str value"), (b"", b"ab")],
    ),
]


@pytest.mark.parametrize(("messages", "expected"), SHAPES)
def test_every_message_shape(
    served: ServedApp, tmp_path: Path, messages: list[Any], expected: Pairs
) -> None:
    with Client(served.url) as client:
        client.publish("shapes", messages)
        client.publish("shapes", iter(messages))  # any iterable
    assert _pairs(_stored(FileStorage(tmp_path / "data"), "shapes")) == expected * 2


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one message"),
        ([object()], "message 0 must be a value"),
        ([b"fine", (b"k", b"v", b"extra")], "message 1 must be a value"),
        ([(b"k", 5)], "message 0: value must be"),
        ([(b"k" * 256, b"v")], "message 0: key is 256 bytes"),
        ([b"x"] * (MAX_BATCH_COUNT + 1), f"at most {MAX_BATCH_COUNT} messages"),
    ],
)
def test_bad_batches_raise_invalid_batch_and_send_nothing(
    served: ServedApp, tmp_path: Path, messages: list[Any], match: str
) -> None:
    with Client(served.url) as client:
        with pytest.raises(InvalidBatch, match=match):
            client.publish("orders", messages)
        assert client.streams() == []


# Reading -----------------------------------------------------------------------------


@pytest.fixture
def frames(served: ServedApp) -> list[Message]:
    """A stream of frames of 1, 5, 3, 10 and 2 messages (values of 50 bytes)."""
    with Client(served.url) as client:
        for number, size in enumerate((1, 5, 3, 10, 2)):
            client.publish("orders", [(b"f%d" % number, b"%050d" % i) for i in range(size)])
        messages = list(client.read("orders"))
    assert len(messages) == 21
    return messages


def test_read_from_any_position_with_or_without_limit(
    served: ServedApp, frames: list[Message]
) -> None:
    positions = [m.position for m in frames] + [frames[-1].next_position]
    with Client(served.url) as client:
        for start, position in enumerate(positions):
            assert list(client.read("orders", position)) == frames[start:]
            for limit in (0, 1, 2, 7, 100):
                got = list(client.read("orders", position, limit=limit))
                assert got == frames[start : start + limit], (position, limit)


async def test_async_read_from_any_position_with_or_without_limit(
    served: ServedApp, frames: list[Message]
) -> None:
    positions = [m.position for m in frames] + [frames[-1].next_position]
    async with AsyncClient(served.url) as client:
        for start, position in enumerate(positions):
            assert [m async for m in client.read("orders", position)] == frames[start:]
            for limit in (0, 1, 7, 100):
                got = [m async for m in client.read("orders", position, limit=limit)]
                assert got == frames[start : start + limit], (position, limit)


def test_read_errors_come_before_iteration(served: ServedApp, frames: list[Message]) -> None:
    with Client(served.url) as client:
        with pytest.raises(InvalidPosition):
            client.read("orders", frames[0].position + 1)  # no message starts there
        with pytest.raises(InvalidPosition, match="beyond the end"):
            client.read("orders", frames[-1].next_position + 64)
        with pytest.raises(StreamNotFound):
            client.read("no-such-stream")
        for bad_position in (-1, "0", 1.5):
            with pytest.raises(InvalidInput, match="position must be"):
                client.read("orders", bad_position)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="limit must be"):
            client.read("orders", limit=-1)


async def test_async_read_errors(served: ServedApp, frames: list[Message]) -> None:
    async with AsyncClient(served.url) as client:
        with pytest.raises(InvalidPosition):
            [m async for m in client.read("orders", frames[0].position + 1)]
        with pytest.raises(StreamNotFound):
            await client.info("no-such-stream")


def test_streams_and_info(served: ServedApp, frames: list[Message]) -> None:
    with Client(served.url) as client:
        (listed,) = client.streams()
        info = client.info("orders")
    assert (listed.stream, listed.length, listed.messages) == ("orders", info.length, 21)
    assert info.length == frames[-1].next_position
    assert info.first_write is not None and info.last_write is not None
    assert int(info.first_write.timestamp() * 1000) == frames[0].timestamp
    assert int(info.last_write.timestamp() * 1000) == frames[-1].timestamp
    assert info.read_access is not None and info.read_access.kind == "file"


# Corruption in transit ---------------------------------------------------------------


def _flipping(offset: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that flips one byte of every binary read answer: corruption in transit."""

    @web.middleware
    async def flip(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, web.Response) and response.content_type == BATCH_CONTENT_TYPE:
            body = bytearray(response.body)  # type: ignore[arg-type]
            if body:
                body[offset % len(body)] ^= 0x01
            response.body = bytes(body)
        return response

    return flip


@pytest.mark.parametrize("offset", [10, 70, 150, -1])  # header, slots, value lengths, last value
async def test_bytes_flipped_in_transit_raise_corrupt_data(offset: int) -> None:
    storage = MemoryStorage()
    app = create_app(StreamHub(storage))
    app.middlewares.append(_flipping(offset))
    with ServedApp(app) as served:
        with Client(served.url) as client:
            client.publish("orders", [(b"key", b"value %d" % i) for i in range(30)])
            with pytest.raises(CorruptData):
                list(client.read("orders"))
        async with AsyncClient(served.url) as async_client:
            with pytest.raises(CorruptData):
                [m async for m in async_client.read("orders")]


# Following ---------------------------------------------------------------------------


def _follow_in_thread(
    client: Client, position: int, stop: threading.Event | None = None
) -> tuple[threading.Thread, list[Message], list[BaseException]]:
    seen: list[Message] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            seen.extend(client.follow("orders", position, stop=stop))
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    return thread, seen, errors


@pytest.mark.parametrize("ending", ["stop", "close"])
def test_follow_sees_later_messages_and_ends_on_stop_or_close(
    served: ServedApp, ending: str
) -> None:
    client = Client(served.url)
    start = client.publish("orders", [b"before"]).committed_length
    stop = threading.Event()
    thread, seen, errors = _follow_in_thread(client, start, stop)
    try:
        _wait_for(lambda: bool(served.app[HUB].waiting_reads().get("orders")), "the long poll")
        client.publish("orders", [b"after 1", b"after 2"])
        _wait_for(lambda: len(seen) == 2, "the followed messages")
        client.publish("orders", [b"after 3"])
        _wait_for(lambda: len(seen) == 3, "the third message")
        _wait_for(lambda: bool(served.app[HUB].waiting_reads().get("orders")), "the next long poll")
        # Now waiting (long poll): the ending must cut the wait short.
        if ending == "stop":
            stop.set()
        else:
            client.close()
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        stop.set()
        client.close()
        thread.join(timeout=10)
    assert errors == []
    assert [m.value for m in seen] == [b"after 1", b"after 2", b"after 3"]


def test_follow_rides_out_a_server_restart(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    first = ServedApp(create_app(StreamHub(storage))).start()
    second = ServedApp(create_app(StreamHub(storage)), first.port)
    client = Client(first.url)
    client.publish("orders", [b"before"])
    stop = threading.Event()
    thread, seen, errors = _follow_in_thread(client, 0, stop)
    try:
        _wait_for(lambda: len(seen) == 1, "the first message")
        first.stop()  # ends the long poll; then connections are refused for a while
        second.start()
        client.publish("orders", [b"after"])
        _wait_for(lambda: len(seen) == 2, "the message sent after the restart")
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
        first.stop()
        second.stop()
    assert errors == []
    assert [m.value for m in seen] == [b"before", b"after"]


def test_follow_ends_when_its_iterator_is_closed(served: ServedApp) -> None:
    with Client(served.url) as client:
        client.publish("orders", [b"one", b"two", b"three"])
        follower = client.follow("orders")
        assert isinstance(follower, Generator)
        assert next(follower).value == b"one"
        follower.close()
        with pytest.raises(StopIteration):
            next(follower)
        assert [m.value for m in client.read("orders")] == [b"one", b"two", b"three"]


async def test_async_follow_ends_on_stop_close_and_cancellation(served: ServedApp) -> None:
    client = AsyncClient(served.url)
    try:
        start = (await client.publish("orders", [b"before"])).committed_length
        seen: list[bytes] = []
        stop = asyncio.Event()

        async def consume(follower: AsyncIterator[Message]) -> None:
            async for message in follower:  # each seen as it comes, not at the end
                seen.append(message.value)  # noqa: PERF401

        def waiting() -> bool:
            return bool(served.app[HUB].waiting_reads().get("orders"))

        by_stop = asyncio.ensure_future(consume(client.follow("orders", start, stop=stop)))
        by_cancel = asyncio.ensure_future(consume(client.follow("orders", start)))
        await _async_wait_for(lambda: served.app[HUB].waiting_reads().get("orders") == 2, "polls")
        await client.publish("orders", [b"after"])
        await _async_wait_for(lambda: seen == [b"after", b"after"], "the new message, twice")
        await _async_wait_for(waiting, "the next long polls")
        stop.set()
        await asyncio.wait_for(by_stop, 10)
        by_cancel.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(by_cancel, 10)

        by_close = asyncio.ensure_future(consume(client.follow("orders", start)))
        await _async_wait_for(lambda: len(seen) == 3, "the message once more")
        await _async_wait_for(waiting, "a long poll")
        await client.aclose()
        await asyncio.wait_for(by_close, 10)
    finally:
        await client.aclose()


# Direct readers ----------------------------------------------------------------------


def test_open_reader_reads_file_storage_without_the_server(tmp_path: Path) -> None:
    server = _serve(FileStorage(tmp_path / "data", fsync="never"))
    try:
        with Client(server.url) as client:
            receipts = client.publish("orders", [(b"k", b"v1"), (b"k", b"v2")])
            reader = client.open_reader("orders")
    finally:
        server.stop()
    with reader:  # the server is gone: this reads the folder itself
        assert [(m.position, m.value) for m in reader.read()] == [
            (receipts[0].position, b"v1"),
            (receipts[1].position, b"v2"),
        ]


def test_open_reader_refuses_storage_it_cannot_reach(served: ServedApp) -> None:
    with ServedApp(create_app(StreamHub(MemoryStorage()))) as memory, Client(memory.url) as client:
        client.publish("orders", [b"x"])
        with pytest.raises(InvalidInput, match="cannot be read directly"):
            client.open_reader("orders")


@pytest.fixture
def azure_served(azurite: Azurite) -> Iterator[tuple[ServedApp, Any]]:
    from messagevault.storage.azure import CONTAINER_PREFIX, AzureStorage

    storage = AzureStorage.from_connection_string(azurite.connection_string)
    server = _serve(storage)
    yield server, storage
    server.stop()
    for container in storage.service.list_containers(name_starts_with=CONTAINER_PREFIX):
        storage.service.delete_container(container.name)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_open_reader_on_azure_renews_an_expired_sas_through_the_client(
    azure_served: tuple[ServedApp, Any], kind: str
) -> None:
    served, storage = azure_served
    storage.sas_expiry = timedelta(seconds=2)  # short-lived read access
    with Client(served.url) as client:
        client.publish("orders", [b"one"])
        if kind == "sync":
            reader = client.open_reader("orders")
        else:
            async with AsyncClient(served.url) as async_client:
                reader = await async_client.open_reader("orders")
                first = _access(reader)
                await asyncio.to_thread(_read_after_expiry, reader, client)
        if kind == "sync":
            first = _access(reader)
            await asyncio.to_thread(_read_after_expiry, reader, client)
    renewed = _access(reader)
    reader.close()
    assert first.expires_at is not None and renewed.expires_at is not None
    assert renewed.expires_at > first.expires_at  # a new SAS, fetched through the client
    with pytest.raises(AccessDenied):  # the first one really is refused by storage now
        Reader.from_read_access(first).checkpoint()


def _read_after_expiry(reader: Reader, client: Client) -> None:
    assert [m.value for m in reader.read()] == [b"one"]
    expires_at = _access(reader).expires_at
    assert expires_at is not None
    _wait_for(lambda: time.time() > expires_at + 0.5, "the SAS to expire")
    client.publish("orders", [b"two"])
    assert [m.value for m in reader.read()] == [b"one", b"two"]


def _access(reader: Reader) -> ReadAccess:
    return reader._store.read_access()


# Errors ------------------------------------------------------------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServedApp]:
    storage = FileStorage(tmp_path / "data", fsync="never")
    users = Users()
    users.set_password("writer", "secret")
    users.grant("writer", ["orders:write", "all:read"])
    users.set_password("reader", "secret")
    users.grant("reader", ["orders:read"])
    save_users(storage, users)
    server = _serve(storage, Limits(max_body=4096), Authenticator(storage, reload_interval=60))
    yield server
    server.stop()


def test_errors_are_the_classes_the_server_raised(secured: ServedApp) -> None:
    with Client(secured.url, user="writer", password="secret") as writer:
        writer.publish("orders", [b"x"])
        with pytest.raises(Forbidden, match="may not write"):
            writer.publish("payments", [b"x"])
        with pytest.raises(StreamNotFound) as caught:
            writer.read("no-such-stream")
        assert caught.value.status == 404
        with pytest.raises(RequestTooLarge):
            writer.publish("orders", [b"x" * 5000])
        with pytest.raises(InvalidStreamName):
            writer.publish("Bad_Name", [b"x"])
    with Client(secured.url, user="writer", password="wrong") as stranger:
        with pytest.raises(Unauthenticated) as refused:
            stranger.info("orders")
        assert refused.value.status == 401
    with Client(secured.url, user="reader", password="secret") as reader:
        assert [m.value for m in reader.read("orders")] == [b"x"]
        with pytest.raises(Forbidden):
            reader.publish("orders", [b"y"])


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_batch_over_the_servers_limit_says_what_is_too_large(
    kind: str, tmp_path: Path
) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    server = _serve(storage, Limits(max_body=4096))

    async def publish(messages: list[bytes]) -> None:
        if kind == "sync":
            with Client(server.url) as client:
                await asyncio.to_thread(client.publish, "orders", messages)
        else:
            async with AsyncClient(server.url) as async_client:
                await async_client.publish("orders", messages)

    try:
        with pytest.raises(RequestTooLarge) as one:
            await publish([b"x" * 5000])
        with pytest.raises(RequestTooLarge) as several:
            await publish([b"x" * 3000, b"y" * 3000])
    finally:
        server.stop()
    framed = 96 + 4 + 5000 + 5  # v2 header, slot, value and its length column, CRC
    assert str(one.value).startswith(f"the batch, a single value, is {framed:,} bytes, over")
    assert "4096" in str(one.value)  # the server's own words name its limit
    assert "one value cannot be split" in str(one.value)
    assert "--max-body" in str(one.value)
    assert "the batch of 2 messages is " in str(several.value)
    assert "send fewer messages a batch" in str(several.value)
    assert one.value.status == several.value.status == 413
    assert storage.list_streams() == []


async def test_async_errors_are_the_classes_the_server_raised(secured: ServedApp) -> None:
    async with AsyncClient(secured.url, user="writer", password="wrong") as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.streams()
    async with AsyncClient(secured.url, user="reader", password="secret") as reader:
        with pytest.raises(Forbidden):
            await reader.publish("orders", [b"y"])


def test_settings_come_from_the_environment(
    secured: ServedApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESSAGEVAULT_URL", secured.url)
    monkeypatch.setenv("MESSAGEVAULT_USER", "writer")
    monkeypatch.setenv("MESSAGEVAULT_PASSWORD", "secret")
    with Client() as client:
        assert client.url == secured.url
        assert client.publish("orders", [b"from the environment"]).message_count == 1
    with Client(password="wrong") as overridden, pytest.raises(Unauthenticated):
        overridden.streams()
    monkeypatch.delenv("MESSAGEVAULT_USER")
    with Client() as anonymous, pytest.raises(Unauthenticated, match="needs HTTP Basic"):
        anonymous.streams()
    monkeypatch.delenv("MESSAGEVAULT_URL")
    assert Client().url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"url": "ftp://host"}, "must be http"),
        ({"url": "127.0.0.1:8080"}, "must be http"),
        ({"url": "http://host:99999"}, "bad port"),
        ({"url": "http://[::1"}, "cannot be parsed"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"retries": -1}, "retries must be 0 or more"),
    ],
)
def test_bad_settings_are_refused(arguments: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        Client(**arguments)
    with pytest.raises(InvalidInput, match=match):
        AsyncClient(**arguments)


# Retries -----------------------------------------------------------------------------


def _appends_answered(served: ServedApp, status: int) -> float:
    """How many appends the server answered with ``status``, from its /metrics."""
    with urllib.request.urlopen(f"{served.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sample(
        text, "messagevault_requests_total", route="/streams/{stream}", status=str(status)
    )


def test_an_append_refused_as_overloaded_is_sent_again(tmp_path: Path) -> None:
    storage = GatedStorage(hold=30)
    hub = StreamHub(storage, max_queued_bytes=1, max_queue_wait=0.1)
    with ServedApp(create_app(hub)) as served, Client(served.url, retries=10) as client:
        stalled = threading.Thread(target=client.publish, args=("orders", [b"first"]))
        stalled.start()  # its commit waits for the gate
        assert storage.writes_waiting.acquire(timeout=30)
        queued = threading.Thread(target=client.publish, args=("orders", [b"queued"]))
        queued.start()  # fills the queue
        _wait_for(
            lambda: "orders" in hub._committers and not hub._committers["orders"].has_room,
            "a full queue",
        )
        result: list[Any] = []
        retried = threading.Thread(
            target=lambda: result.append(client.publish("orders", [b"retried"]))
        )
        retried.start()
        _wait_for(lambda: _appends_answered(served, 503) >= 1, "a 503 overloaded")
        storage.gate.set()
        for thread in (stalled, queued, retried):
            thread.join(timeout=30)
        assert result and result[0].message_count == 1
    assert [m.value for m in _stored(storage, "orders")] == [b"first", b"queued", b"retried"]


def test_retries_connection_refused_until_the_server_comes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    storage = FileStorage(tmp_path / "data", fsync="never")
    server = ServedApp(create_app(StreamHub(storage)), port)
    refusals: list[BaseException] = []
    next_delay = client_base.Retries.next_delay

    def start_on_first_refusal(self: Any, failure: BaseException, request: Any) -> Any:
        refusals.append(failure)
        if len(refusals) == 2:
            server.start()  # the server comes up after two refused tries
        return next_delay(self, failure, request)

    monkeypatch.setattr(client_base.Retries, "next_delay", start_on_first_refusal)
    try:
        with Client(server.url, retries=5) as client:
            result = client.publish("orders", [b"patient"])
        assert result.message_count == 1
        assert [type(f) for f in refusals] == [client_base.NotSent] * 2
    finally:
        server.stop()


@pytest.mark.parametrize("reached", [True, False])
@pytest.mark.parametrize("idempotent", [True, False])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_retries_are_bounded(
    kind: str, idempotent: bool, reached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By ``retries``; an idempotent append that may have reached the server by ``retry_timeout``.

    ``reached``: a server that reads every request and drops the connection
    (the outcome in doubt); otherwise nothing listens (refused: nothing sent).
    """
    decisions: list[float | None] = []
    next_delay = client_base.Retries.next_delay

    def recorded(self: Any, failure: BaseException, request: Any) -> Any:
        decisions.append(next_delay(self, failure, request))
        return decisions[-1]

    monkeypatch.setattr(client_base.Retries, "next_delay", recorded)
    # Small bounds keep this quick; 1 s leaves room for at least 3 retries
    # (backoff of at most 0.1 + 0.2 + 0.4 s).
    settings: dict[str, Any] = {"retries": 1, "retry_timeout": 1.0, "idempotent": idempotent}
    calls: list[str] = []
    with contextlib.ExitStack() as stack:
        if reached:
            url = stack.enter_context(ServedApp(_dropping_app(calls, drops=10**6))).url
        else:
            url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        if kind == "sync":
            with Client(url, **settings) as client, pytest.raises(ServerUnreachable):
                await asyncio.to_thread(client.publish, "orders", [b"x"])
        else:
            async with AsyncClient(url, **settings) as async_client:
                with pytest.raises(ServerUnreachable):
                    await async_client.publish("orders", [b"x"])
    assert decisions[-1] is None and None not in decisions[:-1]
    if idempotent and reached:  # a deadline, not the count, ends it: more tries than ``retries``
        assert 3 < len(decisions) < 100
    elif reached:  # a lost non-idempotent append is never sent again
        assert len(decisions) == 1
    else:
        assert len(decisions) == 2  # the first try and 1 retry


def _dropping_app(calls: list[str], drops: int) -> web.Application:
    """Drops the connection of the first ``drops`` requests after reading them, then answers."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls.append(request.method)
        if len(calls) <= drops:
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never sent: the connection is gone
        return web.Response(
            body=error_body("stream_not_found", "no stream 'orders'"),
            status=404,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_lost_read_is_retried_but_a_lost_non_idempotent_append_is_not(kind: str) -> None:
    calls: list[str] = []
    with ServedApp(_dropping_app(calls, drops=1)) as served:
        if kind == "sync":
            with Client(served.url, idempotent=False) as client:
                with pytest.raises(StreamNotFound):  # the second try's answer
                    await asyncio.to_thread(client.info, "orders")
                calls.clear()
                with pytest.raises(ServerUnreachable, match="may or may not"):
                    await asyncio.to_thread(client.publish, "orders", [b"x"])
        else:
            async with AsyncClient(served.url, idempotent=False) as async_client:
                with pytest.raises(StreamNotFound):
                    await async_client.info("orders")
                calls.clear()
                with pytest.raises(ServerUnreachable, match="may or may not"):
                    await async_client.publish("orders", [b"x"])
    assert calls == ["POST"]  # sent once: it may have been committed


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_lost_idempotent_append_is_sent_again(kind: str) -> None:
    calls: list[str] = []
    with ServedApp(_dropping_app(calls, drops=1)) as served:
        if kind == "sync":
            with Client(served.url) as client, pytest.raises(StreamNotFound):
                await asyncio.to_thread(client.publish, "orders", [b"x"])  # the second try's answer
        else:
            async with AsyncClient(served.url) as async_client:
                with pytest.raises(StreamNotFound):
                    await async_client.publish("orders", [b"x"])
    assert calls == ["POST", "POST"]  # safe: the batch carries a producer id


@pytest.mark.parametrize(
    ("failure", "idempotent", "retried"),
    [
        (client_base.NotSent("refused"), False, True),
        (client_base.Lost("reset"), True, True),
        (client_base.Lost("reset"), False, False),
        (Overloaded, False, True),
        (StorageError, False, False),  # the commit may have landed
        (StorageError, True, True),
        (StreamNotFound, True, False),
        ("http_503", True, True),  # a proxy's 503
        ("http_503", False, False),
    ],
)
def test_retry_decisions(failure: Any, idempotent: bool, retried: bool) -> None:
    if isinstance(failure, type) and issubclass(failure, MessageVaultError):
        answer = client_base.Answer(
            503 if failure.retriable else 404, {}, error_body(failure.code, "x")
        )
        failure = client_base.answered_error(answer)
    elif isinstance(failure, str):
        failure = client_base.answered_error(client_base.Answer(503, {}, b"<html/>"))
    request = client_base.Request("GET" if idempotent else "POST", "/", {}, idempotent=idempotent)
    assert client_base.retriable(failure, request) is retried


def _misanswering(
    storage: Storage, posts: list[int], status: int, code: str, *, times: int, commit: bool
) -> ServedApp:
    """A real server whose first ``times`` appends are answered ``status`` ``code``.

    With ``commit``, each of them is committed first (its true answer lost,
    as when a takeover or a failing storage hides that the batch landed).
    """

    @web.middleware
    async def misanswer(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        posts.append(1)
        if len(posts) > times:
            return await handler(request)
        if commit:
            committed = await handler(request)
            assert committed.status == 200
        return web.Response(
            status=status,
            body=error_body(code, f"made up: {code}"),
            content_type="application/json",
        )

    app = create_app(StreamHub(storage))
    app.middlewares.insert(0, misanswer)
    return ServedApp(app).start()


async def _publish(kind: str, url: str, **settings: Any) -> Any:
    if kind == "sync":
        with Client(url, **settings) as client:
            return await asyncio.to_thread(client.publish, "orders", [b"once"])
    async with AsyncClient(url, **settings) as async_client:
        return await async_client.publish("orders", [b"once"])


@pytest.mark.parametrize(
    ("status", "code", "commit"),
    [
        (409, "stale_writer", False),
        (409, "stale_writer", True),  # committed as another writer took over
        (409, "stream_locked", False),
        (500, "internal_error", True),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_idempotent_append_is_sent_again_after_a_writer_change_or_a_500(
    kind: str, status: int, code: str, commit: bool, tmp_path: Path
) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    posts: list[int] = []
    server = _misanswering(storage, posts, status, code, times=1, commit=commit)
    try:
        result = await _publish(kind, server.url, retry_timeout=10)
    finally:
        server.stop()
    assert len(posts) == 2
    assert result.duplicate is commit  # the retry was answered with the first commit's receipts
    assert [(m.value, m.position) for m in _stored(storage, "orders")] == [(b"once", 0)]


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(409, "stale_writer", StaleWriter), (500, "internal_error", InternalError)],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_non_idempotent_append_in_doubt_is_not_sent_again_and_says_so(
    kind: str, status: int, code: str, error: type[MessageVaultError], tmp_path: Path
) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    posts: list[int] = []
    server = _misanswering(storage, posts, status, code, times=1, commit=True)
    try:
        with pytest.raises(error) as raised:
            await _publish(kind, server.url, idempotent=False)
    finally:
        server.stop()
    assert posts == [1]
    assert raised.value.__notes__ == ["the append may or may not have been committed"]
    assert [m.value for m in _stored(storage, "orders")] == [b"once"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_idempotent_append_given_up_on_storage_errors_says_it_may_have_landed(
    kind: str, tmp_path: Path
) -> None:
    """Every try is committed (then duplicates) but answered 503 storage_error."""
    storage = FileStorage(tmp_path / "data", fsync="never")
    posts: list[int] = []
    server = _misanswering(storage, posts, 503, "storage_error", times=1000, commit=True)
    try:
        with pytest.raises(StorageError, match="made up") as raised:
            await _publish(kind, server.url, retry_timeout=1.0)
    finally:
        server.stop()
    assert len(posts) > 1  # retried until retry_timeout, then given up
    assert raised.value.__notes__ == ["the append may or may not have been committed"]
    assert [m.value for m in _stored(storage, "orders")] == [b"once"]


def _append_failure(failure: type[MessageVaultError] | int) -> Any:
    if isinstance(failure, int):  # a proxy's page, not the error shape
        return client_base.answered_error(client_base.Answer(failure, {}, b"<html/>"))
    status = {InternalError: 500, RequestTooLarge: 413}.get(failure, 409)
    return client_base.answered_error(client_base.Answer(status, {}, error_body(failure.code, "x")))


@pytest.mark.parametrize(
    ("failure", "retried"),
    [
        (StaleWriter, True),  # the writer changed as the batch went in: it may have landed
        (StreamLocked, True),  # a takeover under way
        (InternalError, True),  # the server may have committed it
        (500, True),
        (SequenceGap, False),
        (StaleSequence, False),
        (RequestTooLarge, False),
    ],
)
def test_append_retry_decisions(failure: type[MessageVaultError] | int, retried: bool) -> None:
    """An append with a producer id is retried after a 500 or a writer change; others never."""
    error = _append_failure(failure)
    appending = client_base.Request("POST", "/", {}, idempotent=True, append=True)
    assert client_base.retriable(error, appending) is retried
    without_id = client_base.Request("POST", "/", {}, idempotent=False, append=True)
    assert client_base.retriable(error, without_id) is False
    reading = client_base.Request("GET", "/", {})
    assert client_base.retriable(error, reading) is False
    settings = client_base.Settings.resolve(None, None, None, 30, 3, retry_timeout=5)
    retries = client_base.Retries.for_request(settings, appending)
    assert (retries.next_delay(error, appending) is not None) is retried


def test_an_idempotent_append_nothing_of_which_was_sent_gives_up_after_the_retry_count() -> None:
    # Refused before sending: nothing is in doubt, so a server that is not
    # running is reported after ``retries``, not after ``retry_timeout``.
    appending = client_base.Request("POST", "/", {}, idempotent=True, append=True)
    settings = client_base.Settings.resolve(None, None, None, 30, 3, retry_timeout=600)
    retries = client_base.Retries.for_request(settings, appending)
    refused = client_base.NotSent("connection refused")
    assert [retries.next_delay(refused, appending) is not None for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    # Once a try may have reached the server, the deadline alone bounds it.
    retries = client_base.Retries.for_request(settings, appending)
    lost = client_base.Lost("connection reset")
    assert retries.next_delay(lost, appending) is not None
    assert all(retries.next_delay(refused, appending) is not None for _ in range(10))


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    retries = client_base.Retries(10)
    ceilings = []
    for attempt in range(8):
        retries.attempt = attempt
        ceiling = min(retries.cap, retries.base * 2**attempt)
        delays = {retries.delay() for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
        ceilings.append(ceiling)
    assert ceilings == sorted(ceilings) and ceilings[-1] == retries.cap
    assert retries.delay(retry_after=5) >= 5
    assert retries.delay(retry_after=3600) <= retries.retry_after_cap


# Against `messagevault serve` ----------------------------------------------------------


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[str]:
    with serving(tmp_path / "data", "app", "secret", fsync="always") as url:
        yield url


async def test_against_a_serve_process(serve_process: str, tmp_path: Path) -> None:
    url = serve_process
    with Client(url, user="app", password="secret") as client:
        result = client.publish("orders", [(f"k{i}", f"value {i}") for i in range(1000)])
        stop = threading.Event()
        followed: list[Message] = []

        def follow() -> None:
            for message in client.follow("orders", result.committed_length, stop=stop):
                followed.append(message)
                stop.set()

        thread = threading.Thread(target=follow)
        thread.start()
        async with AsyncClient(url, user="app", password="secret") as async_client:
            late = await async_client.publish("orders", [b"late"])
            assert [m.value async for m in async_client.read("orders", late[0].position)] == [
                b"late"
            ]
        thread.join(timeout=30)
        assert [m.value for m in followed] == [b"late"]
        messages = list(client.read("orders"))
        with client.open_reader("orders") as reader:
            direct = list(reader.read())
        with Client(url, user="app", password="wrong") as stranger, pytest.raises(Unauthenticated):
            stranger.info("orders")
    assert messages == direct
    assert [(r.position, r.sequence, r.id) for r in [*result, *late]] == [
        (m.position, m.sequence, m.id) for m in direct
    ]


def test_follow_works_with_a_server_that_holds_long_polls_briefly(tmp_path: Path) -> None:
    """The client asks for 30 s waits; a server with --max-wait 1 shortens them, not refuses."""
    server = _serve(FileStorage(tmp_path / "data", fsync="never"), Limits(max_wait=1))
    client = Client(server.url)
    stop = threading.Event()
    try:
        start = client.publish("orders", [b"before"]).committed_length
        thread, seen, errors = _follow_in_thread(client, start, stop)
        _wait_for(lambda: bool(server.app[HUB].waiting_reads().get("orders")), "the long poll")
        client.publish("orders", [b"after"])
        _wait_for(lambda: len(seen) == 1, "the followed message")
        stop.set()
        thread.join(timeout=10)
    finally:
        stop.set()
        client.close()
        server.stop()
    assert errors == []
    assert [m.value for m in seen] == [b"after"]


async def test_a_closed_client_raises_client_closed(served: ServedApp) -> None:
    from messagevault.errors import ClientClosed

    client = Client(served.url)
    client.close()
    with pytest.raises(ClientClosed):
        client.streams()
    async_client = AsyncClient(served.url)
    await async_client.aclose()
    with pytest.raises(ClientClosed):
        await async_client.streams()
