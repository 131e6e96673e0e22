"""The sync client's HTTP/1.1 connection against a real socket that answers canned bytes.

The happy path (aiohttp's answers) is covered by every sync client test;
here are the answers aiohttp never sends but a proxy or a broken server
might, and what a request must never carry.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from messagevault.client.http1 import MAX_HEAD, AsyncConnection, BadAnswer, Connection, Response

TIMEOUT = 5.0


class CannedServer:
    """Accepts one connection on 127.0.0.1; answers each request with the next canned bytes.

    A canned answer of None closes the connection instead; ``close_at_end``
    closes it after the last answer (else it is held open until the client
    closes it). What each request brought is kept in ``received``.
    """

    def __init__(self, answers: list[bytes | None], *, close_at_end: bool = False) -> None:
        self.answers = answers
        self.close_at_end = close_at_end
        self.received: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            peer, _ = self.listener.accept()
        except OSError:
            return
        with peer:
            peer.settimeout(TIMEOUT)
            for answer in self.answers:
                request = self._request(peer)
                if request is None:
                    return
                self.received.append(request)
                if answer is None:
                    return
                peer.sendall(answer)
            if self.close_at_end:
                return
            # Hold the connection open until the client is done with it.
            try:
                while peer.recv(65536):
                    pass
            except OSError:
                return

    @staticmethod
    def _request(peer: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = peer.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                while len(body) < int(line.split(b":")[1]):
                    body += peer.recv(65536)
        return data if not body else head + b"\r\n\r\n" + body

    def close(self) -> None:
        # Unblocks an accept still waiting for a client that never came.
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), TIMEOUT).close()
        self.listener.close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def canned() -> Iterator[list[CannedServer]]:
    servers: list[CannedServer] = []
    yield servers
    for server in servers:
        server.close()


def exchange(
    canned: list[CannedServer],
    *answers: bytes | None,
    method: str = "GET",
    body: bytes | None = None,
    close_at_end: bool = False,
) -> tuple[Connection, CannedServer]:
    server = CannedServer(list(answers), close_at_end=close_at_end)
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.send(method, "/streams/orders?from=0", {"Accept": "application/json"}, body)
    return connection, server


class CountingSocket:
    """A connected socket that counts its sends (the one thing a real one cannot tell)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_request_is_one_send_of_head_and_body(canned: list[CannedServer]) -> None:
    server = CannedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.connect()
    assert connection.sock is not None
    counting = CountingSocket(connection.sock)
    connection.sock = counting  # type: ignore[assignment]
    connection.send("POST", "/streams/orders?from=0", {"Accept": "application/json"}, b"batch")
    response = connection.receive()
    connection.sock = counting.sock
    assert counting.sends == 1
    connection.close()
    assert (response.status, response.body, response.will_close) == (200, b"ok", False)
    request = server.received[0]
    assert request.startswith(b"POST /streams/orders?from=0 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in request
    assert b"\r\nContent-Length: 5\r\n" in request
    assert request.endswith(b"\r\n\r\nbatch")


def test_answers_in_every_framing_and_one_connection_for_many(
    canned: list[CannedServer],
) -> None:
    connection, _ = exchange(
        canned,
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Next: 7\r\n\r\none",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\ntwo\r\n5\r\n-more\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After:  1 \r\n\r\nbusy",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        close_at_end=True,
    )
    first = connection.receive()
    assert (first.status, first.body, first.headers["X-Next"]) == (200, b"one", "7")
    for expected in (b"two-more", b""):
        connection.send("GET", "/x", {}, None)
        assert connection.receive().body == expected
    connection.send("GET", "/x", {}, None)
    busy = connection.receive()
    assert (busy.status, busy.body, busy.headers["Retry-After"]) == (503, b"busy", "1")
    connection.send("GET", "/x", {}, None)
    last = connection.receive()
    connection.close()
    assert (last.body, last.will_close) == (b"until the end", True)


def test_a_large_body_arrives_whole(canned: list[CannedServer]) -> None:
    body = bytes(range(256)) * 40_000  # over 10 MB: many reads
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    connection, _ = exchange(canned, head + body)
    assert connection.receive().body == body
    connection.close()


@pytest.mark.parametrize(
    ("answer", "closes"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", False),
        # Bytes after the answer: the next answer would start inside them.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK", True),
    ],
)
def test_when_the_connection_cannot_be_used_again(
    canned: list[CannedServer], answer: bytes, closes: bool
) -> None:
    connection, _ = exchange(canned, answer)
    assert connection.receive().will_close is closes
    connection.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz\r\n0\r\n\r\n", "longer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "more than"),
    ],
)
def test_an_answer_that_is_not_http_is_a_bad_answer(
    canned: list[CannedServer], answer: bytes, error: str
) -> None:
    connection, _ = exchange(canned, answer)
    with pytest.raises(BadAnswer, match=error):
        connection.receive()
    connection.close()


