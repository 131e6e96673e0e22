"""``AsyncClient``: the asyncio client, over a lean HTTP/1.1 connection of its own (``http1``)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from itertools import islice
from types import TracebackType
from typing import Any

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
    Seek,
    Settings,
    Trimmed,
    answered_error,
    batch_of,
    check_limit,
    clear_retention_request,
    cluster_request,
    delete_request,
    give_up,
    idempotent_batch,
    info_request,
    json_of,
    no_content,
    page_of,
    page_request,
    publish_request,
    published,
    read_access_of,
    read_start,
    records_ahead,
    records_of,
    records_request,
    retention_request,
    seek_start,
    sought,
    started_at,
    stream_infos,
    streams_request,
    too_large,
    trim_request,
    unreachable,
)
from messagevault.client.http1 import AsyncConnection, BadAnswer, tls_context
from messagevault.client.nodes import WRITER_HEADER, Node, Nodes, Route
from messagevault.client.sync import Client, MessageLike
from messagevault.errors import ClientClosed, InvalidInput, InvalidPosition, RequestTooLarge
from messagevault.format import EncodedBatch, Message
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess
from messagevault.wire import StreamInfo
from messagevault.writer import AppendResult

# A request that ended because ``stop`` was set or the client closed.
_STOPPED = Answer(0, {}, b"")


class _Pool:
    """Keep-alive connections to one node for one event loop, at most ``limit`` at a time."""

    def __init__(
        self, settings: Settings, node: Node, limit: int = 100, max_idle: int = 16
    ) -> None:
        self._settings = settings
        self._node = node
        self._max_idle = max_idle
        self._idle: list[AsyncConnection] = []
        self._busy: set[AsyncConnection] = set()
        self._room = asyncio.Semaphore(limit)
        self._tls = tls_context() if node.scheme == "https" else None
        self.closed = False

    async def take(self) -> AsyncConnection:
        """A connected connection: an idle one still open, or a new one (``NotSent`` if not)."""
        await self._room.acquire()
        try:
            while self._idle:
                connection = self._idle.pop()
                if not connection.dropped:
                    self._busy.add(connection)
                    return connection
                connection.close()
            node = self._node
            connection = AsyncConnection(
                node.host, node.port, timeout=self._settings.timeout, tls=self._tls
            )
            try:
                await connection.connect()
            except (OSError, TimeoutError) as exc:  # refused, unreachable, connect timeout
                connection.close()
                raise NotSent(exc) from exc
            if self.closed:
                connection.close()
                raise NotSent("the client is closed")
            self._busy.add(connection)
            return connection
        except BaseException:
            self._room.release()
            raise

    def give(self, connection: AsyncConnection) -> None:
        self._busy.discard(connection)
        self._room.release()
        if not self.closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    def discard(self, connection: AsyncConnection) -> None:
        self._busy.discard(connection)
        self._room.release()
        connection.close()

    def close(self) -> None:
        """Close every connection, busy ones too: their requests fail at once."""
        self.closed = True
        connections = [*self._idle, *self._busy]
        self._idle, self._busy = [], set()
        for connection in connections:
            connection.close()


class AsyncClient:
    """The asyncio twin of ``Client``: the same methods, awaited; ``aclose()``, ``async with``.

    >>> async with AsyncClient() as client:  # doctest: +SKIP
    ...     await client.publish("orders", [("OrderPlaced", b'{"id": 7}')])
    ...     async for message in client.follow("orders"):
    ...         print(message.sequence, message.value)

    ``read`` and ``follow`` are async iterators. Retries, timeouts and
    errors are as for ``Client``; ``follow`` also ends when ``stop`` (an
    ``asyncio.Event``) is set and when its task is cancelled. One client
    belongs to one event loop: its connections are made on first use. Like
    ``Client``, it may be given several nodes of one server.
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
        self._nodes = Nodes(self._settings.nodes)
        self._pools: dict[Node, _Pool] = {}  # made on first use, on the running loop
        self._renewer: Client | None = None  # for readers' SAS renewals, which are blocking
        self._closed = False

    @property
    def idempotent(self) -> bool:
        """Whether appends carry a producer id and are retried safely (``Producer`` asks)."""
        return self._settings.idempotent

    @property
    def url(self) -> str:
        """The server's base URL (without credentials); several nodes', comma-separated."""
        return self._settings.url

    @property
    def nodes(self) -> tuple[str, ...]:
        """The base URL of each of the server's nodes the client was given."""
        return tuple(node.url for node in self._settings.nodes)

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

    async def cluster(self) -> dict[str, Any]:
        """The server's nodes and which node writes each stream (``GET /cluster``).

        ``{"node": None, "role": "single", ...}`` from a server that is the
        only one of its storage.
        """
        answer: dict[str, Any] = json_of(await self._call(cluster_request(self._settings)))
        return answer

    async def info(self, stream: str) -> StreamInfo:
        """A stream's committed state and its direct read access."""
        answer = await self._call(info_request(self._settings, stream))
        return StreamInfo.from_json(json_of(answer))

    # Administration (the admin claim) ----------------------------------------------------

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream`` and everything in it, for good; ``StreamNotFound`` if there is none."""
        no_content(await self._call(delete_request(self._settings, stream)))

    async def trim(
        self,
        stream: str,
        *,
        before_position: int | None = None,
        before_sequence: int | None = None,
        before_time: datetime | float | None = None,
    ) -> Trimmed:
        """Release the messages before a point (see ``Client.trim``)."""
        request = trim_request(
            self._settings,
            stream,
            before_position=before_position,
            before_sequence=before_sequence,
            before_time=before_time,
        )
        return Trimmed.from_json(json_of(await self._call(request)))

    async def retention(self, stream: str) -> dict[str, Any]:
        """The retention that applies to ``stream`` (see ``Client.retention``)."""
        answer: dict[str, Any] = json_of(
            await self._call(retention_request(self._settings, stream))
        )
        return answer

    async def set_retention(
        self, stream: str, *, max_age: float | None = None, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Give ``stream`` its own policy: at most ``max_age`` seconds and/or ``max_bytes``."""
        policy = {"max_age": max_age, "max_bytes": max_bytes}
        answer: dict[str, Any] = json_of(
            await self._call(retention_request(self._settings, stream, policy))
        )
        return answer

    async def clear_retention(self, stream: str) -> None:
        """Drop ``stream``'s own policy: the server's default applies again."""
        no_content(await self._call(clear_retention_request(self._settings, stream)))

    async def read(
        self,
        stream: str,
        position: int | None = None,
        *,
        limit: int | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> AsyncIterator[Message]:
        """Messages from ``position`` (or a sequence, or a time) on (see ``Client.read``)."""
        check_limit(limit)
        start: int | Seek = read_start(position, from_sequence, from_time)
        remaining = sys.maxsize if limit is None else limit
        while remaining:
            page = await self._page(stream, start, None if limit is None else remaining)
            if not page.count:
                return
            if page.count >= remaining:
                for message in islice(page.messages, remaining):
                    yield message
                return
            for message in page.messages:
                yield message
            remaining -= page.count
            start = page.next_position

    async def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        """The position of message ``sequence``, or of the first at or after ``time``.

        See ``Client.seek``.
        """
        start = seek_start(sequence, time)
        return sought(await self._call(page_request(self._settings, stream, start, 0)), start)

    async def read_records(
        self,
        stream: str,
        position: int | None = None,
        *,
        limit: int | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Messages from ``position`` on as JSON records (see ``Client.read_records``)."""
        check_limit(limit)
        start = read_start(position, from_sequence, from_time)
        remaining = sys.maxsize if limit is None else limit
        if not remaining:
            return
        sized = True
        try:
            answer = await self._call(records_request(self._settings, stream, start, limit))
        except InvalidPosition:
            raise
        except InvalidInput:  # a server with a lower --max-read-messages: its own page size
            sized = False
            request = records_request(self._settings, stream, start, limit, sized=False)
            answer = await self._call(request)
        started_at(answer, start)  # a server that cannot seek is refused here
        upcoming: asyncio.Future[Answer] | None = None
        try:
            while True:
                count, next_position = records_ahead(answer)
                if not count:
                    return
                remaining -= count
                if remaining > 0:
                    rest = None if limit is None else remaining
                    request = records_request(
                        self._settings, stream, next_position, rest, sized=sized
                    )
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

    async def _page(self, stream: str, start: int | Seek, limit: int | None) -> Page:
        answer = await self._call(page_request(self._settings, stream, start, limit))
        return page_of(answer, start)

    async def follow(
        self,
        stream: str,
        position: int | None = None,
        *,
        stop: asyncio.Event | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> AsyncIterator[Message]:
        """Messages from ``position`` (or a sequence, or a time) on, for ever (``Client.follow``).

        Ends when ``stop`` is set, when the client is closed, when the
        consuming task is cancelled, or when the iterator is closed.
        """

        def stopped() -> bool:
            return self._closed or (stop is not None and stop.is_set())

        start: int | Seek = read_start(position, from_sequence, from_time)
        while not stopped():
            request = page_request(self._settings, stream, start, None, FOLLOW_WAIT)
            asked = time.monotonic()
            answer = await self._poll(request, stop)
            if answer is _STOPPED:
                return
            page = page_of(answer, start)
            if not page.count and time.monotonic() - asked < EARLY_EMPTY:
                await asyncio.sleep(EARLY_EMPTY)  # the server ended the wait: shutting down
            for message in page.messages:
                yield message
                if stopped():
                    return
            start = page.next_position

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
        route = self._nodes.route(request.stream)
        while True:
            if self._closed:
                if patience is not None:
                    return _STOPPED
                raise ClientClosed("the client is closed")
            outcome = await self._try(route, request)
            if isinstance(outcome, Answer):
                return outcome
            delay = retries.next_delay(outcome, request)
            if delay is None:
                if self._closed and patience is not None:
                    return _STOPPED
                raise give_up(outcome, request, self._settings, route.node) from None
            await asyncio.sleep(delay)
            route.retry(refused=isinstance(outcome, NotSent))

    async def _try(self, route: Route, request: Request) -> Answer | Exception:
        """One try of ``request`` (see ``Client._try``)."""
        while True:
            try:
                answer = await self._send(route.node, request)
            except NotSent as exc:
                if route.refused(exc):
                    continue
                return unreachable(route.refusals)
            except Lost as exc:
                return exc
            error = answered_error(answer)
            if error is not None:
                return error
            route.answered(answer.header(WRITER_HEADER) if request.append else None)
            return answer

    async def _send(self, node: Node, request: Request) -> Answer:
        """One try over one connection to ``node`` (see ``Client._send``)."""
        pool = self._open_pool(node)
        connection = await pool.take()
        try:
            try:
                await connection.send(
                    request.method, node.prefix + request.path, request.headers, request.body
                )
            except OSError as exc:
                # The server takes a request only once its whole body has
                # arrived, and this send did not finish: it was not acted on.
                raise NotSent(exc) from exc
            try:
                response = await connection.receive(
                    self._settings.timeout + request.wait, head_only=request.method == "HEAD"
                )
            except (OSError, BadAnswer, TimeoutError) as exc:
                raise Lost(exc) from exc
        except BaseException:  # cancelled too: the answer may still come, on no one's watch
            pool.discard(connection)
            raise
        if response.will_close:
            pool.discard(connection)
        else:
            pool.give(connection)
        return Answer(response.status, response.headers, response.body)

    def _open_pool(self, node: Node) -> _Pool:
        if self._closed:
            raise NotSent("the client is closed")
        pool = self._pools.get(node)
        if pool is None:
            pool = self._pools[node] = _Pool(self._settings, node)
        return pool

    # Lifetime --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close connections; ends ``follow`` loops (a waiting one within ~0 s)."""
        self._closed = True
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
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
