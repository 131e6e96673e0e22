"""Lean HTTP/1.1 connections, blocking and asyncio: what the clients need of HTTP, no more.

The standard library's ``http.client`` writes a request's head and body in
two sends (with TCP_NODELAY, two packets: the server wakes twice for one
request) and parses every answer's headers with the ``email`` package,
~600 Python calls a request. An append of 10 small messages is a round trip
of ~1 ms, and that was a third of it. Here a request is one ``sendall`` of
head and body together, and an answer is read into one buffer and split by
hand: status line, headers, then a body of its ``Content-Length``, chunked,
or up to the end of the connection.

A connection carries one request at a time (no pipelining); an answer with
bytes after its end leaves the connection unusable (``will_close``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final

# Bytes received at a time, and the most a status line and headers may take.
RECEIVE_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024

# Characters a request target or header value may not hold: CR/LF would let
# them write headers of their own (and the target may not hold spaces).
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class BadAnswer(Exception):
    """The server's bytes are not an HTTP/1.1 answer (or the connection ended inside one)."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names as the server sent them; the last of repeated ones
    body: bytes
    will_close: bool  # the server closes the connection after this answer


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port``, over TLS when given a context.

    ``timeout`` (seconds) bounds connecting and every wait for bytes; the
    socket is ``sock`` once connected, for ``select`` and ``settimeout``.
    Failures to connect, send or receive are ``OSError``s; an answer that
    is not HTTP is ``BadAnswer``.
    """

    def __init__(
        self, host: str, port: int, *, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.sock: socket.socket | None = None
        self._host_header = _host_header(host, port, tls)

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            # A request is one send and its answer one read: nothing for
            # Nagle's algorithm to merge, only a delayed ACK to wait for.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def send(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> None:
        """Write one request, head and body in a single send (connecting first if need be)."""
        data = _request(method, target, self._host_header, headers, body)
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(data)

    def receive(self, *, head_only: bool = False) -> Response:
        """Read the answer to the request sent; ``head_only`` for the answer to a HEAD."""
        if self.sock is None:
            raise BadAnswer("no request was sent on this connection")
        reading = _Reading(self.sock)
        while True:
            status, version, headers = reading.head()
            if status >= 200 or status == 101:
                break  # 1xx before the answer (100 Continue) are skipped
        will_close = not _keeps_alive(version, headers)
        length = _body_length(status, headers, head_only)
        if length == CHUNKED:
            body = reading.chunked()
        elif length == TO_THE_END:
            body, will_close = reading.until_closed(), True
        else:
            body = reading.exactly(length)
        if reading.left_over:
            will_close = True  # bytes nobody asked for: the next answer would start wrong
        return Response(status, headers, body, will_close)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class AsyncConnection:
    """``Connection`` for asyncio: one keep-alive HTTP/1.1 connection, a request at a time.

    ``timeout`` bounds connecting; ``receive`` takes the bound of each wait
    for bytes. ``dropped`` tells an idle connection the server closed.
    """

    def __init__(
        self, host: str, port: int, *, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self._host_header = _host_header(host, port, tls)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        async with asyncio.timeout(self.timeout):
            self._reader, self._writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.tls,
                server_hostname=self.host if self.tls is not None else None,
                limit=MAX_HEAD + 4,
            )

    @property
    def dropped(self) -> bool:
        """Whether the connection is closed or closing (the server hung up on it)."""
        return (
            self._reader is None
            or self._reader.at_eof()
            or self._writer is None
            or (self._writer.is_closing())
        )

    async def send(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> None:
        """Write one request, head and body in one write (connecting first if need be)."""
        data = _request(method, target, self._host_header, headers, body)
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self, read_timeout: float, *, head_only: bool = False) -> Response:
        """The answer to the request sent, each wait for bytes at most ``read_timeout`` s."""
        reader = self._reader
        if reader is None:
            raise BadAnswer("no request was sent on this connection")
        while True:
            head = await _timed(reader.readuntil(b"\r\n\r\n"), read_timeout)
            status, version, headers = _parse_head(head[:-4])
            if status >= 200 or status == 101:
                break  # 1xx before the answer (100 Continue) are skipped
        will_close = not _keeps_alive(version, headers)
        length = _body_length(status, headers, head_only)
        if length == CHUNKED:
            parts = []
            while size := _chunk_size(await _timed(reader.readuntil(b"\r\n"), read_timeout)):
                chunk = await _timed(reader.readexactly(size + 2), read_timeout)
                if chunk[-2:] != b"\r\n":
                    raise BadAnswer("a chunk of the answer is longer than its size says")
                parts.append(chunk[:-2])
            while await _timed(reader.readuntil(b"\r\n"), read_timeout) != b"\r\n":
                pass  # trailers, up to the empty line
            body = b"".join(parts)
        elif length == TO_THE_END:
            body, will_close = await _timed(reader.read(), read_timeout), True
        else:
            body = await _timed(reader.readexactly(length), read_timeout) if length else b""
        return Response(status, headers, body, will_close)

    def close(self) -> None:
        """Close at once, also in the middle of an exchange (whose task then fails)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.transport.abort()


