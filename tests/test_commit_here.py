"""Commits in the caller's thread (``GroupCommitter.commit_here``) and the server's loop commits.

An append that finds the committer idle is committed by the thread that
brings it; the queued path and this one must keep arrival order, give the
same outcomes and errors, and keep the committer's bookkeeping (observers,
stats, snapshots, close) whole.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, MemoryStorage, Reader, StaleWriter, Writer, encode_batch
from messagevault.committer import Commit, GroupCommitter
from messagevault.errors import CommitterClosed, SequenceGap
from messagevault.format import EncodedBatch
from messagevault.server import StreamHub, create_app
from messagevault.server.hub import LOOP_COMMIT_MAX_BYTES
from messagevault.storage.memory import MemoryStreamStore

MakeClient = Any  # the aiohttp_client fixture


def _batch(tag: str, count: int = 3) -> EncodedBatch:
    return encode_batch([(tag.encode(), f"{tag}/{i}".encode()) for i in range(count)])


class _HeldStorage(MemoryStorage):
    """Memory storage whose next write, once armed, waits for ``release`` (30 s at most)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def open_stream(
        self, name: str, *, write: bool = False, create: bool = False, takeover: bool = False
    ) -> MemoryStreamStore:
        store = super().open_stream(name, write=write, create=create, takeover=takeover)
        inner_write = store.write

        def held_write(offset: int, data: bytes | memoryview) -> None:
            if self.armed:
                self.armed = False
                self.entered.set()
                assert self.release.wait(30)
            inner_write(offset, data)

        store.write = held_write  # type: ignore[method-assign]
        return store


def _values(storage: MemoryStorage | FileStorage) -> list[bytes]:
    with Reader.open(storage, "orders") as reader:
        return [m.value for m in reader.read()]


def test_an_idle_committer_commits_in_the_callers_thread(tmp_path: Path) -> None:
    seen: list[tuple[Commit, int]] = []
    committer = GroupCommitter(
        Writer.open(FileStorage(tmp_path), "orders"),
        on_commit=lambda commit: seen.append((commit, threading.get_ident())),
    )
    with committer:
        assert committer.last_commit_seconds is None
        first = committer.commit_here(_batch("a"))
        second = committer.submit(_batch("b")).result(timeout=30)
        third = committer.commit_here(_batch("c"))
        assert first is not None and third is not None
        assert [r.base_sequence for r in (first, second, third)] == [0, 3, 6]
        assert committer.last_commit_seconds is not None
        assert (committer.stats.commits, committer.stats.messages) == (3, 9)
    me = threading.get_ident()
    assert [(c.messages, thread == me) for c, thread in seen] == [
        (3, True),
        (3, False),  # the committer thread's
        (3, True),
    ]
    assert seen[-1][0].length == third.committed_length
    values = _values(FileStorage(tmp_path))
    assert values == [f"{t}/{i}".encode() for t in "abc" for i in range(3)]


def test_a_busy_committer_declines_and_queued_batches_keep_arrival_order() -> None:
    storage = _HeldStorage()
    committer = GroupCommitter(Writer.open(storage, "orders"))
    try:
        storage.armed = True
        in_flight = committer.submit(_batch("first"))
        assert storage.entered.wait(30)
        assert committer.commit_here(_batch("declined")) is None  # a commit is in flight
        queued = committer.submit(_batch("queued"))
        storage.release.set()
        # Behind a queued batch: declined until the committer thread took it.
        deadline = time.monotonic() + 30
        result = None
        while result is None and time.monotonic() < deadline:
            result = committer.commit_here(_batch("after"))
        assert result is not None
        assert in_flight.result(timeout=30).base_sequence == 0
        assert queued.result(timeout=30).base_sequence == 3
        assert result.base_sequence == 6
    finally:
        storage.release.set()
        committer.close()
    assert _values(storage) == [
        f"{t}/{i}".encode() for t in ("first", "queued", "after") for i in range(3)
    ]


