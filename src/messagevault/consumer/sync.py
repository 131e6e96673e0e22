"""``Consumer``: the blocking consumer, run on a thread of its own (often the main one)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from messagevault.consumer.feeds import (
    FEED_MAX_MESSAGES,
    Feed,
    ReaderFeed,
    Stream,
    StreamClient,
    check_max_batch,
)
from messagevault.consumer.progress import Progress, Start
from messagevault.errors import InvalidPosition
from messagevault.format import Message
from messagevault.polling import DEFAULT_POLL_INTERVAL, check_poll_options
from messagevault.positions import JsonValue, PositionStore, SavedPosition
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess, Storage

Source = StreamClient | Storage | Reader | ReadAccess


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
    stops ``run`` when set, as ``stop()`` does. ``poll_interval`` and
    ``max_poll_interval`` are how often a storage source is checked for new
    messages at the tail, as for ``Reader.follow``: the wait doubles while
    the stream is idle, up to the ceiling (default 2 s).
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
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress = Progress(
            stream,
            name,
            positions,
            save_every=save_every,
            save_interval=save_interval,
            state=state,
            start=start,
            clock=clock,
        )
        poll_interval, max_poll_interval = check_poll_options(poll_interval, max_poll_interval)
        self._stream = Stream(source, self._progress.stream, poll_interval, max_poll_interval)
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
        check_max_batch(max_batch)
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
                try:
                    feed = stream.feed(start, follow=follow, stop=self._stop)
                except InvalidPosition as exc:
                    raise progress.resume_error(exc) from exc
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
        feed: Feed | ReaderFeed,
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