async def _timed(wait: Awaitable[bytes], seconds: float) -> bytes:
    """``wait``, at most ``seconds``; the connection's end inside an answer is a reset."""
    try:
        async with asyncio.timeout(seconds):
            return await wait
    except asyncio.IncompleteReadError:
        raise _ended() from None
    except asyncio.LimitOverrunError:
        raise BadAnswer(f"a line of the answer is longer than {MAX_HEAD} bytes") from None


class _Reading:
    """The bytes of one answer as they arrive: a buffer and a read position."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._at = 0

    @property
    def left_over(self) -> bool:
        return self._at < len(self._buffer)

    def _more(self) -> bool:
        """Receive what has arrived (waiting for some); False at the end of the connection."""
        data = self._sock.recv(RECEIVE_SIZE)
        if not data:
            return False
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        self._buffer += data
        return True

    def _line(self, limit: int = MAX_HEAD) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._at)) < 0:
            if len(self._buffer) - self._at > limit:
                raise BadAnswer(f"a line of the answer is longer than {limit} bytes")
            if not self._more():
                raise _ended()
        line = bytes(self._buffer[self._at : end])
        self._at = end + 2
        return line

    def head(self) -> tuple[int, str, dict[str, str]]:
        """The status line and headers: (status, HTTP version, headers)."""
        while (end := self._buffer.find(b"\r\n\r\n", self._at)) < 0:
            if len(self._buffer) - self._at > MAX_HEAD:
                raise BadAnswer(f"the answer's headers take more than {MAX_HEAD} bytes")
            if not self._more():
                raise _ended()
        head = bytes(self._buffer[self._at : end])
        self._at = end + 4
        return _parse_head(head)

    def exactly(self, size: int) -> bytes:
        available = len(self._buffer) - self._at
        if available >= size:
            body = bytes(self._buffer[self._at : self._at + size])
            self._at += size
            return body
        # A large body: whatever is buffered, then straight into one buffer of its size.
        body_buffer = bytearray(size)
        view = memoryview(body_buffer)
        view[:available] = self._buffer[self._at :]
        self._buffer.clear()
        self._at = 0
        filled = available
        while filled < size:
            received = self._sock.recv_into(view[filled:])
            if not received:
                raise _ended()
            filled += received
        return bytes(body_buffer)

    def chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = _chunk_size(self._line())
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            if self._line(limit=2):
                raise BadAnswer("a chunk of the answer is longer than its size says")

    def until_closed(self) -> bytes:
        while self._more():
            pass
        body = bytes(self._buffer[self._at :])
        self._at = len(self._buffer)
        return body


CHUNKED: Final = -1  # a body length: chunked transfer coding
TO_THE_END: Final = -2  # a body length: up to the end of the connection


def _host_header(host: str, port: int, tls: ssl.SSLContext | None) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if tls is not None else 80) else f"{name}:{port}"


def _request(
    method: str, target: str, host_header: str, headers: dict[str, str], body: bytes | None
) -> bytes:
    """A request's bytes, head and body; ValueError for a target or header that would forge."""
    if _BAD_TARGET.search(target):
        raise ValueError(f"a request target may not hold spaces or controls: {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
    for name, value in headers.items():
        if _BAD_VALUE.search(value):
            raise ValueError(f"header {name!r} may not hold CR, LF or NUL")
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body) if body is not None else 0}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """Status line and headers (without the blank line): (status, HTTP version, headers)."""
    if len(head) > MAX_HEAD:
        raise BadAnswer(f"the answer's headers take more than {MAX_HEAD} bytes")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadAnswer(f"malformed header line in the answer: {line[:80]!r}")
        headers[name] = value.strip(" \t")
    return int(code), version, headers


def _keeps_alive(version: str, headers: dict[str, str]) -> bool:
    if _has_token(headers, "connection", "close"):
        return False
    return version != "HTTP/1.0" or _has_token(headers, "connection", "keep-alive")


def _body_length(status: int, headers: dict[str, str], head_only: bool) -> int:
    """The answer body's length in bytes, or ``CHUNKED``, or ``TO_THE_END``."""
    if head_only or status in (204, 304) or 100 <= status < 200:
        return 0
    if _has_token(headers, "transfer-encoding", "chunked"):
        return CHUNKED
    length = _content_length(headers)
    return TO_THE_END if length is None else length


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    try:
        size = int(size_text, 16)
    except ValueError:
        raise BadAnswer(f"bad chunk size in the answer: {size_text[:20]!r}") from None
    if size < 0:
        raise BadAnswer(f"bad chunk size in the answer: {size_text[:20]!r}")
    return size


def _ended() -> ConnectionResetError:
    # An OSError, as a reset would be: the request's fate is unknown.
    return ConnectionResetError("the server closed the connection before its answer was complete")


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _has_token(headers: dict[str, str], name: str, token: str) -> bool:
    value = _header(headers, name)
    return value is not None and token in (part.strip().lower() for part in value.split(","))


def _content_length(headers: dict[str, str]) -> int | None:
    value = _header(headers, "content-length")
    if value is None:
        return None
    if not value.isdigit():  # also refuses "-1" and "1, 2"
        raise BadAnswer(f"bad Content-Length in the answer: {value[:20]!r}")
    return int(value)


def tls_context() -> ssl.SSLContext:
    """The default client context (certificates checked, host names matched), speaking HTTP/1.1."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
