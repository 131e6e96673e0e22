"""Failover under load, proven (issue 13 §4): SIGKILL a stream's writer again and again.

Three ``messagevault serve --node-id`` processes share one storage (a data
folder, or Azurite); four producers publish numbered messages to two
streams through the nodes, each batch under its producer's id and number
and sent again until acknowledged (two through a client that knows every
node, two through a random node each time, so appends are forwarded). The
test kills the writer of one stream or the other with SIGKILL, restarts
it under the same id and port (at once, or after a second), and waits for
the next acknowledged append on that stream: the failover. After the last
one the producers stop, the nodes stop, and each stream, read from storage,
must hold every acknowledged message exactly once, in each producer's order.

Each failover's time (kill to next ack) is printed (``pytest -s``) and saved
under ``benchmarks/results/cluster-failover-<backend>-<time>.json``; only
that a failover happened within ``FAILOVER_BOUND`` is asserted.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from messagevault.storage import open_storage
from messagevault.storage.base import Storage
from tests.azurite import Azurite
from tests.cluster_load import (
    Ack,
    Acks,
    DirectAppend,
    Failover,
    LoadProducer,
    check_stream,
    node_logs,
    report_failovers,
    wait_for,
)
from tests.cluster_nodes import Cluster, Node, clear_leases, cluster_of, credentials

KILLS = 10
FAILOVER_BOUND = 60.0  # seconds from a kill to the next ack on the stream: generous, not a timing
RESTART_PAUSES = (0.0, 1.0)  # seconds between a kill and the restart, in turn
# The default stream lease: failover must come from the dead writer's refused
# connections (DEAD_AFTER), not from its lease running out.
LEASE_DURATION = 15.0


def _live_writer(cluster: Cluster, stream: str) -> Node | None:
    node = cluster.writer_of(stream)
    if node is None or node.process is None or node.process.poll() is not None:
        return None
    return node


def _log_count(cluster: Cluster, text: str) -> int:
    return sum(node.log.read_text(errors="replace").count(text) for node in cluster.nodes)


def _next_ack(
    acks: Acks, producers: list[LoadProducer], stream: str, killed_at: float
) -> Ack | None:
    """The failover's ack, waiting ``FAILOVER_BOUND`` at most; None at once if no producer runs."""
    deadline = killed_at + FAILOVER_BOUND
    while time.monotonic() < deadline:
        ack = acks.first_after(stream, killed_at, min(1.0, deadline - time.monotonic()))
        if ack is not None or not any(p.is_alive() for p in producers):
            return ack
    return None


def _problems(producers: list[LoadProducer]) -> list[str]:
    return [f"{p.producer}: {p.fatal or p.gave_up}" for p in producers if p.fatal or p.gave_up]


