"""``Client``: the blocking client, over a lean HTTP/1.1 connection of its own (``http1``)."""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from itertools import islice
from types import TracebackType
from typing import Any

from messagevault.client.base import (
    DEFAULT_RETRY_TIMEOUT,
    EARLY_EMPTY,
    FOLLOW_WAIT,
    STOP_CHECK_INTERVAL,
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
    frames_page_of,
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
from messagevault.client.http1 import BadAnswer, Connection, tls_context
from messagevault.client.nodes import WRITER_HEADER, Node, Nodes, Route
from messagevault.errors import ClientClosed, InvalidInput, InvalidPosition, RequestTooLarge
from messagevault.format import EncodedBatch, Message
from messagevault.reader import Reader
from messagevault.storage.base import ReadAccess
from messagevault.wire import StreamInfo
from messagevault.writer import AppendResult

MessageLike = tuple[bytes | str, bytes | str] | bytes | str | Message | object


class _Pool:
    """Idle keep-alive connections to one node, shared by the client's threads."""

    def __init__(self, settings: Settings, node: Node, max_idle: int = 16) -> None:
        self._settings = settings
        self._node = node
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._lock = threading.Lock()
        self._tls = tls_context() if node.scheme == "https" else None
        self.closed = False

    def take(self) -> Connection:
        """A connected connection: an idle one still open, or a new one (``NotSent`` if not)."""
        while True:
            with self._lock:
                if self.closed:
                    raise NotSent("the client is closed")
                connection = self._idle.pop() if self._idle else None
                if connection is not None:
                    self._busy.add(connection)
            if connection is None:
                break
            if not _dropped(connection):
                return connection
            self.discard(connection)
        node = self._node
        connection = Connection(node.host, node.port, timeout=self._settings.timeout, tls=self._tls)
        try:
            connection.connect()
        except OSError as exc:  # refused, unreachable, name unknown, connect timeout
            connection.close()
            raise NotSent(exc) from exc
        with self._lock:
            self._busy.add(connection)
        if self.closed:
            self.discard(connection)
            raise NotSent("the client is closed")
        return connection

    def give(self, connection: Connection) -> None:
        with self._lock:
            self._busy.discard(connection)
            if not self.closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def discard(self, connection: Connection) -> None:
        with self._lock:
            self._busy.discard(connection)
        connection.close()

    def close(self) -> None:
        """Close idle connections, and cut the busy ones so that no thread stays blocked."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for connection in idle:
            connection.close()
        for connection in busy:
            if connection.sock is not None:
                with contextlib.suppress(OSError):  # already gone
                    connection.sock.shutdown(socket.SHUT_RDWR)


def _dropped(connection: Connection) -> bool:
    """Whether the server closed an idle connection (it is readable: EOF, or stray bytes)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Client:
    """A blocking client of a MessageVault server; thread-safe, reuses connections.

    >>> with Client("http://127.0.0.1:8080", user="app", password="pw") as client:  # doctest: +SKIP
    ...     receipts = client.publish("orders", [("OrderPlaced", b'{"id": 7}')])
    ...     for message in client.read("orders", receipts[0].position):
    ...         print(message.sequence, message.key, message.value)

    ``url``, ``user`` and ``password`` default to ``MESSAGEVAULT_URL``,
    ``MESSAGEVAULT_USER`` and ``MESSAGEVAULT_PASSWORD`` (the URL finally to
    http://127.0.0.1:8080). ``timeout`` bounds connecting and each wait for
    bytes from the server, in seconds.

    ``url`` may name several nodes of one server (nodes sharing one
    storage): ``"http://a:8080,http://b:8080"`` or a list of URLs. Each
    request goes to one node; a node that cannot be reached is passed over
    and the request goes to the next at once, and appends go straight to
    their stream's writer once an answer has named it (``client/nodes.py``).

    Errors are the classes the server raised (``StreamNotFound``,
    ``InvalidBatch``, ``Unauthenticated``...: ``errors.for_code``), and
    ``ServerUnreachable`` when no answer came. Failed requests are retried
    with exponential backoff and jitter (and ``Retry-After``):

    * reads, up to ``retries`` times, after any connection failure or a
      retriable answer (503, 502, 504);
    * appends (``publish``) exactly once each: every batch travels under a
      producer id (a fresh random one per ``publish`` call, as its batch 0)
      and is sent again, the same bytes, after a refused or reset
      connection, a ``timeout`` waiting for the answer, a 503, a 500, or a
      409 ``stale_writer``/``stream_locked`` (the stream changing writers),
      until it is answered or ``retry_timeout`` seconds have passed (then
      the last error is raised, with a note when the batch may or may not
      have been committed). The server answers a repeat of a batch it
      committed with the first commit's receipts (``AppendResult.duplicate``),
      so a lost answer never appends twice (docs/client.md);
    * with ``idempotent=False``, appends carry no producer id and are sent
      again (up to ``retries`` times) only when they surely did nothing:
      the connection could not be made or broke while the request was being
      sent, or the server refused the batch before trying it (503
      ``overloaded``, ``committer_closed``). Such an append whose answer was
      lost, or that got ``storage_error``, a 500 or ``stale_writer``, raises
      (saying so) and may or may not have been committed.
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
        self._open()

    @classmethod
    def _from_settings(cls, settings: Settings) -> Client:
        client = cls.__new__(cls)
        client._settings = settings
        client._open()
        return client

    def _open(self) -> None:
        self._nodes = Nodes(self._settings.nodes)
        self._pools = {node: _Pool(self._settings, node) for node in self._settings.nodes}
        self._closing = threading.Event()

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

    # Publishing ------------------------------------------------------------------------

    def publish(
        self, stream: str, messages: Iterable[MessageLike], *, compress: bool = False
    ) -> AppendResult:
        """Append ``messages`` to ``stream`` as one batch; their receipts once committed.

        A message is a ``(key, value)`` pair, a bare value (empty key), or
        anything with ``.key`` and ``.value`` (a ``Message`` read elsewhere);
        ``str`` keys and values are UTF-8. The batch travels in the binary
        batch format and the server answers briefly; the receipts (position,
        sequence, id of every message) are rebuilt exactly from that answer.
        ``compress=True`` zstd-compresses the values here, before they travel;
        the server stores them as sent and every reader unpacks them.
        """
        return self.publish_batch(stream, batch_of(messages, compress=compress))

    def publish_batch(self, stream: str, batch: EncodedBatch) -> AppendResult:
        """Append a batch already encoded (``format.encode_batch``).

        A batch with a producer id (``batch.with_producer``) keeps it, and
        is retried as safely as ``publish``'s own.
        """
        batch = idempotent_batch(self._settings, batch)
        try:
            answer = self._call(publish_request(self._settings, stream, batch))
        except RequestTooLarge as exc:
            raise too_large(exc, batch) from None
        return published(answer, batch)

    # Stream state ----------------------------------------------------------------------

    def streams(self) -> list[StreamInfo]:
        """The streams the user may read (name, length, message count)."""
        return stream_infos(self._call(streams_request(self._settings)))

    def cluster(self) -> dict[str, Any]:
        """The server's nodes and which node writes each stream (``GET /cluster``).

        ``{"node": None, "role": "single", ...}`` from a server that is the
        only one of its storage.
        """
        answer: dict[str, Any] = json_of(self._call(cluster_request(self._settings)))
        return answer

    def info(self, stream: str) -> StreamInfo:
        """A stream's committed state and its direct read access."""
        return StreamInfo.from_json(json_of(self._call(info_request(self._settings, stream))))

    # Administration (the admin claim) ----------------------------------------------------

    def delete_stream(self, stream: str) -> None:
        """Delete ``stream`` and everything in it, for good; ``StreamNotFound`` if there is none."""
        no_content(self._call(delete_request(self._settings, stream)))

    def retention(self, stream: str) -> dict[str, Any]:
        """The retention that applies to ``stream``: ``max_age``, ``max_bytes`` and ``source``.

        ``source`` is ``stream`` (its own policy), ``default`` (the
        server's) or ``none`` (kept for ever).
        """
        answer: dict[str, Any] = json_of(self._call(retention_request(self._settings, stream)))
        return answer

    def set_retention(
        self, stream: str, *, max_age: float | None = None, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Give ``stream`` its own policy: at most ``max_age`` seconds and/or ``max_bytes``."""
        policy = {"max_age": max_age, "max_bytes": max_bytes}
        request = retention_request(self._settings, stream, policy)
        answer: dict[str, Any] = json_of(self._call(request))
        return answer

    def clear_retention(self, stream: str) -> None:
        """Drop ``stream``'s own policy: the server's default applies again."""
        no_content(self._call(clear_retention_request(self._settings, stream)))

    def trim(
        self,
        stream: str,
        *,
        before_position: int | None = None,
        before_sequence: int | None = None,
        before_time: datetime | float | None = None,
    ) -> Trimmed:
        """Release the messages before a position, a sequence or a time; give exactly one.

        Whole frames go: the message at ``before_position`` or
        ``before_sequence``, and the first at or after ``before_time`` (an
        aware ``datetime`` or Unix seconds), stay readable. Reads below the
        new first position then raise ``PositionTrimmed``. Never backwards:
        a point already trimmed changes nothing (``trimmed`` is False).
        """
        request = trim_request(
            self._settings,
            stream,
            before_position=before_position,
            before_sequence=before_sequence,
            before_time=before_time,
        )
        return Trimmed.from_json(json_of(self._call(request)))

    # Reading ---------------------------------------------------------------------------

    def read(
        self,
        stream: str,
        position: int | None = None,
        *,
        limit: int | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> Iterator[Message]:
        """Messages from ``position`` to the end of the stream (at most ``limit`` of them).

        Or from message number ``from_sequence``, or from the first message
        at or after ``from_time`` (an aware ``datetime`` or Unix seconds):
        the server finds where (``seek``), in the same request. Give one of
        the three; none starts at 0.

        Pages through the server's binary read route (whole stored frames,
        every CRC checked here) until a page comes back empty. The first page
        is fetched before this returns, so a bad stream or position raises
        here (``StreamNotFound``, ``InvalidPosition``; ``PositionTrimmed``
        below a trimmed stream's first message).
        """
        check_limit(limit)
        start = read_start(position, from_sequence, from_time)
        page_request(self._settings, stream, start, limit)  # bad arguments raise here
        if limit == 0:
            return iter(())
        first = self._page(stream, start, limit)
        return self._pages(stream, first, limit)

    def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        """The position of message ``sequence``, or of the first message at or after ``time``.

        As ``Reader.seek``, asked of the server (a read of no messages):
        ``sequence`` equal to the stream's message count, or a ``time``
        after its last message, gives the committed length; a larger
        ``sequence`` raises ``InvalidPosition``.
        """
        start = seek_start(sequence, time)
        return sought(self._call(page_request(self._settings, stream, start, 0)), start)

    def read_frames(
        self, stream: str, position: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The stored frames from ``position`` (a frame start) to ``end``, a page at a time.

        Byte for byte as in storage, every frame checked: what a copy of the
        stream through the server is made of (``messagevault copy``).
        """
        page_request(self._settings, stream, position, None)  # bad arguments raise here
        while end is None or position < end:
            data, position = frames_page_of(
                self._call(page_request(self._settings, stream, position, None)), position
            )
            if not data:
                return
            yield data

    def read_records(
        self,
        stream: str,
        position: int | None = None,
        *,
        limit: int | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Messages from ``position`` as the HTTP API's JSON records, at most ``limit`` of them.

        Each is a dict: ``position``, ``sequence``, ``id``, ``timestamp``,
        ``key``, ``next_position``, ``value``, ``encoding`` (and
        ``key_encoding`` for a key that is not UTF-8): docs/HTTP.md, Reading.
        For passing messages on as JSON; ``read`` is the faster way to their
        bytes. Pages of up to 10,000 come through the NDJSON route, the next
        one asked for while this one is decoded and handed out. The first
        page is fetched before this returns, so a bad stream or position
        raises here. ``from_sequence`` and ``from_time`` are as for ``read``.
        """
        check_limit(limit)
        start = read_start(position, from_sequence, from_time)
        records_request(self._settings, stream, start, limit)  # bad arguments raise here
        if limit == 0:
            return iter(())
        sized = True
        try:
            first = self._call(records_request(self._settings, stream, start, limit))
        except InvalidPosition:
            raise
        except InvalidInput:  # a server with a lower --max-read-messages: its own page size
            sized = False
            request = records_request(self._settings, stream, start, limit, sized=False)
            first = self._call(request)
        started_at(first, start)  # a server that cannot seek is refused here
        return self._record_pages(stream, first, limit, sized)

    def _record_pages(
        self, stream: str, answer: Answer, limit: int | None, sized: bool
    ) -> Iterator[dict[str, Any]]:
        remaining = sys.maxsize if limit is None else limit
        # One request ahead: the server reads and encodes the next page on
        # its own core while this thread decodes the current one. A caller
        # that stops early waits here for that answer, read to its end, so
        # that its connection goes back to the pool clean.
        with ThreadPoolExecutor(1, thread_name_prefix="messagevault-read-ahead") as ahead:
            while True:
                count, next_position = records_ahead(answer)
                if not count:
                    return
                remaining -= count
                upcoming: Future[Answer] | None = None
                if remaining > 0:
                    rest = None if limit is None else remaining
                    request = records_request(
                        self._settings, stream, next_position, rest, sized=sized
                    )
                    upcoming = self._ask_ahead(request, ahead)
                records = records_of(answer)
                yield from records if remaining >= 0 else records[:remaining]
                if upcoming is None:
                    return
                answer = upcoming.result()

    def _ask_ahead(self, request: Request, ahead: ThreadPoolExecutor) -> Future[Answer]:
        """Send ``request`` now; its answer is read in ``ahead`` while this thread works on.

        Sent here, not by ``ahead``: decoding a page holds the GIL for
        milliseconds, and a request the reading thread had to send would
        wait for that, and the server with it. Reads may be sent again, so
        any failure, or an answer that is not a 200, goes the ordinary way
        (``_call``: its retries, its errors).
        """
        node = self._nodes.route().node
        pool = self._pools[node]
        try:
            connection = pool.take()
        except NotSent:
            return ahead.submit(self._call, request)
        target = node.prefix + request.path
        try:
            connection.send(request.method, target, request.headers, request.body)
        except OSError:
            pool.discard(connection)
            return ahead.submit(self._call, request)

        def receive() -> Answer:
            try:
                response = connection.receive()
            except (OSError, BadAnswer):
                pool.discard(connection)
                return self._call(request)
            if response.will_close:
                pool.discard(connection)
            else:
                pool.give(connection)
            if response.status != 200:
                return self._call(request)
            return Answer(response.status, response.headers, response.body)

        return ahead.submit(receive)

    def _page(self, stream: str, start: int | Seek, limit: int | None) -> Page:
        return page_of(self._call(page_request(self._settings, stream, start, limit)), start)

    def _pages(self, stream: str, page: Page, limit: int | None) -> Iterator[Message]:
        remaining = sys.maxsize if limit is None else limit
        while page.count:
            if page.count >= remaining:
                yield from islice(page.messages, remaining)
                return
            yield from page.messages
            remaining -= page.count
            page = self._page(stream, page.next_position, None if limit is None else remaining)

    def follow(
        self,
        stream: str,
        position: int | None = None,
        *,
        stop: threading.Event | None = None,
        from_sequence: int | None = None,
        from_time: datetime | float | None = None,
    ) -> Iterator[Message]:
        """Messages from ``position`` on, for ever: waits at the tail for new commits.

        ``from_sequence`` and ``from_time`` start elsewhere, as for ``read``
        (a ``from_time`` after the last message waits for the next one).
        Long-polls the server (``wait``), so a new commit arrives at once.
        Ends when ``stop`` is set, when the client is closed (within
        ~0.1 s, even while waiting) or when the caller closes the iterator.
        A server that goes away is waited for, up to ``timeout`` seconds in a
        row, then ``ServerUnreachable`` is raised.
        """
        start = read_start(position, from_sequence, from_time)
        page_request(self._settings, stream, start, None)  # bad arguments raise here
        return self._follow(stream, start, stop)

    def _follow(
        self, stream: str, position: int | Seek, stop: threading.Event | None
    ) -> Iterator[Message]:
        def stopped() -> bool:
            return self._closing.is_set() or (stop is not None and stop.is_set())

        while not stopped():
            request = page_request(self._settings, stream, position, None, FOLLOW_WAIT)
            asked = time.monotonic()
            answer = self._call(request, stop=stop, patience=self._settings.timeout)
            if answer is _STOPPED:
                return
            page = page_of(answer, position)
            early = not page.count and time.monotonic() - asked < EARLY_EMPTY
            if early and self._sleep(EARLY_EMPTY, stop):  # the server ended the wait: shutdown
                return
            for message in page.messages:
                yield message
                if stopped():
                    return
            position = page.next_position

    def open_reader(self, stream: str) -> Reader:
        """A ``Reader`` on the stream's storage itself, from the server's read access.

        It reads without the server: the data folder (file storage on this
        machine) or a read-only SAS URL (Azure), which it renews through this
        client when it expires.
        """
        access = read_access_of(self.info(stream))

        def renew() -> ReadAccess:
            return read_access_of(self.info(stream))

        try:
            return Reader.from_read_access(
                access, refresh=renew if access.expires_at is not None else None
            )
        except ValueError as exc:
            raise InvalidInput(f"stream {stream!r} cannot be read directly here: {exc}") from None

    # Requests --------------------------------------------------------------------------

    def _call(
        self,
        request: Request,
        *,
        stop: threading.Event | None = None,
        patience: float | None = None,
    ) -> Answer:
        """Send ``request``, retrying as ``Retries`` allows; the successful answer.

        With ``patience``, retries are bounded by that many seconds instead
        of by count. With ``stop``, the wait ends when it is set, and an
        empty answer (status 0) says so.
        """
        if patience is None:
            retries = Retries.for_request(self._settings, request)
        else:
            retries = Retries(sys.maxsize, deadline=time.monotonic() + patience)
        route = self._nodes.route(request.stream)
        while True:
            if self._closing.is_set():
                if stop is not None or patience is not None:
                    return _STOPPED
                raise ClientClosed("the client is closed")
            outcome = self._try(route, request, stop)
            if isinstance(outcome, Answer):
                return outcome
            delay = retries.next_delay(outcome, request)
            if delay is None:
                if self._closing.is_set() and (stop is not None or patience is not None):
                    return _STOPPED
                raise give_up(outcome, request, self._settings, route.node) from None
            if self._sleep(delay, stop):
                return _STOPPED
            route.retry(refused=isinstance(outcome, NotSent))

    def _try(
        self, route: Route, request: Request, stop: threading.Event | None
    ) -> Answer | Exception:
        """One try of ``request``: its successful answer, or the failure to retry or raise.

        A node that cannot be connected to is passed over for the next at
        once, within the try: only a round of refusals is a failure.
        """
        while True:
            try:
                answer = self._send(route.node, request, stop)
            except NotSent as exc:
                if route.refused(exc):
                    continue
                return unreachable(route.refusals)
            except Lost as exc:
                return exc
            error = answered_error(answer)
            if error is not None:
                return error
            if answer is not _STOPPED:
                route.answered(answer.header(WRITER_HEADER) if request.append else None)
            return answer

    def _sleep(self, seconds: float, stop: threading.Event | None) -> bool:
        """Wait ``seconds``; True if the client closed or ``stop`` was set meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if stop is not None and stop.is_set():
                return True
            if self._closing.wait(min(remaining, STOP_CHECK_INTERVAL)):
                return True
        return False

    def _send(self, node: Node, request: Request, stop: threading.Event | None) -> Answer:
        """One try over one connection to ``node``."""
        pool = self._pools[node]
        connection = pool.take()
        settings = self._settings
        try:
            if request.wait and connection.sock is not None:
                connection.sock.settimeout(settings.timeout + request.wait)
            try:
                connection.send(
                    request.method, node.prefix + request.path, request.headers, request.body
                )
            except OSError as exc:
                # The server takes a request only once its whole body has
                # arrived (its size and CRCs are checked), and this send did
                # not finish: it was not acted on.
                raise NotSent(exc) from exc
            if stop is not None and not self._await_answer(connection, request, stop):
                pool.discard(connection)
                return _STOPPED
            try:
                response = connection.receive(head_only=request.method == "HEAD")
            except (OSError, BadAnswer) as exc:
                raise Lost(exc) from exc
        except BaseException:
            pool.discard(connection)
            raise
        if request.wait and connection.sock is not None:
            connection.sock.settimeout(settings.timeout)
        if response.will_close:
            pool.discard(connection)
        else:
            pool.give(connection)
        return Answer(response.status, response.headers, response.body)

    def _await_answer(
        self, connection: Connection, request: Request, stop: threading.Event
    ) -> bool:
        """Wait until the answer starts to arrive; False if ``stop`` or ``close()`` came first."""
        sock = connection.sock
        if sock is None:
            return True
        deadline = time.monotonic() + self._settings.timeout + request.wait
        while not (stop.is_set() or self._closing.is_set()):
            if time.monotonic() > deadline:
                return True  # let receive time out and say so
            try:
                readable, _, _ = select.select([sock], [], [], STOP_CHECK_INTERVAL)
            except (OSError, ValueError):
                return True  # a closed socket: receive reports it
            if readable:
                return True
        return False

    # Lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close connections; ends ``follow`` loops and interrupts waiting requests."""
        self._closing.set()
        for pool in self._pools.values():
            pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# A request that ended because ``stop`` was set or the client closed.
_STOPPED = Answer(0, {}, b"")
