"""A client given several server nodes: spreading, failing over, a stream's writer, bad lists.

Nodes here are real servers on 127.0.0.1 (in-process apps each on its own
file storage, ``messagevault serve`` processes, a fault proxy in front of a
server) and ports where nothing listens. Until nodes share one storage,
two servers on two data folders stand in for two nodes wherever the
storage behind them does not matter (reads, stream lists, where a request
goes); the exactly-once tests put two routes in front of one server: the
proxy (a node that forwarded the append and lost its answer) and the server
itself (the writer).

Sync ``Client`` and ``AsyncClient`` route requests through separate code,
so each test runs both (``kind``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from messagevault import FileStorage, Reader
from messagevault.cli import main
from messagevault.client import AsyncClient, Client
from messagevault.client import nodes as client_nodes
from messagevault.client.http1 import AsyncConnection, Connection
from messagevault.client.nodes import WRITER_HEADER
from messagevault.errors import InvalidInput, ServerUnreachable
from messagevault.producer import Producer
from messagevault.server import StreamHub, create_app
from messagevault.server.auth import Users, save_users
from messagevault.wire import error_body
from messagevault.writer import AppendResult
from tests.azurite import free_port
from tests.fault_proxy import Fault, FaultProxy, port_of
from tests.served import ServedApp

KINDS = ["sync", "async"]
USER = "app"
PASSWORD = "nodes-test-password"


@pytest.fixture
def nowhere() -> Iterator[Callable[[], str]]:
    """Makes loopback URLs where nothing listens: connecting is refused.

    Each port is bound (never listened on) until the test ends, so that no
    server another test starts meanwhile can take it.
    """
    sockets: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield make
    for sock in sockets:
        sock.close()


def _stored(root: Path, stream: str) -> list[bytes]:
    storage = FileStorage(root)
    if stream not in storage.list_streams():
        return []
    with Reader.open(storage, stream) as reader:
        return [message.value for message in reader.read()]


@pytest.fixture
def first_node_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients start at the first node of their list (normally a random one)."""
    monkeypatch.setattr(client_nodes, "_start", lambda count: 0)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The port of every connection the clients try to make, in order (real connects)."""
    ports: list[int] = []
    connect = Connection.connect
    async_connect = AsyncConnection.connect

    def recorded(self: Connection) -> None:
        ports.append(self.port)
        connect(self)

    async def async_recorded(self: AsyncConnection) -> None:
        ports.append(self.port)
        await async_connect(self)

    monkeypatch.setattr(Connection, "connect", recorded)
    monkeypatch.setattr(AsyncConnection, "connect", async_recorded)
    return ports


class Either:
    """A ``Client`` or an ``AsyncClient`` behind one awaitable face, for tests run with both."""

    def __init__(self, kind: str, url: str | list[str], **options: Any) -> None:
        self.sync = Client(url, **options) if kind == "sync" else None
        self.aio = AsyncClient(url, **options) if kind == "async" else None

    def writer(self, stream: str) -> str | None:
        """The URL of the node the client sends ``stream``'s appends to first, if it knows one."""
        client = self.sync or self.aio
        assert client is not None
        node = client._nodes.writer(stream)
        return None if node is None else node.url

    async def publish(self, stream: str, values: list[bytes]) -> AppendResult:
        if self.sync is not None:
            return self.sync.publish(stream, values)
        assert self.aio is not None
        return await self.aio.publish(stream, values)

    async def streams(self) -> list[str]:
        if self.sync is not None:
            return [info.stream for info in self.sync.streams()]
        assert self.aio is not None
        return [info.stream for info in await self.aio.streams()]

    async def read(self, stream: str) -> list[bytes]:
        if self.sync is not None:
            return [message.value for message in self.sync.read(stream)]
        assert self.aio is not None
        return [message.value async for message in self.aio.read(stream)]

    async def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.aio is not None:
            await self.aio.aclose()


@contextlib.asynccontextmanager
async def _either(kind: str, url: str | list[str], **options: Any) -> Any:
    client = Either(kind, url, **options)
    try:
        yield client
    finally:
        await client.close()


def _server(root: Path) -> ServedApp:
    """A server on file storage at ``root``, not started yet (``with`` starts and stops it)."""
    return ServedApp(create_app(StreamHub(FileStorage(root, fsync="never"))))


