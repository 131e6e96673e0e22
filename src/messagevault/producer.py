"""Background batching for producers: ``send()`` one message, get its receipt later.

A ``Producer`` gathers the messages sent to each stream into batches and
publishes them through a client, so that code which has one message at a time
still gets the throughput of large batches (a 1,000-message batch costs the
server about as much as a single message). Like Kafka's producer:

* a batch is sent when it is full (``max_batch_messages`` / ``max_batch_bytes``)
  or when its first message has waited ``linger`` seconds, whichever comes
  first; ``flush()`` sends everything now; a message larger than
  ``max_batch_bytes`` (a value of any size) is a batch of its own;
* order is kept per stream: each stream has one *lane* (a thread, or a task
  for ``AsyncProducer``) with at most one batch in flight, so batches commit
  in the order their messages were sent; different streams go in parallel;
* memory is bounded: at most ``max_buffered_bytes`` wait in all (or one
  message larger than that, alone); beyond that ``send()`` blocks until room
  is made (``block=True``, for at most ``max_block`` seconds) or raises
  ``Overloaded`` at once;
* a failed batch fails exactly its own futures; later batches still go.

``send()`` is on the hot path of a producer, so it does no more than append
to two lists: the batch owns one future, and the per-message future is a
two-field view of it (batch, index). The receipt itself is computed only when
asked for (``AppendResult`` derives it from the batch's first position).

Publishing is exactly-once when the client is idempotent (the default): a
producer has one random producer id, numbers each stream's batches 0, 1,
2, ... and the client sends a batch again, the same bytes, through lost
answers, resets and 503s until it commits or the client's ``retry_timeout``
passes; the server answers a repeat with the first commit's receipts. A
batch that fails anyway leaves its lane unsure whether it committed, so the
lane goes on under a new producer id (a new id starts fresh: the next batch
can neither be taken for the failed one nor be refused for skipping it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Protocol

from messagevault.errors import (
    InvalidBatch,
    InvalidInput,
    Overloaded,
    ProducerClosed,
    SequenceGap,
    StaleSequence,
)
from messagevault.format import (
    FRAME_HEADER_SIZE,
    MAX_BATCH_COUNT,
    MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    MAX_KEY_SIZE,
    NO_PRODUCER,
    PER_MESSAGE_OVERHEAD,
    EncodedBatch,
    encode_columns,
)
from messagevault.names import validate_stream_name
from messagevault.writer import AppendResult, Receipt

DEFAULT_MAX_BATCH_MESSAGES = 1000
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
DEFAULT_LINGER = 0.005  # seconds; Kafka's linger.ms default is 5 ms too
DEFAULT_MAX_BUFFERED_BYTES = 32 * 1024 * 1024


class BatchPublisher(Protocol):
    """What a ``Producer`` publishes through: a ``Client`` (or anything with this method)."""

    def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult: ...


class AsyncBatchPublisher(Protocol):
    """What an ``AsyncProducer`` publishes through: an ``AsyncClient``."""

    async def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult: ...


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidBatch(f"{what} must be bytes or str, not {type(value).__name__}")


def _producer_id(client: object, idempotent: bool | None) -> bytes:
    """A new random producer id, or NO_PRODUCER when appends are not to be idempotent.

    ``idempotent=None`` follows the client (``Client.idempotent``); a
    publisher that does not say is taken as not idempotent.
    """
    if idempotent is None:
        idempotent = bool(getattr(client, "idempotent", False))
    return uuid.uuid4().bytes if idempotent else NO_PRODUCER


class _Batch:
    """Messages of one stream that will travel in one request, and their one future."""

    __slots__ = ("bytes", "future", "keys", "started", "values")

    def __init__(self, started: float) -> None:
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.bytes = 0  # frame bytes these messages add, for the batch and buffer limits
        self.started = started  # when the first message arrived: linger counts from here
        self.future: Future[AppendResult] = Future()

    def encode(self, compress: bool) -> EncodedBatch:
        return encode_columns(self.keys, self.values, compress=compress)


class MessageFuture:
    """The receipt of one sent message, once its batch is committed.

    ``result()`` returns a ``Receipt`` (position, sequence, id) or raises the
    batch's error; in ``AsyncProducer`` the object can also be awaited.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    def result(self, timeout: float | None = None) -> Receipt:
        return self._batch.future.result(timeout)[self._index]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._batch.future.exception(timeout)

    def done(self) -> bool:
        return self._batch.future.done()

    def add_done_callback(self, callback: Callable[[MessageFuture], object]) -> None:
        self._batch.future.add_done_callback(lambda _: callback(self))

    def __await__(self) -> Generator[Any, None, Receipt]:
        result = yield from asyncio.wrap_future(self._batch.future).__await__()
        return result[self._index]


