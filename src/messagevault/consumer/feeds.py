"""Where a consumer's messages come from: storage read inline, or a client on a thread.

``Stream`` sorts out the source (a ``Client``, a ``Storage``, a ``Reader``
or a ``ReadAccess``); its ``feed`` hands messages over in batches of
whatever has arrived, through one interface, ``take(limit, timeout)``.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Protocol

from messagevault.consumer.progress import IDLE_WAKE
from messagevault.errors import InvalidInput
from messagevault.format import Message
from messagevault.polling import PollBackoff
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess, Storage

# Fetched but unhandled messages are bounded by count and by bytes.
FEED_MAX_MESSAGES = 10_000
FEED_MAX_BYTES = 32 * 1024 * 1024
FEED_JOIN_TIMEOUT = 5.0
_NEGLIGIBLE = 1e-9  # seconds


class StreamInfo(Protocol):
    @property
    def length(self) -> int: ...


class StreamClient(Protocol):
    """What a consumer needs of ``messagevault.client.Client``."""

    def info(self, stream: str) -> StreamInfo: ...

    def read(self, stream: str, position: int = 0) -> Iterator[Message]: ...

    def follow(
        self, stream: str, position: int = 0, *, stop: threading.Event | None = None
    ) -> Iterator[Message]: ...


class Stream:
    """One stream of one synchronous source: its end, and its messages from a position."""

    def __init__(
        self,
        source: object,
        stream: str,
        poll_interval: float,
        max_poll_interval: float | None = None,
    ) -> None:
        self._client: StreamClient | None = None
        self._reader: Reader | None = None
        self._storage: Storage | None = None  # opened into a reader by ``open``
        self._access: ReadAccess | None = None  # likewise
        self._stream = stream
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        if isinstance(source, Reader):
            check_same_stream(source.name, stream, "the reader")
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
                    check_same_stream(reader.name, self._stream, "the read access")
            else:
                assert self._storage is not None
                reader = Reader.open(self._storage, self._stream)
            self._reader = reader

    def end(self) -> int:
        if self._reader is not None:
            return self._reader.checkpoint().length
        assert self._client is not None
        return self._client.info(self._stream).length

    def feed(self, position: int, *, follow: bool, stop: threading.Event) -> Feed | ReaderFeed:
        """Messages from ``position``; ``InvalidPosition`` here if it is not a message's."""
        if self._reader is not None:
            backoff = PollBackoff(self._poll_interval, self._max_poll_interval)
            return ReaderFeed(self._reader, position, follow, backoff, stop)
        client, stream = self._client, self._stream
        assert client is not None
        if follow:
            return Feed(lambda stop: client.follow(stream, position, stop=stop))
        return Feed(lambda stop: client.read(stream, position))

    def close(self) -> None:
        if self._owned and self._reader is not None:
            self._reader.close()


def check_same_stream(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise InvalidInput(
            f"{what} reads stream {actual!r}, but the consumer was given {expected!r}"
        )


class ReaderFeed:
    """Messages straight from a ``Reader``, read on the handler's own thread.

    A read never blocks (it stops at the committed end), so no fetching
    thread is needed; at the end, ``follow`` reads again after the waits
    ``backoff`` gives, as ``Reader.follow`` does: longer while the stream
    is idle, short again once data comes.
    """

    def __init__(
        self,
        reader: Reader,
        position: int,
        follow: bool,
        backoff: PollBackoff,
        stop: threading.Event,
    ) -> None:
        self._reader = reader
        self._position = position
        self._follow = follow
        self._backoff = backoff
        # Seconds still to wait before storage is read again. The consumer's
        # loop comes back every IDLE_WAKE at most (timed saves, stop events),
        # so one backoff wait spans several takes. It is counted down by the
        # waits asked for rather than a clock: an event wait ends early only
        # when the consumer stops, and the feed's polls stay a pure function
        # of its waits.
        self._until_poll = 0.0
        self._stop = stop
        self._messages: Iterator[Message] = reader.read(position)
        self.error: BaseException | None = None

    def take(self, limit: int, timeout: float) -> list[Message] | None:
        """Up to ``limit`` messages; waits up to ``timeout`` s for one. ``None``: the end.

        A failed read ends the feed too, with ``error`` set: the consumer
        saves what its handler finished before it raises the error.
        """
        if self.error is not None:
            return None
        batch: list[Message] = []
        try:
            # extend() keeps what came before a failure: those are handed over first.
            batch.extend(islice(self._messages, limit))
            if not batch:
                if not self._follow:
                    return None
                if self._until_poll <= 0:
                    self._messages = self._reader.read(self._position)  # committed since
                    batch.extend(islice(self._messages, limit))
                    if batch:
                        self._backoff.found()
                    else:
                        self._until_poll = self._backoff.idle()
                if not batch:
                    wait = min(timeout, self._until_poll)
                    self._stop.wait(wait)
                    self._until_poll -= wait
                    if self._until_poll < _NEGLIGIBLE:  # float residue is no reason to wait
                        self._until_poll = 0.0
                    return batch
        except Exception as exc:  # noqa: BLE001 - handed over, raised by run()
            self.error = exc
            if not batch:
                return None
        self._position = batch[-1].next_position
        return batch

    def close(self) -> None:
        self._messages = iter(())


_KEY = operator.itemgetter(3)
_VALUE = operator.itemgetter(4)


class Feed:
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
        # Locals and one combined test per message: this loop runs on every
        # message, sharing the interpreter with the handler's thread.
        buffer = self._buffer
        append = buffer.append
        stopped = self.stop.is_set
        bytes_in = 0
        iterator: Iterator[Message] | None = None
        try:
            iterator = self._messages(self.stop)
            for message in iterator:
                append(message)
                bytes_in += len(message[3]) + len(message[4])  # key, value
                self._bytes_in = bytes_in
                if (
                    self._taker_waits
                    or len(buffer) >= FEED_MAX_MESSAGES
                    or bytes_in - self._bytes_out >= FEED_MAX_BYTES
                ):
                    with self._condition:
                        self._condition.notify_all()
                        while self._full() and not stopped():
                            self._fetcher_waits = True
                            self._condition.wait(IDLE_WAKE)
                        self._fetcher_waits = False
                if stopped():
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
                # The flag goes up before the buffer is looked at: the fetcher
                # appends, then reads the flag; so either this sees its
                # message, or it sees the flag and notifies.
                self._taker_waits = True
                if not buffer and not self._done:
                    self._condition.wait(timeout)
                self._taker_waits = False
            if not buffer:
                return None if self._done else []
        popleft = buffer.popleft
        batch = [popleft() for _ in range(min(limit, len(buffer)))]
        self._bytes_out += sum(map(len, map(_KEY, batch))) + sum(map(len, map(_VALUE, batch)))
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


def check_max_batch(max_batch: int) -> None:
    if type(max_batch) is not int or not 1 <= max_batch <= FEED_MAX_MESSAGES:
        raise InvalidInput(
            f"max_batch must be a whole number 1-{FEED_MAX_MESSAGES}, not {max_batch!r}"
        )