# URL lists -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_a_url_list_names_the_nodes(make: Callable[..., Client | AsyncClient]) -> None:
    spaced = "http://127.0.0.1:8081, http://127.0.0.1:8082/ ,http://[::1]:8083/mv/"
    listed = ["http://127.0.0.1:8081", "http://127.0.0.1:8082,http://[::1]:8083/mv"]
    expected = ("http://127.0.0.1:8081", "http://127.0.0.1:8082", "http://[::1]:8083/mv")
    for url in (spaced, listed):
        client = make(url, user=USER, password=PASSWORD)
        assert client.nodes == expected
        assert client.url == ",".join(expected)
    lone = make("http://someone:pw@127.0.0.1:8081/")  # one URL may still carry credentials
    assert lone.nodes == ("http://127.0.0.1:8081",)
    assert lone._settings.authorization is not None


BAD_LISTS: list[tuple[Any, str]] = [
    ("http://127.0.0.1:1,,http://127.0.0.1:2", "has an empty entry"),
    ("http://127.0.0.1:1,", "has an empty entry"),
    (",http://127.0.0.1:1", "has an empty entry"),
    (["http://127.0.0.1:1", " "], "has an empty entry"),
    ([], "the list of server URLs is empty"),
    (["http://127.0.0.1:1", 8082], "server URLs must be strings, not int"),
    ("http://127.0.0.1:1,https://127.0.0.1:2", "must all use one scheme, not http and https"),
    ("http://127.0.0.1:1,http://u:secret@127.0.0.1:2", "holds credentials"),
    ("http://u:secret@127.0.0.1:1,http://127.0.0.1:2", "holds credentials"),
    ("http://127.0.0.1:1,http://127.0.0.1:1/", "http://127.0.0.1:1 is listed twice"),
    ("http://127.0.0.1:80,http://127.0.0.1", "http://127.0.0.1:80 is listed twice"),
    ("http://127.0.0.1:1,ftp://127.0.0.1:2", "must be http://HOST[:PORT]"),
    ("http://127.0.0.1:1,http://127.0.0.1:x", "has a bad port"),
    ("http://127.0.0.1:1,http://[::1", "cannot be parsed"),
]


@pytest.mark.parametrize(("url", "message"), BAD_LISTS)
@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_bad_url_lists_are_refused_in_one_line(
    make: Callable[..., Client | AsyncClient], url: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^[^\n]*{re.escape(message)}[^\n]*$") as raised:
        make(url, user=USER, password=PASSWORD)
    assert "secret" not in str(raised.value)  # a password in a bad URL is not repeated


def test_the_environment_and_a_profile_may_name_several_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = "http://127.0.0.1:8081", "http://127.0.0.1:8082"
    monkeypatch.setenv("MESSAGEVAULT_URL", f"{one},{two}")
    assert Client().nodes == (one, two)
    monkeypatch.delenv("MESSAGEVAULT_URL")
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.default]\nurl = "{one}, {two}"\nuser = "u"\npassword = "p"\n')
    config.chmod(0o600)
    monkeypatch.setenv("MESSAGEVAULT_CONFIG", str(config))
    from_profile = Client()
    assert from_profile.nodes == (one, two)
    assert from_profile._settings.authorization is not None
    # The profile's password goes to its own nodes (any of them), never to another server.
    assert Client(two)._settings.authorization == from_profile._settings.authorization
    assert Client([two, one])._settings.authorization == from_profile._settings.authorization
    assert Client(f"{one},http://127.0.0.1:8083")._settings.authorization is None


# Spreading and failing over ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_requests_pass_over_a_node_that_is_down(
    kind: str, tmp_path: Path, connects: list[int], nowhere: Callable[[], str]
) -> None:
    """Without using up a retry (``retries=0``), and the dead node is left alone for a while."""
    dead = nowhere()
    with _server(tmp_path / "a") as a, _server(tmp_path / "b") as b:
        async with _either(kind, [dead, a.url, b.url], retries=0) as client:
            receipts = [await client.publish("orders", [b"m%d" % n]) for n in range(3)]
            assert await client.streams() == ["orders"]
            assert await client.read("orders") == [b"m0", b"m1", b"m2"]
        assert [r[0].sequence for r in receipts] == [0, 1, 2]
        # It stayed on the node that answered: one storage has it all.
        assert _stored(tmp_path / "a", "orders") == [b"m0", b"m1", b"m2"]
        assert _stored(tmp_path / "b", "orders") == []
    assert connects.count(port_of(dead)) == 1  # passed over after its refusal
    assert connects.count(port_of(b.url)) == 0


