"""Group commit: concurrent appends share storage commits, each answered with its own receipt."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from messagevault import (
    FileStorage,
    MemoryStorage,
    Overloaded,
    Reader,
    StaleWriter,
    StorageError,
    Writer,
    encode_batch,
)
from messagevault.committer import Commit, CommitterClosed, GroupCommitter
from messagevault.storage.base import Storage
from messagevault.writer import AppendResult
from tests.test_writer_faults import FailingStore


def _batch(tag: str, count: int = 3) -> list[tuple[bytes, bytes]]:
    return [(tag.encode(), f"{tag}/{i}".encode()) for i in range(count)]


def test_queued_appends_share_commits_and_get_their_own_receipts(storage: Storage) -> None:
    writer = Writer.open(storage, "orders")
    with GroupCommitter(writer, linger=0.3) as committer:
        futures = [committer.submit(encode_batch(_batch(f"b{n}"))) for n in range(100)]
        results = [future.result(timeout=30) for future in futures]
        assert committer.stats.batches == 100
        assert committer.stats.commits <= 10  # 100 appends, a handful of storage commits
        assert writer.checkpoint.commit == committer.stats.commits
    messages = list(Reader.open(storage, "orders").read())
    assert [m.value for m in messages] == [v for n in range(100) for _, v in _batch(f"b{n}")]
    assert [p for r in results for p in r.positions] == [m.position for m in messages]
    assert [r.base_sequence for r in results] == list(range(0, 300, 3))


def test_many_threads_append_concurrently(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, fsync="always")  # slow commits: appends pile up behind them
    writer = Writer.open(storage, "orders")
    received: dict[int, list[AppendResult]] = {}

    def produce(thread: int) -> None:
        received[thread] = [committer.append(_batch(f"t{thread}-{n}", 2)) for n in range(40)]

    with GroupCommitter(writer) as committer:
        threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = committer.stats
    assert stats.batches == 320
    assert stats.commits < 320
    by_position = {m.position: m for m in Reader.open(storage, "orders").read()}
    assert len(by_position) == 640
    for thread, results in received.items():
        # Each thread's batches are in the stream in its own order, at its receipts.
        positions = [r.frame_position for r in results]
        assert positions == sorted(positions)
        for n, result in enumerate(results):
            values = [by_position[p].value for p in result.positions]
            assert values == [v for _, v in _batch(f"t{thread}-{n}", 2)]


def test_one_commit_never_exceeds_one_storage_write() -> None:
    storage = MemoryStorage(page_size=512)
    writer = Writer.open(storage, "orders")
    big = encode_batch([(b"k", bytes(700_000))])
    with GroupCommitter(writer, linger=0.2) as committer:
        futures = [committer.submit(big) for _ in range(12)]
        for future in futures:
            future.result(timeout=30)
        assert committer.stats.commits >= 3  # 12 x 700 kB in <= 4 MiB commits
    writes = storage.storage_writes("orders")
    assert writes == committer.stats.commits  # each commit was exactly one write


def test_storage_failure_fails_that_commit_only() -> None:
    storage = MemoryStorage()
    store = FailingStore(storage.open_stream("orders", write=True, create=True))
    writer = Writer(store, "orders", commit_timeout=0.2)  # type: ignore[arg-type]
    with GroupCommitter(writer) as committer:
        committer.append(_batch("before"))
        store.fail["write"] = ("before", 10_000)
        store.fail["read_checkpoint"] = ("before", 10_000)
        failed = committer.submit(encode_batch(_batch("during")))
        with pytest.raises(StorageError):
            failed.result(timeout=30)
        store.fail.clear()
        committer.append(_batch("after"))
    values = [m.value for m in Reader.open(storage, "orders").read()]
    assert values == [v for _, v in _batch("before") + _batch("after")]


def test_deposed_writer_fails_everything_queued() -> None:
    storage = MemoryStorage()
    writer = Writer.open(storage, "orders")
    committer = GroupCommitter(writer, linger=0.5)
    committer.append(_batch("first"))
    usurper = Writer.open(storage, "orders", takeover=True)
    futures: list[Future[AppendResult]] = [
        committer.submit(encode_batch(_batch(f"q{n}"))) for n in range(5)
    ]
    for future in futures:
        with pytest.raises((StaleWriter, CommitterClosed)):
            future.result(timeout=30)
    with pytest.raises(CommitterClosed, match="can no longer be written"):
        committer.submit(encode_batch(_batch("late")))
    committer.close()
    usurper.append(_batch("usurper"))
    values = [m.value for m in Reader.open(storage, "orders").read()]
    assert values == [v for _, v in _batch("first") + _batch("usurper")]
    usurper.close()


def test_back_pressure_blocks_then_drains() -> None:
    storage = MemoryStorage()
    writer = Writer.open(storage, "orders")
    with GroupCommitter(writer, max_queued_bytes=10_000) as committer:
        started = time.monotonic()
        futures = [committer.submit(encode_batch([(b"k", bytes(5_000))])) for _ in range(50)]
        for future in futures:
            future.result(timeout=30)
        assert time.monotonic() - started < 30
    assert len(list(Reader.open(storage, "orders").read())) == 50


def test_close_commits_what_is_queued_then_refuses() -> None:
    storage = MemoryStorage()
    committer = GroupCommitter(Writer.open(storage, "orders"), linger=0.2)
    futures = [committer.submit(encode_batch(_batch(f"b{n}"))) for n in range(20)]
    committer.close()
    assert all(future.done() and future.exception() is None for future in futures)
    with pytest.raises(CommitterClosed, match="closed"):
        committer.submit(encode_batch(_batch("late")))
    assert len(list(Reader.open(storage, "orders").read())) == 60


class GroupWatcher:
    """An ``after_group`` hook that records, at each call, which futures were done by then."""

    def __init__(self) -> None:
        self.futures: list[Future[AppendResult]] = []
        self.calls: list[int] = []  # futures done at each call

    def watch(self, future: Future[AppendResult]) -> Future[AppendResult]:
        self.futures.append(future)
        return future

    def __call__(self) -> None:
        self.calls.append(sum(f.done() for f in self.futures))


def test_after_group_runs_once_per_commit_with_its_futures_resolved() -> None:
    storage = MemoryStorage()
    watcher = GroupWatcher()
    with GroupCommitter(Writer.open(storage, "orders"), linger=0.3, after_group=watcher) as c:
        for n in range(20):
            given: Future[AppendResult] = Future()
            assert c.submit(encode_batch(_batch(f"b{n}")), watcher.watch(given)) is given
        for future in watcher.futures:
            future.result(timeout=30)
        commits = c.stats.commits
    assert len(watcher.calls) == commits < 20
    assert watcher.calls[-1] == 20
    # Each call saw every future of its own commit resolved: the counts only grow, by whole groups.
    assert watcher.calls == sorted(watcher.calls)


def test_after_group_also_follows_failed_commits() -> None:
    storage = MemoryStorage()
    store = FailingStore(storage.open_stream("orders", write=True, create=True))
    watcher = GroupWatcher()
    writer = Writer(store, "orders", commit_timeout=0.2)  # type: ignore[arg-type]
    with GroupCommitter(writer, after_group=watcher) as committer:
        store.fail["write"] = ("before", 10_000)
        store.fail["read_checkpoint"] = ("before", 10_000)
        failed = committer.submit(encode_batch(_batch("during")), watcher.watch(Future()))
        with pytest.raises(StorageError):
            failed.result(timeout=30)
        store.fail.clear()
    assert watcher.calls == [1]


def test_after_group_follows_a_deposed_writer_failing_the_queue() -> None:
    storage = MemoryStorage()
    watcher = GroupWatcher()
    committer = GroupCommitter(Writer.open(storage, "orders"), linger=0.5, after_group=watcher)
    committer.append(_batch("first"))
    Writer.open(storage, "orders", takeover=True).close()
    for n in range(5):
        committer.submit(encode_batch(_batch(f"q{n}")), watcher.watch(Future()))
    for future in watcher.futures:
        with pytest.raises((StaleWriter, CommitterClosed)):
            future.result(timeout=30)
    committer.close()
    assert watcher.calls[-1] == 5


def test_a_full_queue_refuses_after_the_timeout_and_queues_nothing() -> None:
    storage = MemoryStorage()
    store = storage.open_stream("orders", write=True, create=True)
    gate = threading.Event()
    inner_write = store.write

    def held_write(offset: int, data: bytes | memoryview) -> None:
        gate.wait(30)
        inner_write(offset, data)

    store.write = held_write  # type: ignore[method-assign]
    committer = GroupCommitter(Writer(store, "orders"), max_queued_bytes=1)
    try:
        first = committer.submit(encode_batch(_batch("first")))  # taken, stuck in its write
        deadline = time.monotonic() + 30
        while committer.queued_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = committer.submit(encode_batch(_batch("queued")))  # the queue is now full
        with pytest.raises(Overloaded, match="try again"):
            committer.submit(encode_batch(_batch("refused")), timeout=0.2)
        assert committer.has_room is False
    finally:
        gate.set()
        committer.close()
    assert first.result(timeout=30).base_sequence == 0
    assert queued.result(timeout=30).base_sequence == 3
    values = [m.value for m in Reader.open(storage, "orders").read()]
    assert values == [v for _, v in _batch("first") + _batch("queued")]


def test_commit_observer_hears_each_commit_after_its_acknowledgements(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    heard: list[Commit] = []

    def observe(commit: Commit) -> None:
        # The acknowledgements went out first: an observer cannot delay them.
        assert all(f.done() for f in futures)
        heard.append(commit)

    futures: list[Future[AppendResult]] = []
    committer = GroupCommitter(Writer.open(storage, "orders"), on_commit=observe)
    with committer:
        futures.append(committer.submit(encode_batch([(b"k", b"v" * 10)] * 3)))
        futures[0].result()
        futures.append(committer.submit(encode_batch([(b"k", b"v")])))
        futures[1].result()
    assert [(c.stream, c.batches, c.messages) for c in heard] == [
        ("orders", 1, 3),
        ("orders", 1, 1),
    ]
    assert heard[-1].length == futures[1].result().committed_length
    assert sum(c.bytes for c in heard) == committer.stats.bytes
    assert all(c.seconds >= 0 for c in heard)


def test_a_failing_commit_observer_stops_nothing(tmp_path: Path) -> None:
    def broken(commit: Commit) -> None:
        raise RuntimeError("observer bug")

    with GroupCommitter(Writer.open(FileStorage(tmp_path), "orders"), on_commit=broken) as c:
        for _ in range(3):
            assert c.append([(b"k", b"v")]).message_count == 1
    assert c.stats.commits == 3
