"""Consumers that keep their place: handle every message, save the position, resume.

A ``Consumer`` reads one stream (through a server ``Client``, or straight
from storage), calls a handler per message or per batch, and saves its
position in a ``PositionStore`` every N messages and/or T seconds. After a
crash or restart it resumes right after the last saved message: every
message is handled at least once, in order; what was handled after the
last save is handled again.

The rule that makes this safe: a position is saved only once the handler
has returned for every message before it, never earlier. The application
may keep its own state in the same document (``state=``), saved atomically
with the position, so that state and position never disagree.

Messages are fetched by a background thread (``_Feed``) while the handler
runs, and handed over in batches of whatever has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, Literal, Protocol

from messagevault.errors import InvalidInput, InvalidPosition
from messagevault.format import Message
from messagevault.names import validate_stream_name
from messagevault.positions import JsonValue, PositionStore, SavedPosition, validate_consumer_name
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess, Storage

Start = Literal["beginning", "end"]
MAX_SAVE_EVERY = 1_000_000_000
MAX_SAVE_INTERVAL = 24 * 3600.0
MIN_SAVE_INTERVAL = 0.001
MAX_POLL_INTERVAL = 60.0
# The handling loop wakes at least this often (seconds) to notice a stop
# event it cannot be notified of (one the caller sets) and due timed saves.
IDLE_WAKE = 0.1
# Fetched but unhandled messages are bounded by count and by bytes.
FEED_MAX_MESSAGES = 10_000
FEED_MAX_BYTES = 32 * 1024 * 1024
FEED_JOIN_TIMEOUT = 5.0


class _StreamInfo(Protocol):
    @property
    def length(self) -> int: ...


class StreamClient(Protocol):
    """What a consumer needs of ``messagevault.client.Client``."""

    def info(self, stream: str) -> _StreamInfo: ...

    def read(self, stream: str, position: int = 0) -> Iterator[Message]: ...

    def follow(
        self, stream: str, position: int = 0, *, stop: threading.Event | None = None
    ) -> Iterator[Message]: ...


class AsyncStreamClient(Protocol):
    """What an ``AsyncConsumer`` needs of ``messagevault.client.AsyncClient``."""

    async def info(self, stream: str) -> _StreamInfo: ...

    def read(self, stream: str, position: int = 0) -> AsyncIterator[Message]: ...

    def follow(self, stream: str, position: int = 0) -> AsyncIterator[Message]: ...


Source = StreamClient | Storage | Reader | ReadAccess


class _Stream:
    """One stream of one synchronous source: its end, and its messages from a position."""

    def __init__(self, source: object, stream: str, poll_interval: float) -> None:
        self._client: StreamClient | None = None
        self._reader: Reader | None = None
        self._storage: Storage | None = None  # opened into a reader by ``open``
        self._access: ReadAccess | None = None  # likewise
        self._stream = stream
        self._poll_interval = poll_interval
        if isinstance(source, Reader):
            _check_same_stream(source.name, stream, "the reader")
            self._reader = source
        elif isinstance(source, ReadAccess):
            self._access = source
        elif hasattr(source, "open_stream"):
            self._storage = source  # type: ignore[assignment]
        elif hasattr(source, "follow") and hasattr(source, "info"):
            self._client = source  # type: ignore[assignment]
        else:
            raise TypeError(
                "a consumer reads from a Client, a Storage, a Reader or a ReadAccess, "
                f"not {type(source).__name__}"
            )
        self._owned = self._reader is None and self._client is None

    def open(self) -> None:
        """Check that the stream exists (``StreamNotFound``); open a reader if ours to open."""
        if self._client is not None:
            self._client.info(self._stream)
        elif self._reader is None:
            if self._access is not None:
                reader = Reader.from_read_access(self._access)
                if reader.name != self._stream:
                    reader.close()
                    _check_same_stream(reader.name, self._stream, "the read access")
            else:
                assert self._storage is not None
                reader = Reader.open(self._storage, self._stream)
            self._reader = reader

    def end(self) -> int:
        if self._reader is not None:
            return self._reader.checkpoint().length
        assert self._client is not None
        return self._client.info(self._stream).length

    def messages(self, position: int, *, follow: bool, stop: threading.Event) -> Iterator[Message]:
        if self._reader is not None:
            if follow:
                return self._reader.follow(position, poll_interval=self._poll_interval, stop=stop)
            return self._reader.read(position)
        assert self._client is not None
        if follow:
            return self._client.follow(self._stream, position, stop=stop)
        return self._client.read(self._stream, position)

    def close(self) -> None:
        if self._owned and self._reader is not None:
            self._reader.close()


def _check_same_stream(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise InvalidInput(
            f"{what} reads stream {actual!r}, but the consumer was given {expected!r}"
        )


class _Feed:
    """Fetches messages on a thread and hands them over in batches.

    The fetching thread appends to a deque without locking; it takes the
    condition's lock only to wake a waiting taker, or to wait itself while
    the buffer is full. Each side owns its counters (only the fetcher
    writes ``_bytes_in``, only the taker ``_bytes_out``).
    """

    def __init__(self, messages: Callable[[threading.Event], Iterator[Message]]) -> None:
        self._messages = messages
        self._buffer: deque[Message] = deque()
        self._bytes_in = 0
        self._bytes_out = 0
        self._condition = threading.Condition()
        self._taker_waits = False
        self._fetcher_waits = False
        self._done = False
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fetch, name="messagevault-consumer-fetch", daemon=True
        )
        self._thread.start()

    def _full(self) -> bool:
        return (
            len(self._buffer) >= FEED_MAX_MESSAGES
            or self._bytes_in - self._bytes_out >= FEED_MAX_BYTES
        )

    def _fetch(self) -> None:
        buffer = self._buffer
        iterator: Iterator[Message] | None = None
        try:
            iterator = self._messages(self.stop)
            for message in iterator:
                buffer.append(message)
                self._bytes_in += len(message.key) + len(message.value)
                if self._taker_waits or self._full():
                    with self._condition:
                        self._condition.notify_all()
                        while self._full() and not self.stop.is_set():
                            self._fetcher_waits = True
                            self._condition.wait(IDLE_WAKE)
                        self._fetcher_waits = False
                if self.stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed over, raised by run()
            self.error = exc
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            with self._condition:
                self._done = True
                self._condition.notify_all()

    def take(self, limit: int, timeout: float) -> list[Message] | None:
        """Up to ``limit`` messages; waits up to ``timeout`` s for one. ``None``: fetching ended."""
        buffer = self._buffer
        if not buffer:
            with self._condition:
                if not buffer and not self._done:
                    self._taker_waits = True
                    self._condition.wait(timeout)
                    self._taker_waits = False
            if not buffer:
                return None if self._done else []
        count = min(limit, len(buffer))
        batch = [buffer.popleft() for _ in range(count)]
        self._bytes_out += sum(len(message.key) + len(message.value) for message in batch)
        if self._fetcher_waits:
            with self._condition:
                self._condition.notify_all()
        return batch

    def close(self) -> None:
        """Stop fetching; wait a little for the thread (a long poll may hold it longer)."""
        self.stop.set()
        with self._condition:
            self._condition.notify_all()
        self._thread.join(FEED_JOIN_TIMEOUT)


class _Progress:
    """Where a consumer stands and when it saves: shared by ``Consumer`` and ``AsyncConsumer``."""

    def __init__(
        self,
        stream: str,
        name: str,
        positions: PositionStore,
        *,
        save_every: int | None,
        save_interval: float | None,
        state: Callable[[], JsonValue] | None,
        start: int | Start,
        clock: Callable[[], float],
    ) -> None:
        self.stream = validate_stream_name(stream)
        self.name = validate_consumer_name(name)
        if not isinstance(positions, PositionStore):
            raise TypeError(f"positions must be a PositionStore, not {type(positions).__name__}")
        self.positions = positions
        if save_every is None and save_interval is None:
            raise InvalidInput("give save_every, save_interval or both: when to save the position")
        if save_every is not None and (
            type(save_every) is not int or not 1 <= save_every <= MAX_SAVE_EVERY
        ):
            raise InvalidInput(
                f"save_every must be a whole number 1-{MAX_SAVE_EVERY}, not {save_every!r}"
            )
        if save_interval is not None and (
            isinstance(save_interval, bool)
            or not isinstance(save_interval, int | float)
            or not MIN_SAVE_INTERVAL <= save_interval <= MAX_SAVE_INTERVAL
        ):
            raise InvalidInput(
                f"save_interval must be {MIN_SAVE_INTERVAL}-{MAX_SAVE_INTERVAL:.0f} seconds, "
                f"not {save_interval!r}"
            )
        if state is not None and not callable(state):
            raise TypeError("state must be a function returning the state to save, or None")
        if start not in ("beginning", "end") and (type(start) is not int or start < 0):
            raise InvalidInput(
                f"start must be 'beginning', 'end' or a position (>= 0), not {start!r}"
            )
        self.save_every = save_every if save_every is not None else MAX_SAVE_EVERY + 1
        self.save_interval = save_interval
        self._state = state
        self.start = start
        self.clock = clock
        self.loaded = False
        self.saved: SavedPosition | None = None
        self.position: int | None = None  # the next message to handle
        self.unsaved = 0  # messages handled since the last save
        self.last_save = 0.0

    def accept(self, saved: SavedPosition | None) -> SavedPosition | None:
        if saved is not None and saved.stream != self.stream:
            raise InvalidInput(
                f"consumer {self.name!r} in {self.positions.describe()} follows stream "
                f"{saved.stream!r}, not {self.stream!r}: use another consumer name"
            )
        self.saved = saved
        self.loaded = True
        return saved

    def initial(self, end: Callable[[], int]) -> SavedPosition | None:
        """Where to begin: the saved position, else ``start`` (to be saved at once)."""
        if self.saved is not None:
            self.position = self.saved.position
            self.last_save = self.clock()  # the interval counts from the start of this run
            return None
        if self.start == "beginning":
            self.position = 0
        elif self.start == "end":
            self.position = end()
        else:
            self.position = self.start
        # Saved before anything is handled: a restart must not pick a new "end".
        return self.snapshot()

    def handled(self, next_position: int, count: int) -> bool:
        """Note handled messages; ``True`` if a save is due."""
        self.position = next_position
        self.unsaved += count
        return self.due()

    def due(self) -> bool:
        if not self.unsaved:
            return False
        if self.unsaved >= self.save_every:
            return True
        interval = self.save_interval
        return interval is not None and self.clock() - self.last_save >= interval

    def wait_time(self) -> float:
        """How long the loop may wait for messages before a timed save is due."""
        if not self.unsaved or self.save_interval is None:
            return IDLE_WAKE
        left = self.last_save + self.save_interval - self.clock()
        return min(max(left, 0.0), IDLE_WAKE)

    def snapshot(self) -> SavedPosition:
        assert self.position is not None
        state = self._state() if self._state is not None else None
        return SavedPosition(self.name, self.stream, self.position, state)

    def stored(self, saved: SavedPosition) -> None:
        self.saved = saved
        self.unsaved = 0
        self.last_save = self.clock()

    def resume_error(self, exc: InvalidPosition) -> InvalidPosition:
        return InvalidPosition(
            f"consumer {self.name!r} cannot resume at position {self.position} "
            f"(from {self.positions.describe()}): {exc}"
        )


def _check_poll_interval(poll_interval: float) -> None:
    if isinstance(poll_interval, bool) or not (
        isinstance(poll_interval, int | float) and 0 < poll_interval <= MAX_POLL_INTERVAL
    ):
        raise InvalidInput(
            f"poll_interval must be more than 0 and at most {MAX_POLL_INTERVAL:.0f} seconds, "
            f"not {poll_interval!r}"
        )


def _check_max_batch(max_batch: int) -> None:
    if type(max_batch) is not int or not 1 <= max_batch <= FEED_MAX_MESSAGES:
        raise InvalidInput(
            f"max_batch must be a whole number 1-{FEED_MAX_MESSAGES}, not {max_batch!r}"
        )


class Consumer:
    """Handles every message of a stream once or more, in order, resuming where it stopped.

    >>> from messagevault import MemoryStorage, Writer
    >>> from messagevault.positions import MemoryPositionStore
    >>> storage, positions = MemoryStorage(), MemoryPositionStore()
    >>> with Writer.open(storage, "orders", create=True) as writer:
    ...     _ = writer.append([(b"k", b"one"), (b"k", b"two")])
    >>> seen = []
    >>> with Consumer(storage, "orders", "audit", positions, save_every=1) as consumer:
    ...     consumer.run(lambda message: seen.append(message.value), follow=False)
    >>> seen, positions.load("audit").position == consumer.position
    ([b'one', b'two'], True)

    ``source`` is a ``Client`` (through the server) or, straight from
    storage, a ``Storage``, a ``Reader`` or a ``ReadAccess``. ``name`` names
    the consumer in ``positions``; one name is one position: two consumers
    running under one name get ``StaleWriter`` on their next save.

    The position is saved every ``save_every`` handled messages and/or
    every ``save_interval`` seconds (whichever comes first, measured by
    ``clock``), when ``run`` returns after a stop, and when the source
    fails; not when a handler raises. ``state`` returns what to save with
    each position (any JSON value); ``load()`` gives it back after a
    restart. ``start`` is where a consumer with no saved position begins:
    ``"beginning"``, ``"end"`` or a position. ``stop`` is an event that
    stops ``run`` when set, as ``stop()`` does. ``poll_interval`` is how
    often a storage source is checked for new messages at the tail.
    """

    def __init__(
        self,
        source: Source,
        stream: str,
        name: str,
        positions: PositionStore,
        *,
        save_every: int | None = 1000,
        save_interval: float | None = 5.0,
        state: Callable[[], JsonValue] | None = None,
        start: int | Start = "beginning",
        stop: threading.Event | None = None,
        poll_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress = _Progress(
            stream,
            name,
            positions,
            save_every=save_every,
            save_interval=save_interval,
            state=state,
            start=start,
            clock=clock,
        )
        _check_poll_interval(poll_interval)
        self._stream = _Stream(source, self._progress.stream, poll_interval)
        self._stop = stop if stop is not None else threading.Event()
        self._running = False

    @property
    def name(self) -> str:
        return self._progress.name

    @property
    def position(self) -> int | None:
        """The position of the next message to handle (``None`` before ``run``)."""
        return self._progress.position

    @property
    def saved(self) -> SavedPosition | None:
        """What was saved last (or loaded), with its state."""
        return self._progress.saved

    def load(self) -> SavedPosition | None:
        """The saved position and state, read once from the store (``None`` if there is none).

        ``run`` calls it if you have not: call it first to restore your
        own state from ``saved.state`` before handling resumes.
        """
        progress = self._progress
        if not progress.loaded:
            progress.accept(progress.positions.load(progress.name))
        return progress.saved

    def stop(self) -> None:
        """Make ``run`` return after the message in hand (thread-safe; also from a handler)."""
        self._stop.set()

    def run(
        self,
        handler: Callable[[Message], object],
        *,
        follow: bool = True,
        handle_signals: bool = True,
    ) -> None:
        """Call ``handler(message)`` for each message, saving the position as it goes.

        Blocks until stopped (``stop()``, the ``stop`` event, SIGINT/SIGTERM
        when ``handle_signals`` and called from the main thread), or, with
        ``follow=False``, until the end of the stream as it was at the start.
        If the handler raises, ``run`` raises it without saving.
        """
        if not callable(handler):
            raise TypeError("handler must be a function taking a Message")
        self._run(handler, None, FEED_MAX_MESSAGES, follow, handle_signals)

    def run_batches(
        self,
        handler: Callable[[list[Message]], object],
        *,
        max_batch: int = 1000,
        follow: bool = True,
        handle_signals: bool = True,
    ) -> None:
        """Like ``run``, with ``handler(messages)`` called on up to ``max_batch`` messages at once.

        A batch is whatever has arrived (never empty); the position is
        saved only between batches, so ``save_every`` is reached at the
        first batch that completes it.
        """
        if not callable(handler):
            raise TypeError("handler must be a function taking a list of Messages")
        _check_max_batch(max_batch)
        self._run(None, handler, max_batch, follow, handle_signals)

    def _run(
        self,
        on_message: Callable[[Message], object] | None,
        on_batch: Callable[[list[Message]], object] | None,
        max_batch: int,
        follow: bool,
        handle_signals: bool,
    ) -> None:
        if self._running:
            raise RuntimeError(f"consumer {self.name!r} is already running")
        self._running = True
        progress = self._progress
        try:
            with _stop_on_signals(self._stop, handle_signals):
                self.load()
                stream = self._stream
                stream.open()
                first = progress.initial(stream.end)
                if first is not None:
                    self._save(first, replaces=None)
                start = progress.position
                assert start is not None
                feed = _Feed(lambda stop: stream.messages(start, follow=follow, stop=stop))
                try:
                    self._handle(feed, on_message, on_batch, max_batch)
                finally:
                    feed.close()
                # Every handler has returned: the position is safe to save.
                if progress.unsaved:
                    self._save(progress.snapshot(), replaces=progress.saved)
                if feed.error is not None:
                    if isinstance(feed.error, InvalidPosition) and progress.position == start:
                        raise progress.resume_error(feed.error) from feed.error
                    raise feed.error
        finally:
            self._running = False

    def _handle(
        self,
        feed: _Feed,
        on_message: Callable[[Message], object] | None,
        on_batch: Callable[[list[Message]], object] | None,
        max_batch: int,
    ) -> None:
        progress = self._progress
        stop = self._stop
        while not stop.is_set():
            batch = feed.take(max_batch, progress.wait_time())
            if batch is None:
                return
            if on_batch is not None:
                if batch:
                    on_batch(batch)
                    if progress.handled(batch[-1].next_position, len(batch)):
                        self._save(progress.snapshot(), replaces=progress.saved)
            else:
                assert on_message is not None
                for message in batch:
                    if stop.is_set():
                        return
                    on_message(message)
                    if progress.handled(message.next_position, 1):
                        self._save(progress.snapshot(), replaces=progress.saved)
            if progress.due():  # a timed save while idle
                self._save(progress.snapshot(), replaces=progress.saved)

    def _save(self, saved: SavedPosition, *, replaces: SavedPosition | None) -> None:
        self._progress.stored(self._progress.positions.save(saved, replaces=replaces))

    def close(self) -> None:
        """Stop, and close the reader this consumer opened (not a client or reader it was given)."""
        self._stop.set()
        self._stream.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, enabled: bool) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``; a second SIGINT interrupts as usual."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        stop.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {number: signal.signal(number, on_signal) for number in _SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _AsyncFeed:
    """Messages from an async iterator, fetched by a task while the handler runs."""

    def __init__(self, messages: AsyncIterator[Message]) -> None:
        self._messages = messages
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._done = False
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            async for message in self._messages:
                self._buffer.append(message)
                self._arrived.set()
                while len(self._buffer) >= FEED_MAX_MESSAGES:
                    self._room.clear()
                    await self._room.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed over, raised by run()
            self.error = exc
        finally:
            self._done = True
            self._arrived.set()

    async def take(self, limit: int, timeout: float) -> list[Message] | None:
        buffer = self._buffer
        if not buffer and not self._done:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        if not buffer:
            return None if self._done else []
        batch = [buffer.popleft() for _ in range(min(limit, len(buffer)))]
        self._room.set()
        return batch

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        aclose = getattr(self._messages, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class _ThreadFeed:
    """A ``_Feed`` (storage sources) as seen from asyncio: each take waits in a thread."""

    def __init__(self, feed: _Feed) -> None:
        self._feed = feed

    @property
    def error(self) -> BaseException | None:
        return self._feed.error

    async def take(self, limit: int, timeout: float) -> list[Message] | None:
        if self._feed._buffer:  # no thread hop while messages wait
            return self._feed.take(limit, 0)
        return await asyncio.to_thread(self._feed.take, limit, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self._feed.close)


class AsyncConsumer:
    """The asyncio twin of ``Consumer``: ``await consumer.run(handler)``.

    ``source`` is an ``AsyncClient``, or storage (a ``Storage``, ``Reader``
    or ``ReadAccess``, read on a thread). Handlers may be ``async def`` or
    plain functions. Saves run in a thread; ``state()`` is called on the
    event loop, and what it returns must not change while it is saved
    (return a copy if other tasks change it). Stop with ``stop()`` or by
    cancelling ``run``: a cancelled consumer does not save.
    """

    def __init__(
        self,
        source: AsyncStreamClient | Storage | Reader | ReadAccess,
        stream: str,
        name: str,
        positions: PositionStore,
        *,
        save_every: int | None = 1000,
        save_interval: float | None = 5.0,
        state: Callable[[], JsonValue] | None = None,
        start: int | Start = "beginning",
        poll_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress = _Progress(
            stream,
            name,
            positions,
            save_every=save_every,
            save_interval=save_interval,
            state=state,
            start=start,
            clock=clock,
        )
        _check_poll_interval(poll_interval)
        self._client: AsyncStreamClient | None = None
        self._stream: _Stream | None = None
        if isinstance(source, Reader | ReadAccess) or hasattr(source, "open_stream"):
            self._stream = _Stream(source, self._progress.stream, poll_interval)
        elif hasattr(source, "follow") and hasattr(source, "info"):
            self._client = source
        else:
            raise TypeError(
                "an async consumer reads from an AsyncClient, a Storage, a Reader or a "
                f"ReadAccess, not {type(source).__name__}"
            )
        self._stop = asyncio.Event()
        self._running = False

    @property
    def name(self) -> str:
        return self._progress.name

    @property
    def position(self) -> int | None:
        return self._progress.position

    @property
    def saved(self) -> SavedPosition | None:
        return self._progress.saved

    async def load(self) -> SavedPosition | None:
        """As ``Consumer.load``."""
        progress = self._progress
        if not progress.loaded:
            progress.accept(await asyncio.to_thread(progress.positions.load, progress.name))
        return progress.saved

    def stop(self) -> None:
        """Make ``run`` return after the message in hand (from the event loop's thread)."""
        self._stop.set()

    async def run(
        self, handler: Callable[[Message], Awaitable[object] | object], *, follow: bool = True
    ) -> None:
        """As ``Consumer.run``; ``handler`` may be a coroutine function."""
        if not callable(handler):
            raise TypeError("handler must be a function taking a Message")
        await self._run(handler, None, FEED_MAX_MESSAGES, follow)

    async def run_batches(
        self,
        handler: Callable[[list[Message]], Awaitable[object] | object],
        *,
        max_batch: int = 1000,
        follow: bool = True,
    ) -> None:
        """As ``Consumer.run_batches``; ``handler`` may be a coroutine function."""
        if not callable(handler):
            raise TypeError("handler must be a function taking a list of Messages")
        _check_max_batch(max_batch)
        await self._run(None, handler, max_batch, follow)

    async def _open(self) -> int:
        """Check that the stream exists; its committed end."""
        if self._stream is not None:
            stream = self._stream

            def open_stream() -> int:
                stream.open()
                return stream.end()

            return await asyncio.to_thread(open_stream)
        assert self._client is not None
        return (await self._client.info(self._progress.stream)).length

    def _open_feed(self, start: int, follow: bool) -> _AsyncFeed | _ThreadFeed:
        stream = self._stream
        if stream is not None:
            return _ThreadFeed(_Feed(lambda stop: stream.messages(start, follow=follow, stop=stop)))
        assert self._client is not None
        name = self._progress.stream
        read = self._client.follow if follow else self._client.read
        return _AsyncFeed(read(name, start))

    async def _run(
        self,
        on_message: Callable[[Message], Any] | None,
        on_batch: Callable[[list[Message]], Any] | None,
        max_batch: int,
        follow: bool,
    ) -> None:
        if self._running:
            raise RuntimeError(f"consumer {self.name!r} is already running")
        self._running = True
        progress = self._progress
        try:
            await self.load()
            end = await self._open()
            first = progress.initial(lambda: end)
            if first is not None:
                await self._save(first, replaces=None)
            start = progress.position
            assert start is not None
            feed = self._open_feed(start, follow)
            try:
                await self._handle(feed, on_message, on_batch, max_batch)
            finally:
                await feed.close()
            if progress.unsaved:
                await self._save(progress.snapshot(), replaces=progress.saved)
            if feed.error is not None:
                if isinstance(feed.error, InvalidPosition) and progress.position == start:
                    raise progress.resume_error(feed.error) from feed.error
                raise feed.error
        finally:
            self._running = False

    async def _handle(
        self,
        feed: _AsyncFeed | _ThreadFeed,
        on_message: Callable[[Message], Any] | None,
        on_batch: Callable[[list[Message]], Any] | None,
        max_batch: int,
    ) -> None:
        progress = self._progress
        stop = self._stop
        while not stop.is_set():
            batch = await feed.take(max_batch, progress.wait_time())
            if batch is None:
                return
            if on_batch is not None:
                if batch:
                    result = on_batch(batch)
                    if inspect.isawaitable(result):
                        await result
                    if progress.handled(batch[-1].next_position, len(batch)):
                        await self._save(progress.snapshot(), replaces=progress.saved)
            else:
                assert on_message is not None
                for message in batch:
                    if stop.is_set():
                        return
                    result = on_message(message)
                    if inspect.isawaitable(result):
                        await result
                    if progress.handled(message.next_position, 1):
                        await self._save(progress.snapshot(), replaces=progress.saved)
            if progress.due():
                await self._save(progress.snapshot(), replaces=progress.saved)

    async def _save(self, saved: SavedPosition, *, replaces: SavedPosition | None) -> None:
        positions = self._progress.positions
        self._progress.stored(await asyncio.to_thread(positions.save, saved, replaces=replaces))

    async def aclose(self) -> None:
        """Stop, and close the reader this consumer opened."""
        self._stop.set()
        if self._stream is not None:
            await asyncio.to_thread(self._stream.close)

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