@pytest.mark.parametrize(
    "answer",
    [
        None,  # closed without a word
        b"HTTP/1.1 200 OK\r\nContent-Le",  # inside the headers
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # inside the body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # inside a chunk
    ],
)
def test_a_connection_that_ends_inside_an_answer_is_a_reset(
    canned: list[CannedServer], answer: bytes | None
) -> None:
    server = CannedServer([answer, None] if answer is not None else [None])
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.send("GET", "/x", {}, None)
    if answer is not None:
        # The server closes after these bytes once it sees the end of the requests.
        assert connection.sock is not None
        connection.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionResetError, match="before its answer was complete"):
        connection.receive()
    connection.close()


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/streams/a b", {}),
        ("/streams/x\r\nX-Evil: 1", {}),
        ("/x", {"Authorization": "Basic abc\r\nX-Evil: 1"}),
        ("/x", {"X-Request-Id": "a\nb"}),
    ],
)
def test_a_request_that_would_forge_headers_is_refused_unsent(
    canned: list[CannedServer], target: str, headers: dict[str, str]
) -> None:
    server = CannedServer([])
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, timeout=TIMEOUT)
    with pytest.raises(ValueError, match="may not hold"):
        connection.send("GET", target, headers, None)
    assert connection.sock is None  # not even connected
    connection.close()


def test_a_head_answer_has_no_body_whatever_its_length(canned: list[CannedServer]) -> None:
    connection, _ = exchange(canned, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    response = connection.receive(head_only=True)
    assert (response.status, response.body, response.will_close) == (200, b"", False)
    connection.close()


def test_a_silent_server_times_out(canned: list[CannedServer]) -> None:
    server = CannedServer([])  # reads the request, never answers
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, timeout=0.2)
    connection.send("GET", "/x", {}, None)
    with pytest.raises(TimeoutError):
        connection.receive()
    connection.close()


# The asyncio twin: the same answers through AsyncConnection ---------------------------


async def _async_exchange(
    server: CannedServer, *, timeout: float = TIMEOUT
) -> tuple[AsyncConnection, Response]:
    connection = AsyncConnection("127.0.0.1", server.port, timeout=timeout)
    await connection.send("POST", "/streams/orders", {"Accept": "application/json"}, b"batch")
    return connection, await connection.receive(timeout)


async def test_async_answers_in_every_framing(canned: list[CannedServer]) -> None:
    server = CannedServer(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Next: 7\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\ntwo\r\n5\r\n-more\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        ],
        close_at_end=True,
    )
    canned.append(server)
    connection, first = await _async_exchange(server)
    assert (first.status, first.body, first.headers["X-Next"]) == (200, b"one", "7")
    assert not first.will_close and not connection.dropped
    for expected in (b"two-more", b"", b"until the end"):
        await connection.send("GET", "/x", {}, None)
        response = await connection.receive(TIMEOUT)
        assert response.body == expected
    assert response.will_close
    connection.close()
    assert b"\r\nContent-Length: 5\r\n" in server.received[0]
    assert server.received[0].endswith(b"\r\n\r\nbatch")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz\r\n0\r\n\r\n", "longer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "longer than"),
    ],
)
async def test_async_an_answer_that_is_not_http_is_a_bad_answer(
    canned: list[CannedServer], answer: bytes, error: str
) -> None:
    server = CannedServer([answer])
    canned.append(server)
    connection = AsyncConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    await connection.send("GET", "/x", {}, None)
    with pytest.raises(BadAnswer, match=error):
        await connection.receive(TIMEOUT)
    connection.close()


@pytest.mark.parametrize(
    "answer",
    [
        None,
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
)
async def test_async_a_connection_that_ends_inside_an_answer_is_a_reset(
    canned: list[CannedServer], answer: bytes | None
) -> None:
    server = CannedServer([answer] if answer is not None else [None], close_at_end=True)
    canned.append(server)
    connection = AsyncConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    await connection.send("GET", "/x", {}, None)
    with pytest.raises(ConnectionResetError, match="before its answer was complete"):
        await connection.receive(TIMEOUT)
    connection.close()


async def test_async_a_silent_server_times_out_and_forging_is_refused(
    canned: list[CannedServer],
) -> None:
    server = CannedServer([])
    canned.append(server)
    connection = AsyncConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    with pytest.raises(ValueError, match="may not hold"):
        await connection.send("GET", "/x", {"X-Request-Id": "a\r\nX-Evil: 1"}, None)
    assert connection.dropped  # never connected
    await connection.send("GET", "/x", {}, None)
    with pytest.raises(TimeoutError):
        await connection.receive(0.2)
    connection.close()
    assert connection.dropped
