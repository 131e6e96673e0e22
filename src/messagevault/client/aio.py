"""``AsyncClient``: the asyncio client, over aiohttp (which the server already depends on)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterable
from itertools import islice
from types import TracebackType
from typing import Any

import aiohttp

from messagevault.client.base import (
    DEFAULT_RETRY_TIMEOUT,
    EARLY_EMPTY,
    FOLLOW_WAIT,
    Answer,
    Lost,
    NotSent,
    Page,
    Request,
    Retries,
    Settings,
    answered_error,
    batch_of,
    check_limit,
    give_up,
    idempotent_batch,
    info_request,
    json_of,
    page_of,
    page_request,
    publish_request,
    published,
    read_access_of,
    records_ahead,
    records_of,
    records_request,
    stream_infos,
    streams_request,
    too_large,
)
from messagevault.client.sync import Client, MessageLike
from messagevault.errors import ClientClosed, InvalidInput, RequestTooLarge
from messagevault.format import EncodedBatch, Message
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess
from messagevault.wire import StreamInfo
from messagevault.writer import AppendResult

# A request that ended because ``stop`` was set or the client closed.
_STOPPED = Answer(0, {}, b"")


class AsyncClient:
    """The asyncio twin of ``Client``: the same methods, awaited; ``aclose()``, ``async with``.

    >>> async with AsyncClient() as client:  # doctest: +SKIP
    ...     await client.publish("orders", [("OrderPlaced", b'{"id": 7}')])
    ...     async for message in client.follow("orders"):
    ...         print(message.sequence, message.value)

    ``read`` and ``follow`` are async iterators. Retries, timeouts and
    errors are as for ``Client``; ``follow`` also ends when ``stop`` (an
    ``asyncio.Event``) is set and when its task is cancelled. One client
    belongs to one event loop: its connections are made on first use.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        idempotent: bool = True,
    ) -> None:
        self._settings = Settings.resolve(
            url,
            user,
            password,
            timeout,
            retries,
            retry_timeout=retry_timeout,
            idempotent=idempotent,
        )
        self._base = self._settings.url
        self._prefix = self._settings.prefix
        self._session: aiohttp.ClientSession | None = None
        self._renewer: Client | None = None  # for readers' SAS renewals, which are blocking
        self._closed = False

    @property
    def idempotent(self) -> bool:
        """Whether appends carry a producer id and are retried safely (``Producer`` asks)."""
        return self._settings.idempotent

    @property
    def url(self) -> str:
        """The server's base URL (without credentials)."""
        return self._base

    async def publish(
        self, stream: str, messages: Iterable[MessageLike], *, compress: bool = False
    ) -> AppendResult:
        """Append ``messages`` as one batch (see ``Client.publish``)."""
        return await self.publish_batch(stream, batch_of(messages, compress=compress))

    async def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
        """Append a batch already encoded (see ``Client.publish_batch``)."""
        batch = idempotent_batch(self._settings, batch)
        try:
            answer = await self._call(publish_request(self._settings, stream, batch))
        except RequestTooLarge as exc:
            raise too_large(exc, batch) from None
        return published(answer, batch)

    async def streams(self) -> list[StreamInfo]:
        """The streams the user may read (name, length, message count)."""
        return stream_infos(await self._call(streams_request(self._settings)))

    async def info(self, stream: str) -> StreamInfo:
        """A stream's committed state and its direct read access."""
        answer = await self._call(info_request(self._settings, stream))
        return StreamInfo.from_json(json_of(answer))

    async def read(
        self, stream: str, position: int = 0, *, limit: int | None = None
    ) -> AsyncIterator[Message]:
        """Messages from ``position`` to the end of the stream (see ``Client.read``)."""
        check_limit(limit)
        remaining = sys.maxsize if limit is None else limit
        while remaining:
            page = await self._page(stream, position, None if limit is None else remaining)
            if not page.count:
                return
            if page.count >= remaining:
                for message in islice(page.messages, remaining):
                    yield message
                return
            for message in page.messages:
                yield message
            remaining -= page.count
            position = page.next_position

    async def read_records(
        self, stream: str, position: int = 0, *, limit: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Messages from ``position`` as JSON records (see ``Client.read_records``)."""
        check_limit(limit)
        remaining = sys.maxsize if limit is None else limit
        if not remaining:
            return
        answer = await self._call(records_request(self._settings, stream, position, limit))
        upcoming: asyncio.Future[Answer] | None = None
        try:
            while True:
                count, next_position = records_ahead(answer)
                if not count:
                    return
                remaining -= count
                if remaining > 0:
                    rest = None if limit is None else remaining
                    request = records_request(self._settings, stream, next_position, rest)
                    upcoming = asyncio.ensure_future(self._call(request))
                    await asyncio.sleep(0)  # sent before decoding holds the loop
                records = records_of(answer)
                for record in records if remaining >= 0 else records[:remaining]:
                    yield record
                if upcoming is None:
                    return
                answer, upcoming = await upcoming, None
        finally:
            if upcoming is not None:  # the caller stopped early: the answer is not needed
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)

    async def _page(self, stream: str, position: int, limit: int | None) -> Page:
        answer = await self._call(page_request(self._settings, stream, position, limit))
        return page_of(answer, position)

    async def follow(
        self, stream: str, position: int = 0, *, stop: asyncio.Event | None = None
    ) -> AsyncIterator[Message]:
        """Messages from ``position`` on, for ever (see ``Client.follow``).

        Ends when ``stop`` is set, when the client is closed, when the
        consuming task is cancelled, or when the iterator is closed.
        """

        def stopped() -> bool:
            return self._closed or (stop is not None and stop.is_set())

        while not stopped():
            request = page_request(self._settings, stream, position, None, FOLLOW_WAIT)
            asked = time.monotonic()
            answer = await self._poll(request, stop)
            if answer is _STOPPED:
                return
            page = page_of(answer, position)
            if not page.count and time.monotonic() - asked < EARLY_EMPTY:
                await asyncio.sleep(EARLY_EMPTY)  # the server ended the wait: shutting down
            for message in page.messages:
                yield message
                if stopped():
                    return
            position = page.next_position

    async def _poll(self, request: Request, stop: asyncio.Event | None) -> Answer:
        """A long poll that a set ``stop`` cuts short (then ``_STOPPED``)."""
        call = self._call(request, patience=self._settings.timeout)
        if stop is None:
            return await call
        answering = asyncio.ensure_future(call)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({answering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answering, stopping):
                task.cancel()
            # Collect both, so that neither is left pending or with an unread error.
            await asyncio.gather(answering, stopping, return_exceptions=True)
        if stop.is_set() or answering.cancelled():
            return _STOPPED
        return answering.result()

    async def open_reader(self, stream: str) -> Reader:
        """A ``Reader`` on the stream's storage itself (see ``Client.open_reader``).

        The reader is blocking (run it in a thread); it renews an expiring SAS
        with a blocking request of its own, so it never waits on this loop.
        """
        access = read_access_of(await self.info(stream))

        def renew() -> ReadAccess:
            if self._renewer is None:
                self._renewer = Client._from_settings(self._settings)
            return read_access_of(self._renewer.info(stream))

        try:
            return Reader.from_read_access(
                access, refresh=renew if access.expires_at is not None else None
            )
        except ValueError as exc:
            raise InvalidInput(f"stream {stream!r} cannot be read directly here: {exc}") from None

    # Requests --------------------------------------------------------------------------

    async def _call(self, request: Request, *, patience: float | None = None) -> Answer:
        """Send ``request``, retrying as ``Retries`` allows (see ``Client._call``)."""
        if patience is None:
            retries = Retries.for_request(self._settings, request)
        else:
            retries = Retries(sys.maxsize, deadline=time.monotonic() + patience)
        while True:
            if self._closed:
                if patience is not None:
                    return _STOPPED
                raise ClientClosed("the client is closed")
            failure: BaseException
            try:
                answer = await self._send(request)
            except (NotSent, Lost) as exc:
                failure = exc
            else:
                error = answered_error(answer)
                if error is None:
                    return answer
                failure = error
            delay = retries.next_delay(failure, request)
            if delay is None:
                if self._closed and patience is not None:
                    return _STOPPED
                raise give_up(failure, request, self._settings) from None
            await asyncio.sleep(delay)

    async def _send(self, request: Request) -> Answer:
        session = self._open_session()
        options: dict[str, Any] = {}
        if request.wait:  # the server may hold the answer that long
            seconds = self._settings.timeout
            options["timeout"] = aiohttp.ClientTimeout(
                total=None, sock_connect=seconds, sock_read=seconds + request.wait
            )
        try:
            async with session.request(
                request.method,
                self._prefix + request.path,
                data=request.body,
                headers=request.headers,
                **options,
            ) as response:
                body = await response.read()
                return Answer(response.status, response.headers, body)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise NotSent(exc) from exc  # refused, unreachable, no such host: never sent
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Lost(exc) from exc

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise NotSent("the client is closed")
        if self._session is None:
            seconds = self._settings.timeout
            self._session = aiohttp.ClientSession(
                self._settings.origin,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds),
                connector=aiohttp.TCPConnector(limit=100),
            )
        return self._session

    # Lifetime --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close connections; ends ``follow`` loops (a waiting one within ~0 s)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._renewer is not None:
            self._renewer.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