def test_a_refused_batch_raises_as_the_queued_path_would() -> None:
    storage = MemoryStorage()
    producer = uuid.uuid4().bytes
    with GroupCommitter(Writer.open(storage, "orders")) as committer:
        assert committer.commit_here(_batch("p0").with_producer(producer, 0)) is not None
        gap = _batch("p5").with_producer(producer, 5)
        with pytest.raises(SequenceGap) as here:
            committer.commit_here(gap)
        with pytest.raises(SequenceGap) as queued:
            committer.submit(gap).result(timeout=30)
        assert str(here.value) == str(queued.value)
        repeat = committer.commit_here(_batch("p0").with_producer(producer, 0))
        assert repeat is not None and repeat.duplicate and repeat.base_sequence == 0
        assert committer.accepting  # a refusal is about one batch, not the committer
    assert _values(storage) == [b"p0/0", b"p0/1", b"p0/2"]


def test_a_deposed_writer_closes_the_committer_in_the_callers_thread_too() -> None:
    storage = MemoryStorage()
    committer = GroupCommitter(Writer.open(storage, "orders"))
    assert committer.commit_here(_batch("mine")) is not None
    with Writer.open(storage, "orders", takeover=True) as other:
        other.append([(b"", b"theirs")])
    with pytest.raises(StaleWriter):
        committer.commit_here(_batch("refused"))
    assert not committer.accepting
    assert committer.commit_here(_batch("later")) is None
    with pytest.raises(CommitterClosed):
        committer.submit(_batch("later"))
    committer.close()  # the committer thread heard of it and ended


def test_a_producer_snapshot_due_after_a_commit_here_is_taken_there() -> None:
    storage = MemoryStorage()
    writer = Writer.open(storage, "orders", snapshot_interval=1)
    with GroupCommitter(writer) as committer:
        assert storage.open_stream("orders").read_side("producers") is None
        assert committer.commit_here(_batch("a").with_producer(uuid.uuid4().bytes, 0))
        assert storage.open_stream("orders").read_side("producers") is not None


def test_a_due_producer_snapshot_never_delays_the_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = Writer.open(MemoryStorage(), "orders", snapshot_interval=1)
    writing, finish = threading.Event(), threading.Event()
    write_snapshot = writer.write_snapshot

    def slow_snapshot() -> bool:
        writing.set()
        finish.wait(30)
        return write_snapshot()

    monkeypatch.setattr(writer, "write_snapshot", slow_snapshot)
    with GroupCommitter(writer) as committer:
        try:
            future = committer.submit(_batch("a").with_producer(uuid.uuid4().bytes, 0))
            assert future.result(timeout=30).base_sequence == 0  # answered before the snapshot
            assert writing.wait(30)
            later = committer.submit(_batch("b"))  # waits for the writer: the snapshot has it
            assert not later.done()
        finally:
            finish.set()
        assert later.result(timeout=30).base_sequence == 3