def _failover_under_load(backend: str, url: str, storage: Storage, root: Path) -> None:
    streams = [f"fo-{uuid.uuid4().hex[:8]}-{suffix}" for suffix in ("a", "b")]
    acks = Acks()
    stop = threading.Event()
    failovers: list[Failover] = []
    with cluster_of(3, root, storage=url, lease_duration=LEASE_DURATION) as cluster:
        producers = [
            LoadProducer(
                f"p{i}",
                streams,
                cluster.urls,
                credentials(),
                acks,
                stop,
                spread=i % 2 == 1,
            )
            for i in range(4)
        ]
        for producer in producers:
            producer.start()
        try:
            for stream in streams:
                assert acks.first_after(stream, 0.0, 30.0), (
                    f"no ack on {stream}\n{node_logs(cluster)}"
                )
            for number in range(KILLS):
                stream = streams[number % len(streams)]
                pause = RESTART_PAUSES[(number // len(streams)) % len(RESTART_PAUSES)]
                writer: Node = wait_for(
                    functools.partial(_live_writer, cluster, stream), 30, what="a writer"
                )
                killed_at = time.monotonic()
                writer.kill()
                if pause:
                    time.sleep(pause)
                writer.start(wait=False)
                ack = _next_ack(acks, producers, stream, killed_at)
                assert ack is not None, (
                    f"kill {number + 1} of {writer.node_id} ({stream}): no ack within "
                    f"{FAILOVER_BOUND:g} s; producers: {_problems(producers)}\n{node_logs(cluster)}"
                )
                failovers.append(
                    Failover(number + 1, stream, writer.node_id, pause, ack.at - killed_at)
                )
                writer.wait_ready()
        finally:
            stop.set()
            for producer in producers:
                producer.join(timeout=90)
        assert not any(p.is_alive() for p in producers), "a producer did not stop"
        problems = _problems(producers)
        for node in cluster.nodes:
            node.stop()  # the last commits' checkpoints are in storage (Azure's trail)
        faults = [
            fault
            for stream in streams
            for fault in check_stream(storage, stream, acks.acknowledged(stream))
        ]
        errors: Counter[str] = Counter()
        for producer in producers:
            errors.update(producer.errors)
    report_failovers(
        backend,
        failovers,
        {
            "lease_duration": LEASE_DURATION,
            "streams": len(streams),
            "producers": len(producers),
            "acknowledged_batches": len(acks.items),
            "acknowledged_messages": sum(a.count for a in acks.items),
            "duplicate_acks": sum(a.duplicate for a in acks.items),
            "producer_errors": dict(errors),
            # Every time a node took a stream: a kill moves every stream its
            # victim wrote, and a node may take one from another that lives
            # (which then says "stopped writing stream" if it lives long enough).
            "takeovers": _log_count(cluster, '"writing stream"'),
            "deposed_alive": _log_count(cluster, '"stopped writing stream"'),
        },
    )
    assert not faults and not problems, "\n".join([*problems, *faults, node_logs(cluster)])
    assert len(failovers) == KILLS


@pytest.mark.slow
def test_failover_under_load_on_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _failover_under_load("file", f"file:{root}", open_storage(f"file:{root}"), tmp_path)


@pytest.mark.slow
def test_failover_under_load_on_azurite(
    azurite: Azurite, azure_storage: Storage, tmp_path: Path
) -> None:
    clear_leases(azure_storage)
    try:
        _failover_under_load("azure", f"azure:{azurite.connection_string}", azure_storage, tmp_path)
    finally:
        clear_leases(azure_storage)


def test_a_node_back_from_the_dead_keeps_the_streams_it_took_back(tmp_path: Path) -> None:
    """W dies; X takes one of W's streams; W restarts and takes back another: X forwards to it.

    X saw W's address refuse connections while it took the first stream;
    that must not make X break the lease W took, alive, since it restarted.
    """
    root = tmp_path / "data"
    streams = [f"back-{uuid.uuid4().hex[:6]}-{n}" for n in range(7)]
    with cluster_of(3, tmp_path, storage=f"file:{root}", lease_duration=15) as cluster:
        writers: dict[str, list[str]] = {}
        for stream in streams:  # 7 streams on 3 nodes: one node writes two or more
            append = DirectAppend(stream, 1, uuid.uuid4().bytes, cluster.urls[0])
            assert append.send(stream, credentials(), 30).acknowledged, append
            writers.setdefault(append.writer or "", []).append(stream)
        url, (first, second, *_) = next((u, s) for u, s in writers.items() if len(s) >= 2)
        writer = cluster.by_url(url)
        other = next(node for node in cluster.nodes if node is not writer)

        writer.kill()
        taken = DirectAppend("taken", 1, uuid.uuid4().bytes, other.url)
        taken.send(first, credentials(), 30)  # refused by W's address for 1 s, then taken
        assert taken.acknowledged and taken.writer == other.url, taken
        writer.start()
        back = DirectAppend("back", 1, uuid.uuid4().bytes, writer.url).send(
            second, credentials(), 30
        )
        assert back.acknowledged and back.writer == writer.url, back  # "this node restarted"

        through = DirectAppend("through", 1, uuid.uuid4().bytes, other.url)
        through.send(second, credentials(), 30)
        assert through.acknowledged, through
        assert through.writer == writer.url, (
            f"{other.node_id} took {second} from {writer.node_id}, alive since its restart\n"
            + "\n".join(
                line
                for line in other.log.read_text(errors="replace").splitlines()
                if '"writing stream"' in line
            )
        )
