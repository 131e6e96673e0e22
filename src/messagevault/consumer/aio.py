"""``AsyncConsumer``: the asyncio twin of ``Consumer``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from messagevault.consumer.feeds import (
    FEED_MAX_BYTES,
    FEED_MAX_MESSAGES,
    Feed,
    ReaderFeed,
    Stream,
    StreamInfo,
    check_max_batch,
)
from messagevault.consumer.progress import Progress, Start
from messagevault.errors import InvalidPosition
from messagevault.format import Message
from messagevault.polling import DEFAULT_POLL_INTERVAL, check_poll_options
from messagevault.positions import JsonValue, PositionStore, SavedPosition
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess, Storage


class AsyncStreamClient(Protocol):
    """What an ``AsyncConsumer`` needs of ``messagevault.client.AsyncClient``."""

    async def info(self, stream: str) -> StreamInfo: ...

    def read(self, stream: str, position: int = 0) -> AsyncIterator[Message]: ...

    def follow(self, stream: str, position: int = 0) -> AsyncIterator[Message]: ...


class AsyncFeed:
    """Messages from an async iterator, fetched by a task while the handler runs."""

    def __init__(self, messages: AsyncIterator[Message]) -> None:
        self._messages = messages
        self._buffer: deque[Message] = deque()
        self._bytes = 0  # keys and values buffered
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._done = False
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            async for message in self._messages:
                self._buffer.append(message)
                self._bytes += len(message.key) + len(message.value)
                self._arrived.set()
                while len(self._buffer) >= FEED_MAX_MESSAGES or self._bytes >= FEED_MAX_BYTES:
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
        self._bytes -= sum(len(message.key) + len(message.value) for message in batch)
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


class ThreadFeed:
    """A blocking feed (storage sources) as seen from asyncio: each take runs in a thread."""

    def __init__(self, feed: Feed | ReaderFeed, stop: threading.Event) -> None:
        self._feed = feed
        self._stop = stop

    @property
    def error(self) -> BaseException | None:
        return self._feed.error

    async def take(self, limit: int, timeout: float) -> list[Message] | None:
        return await asyncio.to_thread(self._feed.take, limit, timeout)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._feed.close)


class AsyncConsumer:
    """The asyncio twin of ``Consumer``: ``await consumer.run(handler)``.

    ``source`` is an ``AsyncClient``, or storage (a ``Storage``, ``Reader``
    or ``ReadAccess``, read on a thread). Handlers may be ``async def`` or
    plain functions. Saves run in a thread; ``state()`` is called on the
    event loop, and what it returns must not change while it is saved
    (return a copy if other tasks change it). Stop with ``stop()`` or by
    cancelling ``run``: a cancelled consumer does not save. ``poll_interval``
    and ``max_poll_interval`` are as for ``Consumer``.
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
        self._client: AsyncStreamClient | None = None
        self._stream: Stream | None = None
        if isinstance(source, Reader | ReadAccess) or hasattr(source, "open_stream"):
            self._stream = Stream(source, self._progress.stream, poll_interval, max_poll_interval)
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
        check_max_batch(max_batch)
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

    async def _open_feed(self, start: int, follow: bool) -> AsyncFeed | ThreadFeed:
        stream = self._stream
        if stream is not None:
            stop = threading.Event()
            feed = await asyncio.to_thread(stream.feed, start, follow=follow, stop=stop)
            return ThreadFeed(feed, stop)
        assert self._client is not None
        name = self._progress.stream
        read = self._client.follow if follow else self._client.read
        return AsyncFeed(read(name, start))

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
            try:
                feed = await self._open_feed(start, follow)
            except InvalidPosition as exc:
                raise progress.resume_error(exc) from exc
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
        feed: AsyncFeed | ThreadFeed,
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
