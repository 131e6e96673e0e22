"""Idempotent publishing over HTTP and in the client library (issue 11, section 1).

The wire: JSON bodies' ``producer``/``sequence`` fields and their bad inputs.
The server (in process, on file storage): a repeated batch is answered with
the first answer's receipts and ``X-Duplicate: true`` and appends nothing;
a gap or a stale sequence is 409 and changes nothing. The client: every
``publish`` travels under a fresh producer id and is sent again through a
lost answer, a reset request, a 503 (``Retry-After`` honoured) and an
in-doubt ``storage_error``, and stored once; ``Producer`` numbers its
batches; ``idempotent=False`` keeps the old rules. Faults come from
``tests.fault_proxy`` in front of a real server on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from messagevault import FileStorage, Reader, encode_batch
from messagevault.cli import main
from messagevault.client import AsyncClient, Client
from messagevault.client import base as client_base
from messagevault.errors import (
    InvalidBatch,
    InvalidInput,
    Overloaded,
    SequenceGap,
    ServerUnreachable,
    StaleSequence,
    StorageError,
)
from messagevault.format import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_VALUE_SIZE,
    NO_PRODUCER,
    PER_MESSAGE_OVERHEAD,
    EncodedBatch,
)
from messagevault.producer import AsyncProducer, MessageFuture, Producer
from messagevault.server import StreamHub, create_app
from messagevault.wire import BATCH_CONTENT_TYPE, DUPLICATE_HEADER, json_append
from messagevault.writer import AppendResult
from tests.fault_proxy import Decision, Fault, FaultProxy
from tests.prometheus_text import sample
from tests.served import ServedApp

TestServer = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[TestServer]]
PRODUCER = uuid.UUID("0f8e5c1a-3b2d-4c6e-9a7f-1e2d3c4b5a69")


def _stored(root: Path, stream: str) -> list[tuple[int, int, bytes]]:
    """(position, sequence, value) of every message of ``stream``, straight from storage."""
    with Reader.open(FileStorage(root), stream) as reader:
        return [(m.position, m.sequence, m.value) for m in reader.read(0)]


def _receipts(result: AppendResult) -> list[tuple[int, int, bytes]]:
    return [(r.position, r.sequence, r.id) for r in result]


# The wire: JSON producer fields ------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"value": "a"}, {"value": "b"}], **fields}).encode()


@pytest.mark.parametrize("text", [str(PRODUCER), PRODUCER.hex, PRODUCER.hex.upper()])
def test_a_json_body_names_its_producer_as_a_uuid_or_32_hex_digits(text: str) -> None:
    batch = json_append(_body(producer=text, sequence=7))
    assert (batch.producer, batch.producer_seq, batch.count) == (PRODUCER.bytes, 7, 2)
    assert json_append(_body(producer=text, sequence=2**63 - 1)).producer_seq == 2**63 - 1


@pytest.mark.parametrize("fields", [{}, {"producer": None, "sequence": None}])
def test_a_json_body_without_a_producer_is_as_before(fields: dict[str, Any]) -> None:
    batch = json_append(_body(**fields))
    assert batch == encode_batch([(b"", b"a"), (b"", b"b")])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"producer": str(PRODUCER)}, '"producer" was given without "sequence"'),
        ({"sequence": 0}, '"sequence" was given without "producer"'),
        ({"producer": None, "sequence": 3}, '"sequence" was given without "producer"'),
        ({"producer": 12, "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": PRODUCER.hex[:-1], "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": PRODUCER.hex + "0", "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": "g" * 32, "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": "{" + str(PRODUCER) + "}", "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": PRODUCER.urn, "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": str(PRODUCER)[:-1] + "-", "sequence": 0}, '"producer" must be a UUID'),
        ({"producer": "0" * 32, "sequence": 0}, '"producer" must not be all zeros'),
        ({"producer": str(uuid.UUID(int=0)), "sequence": 0}, '"producer" must not be all zeros'),
        ({"producer": PRODUCER.hex, "sequence": -1}, '"sequence" must be an integer 0..'),
        ({"producer": PRODUCER.hex, "sequence": 2**63}, '"sequence" must be an integer 0..'),
        ({"producer": PRODUCER.hex, "sequence": 1.0}, '"sequence" must be an integer 0..'),
        ({"producer": PRODUCER.hex, "sequence": True}, '"sequence" must be an integer 0..'),
        ({"producer": PRODUCER.hex, "sequence": "1"}, '"sequence" must be an integer 0..'),
        ({"producer_id": PRODUCER.hex, "sequence": 1}, "unknown fields: producer_id"),
    ],
)
def test_bad_producer_fields_are_refused_naming_the_field(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidBatch, match=match) as caught:
        json_append(_body(**fields))
    assert "\n" not in str(caught.value)


# The server ----------------------------------------------------------------------------


@pytest.fixture
async def server(aiohttp_client: MakeClient, tmp_path: Path) -> TestServer:
    return await aiohttp_client(create_app(StreamHub(FileStorage(tmp_path))))


async def _post(server: TestServer, body: bytes, content_type: str, **headers: str) -> Any:
    return await server.post(
        "/streams/orders", data=body, headers={"Content-Type": content_type, **headers}
    )


async def _state(server: TestServer) -> tuple[int, int]:
    info = await (await server.get("/streams/orders")).json()
    return info["length"], info["messages"]


@pytest.mark.parametrize("minimal", [False, True], ids=["full", "minimal"])
@pytest.mark.parametrize("kind", ["binary", "json"])
async def test_a_repeated_batch_gets_the_first_answer_and_appends_nothing(
    server: TestServer, tmp_path: Path, kind: str, minimal: bool
) -> None:
    prefer = {"Prefer": "return=minimal"} if minimal else {}
    await _post(server, encode_batch([(b"k", b"before")]).frame(), BATCH_CONTENT_TYPE)
    if kind == "binary":
        batch = encode_batch([(b"k", b"one"), (b"k", b"two")]).with_producer(PRODUCER.bytes, 0)
        body, content_type = batch.frame(), BATCH_CONTENT_TYPE
    else:
        body = json.dumps(
            {
                "producer": str(PRODUCER),
                "sequence": 0,
                "messages": [{"value": "one"}, {"value": "two"}],
            }
        ).encode()
        content_type = "application/json"
    first = await _post(server, body, content_type, **prefer)
    assert first.status == 200, await first.text()
    assert DUPLICATE_HEADER not in first.headers
    state = await _state(server)
    for _ in range(2):
        again = await _post(server, body, content_type, **prefer)
        assert again.status == 200, await again.text()
        assert again.headers[DUPLICATE_HEADER] == "true"
        assert await again.read() == await first.read()
        assert ("Preference-Applied" in again.headers) is minimal
    assert await _state(server) == state
    assert [value for _, _, value in _stored(tmp_path, "orders")] == [b"before", b"one", b"two"]
    metrics = await (await server.get("/metrics")).text()
    assert sample(metrics, "messagevault_duplicate_appends_total", stream="orders") == 2
    assert sample(metrics, "messagevault_committed_messages_total", stream="orders") == 3


async def test_a_gap_or_a_stale_sequence_is_409_and_changes_nothing(
    server: TestServer, tmp_path: Path
) -> None:
    def frame(sequence: int, value: bytes) -> bytes:
        return encode_batch([(b"", value)]).with_producer(PRODUCER.bytes, sequence).frame()

    for sequence in (0, 1):
        response = await _post(server, frame(sequence, b"%d" % sequence), BATCH_CONTENT_TYPE)
        assert response.status == 200, await response.text()
    state = await _state(server)
    for sequence, code, detail in [
        (3, "sequence_gap", "2"),
        (0, "stale_sequence", ""),
    ]:
        response = await _post(server, frame(sequence, b"late"), BATCH_CONTENT_TYPE)
        assert response.status == 409, await response.text()
        error = await response.json()
        assert error["error"] == code
        assert detail in error["detail"]
        assert DUPLICATE_HEADER not in response.headers
    body = json.dumps({"producer": PRODUCER.hex, "sequence": 5, "messages": [{"value": "x"}]})
    response = await _post(server, body.encode(), "application/json")
    assert (response.status, (await response.json())["error"]) == (409, "sequence_gap")
    assert await _state(server) == state
    assert [value for _, _, value in _stored(tmp_path, "orders")] == [b"0", b"1"]
    # The producer goes on where it was; a new producer starts anywhere.
    assert (await _post(server, frame(2, b"2"), BATCH_CONTENT_TYPE)).status == 200
    other = encode_batch([(b"", b"new")]).with_producer(uuid.uuid4().bytes, 41).frame()
    assert (await _post(server, other, BATCH_CONTENT_TYPE)).status == 200


@pytest.mark.parametrize(
    "document",
    [
        {"producer": "nope", "sequence": 0, "messages": [{"value": "x"}]},
        {"producer": PRODUCER.hex, "messages": [{"value": "x"}]},
        {"sequence": 0, "messages": [{"value": "x"}]},
        {"producer": PRODUCER.hex, "sequence": -1, "messages": [{"value": "x"}]},
        {"producer": PRODUCER.hex, "seq": 0, "messages": [{"value": "x"}]},
    ],
)
async def test_bad_producer_fields_are_400_and_append_nothing(
    server: TestServer, document: dict[str, Any]
) -> None:
    await _post(server, encode_batch([(b"", b"first")]).frame(), BATCH_CONTENT_TYPE)
    state = await _state(server)
    response = await _post(server, json.dumps(document).encode(), "application/json")
    assert response.status == 400, await response.text()
    error = await response.json()
    assert error["error"] == "invalid_batch"
    assert "\n" not in error["detail"]
    assert await _state(server) == state


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
def test_a_client_hanging_up_mid_body_is_no_server_error(tmp_path: Path, reset: bool) -> None:
    # Served as `messagevault serve` serves (aiohttp's test server cancels
    # the handler of a lost connection instead, which hides this).
    with ServedApp(create_app(StreamHub(FileStorage(tmp_path)))) as served:
        frame = encode_batch([(b"", b"never whole")]).with_producer(PRODUCER.bytes, 0).frame()
        head = (
            f"POST /streams/orders HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {BATCH_CONTENT_TYPE}\r\nContent-Length: {len(frame)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(head.encode() + frame[:-1])
            time.sleep(0.05)  # the handler is reading the body
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        metrics = ""
        for _ in range(100):  # the handler hears of it at once; bounded
            with urllib.request.urlopen(f"{served.url}/metrics", timeout=5) as answer:
                metrics = answer.read().decode()
            if sample(metrics, "messagevault_requests_total", code="client_closed_request"):
                break
            time.sleep(0.01)
    assert sample(metrics, "messagevault_requests_total", code="client_closed_request") == 1
    assert sample(metrics, "messagevault_requests_total", code="internal_error") == 0
    assert "orders" not in FileStorage(tmp_path).list_streams()


# The client, through the fault proxy ---------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedApp]:
    with ServedApp(create_app(StreamHub(FileStorage(tmp_path)))) as app:
        yield app


@pytest.fixture
def proxy(served: ServedApp) -> Iterator[FaultProxy]:
    with FaultProxy(served.port) as fault_proxy:
        yield fault_proxy


async def _publish(kind: str, url: str, values: Any, **options: Any) -> AppendResult:
    """``publish`` to "orders" with the sync client (in a thread) or the async one."""
    if kind == "sync":
        with Client(url, **options) as client:
            return await asyncio.to_thread(client.publish, "orders", values)
    async with AsyncClient(url, **options) as async_client:
        return await async_client.publish("orders", values)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_publish_whose_answer_is_lost_is_sent_again_and_stored_once(
    proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    proxy.force(Fault.DROP_ANSWER, Fault.DROP_ANSWER)
    pairs = [(b"k", b"first"), (b"k", b"second")]
    result = await _publish(kind, proxy.url, pairs)
    assert proxy.stats.count(Fault.DROP_ANSWER) == 2  # committed once, answered the third time
    assert result.duplicate
    stored = _stored(tmp_path, "orders")
    assert [value for _, _, value in stored] == [b"first", b"second"]
    assert [(r.position, r.sequence) for r in result] == [(p, s) for p, s, _ in stored]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_publish_reset_mid_request_is_sent_again_and_stored_once(
    proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    proxy.force(Fault.RESET_REQUEST)
    result = await _publish(kind, proxy.url, [b"only"])
    assert proxy.stats.count(Fault.RESET_REQUEST) == 1
    assert not result.duplicate  # the first try never arrived whole
    assert _stored(tmp_path, "orders") == [(result[0].position, 0, b"only")]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_publish_timed_out_waiting_for_its_answer_is_sent_again(
    proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    # The client stops waiting before the delayed request (and its answer)
    # get through; the first try commits later, or the retry does first:
    # either way the other is the duplicate.
    proxy.force(Decision(Fault.DELAY, 0.6))
    pairs = [(b"", b"slow")]
    result = await _publish(kind, proxy.url, pairs, timeout=0.2)
    assert proxy.stats.count(Fault.DELAY) == 1
    assert proxy.stats.connections >= 2
    assert _stored(tmp_path, "orders") == [(result[0].position, 0, b"slow")]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_non_idempotent_publish_whose_answer_is_lost_is_not_sent_again(
    proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    proxy.force(Fault.DROP_ANSWER)
    with pytest.raises(ServerUnreachable, match="may or may not have been committed"):
        await _publish(kind, proxy.url, [b"once"], idempotent=False)
    assert _stored(tmp_path, "orders") == [(0, 0, b"once")]
    assert proxy.stats.connections == 1


def test_each_publish_goes_under_a_new_producer_id_and_a_given_one_is_kept() -> None:
    settings = client_base.Settings.resolve("http://127.0.0.1:1", None, None, 1, 0)
    batch = encode_batch([(b"", b"x")])
    ids = {client_base.idempotent_batch(settings, batch).producer for _ in range(100)}
    assert len(ids) == 100
    assert all(client_base.idempotent_batch(settings, batch).producer_seq == 0 for _ in range(3))
    mine = batch.with_producer(PRODUCER.bytes, 9)
    assert client_base.idempotent_batch(settings, mine) is mine
    plain = client_base.Settings.resolve("http://127.0.0.1:1", None, None, 1, 0, idempotent=False)
    assert client_base.idempotent_batch(plain, batch) is batch


class _FlakyHub(StreamHub):
    """Answers the first appends with an error: ``Overloaded`` before trying, or
    ``StorageError`` after committing (a commit in doubt that in fact landed)."""

    def __init__(self, root: Path, failures: list[type[Exception]]) -> None:
        super().__init__(FileStorage(root))
        self.failures = failures
        self.calls: list[float] = []

    async def append(self, stream: str, batch: EncodedBatch) -> AppendResult:
        self.calls.append(time.monotonic())
        failure = self.failures.pop(0) if self.failures else None
        if failure is Overloaded:
            raise Overloaded("the queue is full")
        result = await super().append(stream, batch)
        if failure is StorageError:
            raise StorageError("the checkpoint write timed out")
        return result


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_503_is_retried_after_its_retry_after_and_a_landed_commit_answers_once(
    tmp_path: Path, kind: str
) -> None:
    hub = _FlakyHub(tmp_path, [Overloaded, StorageError])
    with ServedApp(create_app(hub)) as served:
        result = await _publish(kind, served.url, [b"v"])
    assert len(hub.calls) == 3
    assert hub.calls[1] - hub.calls[0] >= 1.0  # the server's Retry-After: 1
    assert result.duplicate  # the storage_error answer's commit had landed
    assert _stored(tmp_path, "orders") == [(0, 0, b"v")]


async def test_retries_give_up_with_the_last_error_after_retry_timeout(tmp_path: Path) -> None:
    hub = _FlakyHub(tmp_path, [StorageError] * 100)
    with ServedApp(create_app(hub)) as served:
        # Each answer says Retry-After: 1; a second retry would end past 1.5 s.
        with (
            Client(served.url, retry_timeout=1.5) as client,
            pytest.raises(StorageError, match="checkpoint write timed out"),
        ):
            await asyncio.to_thread(client.publish, "orders", [b"v"])
        async with AsyncClient(served.url, retry_timeout=0) as async_client:
            with pytest.raises(StorageError):
                await async_client.publish("orders", [b"w"])
    assert 3 <= len(hub.calls) < 100  # the sync client's retried at least once
    # Each call was its own producer's batch 0: both are stored, each once.
    assert [value for _, _, value in _stored(tmp_path, "orders")] == [b"v", b"w"]


def test_a_publish_whose_answers_keep_getting_lost_gives_up_in_doubt_stored_once(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.force(*[Fault.DROP_ANSWER] * 50)
    with (
        Client(proxy.url, retry_timeout=0.5) as client,
        pytest.raises(ServerUnreachable, match="may or may not have been committed"),
    ):
        client.publish("orders", [b"in doubt"])
    assert 2 <= proxy.stats.count(Fault.DROP_ANSWER) < 50  # retried, then gave up
    assert _stored(tmp_path, "orders") == [(0, 0, b"in doubt")]


@pytest.mark.parametrize("retry_timeout", [-1.0, float("nan")])
def test_a_bad_retry_timeout_is_refused(retry_timeout: float) -> None:
    with pytest.raises(InvalidInput, match="retry_timeout must be 0 or more seconds"):
        Client("http://127.0.0.1:1", retry_timeout=retry_timeout)


# Producers ---------------------------------------------------------------------------


def test_a_producer_numbers_its_batches_per_stream_under_one_id(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    sent: list[tuple[str, EncodedBatch]] = []

    class Recording(Client):
        def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
            sent.append((stream, batch))
            return super().publish_batch(stream, batch)

    streams = ("orders", "events")
    with Recording(proxy.url) as client, Producer(client, linger=60) as producer:
        futures: dict[str, list[MessageFuture]] = {stream: [] for stream in streams}
        for index in range(4):
            if index % 2 == 0:
                proxy.force(Fault.DROP_ANSWER)  # one of the two batches loses its answer
            for stream in streams:
                futures[stream].append(producer.send(stream, b"%d" % index))
            producer.flush()
        receipts = {s: [f.result(timeout=30) for f in fs] for s, fs in futures.items()}
    assert proxy.stats.count(Fault.DROP_ANSWER) == 2
    assert {batch.producer for _, batch in sent} == {producer.producer_id}
    for stream in streams:
        stored = _stored(tmp_path, stream)
        assert [value for _, _, value in stored] == [b"0", b"1", b"2", b"3"]
        assert [(r.position, r.sequence) for r in receipts[stream]] == [
            (position, sequence) for position, sequence, _ in stored
        ]
        # Each batch went once, or again (the same bytes) after its lost answer.
        assert [batch.producer_seq for name, batch in sent if name == stream][-1] == 3
    assert len(sent) == 8  # the client retried; the producer sent each batch once
    assert sorted(batch.producer_seq for _, batch in sent) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("refusal", [SequenceGap, StaleSequence])
def test_a_producer_batch_refused_for_its_sequence_fails_alone_and_the_lane_goes_on(
    refusal: type[Exception],
) -> None:
    sent: list[EncodedBatch] = []
    failures: list[Exception] = [refusal("expected batch 4, got 5")]

    class Publisher:
        idempotent = True

        def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
            sent.append(batch)
            if failures:
                raise failures.pop(0)
            return AppendResult.of_batch(batch, 0, 0, 0, batch.frame_size)

    with Producer(Publisher(), linger=0) as producer:
        first = producer.send("orders", b"a")
        with pytest.raises(refusal) as caught:
            first.result(timeout=10)
        second = producer.send("orders", b"b")
        second.result(timeout=10)
        third = producer.send("orders", b"c")
        third.result(timeout=10)
    assert any("this is a bug" in note for note in caught.value.__notes__)
    assert sent[0].producer == producer.producer_id
    assert sent[1].producer not in (producer.producer_id, bytes(16))
    assert [b.producer_seq for b in sent] == [0, 0, 1]
    assert sent[2].producer == sent[1].producer


def test_a_producer_on_a_non_idempotent_client_sends_no_producer_id() -> None:
    sent: list[EncodedBatch] = []

    class Publisher:
        def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
            sent.append(batch)
            return AppendResult.of_batch(batch, 0, 0, 0, batch.frame_size)

    with Producer(Publisher(), linger=0) as producer:
        producer.send("orders", b"a").result(timeout=10)
    with Client("http://127.0.0.1:1", idempotent=False) as client:
        assert Producer(client).producer_id == bytes(16)
    assert sent[0].producer == bytes(16)


async def test_an_async_producer_survives_lost_answers_and_stores_once(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    async with (
        AsyncClient(proxy.url) as client,
        AsyncProducer(client, max_batch_messages=3) as producer,
    ):
        futures = []
        for index in range(9):
            if index % 3 == 0:
                proxy.force(Fault.DROP_ANSWER)
            futures.append(await producer.send("orders", b"%d" % index))
            if index % 3 == 2:
                await producer.flush()
        receipts = [await future for future in futures]
    assert proxy.stats.count(Fault.DROP_ANSWER) == 3
    stored = _stored(tmp_path, "orders")
    assert [value for _, _, value in stored] == [b"%d" % i for i in range(9)]
    assert [(r.position, r.sequence) for r in receipts] == [(p, s) for p, s, _ in stored]


def test_threads_publishing_at_once_never_collide(proxy: FaultProxy, tmp_path: Path) -> None:
    errors: list[BaseException] = []
    proxy.force(*[Fault.DROP_ANSWER, Fault.PASS, Fault.RESET_REQUEST] * 4)
    with Client(proxy.url) as client:

        def publish(thread: int) -> None:
            try:
                for index in range(10):
                    client.publish("orders", [b"%d:%d" % (thread, index)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors
    assert proxy.stats.count(Fault.DROP_ANSWER) == 4
    values = sorted(value for _, _, value in _stored(tmp_path, "orders"))
    assert values == sorted(b"%d:%d" % (t, i) for t in range(4) for i in range(10))


# The CLI -----------------------------------------------------------------------------


def test_the_cli_publishes_through_the_idempotent_client(proxy: FaultProxy, tmp_path: Path) -> None:
    # Several batches (--batch-bytes), the first and the last answers lost.
    proxy.force(Fault.DROP_ANSWER, Fault.PASS, Fault.PASS, Fault.DROP_ANSWER)
    values = [f"value {n:03d} " + "x" * 300 for n in range(30)]
    result = CliRunner().invoke(
        main,
        ["publish", "orders", *values, "--url", proxy.url, "--batch-bytes", "1024"],
        env={
            "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
            **dict.fromkeys(["MESSAGEVAULT_STORAGE", "MESSAGEVAULT_USER", "MESSAGEVAULT_PASSWORD"]),
        },
        prog_name="messagevault",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 30 and summary["batches"] > 3
    assert proxy.stats.count(Fault.DROP_ANSWER) == 2
    assert [value for _, _, value in _stored(tmp_path, "orders")] == [v.encode() for v in values]


# Frames at the size limit ------------------------------------------------------------


def _full_frame_pairs() -> list[tuple[bytes, bytes]]:
    """Four messages that would make a v1 frame of exactly MAX_FRAME_SIZE."""
    overhead = FRAME_HEADER_SIZE + PER_MESSAGE_OVERHEAD * 4
    big = bytes(MAX_VALUE_SIZE)
    return [(b"", big), (b"", big), (b"", big), (b"", big[overhead:])]


def test_a_full_frame_is_planned_with_room_for_a_producer_id(
    served: ServedApp, tmp_path: Path
) -> None:
    # The encoder sizes frames for the 32 bytes longer v2 header, so the
    # producer id publish adds can never take a frame over the limit: these
    # four messages become two frames, each under it, committed together.
    batch = encode_batch(_full_frame_pairs())
    assert len(batch.frames) == 2
    settings = client_base.Settings.resolve(served.url, None, None, 30, 0)
    sent = client_base.idempotent_batch(settings, batch)
    assert sent.producer != NO_PRODUCER
    assert sent.frame_size <= 2 * MAX_FRAME_SIZE
    with Client(served.url) as client:
        result = client.publish_batch("orders", batch)
    assert result.message_count == 4
    assert len(_stored(tmp_path, "orders")) == 4


def test_a_producer_leaves_room_for_the_producer_header(served: ServedApp, tmp_path: Path) -> None:
    sent: list[EncodedBatch] = []

    class Recording(Client):
        def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
            sent.append(batch)
            return super().publish_batch(stream, batch)

    with (
        Recording(served.url) as client,
        Producer(client, max_batch_bytes=MAX_FRAME_SIZE, linger=60) as producer,
    ):
        futures = [producer.send("orders", value) for _, value in _full_frame_pairs()]
        producer.flush()
        receipts = [future.result(timeout=30) for future in futures]
    assert all(batch.producer == producer.producer_id for batch in sent)
    assert all(batch.frame_size <= MAX_FRAME_SIZE for batch in sent)
    assert len(sent) == 2  # the last message no longer fits the first frame
    assert [(r.position, r.sequence) for r in receipts] == [
        (position, sequence) for position, sequence, _ in _stored(tmp_path, "orders")
    ]
