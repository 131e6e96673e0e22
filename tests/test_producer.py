"""Producer and AsyncProducer: batching, order, limits, failures, bounded memory.

Most tests publish through real writers on real files (``StoragePublisher``),
which keeps them fast and exact; tests/test_client.py's server-backed cases
and ``test_producer_through_a_server`` below cover the same path over HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messagevault import FileStorage, InvalidBatch, InvalidInput, Overloaded, Reader, Writer
from messagevault.errors import InvalidStreamName, StorageError
from messagevault.format import MAX_VALUE_SIZE, EncodedBatch
from messagevault.producer import AsyncProducer, MessageFuture, Producer, ProducerClosed
from messagevault.writer import AppendResult


class StoragePublisher:
    """Publishes batches with real writers (one per stream); records each batch's size.

    ``fail_calls`` makes those publish calls (0-based, in call order) raise
    ``StorageError``; ``gate``, when given, holds every call until it is set.
    """

    def __init__(self, storage: FileStorage, fail_calls: frozenset[int] = frozenset()) -> None:
        self.storage = storage
        self.writers: dict[str, Writer] = {}
        self.batches: dict[str, list[int]] = defaultdict(list)
        self.fail_calls = fail_calls
        self.calls = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()

    def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        with self._lock:
            call, self.calls = self.calls, self.calls + 1
            self.batches[stream].append(batch.count)
            if call in self.fail_calls:
                raise StorageError(f"failed on purpose (call {call})")
            writer = self.writers.get(stream)
            if writer is None:
                writer = self.writers[stream] = Writer.open(self.storage, stream)
            return writer.append_batches([batch])[0]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class AsyncStoragePublisher:
    def __init__(self, publisher: StoragePublisher) -> None:
        self.publisher = publisher

    async def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
        await asyncio.sleep(0)  # let sends interleave, as a network round trip would
        return self.publisher.publish_batch(stream, batch)


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[StoragePublisher]:
    publisher = StoragePublisher(FileStorage(tmp_path / "data"))
    yield publisher
    publisher.close()


def _stored(publisher: StoragePublisher, stream: str) -> list[tuple[int, int, bytes, bytes, bytes]]:
    with Reader.open(publisher.storage, stream) as reader:
        return [(m.position, m.sequence, m.id, m.key, m.value) for m in reader.read()]


def _receipts(futures: list[MessageFuture], keys: list[bytes], values: list[bytes]) -> list[object]:
    return [
        (r.position, r.sequence, r.id, k, v)
        for r, k, v in zip((f.result(10) for f in futures), keys, values, strict=True)
    ]


def test_sends_arrive_in_order_per_stream_in_few_batches(publisher: StoragePublisher) -> None:
    sent: dict[str, tuple[list[MessageFuture], list[bytes], list[bytes]]] = {
        "orders": ([], [], []),
        "billing": ([], [], []),
    }
    with Producer(publisher, max_batch_messages=100) as producer:
        for i in range(1000):
            stream = "orders" if i % 3 else "billing"
            key, value = f"k{i % 7}".encode(), f"value {i}".encode()
            futures, keys, values = sent[stream]
            futures.append(producer.send(stream, value, key=key))
            keys.append(key)
            values.append(value)
        producer.flush()
    for stream, (futures, keys, values) in sent.items():
        assert _receipts(futures, keys, values) == _stored(publisher, stream)
        assert sum(publisher.batches[stream]) == len(futures)
        assert max(publisher.batches[stream]) <= 100
    # Batching happened: far fewer requests than messages.
    assert publisher.calls <= 40


def test_batches_respect_the_byte_limit(publisher: StoragePublisher) -> None:
    value = b"x" * 1000
    with Producer(publisher, max_batch_bytes=10_000, linger=60) as producer:
        futures = [producer.send("orders", value) for _ in range(50)]
    # 64-byte header, then 1,009 bytes a message: 9 fit in 10,000.
    assert publisher.batches["orders"] == [9] * 5 + [5]
    assert [f.result().sequence for f in futures] == list(range(50))


def test_a_batch_full_by_bytes_goes_without_waiting_for_linger(
    publisher: StoragePublisher,
) -> None:
    with Producer(publisher, max_batch_bytes=2000, linger=60) as producer:
        first = producer.send("orders", b"x" * 1500)
        producer.send("orders", b"y" * 1500)  # does not fit: the first batch is full
        assert first.result(timeout=30).sequence == 0  # sent although linger is a minute


def test_a_batch_full_by_count_goes_without_waiting_for_linger(
    publisher: StoragePublisher,
) -> None:
    with Producer(publisher, max_batch_messages=3, linger=60) as producer:
        futures = [producer.send("orders", b"v") for _ in range(3)]
        assert futures[2].result(timeout=30).sequence == 2


def test_messages_sent_while_a_batch_is_in_flight_go_in_the_next(
    publisher: StoragePublisher,
) -> None:
    publisher.gate = threading.Event()
    with Producer(publisher, linger=0) as producer:
        first = producer.send("orders", b"first")
        assert publisher.entered.acquire(timeout=10)  # in flight, held
        later = [producer.send("orders", f"later {i}") for i in range(3)]
        publisher.gate.set()
    assert [f.result().sequence for f in (first, *later)] == [0, 1, 2, 3]
    assert publisher.batches["orders"] == [1, 3]
    assert [v for *_, v in _stored(publisher, "orders")] == [
        b"first",
        b"later 0",
        b"later 1",
        b"later 2",
    ]


def test_linger_holds_a_small_batch_until_flush(publisher: StoragePublisher) -> None:
    with Producer(publisher, linger=60) as producer:
        future = producer.send("orders", "one")
        assert not future.done()
        assert publisher.calls == 0  # nothing is sent before the batch fills or lingers out
        producer.flush(timeout=10)
        assert future.done()
        assert future.result().sequence == 0
        assert future.exception() is None


def test_without_linger_a_message_goes_without_flush(publisher: StoragePublisher) -> None:
    with Producer(publisher, linger=0) as producer:
        assert producer.send("orders", b"now").result(timeout=10).position == 0


def test_a_failed_batch_fails_exactly_its_own_futures(publisher: StoragePublisher) -> None:
    publisher.fail_calls = frozenset({1})
    with Producer(publisher, max_batch_messages=10, linger=60) as producer:
        futures = [producer.send("orders", f"m{i}") for i in range(30)]
    outcomes = [f.exception() for f in futures]
    assert all(isinstance(e, StorageError) for e in outcomes[10:20])
    assert outcomes[:10] == [None] * 10
    assert outcomes[20:] == [None] * 10
    with pytest.raises(StorageError, match="on purpose"):
        futures[15].result()
    # Later batches still went, in order, after the gap.
    assert [v for *_, v in _stored(publisher, "orders")] == [
        f"m{i}".encode() for i in (*range(10), *range(20, 30))
    ]


def test_done_callbacks_run_with_the_message_future(publisher: StoragePublisher) -> None:
    seen: list[int] = []
    with Producer(publisher) as producer:
        future = producer.send("orders", b"v")
        future.add_done_callback(lambda f: seen.append(f.result().sequence))
    assert seen == [0]


def test_a_full_buffer_raises_overloaded_without_blocking(publisher: StoragePublisher) -> None:
    publisher.gate = threading.Event()
    producer = Producer(
        publisher,
        max_batch_bytes=2000,
        max_buffered_bytes=4000,
        linger=0,
        block=False,
    )
    try:
        first = producer.send("orders", b"x" * 1500)
        assert publisher.entered.acquire(timeout=10)  # the first batch is in flight, held
        second = producer.send("orders", b"x" * 1500)
        with pytest.raises(Overloaded, match="max_buffered_bytes"):
            producer.send("orders", b"x" * 1500)
        assert publisher.calls == 0
    finally:
        publisher.gate.set()
        producer.close()
    assert first.result().sequence == 0
    assert second.result().sequence == 1
    assert len(_stored(publisher, "orders")) == 2  # the refused message changed nothing


def _held_producer(publisher: StoragePublisher, max_block: float) -> Producer:
    """A producer whose buffer is full: one batch held in flight, one waiting."""
    publisher.gate = threading.Event()
    producer = Producer(
        publisher, max_batch_bytes=2000, max_buffered_bytes=4000, linger=0, max_block=max_block
    )
    producer.send("orders", b"x" * 1500)
    assert publisher.entered.acquire(timeout=10)
    producer.send("orders", b"x" * 1500)
    return producer


def test_a_full_buffer_blocks_at_most_max_block(publisher: StoragePublisher) -> None:
    producer = _held_producer(publisher, max_block=0.05)
    try:
        with pytest.raises(Overloaded, match=r"after 0\.05 s"):
            producer.send("orders", b"x" * 1500)
    finally:
        assert publisher.gate is not None
        publisher.gate.set()
        producer.close()
    assert len(_stored(publisher, "orders")) == 2


def test_a_full_buffer_blocks_until_room_is_made(publisher: StoragePublisher) -> None:
    producer = _held_producer(publisher, max_block=30)
    sent: list[MessageFuture] = []
    sender = threading.Thread(target=lambda: sent.append(producer.send("orders", b"x" * 1500)))
    try:
        sender.start()
        sender.join(0.2)
        assert sender.is_alive()  # blocked: no room until the held batch is answered
    finally:
        assert publisher.gate is not None
        publisher.gate.set()
        sender.join(30)
        producer.close()
    assert not sender.is_alive()
    assert sent[0].result().sequence == 2


@pytest.mark.parametrize(
    ("stream", "value", "key", "error"),
    [
        ("Bad_Name", b"v", b"", InvalidStreamName),
        ("orders", b"v", b"k" * 256, InvalidBatch),
        ("orders", 42, b"", InvalidBatch),
        ("orders", b"v", 3.5, InvalidBatch),
    ],
)
def test_bad_messages_are_refused_at_send(
    publisher: StoragePublisher, stream: str, value: object, key: object, error: type[Exception]
) -> None:
    with Producer(publisher, max_batch_bytes=1024) as producer:
        with pytest.raises(error):
            producer.send(stream, value, key=key)  # type: ignore[arg-type]
        producer.send("orders", b"fine").result(10)
    assert [v for *_, v in _stored(publisher, "orders")] == [b"fine"]


def test_a_message_larger_than_a_batch_or_the_buffer_goes_alone(
    publisher: StoragePublisher,
) -> None:
    # A value of any size is sent: alone in its batch, in pieces past
    # MAX_VALUE_SIZE, let into the buffer once the buffer is empty.
    large = bytes(range(256)) * (MAX_VALUE_SIZE // 256 + 1)
    with Producer(publisher, max_batch_bytes=1024, max_buffered_bytes=2048, linger=60) as producer:
        futures = [producer.send("orders", b"a"), producer.send("orders", large, key="big")]
        futures.append(producer.send("orders", b"x" * 2000))
        futures.append(producer.send("orders", b"b"))
    assert publisher.batches["orders"] == [1, 1, 1, 1]
    stored = _stored(publisher, "orders")
    assert [v for *_, v in stored] == [b"a", large, b"x" * 2000, b"b"]
    assert [f.result().position for f in futures] == [p for p, *_ in stored]


async def test_async_producer_sends_a_message_larger_than_the_buffer(
    publisher: StoragePublisher,
) -> None:
    large = bytes(range(256)) * (MAX_VALUE_SIZE // 256 + 1)
    async with AsyncProducer(
        AsyncStoragePublisher(publisher), max_batch_bytes=1024, max_buffered_bytes=2048, linger=60
    ) as producer:
        futures = [await producer.send("orders", b"a"), await producer.send("orders", large)]
        futures.append(await producer.send("orders", b"b"))
    assert publisher.batches["orders"] == [1, 1, 1]
    assert [v for *_, v in _stored(publisher, "orders")] == [b"a", large, b"b"]
    assert [f.result().sequence for f in futures] == [0, 1, 2]


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_messages": 0},
        {"max_batch_messages": 100_001},
        {"max_batch_bytes": 64},
        {"max_batch_bytes": 17 * 1024 * 1024},
        {"linger": -1},
        {"max_buffered_bytes": 10, "max_batch_bytes": 1000},
        {"max_block": -1},
    ],
)
def test_bad_options_are_refused(publisher: StoragePublisher, options: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        Producer(publisher, **options)  # type: ignore[arg-type]


def test_send_after_close_is_refused(publisher: StoragePublisher) -> None:
    producer = Producer(publisher)
    producer.send("orders", b"v")
    producer.close()
    producer.close()  # idempotent
    with pytest.raises(ProducerClosed):
        producer.send("billing", b"v")
    assert len(_stored(publisher, "orders")) == 1


def test_close_sends_what_is_buffered(publisher: StoragePublisher) -> None:
    producer = Producer(publisher, linger=60)
    futures = [producer.send("orders", f"{i}") for i in range(5)]
    producer.close(timeout=30)
    assert [f.result(0).sequence for f in futures] == list(range(5))


def test_sends_from_many_threads_keep_each_threads_order(publisher: StoragePublisher) -> None:
    results: dict[int, list[MessageFuture]] = {}

    def send_from(thread: int, producer: Producer) -> None:
        results[thread] = [producer.send("orders", f"{thread}:{i}") for i in range(300)]

    with Producer(publisher, max_batch_messages=64, linger=0.001) as producer:
        threads = [threading.Thread(target=send_from, args=(t, producer)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    stored = _stored(publisher, "orders")
    assert len(stored) == 1200
    for thread, futures in results.items():
        sequences = [f.result().sequence for f in futures]
        assert sequences == sorted(sequences)
        assert [stored[s][4] for s in sequences] == [f"{thread}:{i}".encode() for i in range(300)]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sends=st.lists(
        st.tuples(st.sampled_from(["aaa", "bbb"]), st.binary(max_size=300)), max_size=120
    ),
    max_batch_messages=st.integers(1, 20),
    max_batch_bytes=st.integers(400, 3000),
)
def test_any_sends_and_limits_store_exactly_what_was_sent(
    tmp_path_factory: pytest.TempPathFactory,
    sends: list[tuple[str, bytes]],
    max_batch_messages: int,
    max_batch_bytes: int,
) -> None:
    publisher = StoragePublisher(FileStorage(tmp_path_factory.mktemp("data")))
    try:
        with Producer(
            publisher, max_batch_messages=max_batch_messages, max_batch_bytes=max_batch_bytes
        ) as producer:
            futures = [(s, v, producer.send(s, v)) for s, v in sends]
        for stream in ("aaa", "bbb"):
            mine = [(v, f) for s, v, f in futures if s == stream]
            if not mine:
                continue
            stored = _stored(publisher, stream)
            assert [m[4] for m in stored] == [v for v, _ in mine]
            assert [m[:3] for m in stored] == [tuple(f.result()) for _, f in mine]
            assert max(publisher.batches[stream]) <= max_batch_messages
    finally:
        publisher.close()


async def test_async_producer_batches_in_order(publisher: StoragePublisher) -> None:
    async with AsyncProducer(AsyncStoragePublisher(publisher), max_batch_messages=50) as producer:
        futures = [await producer.send("orders", f"v{i}", key="k") for i in range(500)]
        await producer.flush(timeout=10)
        receipts = [await f for f in futures]
    assert [(r.position, r.sequence, r.id) for r in receipts] == [
        m[:3] for m in _stored(publisher, "orders")
    ]
    assert max(publisher.batches["orders"]) <= 50
    assert publisher.calls < 500


async def test_async_producer_failure_and_bad_input(publisher: StoragePublisher) -> None:
    publisher.fail_calls = frozenset({0})
    producer = AsyncProducer(AsyncStoragePublisher(publisher), linger=60)
    first = await producer.send("orders", b"lost")
    await producer.flush()
    with pytest.raises(StorageError):
        await first
    with pytest.raises(InvalidStreamName):
        await producer.send("NO", b"v")
    second = await producer.send("orders", b"kept")
    await producer.close()
    assert (await second).sequence == 0
    with pytest.raises(ProducerClosed):
        await producer.send("orders", b"late")


async def test_async_producer_overloaded_when_full(publisher: StoragePublisher) -> None:
    publisher.gate = threading.Event()
    producer = AsyncProducer(
        _ThreadedAsyncPublisher(publisher),
        max_batch_bytes=2000,
        max_buffered_bytes=4000,
        linger=0,
        max_block=0.05,
    )
    try:
        await producer.send("orders", b"x" * 1500)
        await asyncio.to_thread(publisher.entered.acquire, True, 10)
        await producer.send("orders", b"x" * 1500)
        with pytest.raises(Overloaded):
            await producer.send("orders", b"x" * 1500)
    finally:
        publisher.gate.set()
        await producer.close()
    assert len(_stored(publisher, "orders")) == 2


class _ThreadedAsyncPublisher:
    """Publishes in a thread, so a held ``gate`` does not block the event loop."""

    def __init__(self, publisher: StoragePublisher) -> None:
        self.publisher = publisher

    async def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
        return await asyncio.to_thread(self.publisher.publish_batch, stream, batch)


async def test_async_lane_sends_while_the_caller_keeps_sending(
    publisher: StoragePublisher,
) -> None:
    async with AsyncProducer(
        AsyncStoragePublisher(publisher), max_batch_messages=10, linger=60
    ) as producer:
        for i in range(35):  # a tight loop: send never has to wait
            await producer.send("orders", f"{i}")
        # Full batches went while the loop ran, not only at flush or close.
        assert publisher.calls >= 1
    assert publisher.batches["orders"] == [10, 10, 10, 5]


def test_producer_through_a_server(tmp_path: Path) -> None:
    """The real path: Producer -> Client -> HTTP -> server -> file storage."""
    from messagevault.client import Client
    from messagevault.server import StreamHub, create_app
    from tests.served import ServedApp

    storage = FileStorage(tmp_path / "data")
    with ServedApp(create_app(StreamHub(storage))) as served, Client(served.url) as client:
        with Producer(client, max_batch_messages=100) as producer:
            futures = [producer.send("orders", f"order {i}", key="OrderPlaced") for i in range(450)]
            bad = producer.send("billing", b"x")
        receipts = [f.result() for f in futures]
        assert bad.result().sequence == 0
    with Reader.open(storage, "orders") as reader:
        stored = list(reader.read())
    assert [(r.position, r.sequence, r.id) for r in receipts] == [
        (m.position, m.sequence, m.id) for m in stored
    ]
    assert [m.value for m in stored] == [f"order {i}".encode() for i in range(450)]
    assert {m.key for m in stored} == {b"OrderPlaced"}


def test_a_refused_batch_fails_its_futures_through_a_server(tmp_path: Path) -> None:
    """A server error (here: the user may not write one stream) fails that batch only."""
    from messagevault.client import Client
    from messagevault.errors import Forbidden
    from messagevault.server import StreamHub, create_app
    from messagevault.server.auth import Authenticator, Users, save_users
    from tests.served import ServedApp

    storage = FileStorage(tmp_path / "data")
    users = Users()
    users.set_password("app", "pw")
    users.grant("app", ["orders:write"])
    save_users(storage, users)
    app = create_app(StreamHub(storage), authenticator=Authenticator(storage))
    with ServedApp(app) as served, Client(served.url, user="app", password="pw") as client:
        with Producer(client) as producer:
            allowed = producer.send("orders", b"ok")
            refused = producer.send("billing", b"no")
        assert allowed.result().sequence == 0
        with pytest.raises(Forbidden):
            refused.result()


async def test_a_cancelled_async_lane_fails_every_batch_it_held(
    publisher: StoragePublisher,
) -> None:
    """Cancelled (the loop shutting down, say): no future is left for ever pending."""
    publisher.gate = threading.Event()
    producer = AsyncProducer(_ThreadedAsyncPublisher(publisher), max_batch_messages=1, linger=0)
    futures = [await producer.send("orders", f"{i}") for i in range(3)]  # three batches
    await asyncio.to_thread(publisher.entered.acquire, True, 10)  # the first is in flight
    (lane,) = producer._tasks
    lane.cancel()
    publisher.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await lane
    for future in futures:
        with pytest.raises(ProducerClosed):
            await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_receipt(future))), 10)


async def _receipt(future: MessageFuture) -> object:
    return await future