@pytest.mark.usefixtures("first_node_first")
def test_threads_share_the_nodes_state(tmp_path: Path, nowhere: Callable[[], str]) -> None:
    """Many threads on one client, the first node down: each request reaches the live one."""
    with (
        _server(tmp_path / "data") as server,
        Client([nowhere(), server.url], retries=0) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        results = list(
            pool.map(lambda n: client.publish(f"stream-{n % 4}", [b"%d" % n]), range(80))
        )
    assert sorted(len(result) for result in results) == [1] * 80
    stored = [value for n in range(4) for value in _stored(tmp_path / "data", f"stream-{n}")]
    assert sorted(stored) == sorted(b"%d" % n for n in range(80))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_node_that_stops_is_left_for_the_next(kind: str, tmp_path: Path) -> None:
    a, b = _server(tmp_path / "a").start(), _server(tmp_path / "b").start()
    try:
        async with _either(kind, [a.url, b.url], retries=0) as client:
            await client.publish("orders", [b"on a"])
            a.stop()  # its keep-alive connection closes, and new ones are refused
            await client.publish("orders", [b"on b"])
            assert await client.read("orders") == [b"on b"]
            await client.publish("orders", [b"on b too"])
    finally:
        a.stop()
        b.stop()
    assert _stored(tmp_path / "a", "orders") == [b"on a"]
    assert _stored(tmp_path / "b", "orders") == [b"on b", b"on b too"]


@pytest.mark.parametrize("kind", KINDS)
async def test_no_node_reachable_raises_server_unreachable_naming_every_node(
    kind: str, connects: list[int], nowhere: Callable[[], str]
) -> None:
    """After ``retries`` rounds of refusals, for reads and idempotent appends alike."""
    nodes = [nowhere(), nowhere()]
    async with _either(kind, nodes, retries=1) as client:
        with pytest.raises(ServerUnreachable) as read:
            await client.streams()
        with pytest.raises(ServerUnreachable) as append:
            await client.publish("orders", [b"x"])
    for raised in (read, append):
        message = str(raised.value)
        assert message.startswith("cannot reach the server for ")
        assert "at any of its 2 nodes" in message
        assert all(f"{node}: " in message for node in nodes), message
    # Each request: a round of both nodes, then one retry of both (retries=1).
    assert sorted(connects) == sorted(port_of(node) for node in nodes for _ in range(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_lost_append_is_retried_on_another_node_and_stored_once(
    kind: str, tmp_path: Path
) -> None:
    """The proxy relays the batch to the writer and loses its answer, as a node that dies would.

    The retry, the same batch under the same producer id, goes to the
    writer itself, which answers with the first commit's receipts.
    """
    with _server(tmp_path / "data") as server, FaultProxy(port_of(server.url)) as proxy:
        proxy.force(Fault.DROP_ANSWER)
        async with _either(kind, [proxy.url, server.url]) as client:
            result = await client.publish("orders", [b"once"])
            assert await client.read("orders") == [b"once"]
        assert result.duplicate
        assert proxy.stats.history == [Fault.DROP_ANSWER]  # nothing more went through it
    with Reader.open(FileStorage(tmp_path / "data"), "orders") as reader:
        stored = list(reader.read())
    assert [m.value for m in stored] == [b"once"]
    assert (result[0].position, result[0].id) == (stored[0].position, stored[0].id)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_lost_non_idempotent_append_is_not_sent_to_another_node(
    kind: str, tmp_path: Path
) -> None:
    with _server(tmp_path / "data") as server, FaultProxy(port_of(server.url)) as proxy:
        proxy.force(Fault.DROP_ANSWER)
        async with _either(kind, [proxy.url, server.url], idempotent=False) as client:
            with pytest.raises(ServerUnreachable, match="may or may not have been committed"):
                await client.publish("orders", [b"in doubt"])
    assert _stored(tmp_path / "data", "orders") == [b"in doubt"]


@pytest.mark.usefixtures("first_node_first")
def test_a_producers_batches_stay_exactly_once_across_nodes(tmp_path: Path) -> None:
    """A ``Producer``'s batch (its id, sequence 2) lost on one node is answered by another."""
    with _server(tmp_path / "data") as server, FaultProxy(port_of(server.url)) as proxy:
        proxy.force(Fault.PASS, Fault.PASS, Fault.DROP_ANSWER)
        with Client([proxy.url, server.url]) as client, Producer(client) as producer:
            futures = []
            for n in range(5):
                futures.append(producer.send("orders", b"m%d" % n))
                producer.flush()  # a batch each: sequences 0 to 4
            receipts = [future.result(timeout=30) for future in futures]
        assert proxy.stats.history == [Fault.PASS, Fault.PASS, Fault.DROP_ANSWER]
    assert _stored(tmp_path / "data", "orders") == [b"m%d" % n for n in range(5)]
    assert [receipt.sequence for receipt in receipts] == [0, 1, 2, 3, 4]


# Real processes: a node killed ---------------------------------------------------------


@contextlib.contextmanager
def _serve_killable(
    root: Path, node_id: str | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``messagevault serve`` on ``root`` (user ``USER``); its URL and process, stopped by PID.

    With ``node_id``: a node of the cluster on ``root`` (``--node-id``).
    """
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(FileStorage(root), users)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = ["--node-id", node_id, "--advertise", url] if node_id is not None else []
    process = subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "serve", "--port", str(port), *node],
        env={**os.environ, "MESSAGEVAULT_STORAGE": f"file:{root}", "MESSAGEVAULT_FSYNC": "never"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("messagevault serve did not start") from None
                time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_node_killed_mid_use_is_passed_over(kind: str, tmp_path: Path) -> None:
    with (
        _serve_killable(tmp_path / "a") as (a, process),
        _serve_killable(tmp_path / "b") as (b, _),
    ):
        options = {"user": USER, "password": PASSWORD, "retries": 0}
        async with _either(kind, [a, b], **options) as client:
            await client.publish("orders", [b"on a"])
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            await client.publish("orders", [b"on b"])
            assert await client.streams() == ["orders"]
            assert await client.read("orders") == [b"on b"]
    assert _stored(tmp_path / "a", "orders") == [b"on a"]


def _writer_address(url: str, stream: str) -> str:
    """The address of ``stream``'s writer, as the cluster's ``GET /cluster`` says."""
    request = urllib.request.Request(f"{url}/cluster")
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        cluster = json.load(answer)
    (entry,) = [entry for entry in cluster["streams"] if entry["stream"] == stream]
    return str(entry["address"])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cluster_writer_is_learnt_and_its_death_ridden_out(
    kind: str, tmp_path: Path
) -> None:
    """Two ``serve --node-id`` nodes on one folder: appends find the writer, which is killed."""
    root = tmp_path / "data"
    with (
        _serve_killable(root, "n1") as (one, first),
        _serve_killable(root, "n2") as (two, second),
    ):
        client = Either(kind, [one, two], user=USER, password=PASSWORD)
        try:
            receipts = [await client.publish("orders", [b"m%d" % n]) for n in range(3)]
            writer = _writer_address(one, "orders")
            assert client.writer("orders") == writer
            process = first if writer == one else second
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            receipts.append(await client.publish("orders", [b"m3"]))
            assert await client.read("orders") == [b"m0", b"m1", b"m2", b"m3"]
            assert client.writer("orders") == (two if writer == one else one)
        finally:
            await client.close()
    assert [receipt[0].sequence for receipt in receipts] == [0, 1, 2, 3]
    assert _stored(root, "orders") == [b"m0", b"m1", b"m2", b"m3"]


# The writer of a stream ----------------------------------------------------------------


class RecordingNode:
    """A real server on its own storage that records every request and may name a writer.

    ``writer``: the ``X-MessageVault-Writer`` its append answers carry;
    ``busy``: appends are answered 503 ``overloaded`` instead.
    """

    def __init__(self, root: Path) -> None:
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.writer: str | None = None
        self.busy = False
        app = create_app(StreamHub(FileStorage(root, fsync="never")))
        app.middlewares.append(self._record)
        self.served = ServedApp(app)

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def appends(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "POST"]

    @web.middleware
    async def _record(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        if request.method == "POST" and self.busy:
            await request.read()
            body = error_body("overloaded", "busy")
            return web.Response(status=503, body=body, content_type="application/json")
        response = await handler(request)
        if request.method == "POST" and self.writer is not None:
            response.headers[WRITER_HEADER] = self.writer
        return response


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Callable[[], RecordingNode]]:
    """Makes started ``RecordingNode``s; all are stopped at the end."""
    started: list[RecordingNode] = []

    def make() -> RecordingNode:
        node = RecordingNode(tmp_path / f"node{len(started)}")
        node.served.start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.served.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_appends_go_to_the_writer_an_answer_names(
    kind: str, recording: Callable[[], RecordingNode]
) -> None:
    a, b = recording(), recording()
    a.writer = f"HTTP://127.0.0.1:{b.served.port}/"  # spelt otherwise: the same node
    b.writer = b.url
    async with _either(kind, [a.url, b.url], user=USER, password=PASSWORD) as client:
        await client.publish("orders", [b"1"])  # to a (the client's node): names b
        await client.publish("orders", [b"2"])  # straight to b
        await client.publish("payments", [b"3"])  # another stream: its writer is not known
        assert await client.streams() == ["orders", "payments"]  # reads: the client's node
        await client.publish("orders", [b"4"])
    assert a.appends == ["/streams/orders", "/streams/payments"]
    assert b.appends == ["/streams/orders", "/streams/orders"]
    assert [method for method, _, _ in b.requests] == ["POST", "POST"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "named",
    [
        "{c}",  # a node the user did not configure
        "https://127.0.0.1:{b_port}",  # b's host and port, another scheme
        "http://localhost:{b_port}",  # b by another name: not compared by resolving it
        "http://127.0.0.1:{b_port}/elsewhere",  # another prefix
        "http://someone:pw@127.0.0.1:{b_port}",  # credentials of its own
        "{b},{c}",  # a list
        "not a URL",
    ],
)
@pytest.mark.usefixtures("first_node_first")
async def test_a_writer_the_user_did_not_configure_is_ignored(
    kind: str, named: str, recording: Callable[[], RecordingNode]
) -> None:
    """The user's credentials go only where the user said: never to a URL an answer names."""
    a, b, c = recording(), recording(), recording()
    a.writer = named.format(b=b.url, b_port=b.served.port, c=c.url)
    async with _either(kind, [a.url, b.url], user=USER, password=PASSWORD) as client:
        for n in range(3):
            await client.publish("orders", [b"%d" % n])
    assert a.appends == ["/streams/orders"] * 3
    assert b.requests == [] and c.requests == []
    assert {authorization for _, _, authorization in a.requests} != {None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_writer_that_fails_is_forgotten(
    kind: str, recording: Callable[[], RecordingNode], connects: list[int]
) -> None:
    a, b = recording(), recording()
    async with _either(kind, [a.url, b.url], retries=0) as client:
        a.writer = b.url
        await client.publish("orders", [b"1"])  # to a, which names b
        a.writer = None
        b.busy = True
        await client.publish("orders", [b"2"])  # to b: a 503, and the retry to a
        await client.publish("orders", [b"3"])  # to a: b was forgotten
        assert b.appends == ["/streams/orders"]
        a.writer = b.url
        b.busy = False
        await client.publish("orders", [b"4"])  # to a, which names b again
        b.served.stop()
        await client.publish("orders", [b"5"])  # to b, refused: the same try goes on to a
        await client.publish("orders", [b"6"])  # to a: b is passed over
    assert a.appends == ["/streams/orders"] * 6
    assert b.appends == ["/streams/orders"]
    assert connects.count(b.served.port) == 2  # the 503, then the refusal


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("first_node_first")
async def test_a_writer_that_moves_out_of_the_list_is_forgotten(
    kind: str, recording: Callable[[], RecordingNode]
) -> None:
    a, b, c = recording(), recording(), recording()
    a.writer = b.url
    b.writer = c.url  # b's answer: the stream's writer is now c, which the user did not give
    async with _either(kind, [a.url, b.url]) as client:
        for n in range(3):
            await client.publish("orders", [b"%d" % n])
    assert a.appends == ["/streams/orders", "/streams/orders"]
    assert b.appends == ["/streams/orders"]
    assert c.requests == []


# The command line ----------------------------------------------------------------------


def _run(tmp_path: Path, *args: str, **env: str | None) -> tuple[int, str, str]:
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        **dict.fromkeys(
            [
                "MESSAGEVAULT_STORAGE",
                "MESSAGEVAULT_URL",
                "MESSAGEVAULT_PROFILE",
                "MESSAGEVAULT_USER",
                "MESSAGEVAULT_PASSWORD",
            ]
        ),
        **env,
    }
    result = CliRunner().invoke(main, [*args], env=variables, prog_name="messagevault")
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_takes_several_nodes(tmp_path: Path, nowhere: Callable[[], str]) -> None:
    with _server(tmp_path / "data") as server:
        nodes = f"{nowhere()},{server.url}"
        code, out, err = _run(tmp_path, "publish", "orders", "hello", "--url", nodes)
        assert code == 0, err
        code, out, err = _run(tmp_path, "read", "orders", MESSAGEVAULT_URL=nodes)
        assert code == 0, err
        assert '"value":"hello"' in out
    code, out, err = _run(tmp_path, "streams", "--url", f"{server.url},,{server.url}")
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "has an empty entry" in err
    dead = [nowhere(), nowhere()]
    code, out, err = _run(tmp_path, "streams", "--url", ",".join(dead))
    assert code != 0
    assert all(node in err for node in dead), err