class _Limits:
    """The batching options, checked once."""

    def __init__(
        self,
        max_batch_messages: int,
        max_batch_bytes: int,
        linger: float,
        max_buffered_bytes: int,
        max_block: float,
    ) -> None:
        if not 1 <= max_batch_messages <= MAX_BATCH_COUNT:
            raise InvalidInput(f"max_batch_messages must be within 1..{MAX_BATCH_COUNT}")
        if not FRAME_HEADER_SIZE < max_batch_bytes <= MAX_FRAME_SIZE:
            raise InvalidInput(
                f"max_batch_bytes must be within {FRAME_HEADER_SIZE + 1}..{MAX_FRAME_SIZE}"
            )
        if not 0 <= linger <= 60:
            raise InvalidInput("linger must be within 0..60 seconds")
        if max_buffered_bytes < max_batch_bytes:
            raise InvalidInput("max_buffered_bytes must be at least max_batch_bytes")
        if max_block < 0:
            raise InvalidInput("max_block must not be negative")
        self.max_batch_messages = max_batch_messages
        # What the messages of a batch may add to its frame header: the 96
        # bytes of a v2 one, which a batch with a producer id has.
        self.max_body_bytes = max_batch_bytes - MAX_HEADER_SIZE
        self.linger = linger
        self.max_buffered_bytes = max_buffered_bytes
        self.max_block = max_block

    def message(self, value: bytes | str, key: bytes | str) -> tuple[bytes, bytes, int]:
        """(key, value, frame bytes it adds), or ``InvalidBatch`` if it can never be sent.

        Paid per message by ``send``. A value of any size can be sent: one
        that does not fit ``max_batch_bytes`` becomes a batch of its own
        (``_Buffer.add``), in pieces if it is over ``MAX_VALUE_SIZE``.
        """
        raw_value = value if type(value) is bytes else _as_bytes(value, "value")
        raw_key = key if type(key) is bytes else _as_bytes(key, "key")
        if len(raw_key) > MAX_KEY_SIZE:
            raise InvalidBatch(f"key is {len(raw_key)} bytes; at most {MAX_KEY_SIZE}")
        return raw_key, raw_value, PER_MESSAGE_OVERHEAD + len(raw_key) + len(raw_value)


class _Lane:
    """One stream's batches, oldest first; the newest may still be filling.

    Only the producer's lock guards it: ``send`` appends under it, and the
    stream's sender takes whole batches from the front.
    """

    __slots__ = ("batches", "in_flight", "producer", "producer_seq", "stream", "waiting")

    def __init__(self, stream: str, producer: bytes) -> None:
        self.stream = stream
        self.batches: deque[_Batch] = deque()
        self.in_flight: _Batch | None = None
        self.waiting = False  # the sender sleeps on the producer's condition
        # The producer id and batch sequence of the lane's next batch
        # (NO_PRODUCER: a client that is not idempotent). Only the lane's
        # sender touches them.
        self.producer = producer
        self.producer_seq = 0

    def stamped(self, batch: EncodedBatch) -> EncodedBatch:
        """``batch`` as this lane's next batch of its producer."""
        if self.producer == NO_PRODUCER:
            return batch
        return batch.with_producer(self.producer, self.producer_seq)

    def settled(self, failure: BaseException | None) -> None:
        """The front batch was answered: the next gets the next sequence, or a new id.

        After a failure the batch may or may not have committed (the client
        gave up in doubt): under a new id the next batch is accepted either way.
        """
        if self.producer == NO_PRODUCER:
            return
        if failure is None:
            self.producer_seq += 1
            return
        if isinstance(failure, SequenceGap | StaleSequence):
            failure.add_note(
                f"producer {self.producer.hex()} sent batch {self.producer_seq} of stream "
                f"{self.stream!r}, and the server expected another: this producer sends each "
                "stream's batches one at a time, in order, so this is a bug (please report "
                "it); the batch was not appended, and later ones go under a new producer id"
            )
        self.producer = uuid.uuid4().bytes
        self.producer_seq = 0

    def ready(self, limits: _Limits, now: float, flushing: bool) -> float | None:
        """0 if the front batch should go now, else seconds until it should (None: empty)."""
        if not self.batches:
            return None
        front = self.batches[0]
        if flushing or len(self.batches) > 1 or len(front.keys) >= limits.max_batch_messages:
            return 0.0
        return max(0.0, front.started + limits.linger - now)