def test_close_waits_for_a_commit_here_in_another_thread() -> None:
    storage = _HeldStorage()
    committer = GroupCommitter(Writer.open(storage, "orders"))
    results: list[object] = []
    storage.armed = True
    here = threading.Thread(target=lambda: results.append(committer.commit_here(_batch("a"))))
    here.start()
    assert storage.entered.wait(30)
    closing = threading.Thread(target=committer.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # the writer is still in use: not closed under it
    storage.release.set()
    closing.join(30)
    here.join(30)
    assert not closing.is_alive() and not here.is_alive()
    assert len(results) == 1 and results[0] is not None
    assert _values(storage) == [b"a/0", b"a/1", b"a/2"]


# The server: lone appends are committed on the event loop -------------------------------


class _Threads:
    """Which threads made a hub's commits (a commit observer), in commit order.

    The committer thread tells its observers after the acknowledgements, so
    a later commit on the loop may be told first: sorted by stream length.
    """

    def __init__(self, hub: StreamHub) -> None:
        self._seen: list[tuple[int, int]] = []
        hub.commit_observers.append(
            lambda commit: self._seen.append((commit.length, threading.get_ident()))
        )

    async def threads(self, commits: int) -> list[int]:
        for _ in range(500):  # until the committer thread told of its commits (bounded: 5 s)
            if len(self._seen) >= commits:
                break
            await asyncio.sleep(0.01)
        return [thread for _, thread in sorted(self._seen)]


async def _post(client: TestClient[Any, web.Application], body: dict[str, Any]) -> Any:
    response = await client.post("/streams/orders", json=body)
    return response.status, await response.json()


async def test_lone_appends_are_committed_on_the_loop_concurrent_ones_by_the_thread(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    hub.loop_commit_limit = 60.0  # whatever this disk's fsync takes today
    threads = _Threads(hub)
    client = await aiohttp_client(create_app(hub))
    loop_thread = threading.get_ident()
    for n in range(3):
        status, body = await _post(client, {"messages": [{"value": f"lone {n}"}]})
        assert (status, body["messages"][0]["sequence"]) == (200, n)
    # The first commit of a stream goes through the thread: its time is not known yet.
    assert [t == loop_thread for t in await threads.threads(3)] == [False, True, True]
    answers = await asyncio.gather(
        *(_post(client, {"messages": [{"value": f"together {n}"}]}) for n in range(20))
    )
    assert sorted(a[1]["messages"][0]["sequence"] for a in answers) == list(range(3, 23))
    # A burst is grouped (by the thread: an append that arrived first may
    # have been alone); lone appends after it are the loop's again.
    burst = await threads.threads(4)
    assert len(burst) < 3 + 20
    assert not all(t == loop_thread for t in burst[3:])
    for n in range(2):
        assert (await _post(client, {"messages": [{"value": f"after {n}"}]}))[0] == 200
    commits = len(burst) + 2
    assert (await threads.threads(commits))[-1] == loop_thread
    # A slow commit sends the next one to the thread, a quick one back to the loop.
    hub.loop_commit_limit = 1.0
    hub.committers()["orders"].last_commit_seconds = 1.5
    for n in range(2):
        assert (await _post(client, {"messages": [{"value": f"slow {n}"}]}))[0] == 200
    assert [t == loop_thread for t in (await threads.threads(commits + 2))[-2:]] == [False, True]
    values = [m.value for m in Reader.open(FileStorage(tmp_path), "orders").read()]
    assert values[:3] == [b"lone 0", b"lone 1", b"lone 2"]
    assert values[-4:] == [b"after 0", b"after 1", b"slow 0", b"slow 1"]
    assert len(values) == 27


@pytest.mark.parametrize("on_loop", [True, False])
async def test_errors_are_answered_alike_on_the_loop_and_through_the_thread(
    aiohttp_client: MakeClient, tmp_path: Path, on_loop: bool
) -> None:
    hub = StreamHub(FileStorage(tmp_path), commit_on_loop=on_loop)
    hub.loop_commit_limit = 60.0
    threads = _Threads(hub)
    client = await aiohttp_client(create_app(hub))
    producer = str(uuid.uuid4())
    answers = [
        await _post(
            client, {"producer": producer, "sequence": sequence, "messages": [{"value": v}]}
        )
        for sequence, v in ((0, "zero"), (1, "one"), (5, "gap"), (1, "one"), (1, "other"))
    ]
    assert [(status, body.get("error")) for status, body in answers] == [
        (200, None),
        (200, None),
        (409, "sequence_gap"),
        (200, None),  # a repeat: the first answer again
        (409, "sequence_reused"),
    ]
    assert answers[3][1] == answers[1][1]
    assert [t == threading.get_ident() for t in await threads.threads(2)] == [False, on_loop]
    values = [m.value for m in Reader.open(FileStorage(tmp_path), "orders").read()]
    assert values == [b"zero", b"one"]


async def test_with_a_linger_lone_appends_still_wait_in_the_thread(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path), linger=0.001)
    hub.loop_commit_limit = 60.0
    threads = _Threads(hub)
    client = await aiohttp_client(create_app(hub))
    for n in range(3):
        assert (await _post(client, {"messages": [{"value": f"lone {n}"}]}))[0] == 200
    assert threading.get_ident() not in await threads.threads(3)


async def test_a_big_lone_batch_is_committed_by_the_thread(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    hub.loop_commit_limit = 60.0
    threads = _Threads(hub)
    client = await aiohttp_client(create_app(hub))
    big = "x" * (LOOP_COMMIT_MAX_BYTES + 1)  # its write alone would hold the loop
    for value in ("first", "small", big, "small again"):
        body = json.dumps({"messages": [{"value": value}]}).encode()
        headers = {"Content-Type": "application/json"}
        response = await client.post("/streams/orders", data=io.BytesIO(body), headers=headers)
        assert response.status == 200
    on_loop = [t == threading.get_ident() for t in await threads.threads(4)]
    assert on_loop == [False, True, False, True]


async def test_memory_storage_and_remote_storage_commit_in_the_thread() -> None:
    assert StreamHub(MemoryStorage()).commit_on_loop is False
    assert StreamHub(MemoryStorage(), commit_on_loop=True).commit_on_loop is True
