"""Several nodes in one process: real HTTP between real aiohttp servers on loopback ports.

The nodes share one storage (memory or files) and its leases; these tests
cover routing, forwarding, hand-over and the node credentials. Crashes and
frozen writers are in test_cluster_failover.py and test_cluster_fencing.py,
with real processes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from messagevault import FileStorage, MemoryStorage, Reader, encode_batch
from messagevault.format import NO_PRODUCER
from messagevault.server import Limits, StreamHub, create_app
from messagevault.server.auth import Authenticator, Users, save_users
from messagevault.server.cluster import NODE_SCHEME, Cluster, load_token, stream_lease
from messagevault.storage.base import Storage
from messagevault.wire import DUPLICATE_HEADER, WRITER_HEADER
from tests.azurite import free_port
from tests.prometheus_text import sample

BATCH = "application/x-messagevault-batch"
PASSWORD = "node-test-password"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


@dataclass
class Node:
    node_id: str
    hub: StreamHub
    cluster: Cluster
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return self.cluster.address

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_node(storage: Storage, node_id: str, *, lease_duration: float = 2.0) -> Node:
    hub = StreamHub(storage)
    cluster = Cluster(
        storage.leases(),  # type: ignore[attr-defined]
        node_id,
        load_token(storage),
        run=hub.run,
        open_writer=hub.open_writer,
        close_writer=hub.stop_writing,
        lease_duration=lease_duration,
    )
    port = free_port()
    cluster.address = f"http://127.0.0.1:{port}"
    app = create_app(hub, Limits(), Authenticator(storage), cluster=cluster)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Node(node_id, hub, cluster, runner)


@pytest.fixture(params=["memory", "file"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    storage: Storage = MemoryStorage() if request.param == "memory" else FileStorage(tmp_path)
    users = Users()
    users.set_password("admin", PASSWORD)
    users.grant("admin", ["admin"])
    save_users(storage, users)  # type: ignore[arg-type]
    return storage


@pytest.fixture
async def nodes(storage: Storage) -> AsyncIterator[list[Node]]:
    # Started one after another: the first ones saw no others when they joined.
    started = [await start_node(storage, f"n{i}") for i in (1, 2, 3)]
    try:
        yield started
    finally:
        for node in started:
            with contextlib.suppress(Exception):
                await node.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def append(
    session: aiohttp.ClientSession, node: Node, stream: str, body: bytes, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with session.post(
        f"{node.url}/streams/{stream}",
        data=body,
        headers={"Content-Type": BATCH, **AUTH, **headers},
    ) as answer:
        return answer.status, dict(answer.headers), json.loads(await answer.read())


def batch(*values: bytes, producer: bytes = NO_PRODUCER, sequence: int = 0) -> bytes:
    encoded = encode_batch([(b"", value) for value in values])
    if producer != NO_PRODUCER:
        encoded = encoded.with_producer(producer, sequence)
    return encoded.frame()


def writer_node(nodes: list[Node], stream: str) -> Node:
    writers = [node for node in nodes if stream in node.cluster.held]
    assert len(writers) == 1, [node.node_id for node in writers]
    return writers[0]


async def test_any_node_takes_appends_and_one_node_writes_each_stream(
    nodes: list[Node], session: aiohttp.ClientSession, storage: Storage
) -> None:
    positions = []
    writers = set()
    for round_ in range(3):
        for node in nodes:
            status, headers, answer = await append(session, node, "orders", batch(b"%d" % round_))
            assert status == 200, answer
            positions.append(answer["messages"][0]["position"])
            writers.add(headers[WRITER_HEADER])
    writer = writer_node(nodes, "orders")
    assert writers == {writer.url}  # every answer names the one writer
    assert positions == sorted(positions) and len(set(positions)) == 9
    with Reader.open(storage, "orders") as reader:
        assert [m.value for m in reader.read(0)] == [b"%d" % (i // 3) for i in range(9)]
    forwarded = 0.0
    for node in nodes:
        if node is not writer:
            metrics = await (await session.get(f"{node.url}/metrics")).text()
            forwarded += sample(metrics, "messagevault_forwarded_appends_total", stream="orders")
    assert forwarded == 6


async def test_new_streams_spread_over_the_nodes(
    nodes: list[Node], session: aiohttp.ClientSession
) -> None:
    for i in range(12):
        status, _, answer = await append(session, nodes[0], f"spread-{i}", batch(b"x"))
        assert status == 200, answer
    counts = [sum(1 for i in range(12) if f"spread-{i}" in node.cluster.held) for node in nodes]
    assert sum(counts) == 12
    assert sum(1 for count in counts if count) >= 2, counts


async def test_a_forwarded_duplicate_gets_the_first_receipts(
    nodes: list[Node], session: aiohttp.ClientSession
) -> None:
    body = batch(b"once", producer=b"p" * 16, sequence=0)
    first = await append(session, nodes[0], "dedup", body)
    assert first[0] == 200
    for node in nodes:
        status, headers, answer = await append(session, node, "dedup", body)
        assert status == 200
        assert headers.get(DUPLICATE_HEADER) == "true"
        assert answer == first[2]


async def test_an_error_answer_is_relayed_unchanged(
    nodes: list[Node], session: aiohttp.ClientSession
) -> None:
    await append(session, nodes[0], "gap", batch(b"a", producer=b"q" * 16, sequence=0))
    writer = writer_node(nodes, "gap")
    other = next(node for node in nodes if node is not writer)
    status, _, answer = await append(
        session, other, "gap", batch(b"c", producer=b"q" * 16, sequence=5)
    )
    assert status == 409
    assert answer["error"] == "sequence_gap"


async def test_a_stopping_writer_hands_its_streams_over_at_once(
    nodes: list[Node], session: aiohttp.ClientSession, storage: Storage
) -> None:
    await append(session, nodes[0], "handover", batch(b"before"))
    writer = writer_node(nodes, "handover")
    generation = writer.cluster.held["handover"].generation
    await writer.stop()
    others = [node for node in nodes if node is not writer]
    status, headers, answer = await append(session, others[0], "handover", batch(b"after"))
    assert status == 200, answer
    new_writer = writer_node(others, "handover")
    assert headers[WRITER_HEADER] == new_writer.url
    assert new_writer.cluster.held["handover"].generation == generation + 1
    with Reader.open(storage, "handover") as reader:
        assert [m.value for m in reader.read(0)] == [b"before", b"after"]


async def test_node_credentials(nodes: list[Node], session: aiohttp.ClientSession) -> None:
    token = nodes[0].cluster.token
    wrong = {"Authorization": f"{NODE_SCHEME} not-the-token"}
    async with session.post(
        f"{nodes[0].url}/streams/x", data=batch(b"v"), headers={"Content-Type": BATCH, **wrong}
    ) as answer:
        assert answer.status == 401
    # A forwarded append that reaches a node which does not write the stream
    # is not forwarded again: not_writer, and the forwarder looks again.
    await append(session, nodes[0], "fwd", batch(b"v"))
    writer = writer_node(nodes, "fwd")
    other = next(node for node in nodes if node is not writer)
    async with session.post(
        f"{other.url}/streams/fwd",
        data=batch(b"v"),
        headers={"Content-Type": BATCH, "Authorization": f"{NODE_SCHEME} {token}"},
    ) as answer:
        assert answer.status == 503
        assert (await answer.json())["error"] == "not_writer"
        assert answer.headers["Retry-After"]


async def test_the_token_is_never_logged(
    nodes: list[Node], session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for node in nodes:
        await append(session, node, "quiet", batch(b"v"))
    text = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert nodes[0].cluster.token not in text


async def test_no_writer_within_the_wait_is_a_retriable_503(
    nodes: list[Node], session: aiohttp.ClientSession, storage: Storage
) -> None:
    # A live lease held by a node that accepts no connections, not yet for DEAD_AFTER.
    leases = storage.leases()  # type: ignore[attr-defined]
    leases.acquire(
        stream_lease("stuck"),
        holder="ghost",
        address=f"http://127.0.0.1:{free_port()}",
        duration=30,
    )
    nodes[0].cluster.forward_wait = 0.3
    status, headers, answer = await append(session, nodes[0], "stuck", batch(b"v"))
    assert status == 503, answer
    assert answer["error"] == "no_writer"
    assert headers["Retry-After"] == "1"
    # Once the address has refused connections for DEAD_AFTER, its lease is broken.
    nodes[0].cluster.forward_wait = 5.0
    status, headers, answer = await append(session, nodes[0], "stuck", batch(b"v"))
    assert status == 200, answer
    assert headers[WRITER_HEADER] == nodes[0].url
    record = leases.inspect(stream_lease("stuck"))
    assert record.holder == "n1" and record.generation == 2


async def test_a_lost_lease_stops_the_writer(
    nodes: list[Node], session: aiohttp.ClientSession, storage: Storage
) -> None:
    await append(session, nodes[0], "lost", batch(b"first"))
    writer = writer_node(nodes, "lost")
    leases = storage.leases()  # type: ignore[attr-defined]
    leases.break_(stream_lease("lost"))
    thief = leases.acquire(
        stream_lease("lost"), holder="thief", address="http://127.0.0.1:9", duration=30
    )
    # The deposed writer's next append fails on the fence and changes nothing...
    status, _, answer = await append(session, writer, "lost", batch(b"fenced"))
    assert status in (409, 503), answer
    assert answer["error"] in ("stale_writer", "not_writer", "committer_closed", "no_writer")
    # ...and renewing finds the lease gone: the node stops counting itself the writer.
    await writer.cluster.renew_once()
    assert "lost" not in writer.cluster.held
    leases.release(thief)
    with Reader.open(storage, "lost") as reader:
        assert [m.value for m in reader.read(0)] == [b"first"]


async def test_ready_cluster_and_metrics_show_the_role(
    nodes: list[Node], session: aiohttp.ClientSession
) -> None:
    await append(session, nodes[0], "roles", batch(b"v"))
    writer = writer_node(nodes, "roles")
    for node in nodes:
        ready = await (await session.get(f"{node.url}/ready")).json()
        assert ready["node"] == node.node_id
        role = "writer" if node.cluster.held else "standby"
        assert ready["role"] == role
        metrics = await (await session.get(f"{node.url}/metrics")).text()
        assert sample(metrics, "messagevault_node_role", node=node.node_id, role=role) == 1
    described = await (await session.get(f"{nodes[0].url}/cluster", headers=AUTH)).json()
    assert {entry["node"] for entry in described["nodes"]} == {"n1", "n2", "n3"}
    assert all(entry["live"] for entry in described["nodes"])
    (entry,) = [entry for entry in described["streams"] if entry["stream"] == "roles"]
    assert entry["writer"] == writer.node_id
    assert entry["address"] == writer.url
    assert entry["generation"] >= 1
    assert entry["expires_at"] > 0
    async with session.get(f"{nodes[0].url}/cluster") as answer:
        assert answer.status == 401  # it names the streams: users only


async def test_a_single_server_says_so(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(StreamHub(FileStorage(tmp_path))))
    assert (await (await client.get("/ready")).json()) == {"status": "ready", "role": "single"}
    described = await (await client.get("/cluster")).json()
    assert described == {"node": None, "role": "single", "nodes": [], "streams": []}
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "messagevault_node_role", node="", role="single") == 1


async def test_a_deposed_writer_does_not_refuse_a_sequence_from_its_stale_table(
    nodes: list[Node], session: aiohttp.ClientSession, storage: Storage
) -> None:
    producer = b"s" * 16
    await append(session, nodes[0], "stale-table", batch(b"0", producer=producer, sequence=0))
    writer = writer_node(nodes, "stale-table")
    other = next(node for node in nodes if node is not writer)
    as_node = {"Authorization": f"{NODE_SCHEME} {writer.cluster.token}"}
    # The lease moves to another node, which commits the producer's next batch;
    # the old writer has not renewed since, so it still counts itself the writer.
    storage.leases().break_(stream_lease("stale-table"))  # type: ignore[attr-defined]
    status, _, answer = await append(
        session, other, "stale-table", batch(b"1", producer=producer, sequence=1), **as_node
    )
    assert status == 200, answer
    assert "stale-table" in writer.cluster.held
    # Its table says the producer's last batch was 0: batch 2 would be a gap.
    # Asked of storage first, the answer is not_writer (send it again), not sequence_gap.
    status, _, answer = await append(
        session, writer, "stale-table", batch(b"2", producer=producer, sequence=2), **as_node
    )
    assert (status, answer["error"]) == (503, "not_writer"), answer
    assert "stale-table" not in writer.cluster.held
    status, _, answer = await append(
        session, writer, "stale-table", batch(b"2", producer=producer, sequence=2)
    )
    assert status == 200, answer  # forwarded to the new writer now
    with Reader.open(storage, "stale-table") as reader:
        assert [m.value for m in reader.read(0)] == [b"0", b"1", b"2"]