class _Buffer:
    """What both producers share: lanes, limits and the memory bound (one lock)."""

    def __init__(self, limits: _Limits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.lanes: dict[str, _Lane] = {}
        self.buffered = 0
        self.closing = False
        self.flushes = 0  # > 0 while a flush() wants everything sent now

    def full_for(self, size: int) -> bool:
        """Whether a message of ``size`` bytes must wait for room (lock held).

        One larger than the whole buffer is let in once the buffer is empty.
        """
        return self.buffered + size > self.limits.max_buffered_bytes and self.buffered > 0

    def add(self, lane: _Lane, key: bytes, value: bytes, size: int) -> tuple[_Batch, int]:
        """Append one message to the lane's open batch (lock held); returns (batch, index)."""
        limits = self.limits
        batches = lane.batches
        batch = batches[-1] if batches else None
        if (
            batch is None
            or len(batch.keys) >= limits.max_batch_messages
            or batch.bytes + size > limits.max_body_bytes
            or (batch is lane.in_flight)
        ):
            batch = _Batch(time.monotonic())
            batches.append(batch)
        index = len(batch.keys)
        batch.keys.append(key)
        batch.values.append(value)
        batch.bytes += size
        self.buffered += size
        return batch, index

    def release(self, batch: _Batch) -> None:
        """A batch left the buffer (sent or failed): its bytes make room. Lock held."""
        self.buffered -= batch.bytes
        self.changed.notify_all()


class Producer:
    """Sends single messages in background batches, one lane (thread) per stream.

    >>> with Client(url) as client, Producer(client) as producer:   # doctest: +SKIP
    ...     future = producer.send("orders", b'{"id": 1}', key="OrderPlaced")
    ...     producer.flush()
    ...     future.result().sequence

    ``idempotent`` (default: as the client is) sends every batch under this
    producer's id (``producer_id``, 16 random bytes) and a per-stream batch
    sequence, so that the client's retries never append a batch twice.
    """

    def __init__(
        self,
        client: BatchPublisher,
        *,
        max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        linger: float = DEFAULT_LINGER,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        block: bool = True,
        max_block: float = 60.0,
        compress: bool = False,
        idempotent: bool | None = None,
    ) -> None:
        self.client = client
        self.block = block
        self.producer_id = _producer_id(client, idempotent)
        # zstd per batch, in the lane (off the caller's send()); a batch
        # whose values do not shrink goes uncompressed.
        self.compress = compress
        self._buffer = _Buffer(
            _Limits(max_batch_messages, max_batch_bytes, linger, max_buffered_bytes, max_block)
        )
        self._threads: list[threading.Thread] = []

    def send(self, stream: str, value: bytes | str, key: bytes | str = b"") -> MessageFuture:
        """Queue one message for ``stream``; its receipt comes with the future.

        Raises ``InvalidBatch`` at once for a message that can never be sent,
        ``Overloaded`` when the buffer stays full (see ``block``), and
        ``ProducerClosed`` after ``close()``.
        """
        buffer = self._buffer
        limits = buffer.limits
        key, value, size = limits.message(value, key)
        with buffer.lock:
            if buffer.closing:
                raise ProducerClosed("the producer is closed")
            lane = buffer.lanes.get(stream)
            if lane is None:
                lane = self._open_lane(stream)
            if buffer.full_for(size):
                self._wait_for_room(size)
                if buffer.closing:  # closed while we waited: its lane may be gone
                    raise ProducerClosed("the producer is closed")
            batch, index = buffer.add(lane, key, value, size)
            if lane.waiting and (index == 0 or index + 1 >= limits.max_batch_messages):
                buffer.changed.notify_all()
        if index == 0 and len(lane.batches) > 1:
            # A batch just filled. A caller sending in a tight loop holds the
            # GIL, and the lane thread, back from its network wait, would wait
            # for it up to the switch interval (5 ms) per batch: hand it over.
            time.sleep(0)
        return MessageFuture(batch, index)

    def _open_lane(self, stream: str) -> _Lane:
        """A new stream's lane and its sender thread (lock held)."""
        lane = self._buffer.lanes[validate_stream_name(stream)] = _Lane(stream, self.producer_id)
        thread = threading.Thread(
            target=self._send_batches, args=(lane,), name=f"messagevault-producer-{stream}"
        )
        thread.daemon = True  # close() joins it; daemon only so a forgotten close cannot hang exit
        thread.start()
        self._threads.append(thread)
        return lane

    def _wait_for_room(self, size: int) -> None:
        buffer = self._buffer
        limits = buffer.limits
        if not self.block:
            raise Overloaded(f"{buffer.buffered} bytes wait to be sent (max_buffered_bytes)")
        deadline = time.monotonic() + limits.max_block
        # Lingering batches would hold the room for nothing (a large message
        # may be waiting for the buffer to empty): they go now.
        buffer.flushes += 1
        buffer.changed.notify_all()
        try:
            while buffer.full_for(size):
                if buffer.closing:
                    raise ProducerClosed("the producer is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(
                        f"no room in the producer's buffer after {limits.max_block} s: "
                        f"{buffer.buffered} bytes wait to be sent"
                    )
                buffer.changed.wait(remaining)
        finally:
            buffer.flushes -= 1

    def _send_batches(self, lane: _Lane) -> None:
        buffer = self._buffer
        while True:
            with buffer.lock:
                batch = self._next_batch(lane)
                if batch is None:
                    return
                lane.in_flight = batch
            try:
                result = self.client.publish_batch(
                    lane.stream, lane.stamped(batch.encode(self.compress))
                )
            except BaseException as exc:  # noqa: BLE001 - the batch's futures must hear of it
                lane.settled(exc)
                batch.future.set_exception(exc)
            else:
                lane.settled(None)
                batch.future.set_result(result)
            with buffer.lock:
                lane.in_flight = None
                lane.batches.popleft()
                buffer.release(batch)

    def _next_batch(self, lane: _Lane) -> _Batch | None:
        """The lane's front batch once it should go, or None when closed and empty. Lock held."""
        buffer = self._buffer
        while True:
            wait = lane.ready(buffer.limits, time.monotonic(), buffer.flushes > 0 or buffer.closing)
            if wait == 0:
                return lane.batches[0]
            if wait is None and buffer.closing:
                return None
            lane.waiting = True
            try:
                buffer.changed.wait(wait)
            finally:
                lane.waiting = False

    def flush(self, timeout: float | None = None) -> None:
        """Send everything sent so far now, and wait until each batch has its answer.

        Failed batches do not raise here: their futures hold the errors.
        Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds.
        """
        buffer = self._buffer
        with buffer.lock:
            pending = [batch.future for lane in buffer.lanes.values() for batch in lane.batches]
            buffer.flushes += 1
            buffer.changed.notify_all()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for future in pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                future.exception(remaining)  # waits; raises TimeoutError when out of time
        finally:
            with buffer.lock:
                buffer.flushes -= 1

    def close(self, timeout: float | None = None) -> None:
        """Send what is buffered, wait for the answers, stop the lanes. Idempotent."""
        buffer = self._buffer
        with buffer.lock:
            buffer.closing = True
            buffer.changed.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise TimeoutError(f"the producer did not finish sending within {timeout} s")

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncProducer:
    """The asyncio twin of ``Producer``: one lane (task) per stream, on the running loop.

    ``await producer.send(...)`` returns at once unless the buffer is full
    (then it waits for room, or raises ``Overloaded`` with ``block=False``);
    the returned ``MessageFuture`` is awaited for the receipt.
    """

    def __init__(
        self,
        client: AsyncBatchPublisher,
        *,
        max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        linger: float = DEFAULT_LINGER,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        block: bool = True,
        max_block: float = 60.0,
        compress: bool = False,
        idempotent: bool | None = None,
    ) -> None:
        self.client = client
        self.block = block
        self.producer_id = _producer_id(client, idempotent)
        # zstd per batch, in the lane (off the caller's send()); a batch
        # whose values do not shrink goes uncompressed.
        self.compress = compress
        self._buffer = _Buffer(
            _Limits(max_batch_messages, max_batch_bytes, linger, max_buffered_bytes, max_block)
        )
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._room = asyncio.Event()

    async def send(self, stream: str, value: bytes | str, key: bytes | str = b"") -> MessageFuture:
        """Queue one message for ``stream`` (see ``Producer.send``)."""
        buffer = self._buffer
        limits = buffer.limits
        key, value, size = limits.message(value, key)
        if buffer.closing:
            raise ProducerClosed("the producer is closed")
        lane = buffer.lanes.get(stream) or self._open_lane(stream)
        if buffer.full_for(size):
            await self._wait_for_room(size)
            if buffer.closing:  # closed while we waited: its lane may be gone
                raise ProducerClosed("the producer is closed")
        with buffer.lock:  # uncontended here; kept so the shared _Buffer code holds one rule
            batch, index = buffer.add(lane, key, value, size)
        full = len(batch.keys) >= limits.max_batch_messages
        if index == 0 or full:
            self._wake[stream].set()
            if full or len(lane.batches) > 1:
                # A caller sending in a tight loop never suspends, so the lane
                # would not run before flush(): yield once per full batch, and
                # the batch travels while the caller fills the next one.
                await asyncio.sleep(0)
        return MessageFuture(batch, index)

    def _open_lane(self, stream: str) -> _Lane:
        lane = self._buffer.lanes[validate_stream_name(stream)] = _Lane(stream, self.producer_id)
        self._wake[stream] = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._send_batches(lane)))
        return lane

    async def _wait_for_room(self, size: int) -> None:
        buffer = self._buffer
        limits = buffer.limits
        if not self.block:
            raise Overloaded(f"{buffer.buffered} bytes wait to be sent (max_buffered_bytes)")
        buffer.flushes += 1  # lingering batches go now (see Producer._wait_for_room)
        self._wake_all()
        try:
            async with asyncio.timeout(limits.max_block):
                while buffer.full_for(size):
                    if buffer.closing:
                        raise ProducerClosed("the producer is closed")
                    await self._room.wait()
        except TimeoutError:
            raise Overloaded(
                f"no room in the producer's buffer after {limits.max_block} s: "
                f"{buffer.buffered} bytes wait to be sent"
            ) from None
        finally:
            buffer.flushes -= 1

    async def _send_batches(self, lane: _Lane) -> None:
        buffer = self._buffer
        wake = self._wake[lane.stream]
        while True:
            wait = lane.ready(buffer.limits, time.monotonic(), buffer.flushes > 0 or buffer.closing)
            if wait is None and buffer.closing:
                return
            if wait != 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):  # linger is over
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            batch = lane.in_flight = lane.batches[0]
            try:
                result = await self.client.publish_batch(
                    lane.stream, lane.stamped(batch.encode(self.compress))
                )
            except asyncio.CancelledError:
                # Nothing will send this lane's batches any more: each must hear it.
                for waiting in lane.batches:
                    waiting.future.set_exception(ProducerClosed("the producer was cancelled"))
                raise
            except BaseException as exc:  # noqa: BLE001 - the batch's futures must hear of it
                lane.settled(exc)
                batch.future.set_exception(exc)
            else:
                lane.settled(None)
                batch.future.set_result(result)
            with buffer.lock:
                lane.in_flight = None
                lane.batches.popleft()
                buffer.release(batch)
            self._room.set()
            self._room = asyncio.Event()

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything sent so far now and wait for the answers (see ``Producer.flush``)."""
        buffer = self._buffer
        pending = [batch.future for lane in buffer.lanes.values() for batch in lane.batches]
        buffer.flushes += 1
        self._wake_all()
        try:
            async with asyncio.timeout(timeout):
                # return_exceptions: failures stay with their futures, retrieved here
                await asyncio.gather(
                    *(asyncio.wrap_future(future) for future in pending), return_exceptions=True
                )
        finally:
            buffer.flushes -= 1

    async def close(self) -> None:
        """Send what is buffered, wait for the answers, stop the lanes. Idempotent."""
        self._buffer.closing = True
        self._wake_all()
        self._room.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
