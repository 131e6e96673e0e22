"""Exactly-once appends on the log side: the writer's producer table, live and rebuilt.

Real storage throughout (memory, page-aligned memory, files; Azurite once);
a storage wrapper only where a fault must land at an exact moment.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner

from messagevault import Reader, SequenceGap, SequenceReused, StaleSequence, StorageError, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.cli import main
from messagevault.committer import GroupCommitter
from messagevault.format import EncodedBatch, encode_batch
from messagevault.producers import (
    SNAPSHOT_NAME,
    ProducerTable,
    decode_snapshot,
    rebuild_table,
)
from messagevault.server import StreamHub
from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.azure import AzureStorage
from messagevault.storage.base import Storage, StreamStore
from messagevault.writer import AppendResult
from tests import idempotent_writer
from tests.conftest import BACKENDS
from tests.serve_process import serve_process

P, Q, R = (bytes([n]) * 16 for n in (0xA1, 0xB2, 0xC3))
STREAM = "orders"


@pytest.fixture(params=["memory", "memory-paged", "file"])
def local_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return BACKENDS[request.param](request, tmp_path)


def _batch(producer: bytes | None, sequence: int, tag: str = "", count: int = 3) -> EncodedBatch:
    batch = encode_batch([(b"k", f"{tag}{sequence}:{n}".encode()) for n in range(count)])
    return batch if producer is None else batch.with_producer(producer, sequence)


def _values(storage: Storage) -> list[bytes]:
    return [message.value for message in Reader.open(storage, STREAM).read()]


def _append(writer: Writer, batch: EncodedBatch) -> AppendResult:
    return writer.append_batches([batch])[0]


def _table(writer: Writer) -> list[Any]:
    return list(writer.producers)


def _scan_alone(storage: Storage, stream: str = STREAM, **bounds: Any) -> list[Any]:
    """The table a writer would rebuild from the frames alone, no snapshot."""
    store = storage.open_stream(stream)
    try:
        checkpoint = store.read_checkpoint()
        return list(_ScanOnly(store).rebuild(checkpoint, **bounds))
    finally:
        store.close()


class _ScanOnly:
    """A read-only view of a stream that hides its snapshot."""

    def __init__(self, store: StreamStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def read_side(self, name: str) -> bytes | None:
        return None

    def rebuild(self, checkpoint: Checkpoint, **bounds: Any) -> ProducerTable:
        return rebuild_table(self, checkpoint, **bounds).table


# The rules, live -------------------------------------------------------------------------


def test_a_duplicate_gets_the_original_receipts_and_appends_nothing(
    local_storage: Storage,
) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(None, 0, "before"))
        first = _append(writer, _batch(P, 0))
        checkpoint = writer.checkpoint
        again = _append(writer, _batch(P, 0))
        assert again == dataclasses.replace(first, duplicate=True)
        assert list(again) == list(first)
        assert writer.checkpoint == checkpoint
    assert _values(local_storage) == [b"before0:0", b"before0:1", b"before0:2", *_ids(P, 0)]


def test_a_retry_of_a_batch_since_trimmed_is_refused_and_the_group_goes_on(
    local_storage: Storage,
) -> None:
    """Its frames are gone, so it cannot be compared or answered: a StaleSequence, alone."""
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(P, 0))
        kept = _append(writer, _batch(None, 0, "kept"))
        writer.trim(kept[0].position)
        outcomes = writer.append_group([_batch(P, 0), _batch(Q, 0)])
        assert isinstance(outcomes[0], StaleSequence)
        assert "trimmed" in str(outcomes[0]) and "not appended again" in str(outcomes[0])
        assert isinstance(outcomes[1], AppendResult) and not outcomes[1].duplicate
    assert _values(local_storage) == [*_ids(None, 0, "kept"), *_ids(Q, 0)]


def _ids(producer: bytes | None, sequence: int, tag: str = "", count: int = 3) -> list[bytes]:
    del producer
    return [f"{tag}{sequence}:{n}".encode() for n in range(count)]


def test_a_duplicate_on_azurite_reads_its_receipts_back(azure_storage: AzureStorage) -> None:
    with Writer.open(azure_storage, STREAM) as writer:
        first = _append(writer, _batch(P, 7))
        _append(writer, _batch(Q, 0))
    with Writer.open(azure_storage, STREAM) as writer:  # rebuilt from the snapshot
        assert _append(writer, _batch(P, 7)) == dataclasses.replace(first, duplicate=True)
        with pytest.raises(SequenceGap):
            _append(writer, _batch(P, 9))
    assert len(_values(azure_storage)) == 6
    store = azure_storage.open_stream(STREAM)
    snapshot = store.read_side(SNAPSHOT_NAME)
    store.close()
    assert snapshot is not None
    assert decode_snapshot(snapshot).position == first.end + _batch(Q, 0).frame_size


def test_a_gap_is_refused_and_changes_nothing(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(P, 4))
        checkpoint, table = writer.checkpoint, _table(writer)
        with pytest.raises(SequenceGap, match="expected batch sequence 5, got 7"):
            _append(writer, _batch(P, 7))
        assert (writer.checkpoint, _table(writer)) == (checkpoint, table)
        _append(writer, _batch(P, 5))  # the expected one still goes in
    assert _values(local_storage) == _ids(P, 4) + _ids(P, 5)


def test_a_repeat_with_other_content_is_refused_not_swallowed(local_storage: Storage) -> None:
    # A retry sends the same bytes; other bytes under the same producer and
    # sequence are a producer's bug: answering them with the first batch's
    # receipts would lose them without a word.
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(P, 0))
        checkpoint, table = writer.checkpoint, _table(writer)
        with pytest.raises(SequenceReused, match="again with other content"):
            _append(writer, _batch(P, 0, tag="other"))
        assert (writer.checkpoint, _table(writer)) == (checkpoint, table)
        outcomes = writer.append_group([_batch(P, 1), _batch(P, 1, tag="other")])
        assert isinstance(outcomes[0], AppendResult)
        assert isinstance(outcomes[1], SequenceReused)
        assert _append(writer, _batch(P, 1)).duplicate  # the same bytes: a duplicate
    assert _values(local_storage) == _ids(P, 0) + _ids(P, 1)


def test_an_older_batch_is_refused_as_stale(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        for sequence in range(3):
            _append(writer, _batch(P, sequence))
        checkpoint = writer.checkpoint
        with pytest.raises(StaleSequence, match="sequence 0 is older"):
            _append(writer, _batch(P, 0))
        assert writer.checkpoint == checkpoint
    assert len(_values(local_storage)) == 9


@pytest.mark.parametrize("sequence", [0, 1, 1000, 2**62])
def test_a_new_producer_starts_at_any_sequence(local_storage: Storage, sequence: int) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(P, 3))
        result = _append(writer, _batch(Q, sequence))
        assert not result.duplicate
        assert _append(writer, _batch(Q, sequence + 1)).frame_position == result.end


def test_batches_without_a_producer_append_every_time(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        results = [_append(writer, _batch(None, 0)) for _ in range(3)]
        assert len(writer.producers) == 0
    assert [r.duplicate for r in results] == [False] * 3
    assert len({r.frame_position for r in results}) == 3
    assert _values(local_storage) == _ids(None, 0) * 3


def test_append_batches_is_all_or_nothing_when_one_is_refused(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        _append(writer, _batch(P, 0))
        checkpoint = writer.checkpoint
        with pytest.raises(SequenceGap):
            writer.append_batches([_batch(Q, 0), _batch(P, 2)])
        assert writer.checkpoint == checkpoint
    assert _values(local_storage) == _ids(P, 0)


def test_in_a_group_each_batch_has_its_own_outcome(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        committed = _append(writer, _batch(P, 0))
        outcomes = writer.append_group(
            [
                _batch(P, 1),  # appended
                _batch(P, 1),  # a retry that overtook the answer to the one before
                _batch(Q, 5),  # appended: a new producer
                _batch(P, 3),  # a gap: refused alone
                _batch(P, 0),  # stale, now that 1 is in the group
                _batch(None, 9),  # appended
                _batch(P, 2),  # appended: follows 1
                _batch(Q, 5),  # the same again
            ]
        )
        first, retry, new, gap, stale, plain, follows, again = outcomes
        assert isinstance(first, AppendResult) and isinstance(follows, AppendResult)
        assert retry == dataclasses.replace(first, duplicate=True)
        assert again == dataclasses.replace(new, duplicate=True)  # type: ignore[type-var]
        assert isinstance(gap, SequenceGap)
        assert "expected batch sequence 2, got 3" in str(gap)
        assert isinstance(stale, StaleSequence)
        appended = [first, new, plain, follows]
        assert [r.duplicate for r in appended] == [False] * 4  # type: ignore[union-attr]
        assert [r.frame_position for r in appended] == [  # type: ignore[union-attr]
            committed.end,
            first.end,
            new.end,  # type: ignore[union-attr]
            plain.end,  # type: ignore[union-attr]
        ]
        assert writer.producers.get(P).sequence == 2  # type: ignore[union-attr]
        assert writer.producers.get(Q).sequence == 5  # type: ignore[union-attr]
    assert _values(local_storage) == (
        _ids(P, 0) + _ids(P, 1) + _ids(Q, 5) + _ids(None, 9) + _ids(P, 2)
    )


def test_a_group_of_only_duplicates_and_refusals_commits_nothing(local_storage: Storage) -> None:
    storage = local_storage
    with Writer.open(storage, STREAM) as writer:
        first = _append(writer, _batch(P, 0))
        checkpoint = writer.checkpoint
        duplicate, gap = writer.append_group([_batch(P, 0), _batch(P, 5)])
        assert duplicate == dataclasses.replace(first, duplicate=True)
        assert isinstance(gap, SequenceGap)
        assert writer.checkpoint == checkpoint  # no commit: not even a new commit number


def test_the_committer_answers_each_batch_of_a_group(local_storage: Storage) -> None:
    writer = Writer.open(local_storage, STREAM)
    committed = _append(writer, _batch(P, 0))
    with GroupCommitter(writer, linger=0.2) as committer:
        futures = [
            committer.submit(batch)
            for batch in (_batch(P, 1), _batch(P, 1), _batch(P, 9), _batch(P, 0))
        ]
        first = futures[0].result(timeout=30)
        assert futures[1].result(timeout=30) == dataclasses.replace(first, duplicate=True)
        with pytest.raises(SequenceGap):
            futures[2].result(timeout=30)
        with pytest.raises(StaleSequence):
            futures[3].result(timeout=30)
        assert first.frame_position == committed.end
        assert committer.stats.batches == 1  # only what was appended counts
    assert _values(local_storage) == _ids(P, 0) + _ids(P, 1)


def test_a_large_batch_in_pieces_is_one_record(local_storage: Storage) -> None:
    """A value over the frame limit is a HEAD and CONTINUATION frames: one batch, one record."""
    big = bytes(range(256)) * (5 * 1024 * 16)  # 20 MiB
    batch = encode_batch([(b"a", b"small"), (b"big", big)]).with_producer(P, 0)
    assert len(batch.frames) > 2
    with Writer.open(local_storage, STREAM) as writer:
        first = _append(writer, batch)
        assert _append(writer, batch) == dataclasses.replace(first, duplicate=True)
        live = _table(writer)
        assert live[0][1].start == first.frame_position and live[0][1].end == first.end
    assert _scan_alone(local_storage) == live
    with Writer.open(local_storage, STREAM) as writer:
        assert _append(writer, batch) == dataclasses.replace(first, duplicate=True)
    assert [m.value for m in Reader.open(local_storage, STREAM).read()] == [b"small", big]


# Rebuilt after a restart -------------------------------------------------------------------


def _fill(writer: Writer) -> dict[tuple[bytes, int], AppendResult]:
    """Batches of three producers and some without one; the result of each producer batch."""
    results = {}
    for round_ in range(4):
        for producer in (P, Q, R):
            results[producer, round_] = _append(writer, _batch(producer, round_))
        _append(writer, _batch(None, round_))
    return results


@pytest.mark.parametrize("snapshot", ["kept", "deleted", "damaged", "misplaced"])
def test_a_reopened_writer_rebuilds_the_table(
    local_storage: Storage, snapshot: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        results = _fill(writer)
        live = _table(writer)
    store = local_storage.open_stream(STREAM, write=True)
    saved = store.read_side(SNAPSHOT_NAME)
    assert saved is not None and decode_snapshot(saved).position == writer.checkpoint.length
    if snapshot == "deleted" and isinstance(local_storage, FileStorage):
        (local_storage.root / STREAM / SNAPSHOT_NAME).unlink()
    elif snapshot == "deleted":
        assert isinstance(local_storage, MemoryStorage)
        del local_storage._streams[STREAM].sides[SNAPSHOT_NAME]
    elif snapshot == "damaged":
        store.write_side(SNAPSHOT_NAME, saved[:40] + bytes([saved[40] ^ 1]) + saved[41:])
    elif snapshot == "misplaced":  # sound, but not at a frame of this stream
        store.write_side(SNAPSHOT_NAME, ProducerTable().snapshot(3, 0))
    store.close()
    with caplog.at_level(logging.WARNING), Writer.open(local_storage, STREAM) as writer:
        assert _table(writer) == live
        for (producer, sequence), result in results.items():
            if sequence == 3:
                assert _append(writer, _batch(producer, sequence)) == dataclasses.replace(
                    result, duplicate=True
                )
            else:
                with pytest.raises(StaleSequence):
                    _append(writer, _batch(producer, sequence))
        with pytest.raises(SequenceGap):
            _append(writer, _batch(P, 5))
    warned = [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()]
    assert bool(warned) == (snapshot in ("damaged", "misplaced")), warned
    store = local_storage.open_stream(STREAM)
    renewed = store.read_side(SNAPSHOT_NAME)
    store.close()
    assert renewed is not None and decode_snapshot(renewed).position == writer.checkpoint.length


def test_frames_after_the_snapshot_are_replayed(local_storage: Storage) -> None:
    """A writer that stopped without closing (no final snapshot): the frames after it count."""
    with Writer.open(local_storage, STREAM, snapshot_interval=1) as writer:
        _fill(writer)  # a snapshot after every commit
        store = local_storage.open_stream(STREAM)
        early = store.read_side(SNAPSHOT_NAME)
        store.close()
        assert early is not None
        more = [_append(writer, _batch(producer, 4)) for producer in (P, Q)]
        live = _table(writer)
        early_position = decode_snapshot(early).position
    writable = local_storage.open_stream(STREAM, write=True)
    writable.write_side(SNAPSHOT_NAME, early)  # as if the writer had died before its last ones
    writable.close()
    assert early_position == more[0].frame_position  # both batches after it
    with Writer.open(local_storage, STREAM) as writer:
        assert _table(writer) == live
        assert _append(writer, _batch(Q, 4)) == dataclasses.replace(more[1], duplicate=True)


def test_a_snapshot_is_written_every_interval(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM, snapshot_interval=1000) as writer:
        store = local_storage.open_stream(STREAM)
        positions = []
        for sequence in range(30):
            _append(writer, _batch(P, sequence, count=10))
            saved = store.read_side(SNAPSHOT_NAME)
            positions.append(None if saved is None else decode_snapshot(saved).position)
        store.close()
    taken = sorted({p for p in positions if p is not None})
    assert 2 <= len(taken) < 30  # every thousand bytes or so, not every commit
    assert all(b - a >= 1000 for a, b in itertools.pairwise(taken))


class _SideFails:
    """A writer's store whose side object writes fail (the data and checkpoint work)."""

    def __init__(self, inner: StreamStore) -> None:
        self.inner = inner
        self.side_writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write_side(self, name: str, data: bytes) -> None:
        self.side_writes += 1
        raise StorageError("injected: side object write failed")


def test_a_failing_snapshot_write_never_fails_an_append(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = MemoryStorage()
    store = _SideFails(storage.open_stream(STREAM, write=True, create=True))
    writer = Writer(store, STREAM, snapshot_interval=1)
    with caplog.at_level(logging.WARNING):
        for sequence in range(5):
            _append(writer, _batch(P, sequence))
        writer.close()
    assert store.side_writes >= 2
    assert any("injected" in r.getMessage() for r in caplog.records)
    assert len(_values(storage)) == 15


# Bounds: the same evictions live and rebuilt ------------------------------------------------


def test_eviction_by_count_is_the_same_live_and_rebuilt(local_storage: Storage) -> None:
    producers = [bytes([n]) * 16 for n in range(1, 8)]
    order = [0, 1, 2, 0, 3, 4, 1, 5, 6, 0, 2]
    sequences: dict[bytes, int] = {}
    with Writer.open(local_storage, STREAM, max_producers=3) as writer:
        for index in order:
            producer = producers[index]
            sequences[producer] = sequences.get(producer, -1) + 1
            _append(writer, _batch(producer, sequences[producer]))
            _append(writer, _batch(None, 0, count=1))
        live = _table(writer)
    assert [producer for producer, _ in live] == [producers[i] for i in (6, 0, 2)]
    assert _scan_alone(local_storage, max_producers=3) == live
    with Writer.open(local_storage, STREAM, max_producers=3) as writer:
        assert _table(writer) == live
        # Forgotten: producer 1's last batch again is a new batch, appended again.
        again = _append(writer, _batch(producers[1], sequences[producers[1]]))
        assert not again.duplicate


def test_eviction_by_age_is_the_same_live_and_rebuilt(local_storage: Storage) -> None:
    """Age counts in commit timestamps: a pause between commits ages every producer."""
    max_age = 0.05
    with Writer.open(local_storage, STREAM, producer_max_age=max_age) as writer:
        _append(writer, _batch(P, 0))
        _append(writer, _batch(Q, 0))
        _pause_commit_clock(writer, max_age)
        _append(writer, _batch(None, 0))  # a later commit without a producer expires both
        assert len(writer.producers) == 0
        _append(writer, _batch(R, 0))
        _append(writer, _batch(P, 0))  # forgotten: starts fresh, appended again
        _pause_commit_clock(writer, max_age)
        _append(writer, _batch(Q, 1))  # new again: any sequence
        live = _table(writer)
    assert [producer for producer, _ in live] == [Q]
    assert _scan_alone(local_storage, max_age=max_age) == live
    with Writer.open(local_storage, STREAM, producer_max_age=max_age) as writer:
        assert _table(writer) == live
    assert len(_values(local_storage)) == 18


def _pause_commit_clock(writer: Writer, seconds: float) -> None:
    """Wait until the next commit's timestamp is more than ``seconds`` after the last one's."""
    last = writer.checkpoint.last_timestamp
    deadline = time.monotonic() + 10
    while time.time_ns() // 1_000_000 <= last + seconds * 1000:
        assert time.monotonic() < deadline
        time.sleep(seconds / 5)


# A commit whose outcome was in doubt -------------------------------------------------------


class _LostAnswers:
    """Storage whose commits fail ``before`` reaching it or ``after`` landing, then goes away.

    ``failing`` is "" (working), "before" or "after"; while it fails, reading
    the checkpoint fails too, so the writer cannot learn what happened.
    """

    def __init__(self, inner: StreamStore) -> None:
        self.inner = inner
        self.failing = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        if self.failing == "before":
            raise StorageError("injected: commit never reached storage")
        self.inner.advance_checkpoint(new, expected=expected)
        if self.failing:
            raise StorageError("injected: commit landed, answer lost")

    def read_checkpoint(self) -> Checkpoint:
        if self.failing:
            raise StorageError("injected: storage unreachable")
        return self.inner.read_checkpoint()


@pytest.mark.parametrize("landed", [True, False])
def test_an_in_doubt_commit_is_recorded_only_if_it_landed(landed: bool) -> None:
    storage = MemoryStorage()
    store = _LostAnswers(storage.open_stream(STREAM, write=True, create=True))
    writer = Writer(store, STREAM, commit_timeout=0.2)
    _append(writer, _batch(P, 0))
    store.failing = "after" if landed else "before"
    with pytest.raises(StorageError, match="not confirmed"):
        writer.append_group([_batch(P, 1), _batch(Q, 0)])
    store.failing = ""
    # The producers retry; the writer first learns what became of the commit.
    retried = writer.append_group([_batch(P, 1), _batch(Q, 0)])
    assert [r.duplicate for r in retried] == [landed, landed]  # type: ignore[union-attr]
    assert _values(storage) == _ids(P, 0) + _ids(P, 1) + _ids(Q, 0)
    assert writer.producers.get(P).sequence == 1  # type: ignore[union-attr]
    writer.close()


# Replicas --------------------------------------------------------------------------------


def test_a_replica_keeps_the_same_table(local_storage: Storage) -> None:
    with Writer.open(local_storage, STREAM) as writer:
        results = _fill(writer)
        live = _table(writer)
    frames = Reader.open(local_storage, STREAM).read_frames(0, max_bytes=10**9)
    with Writer.open(local_storage, "replica") as replica:
        replica.append_frames(frames.data)
        assert list(replica.producers) == live
        duplicate = _append(replica, _batch(Q, 3))
        assert duplicate == dataclasses.replace(results[Q, 3], duplicate=True)


# Options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_producers": 0}, "max_producers must be at least 1"),
        ({"producer_max_age": -1.0}, "max age must be positive"),
        ({"snapshot_interval": 0}, "snapshot_interval must be at least 1"),
    ],
)
def test_bad_writer_options_are_refused_before_opening(
    local_storage: Storage, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Writer.open(local_storage, STREAM, **options)
    assert local_storage.list_streams() == []  # not even created


# A writer killed with SIGKILL ----------------------------------------------------------------

CHILD = Path(__file__).with_name("idempotent_writer.py")
CHILD_PRODUCERS = 3


def _lines(pipe: IO[bytes], into: queue.Queue[str | None]) -> None:
    for line in pipe:
        into.put(line.decode().strip())
    into.put(None)


def _run_child_until(root: Path, acks: int, stderr: Path) -> list[list[int]]:
    """Start the child, let it acknowledge ``acks`` batches, SIGKILL it; all the ACKs it sent."""
    command = [sys.executable, str(CHILD), str(root), str(CHILD_PRODUCERS), "3000"]
    path = [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[list[int]] = []
    with (
        stderr.open("wb") as errors,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env) as child,
    ):
        assert child.stdout is not None
        threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
        try:
            deadline = time.monotonic() + 60
            while len(seen) < acks:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                assert line is not None, stderr.read_text()
                if line.startswith("ACK"):
                    seen.append([int(field) for field in line.split()[1:]])
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        # The ACKs it printed before the kill and nobody read yet count too.
        while (line := lines.get(timeout=30)) is not None:
            if line.startswith("ACK"):
                seen.append([int(field) for field in line.split()[1:]])
    assert child.returncode == -signal.SIGKILL, stderr.read_text()
    return seen


def _committed_batches(storage: Storage) -> Iterator[tuple[int, int]]:
    """(producer, sequence) of every committed message's batch, in stream order."""
    for message in Reader.open(storage, idempotent_writer.STREAM).read():
        producer, sequence, _ = message.value.split(b":", 2)
        yield int(producer), int(sequence)


def test_a_killed_writer_leaves_a_table_that_answers_retries(tmp_path: Path) -> None:
    root = tmp_path / "data"
    storage = FileStorage(root)
    chance = random.Random(20261203)
    stream = idempotent_writer.STREAM
    for round_ in range(5):
        snapshot = root / stream / SNAPSHOT_NAME
        if round_ == 2:  # this child finds no snapshot: it replays every frame
            snapshot.unlink()
        if round_ == 4:  # and this one a damaged snapshot
            snapshot.write_bytes(snapshot.read_bytes()[:-1])
        acks = _run_child_until(root, chance.randint(5, 40), tmp_path / f"child{round_}.err")
        with Writer.open(storage, stream) as writer:
            rebuilt = _table(writer)
            assert _scan_alone(storage, stream) == rebuilt
            for index in range(CHILD_PRODUCERS):
                mine = [ack for ack in acks if ack[0] == index]
                if not mine:
                    continue
                _, sequence, position, base_sequence, count = mine[-1]
                last = writer.producers.get(idempotent_writer.producer_id(index))
                assert last is not None and last.sequence in (sequence, sequence + 1)
                batch = idempotent_writer.batch_for(index, sequence)
                if last.sequence == sequence:  # the retry of the last acknowledged batch
                    result = _append(writer, batch)
                    assert result.duplicate
                    assert (result.frame_position, result.base_sequence) == (
                        position,
                        base_sequence,
                    )
                    assert result.message_count == count
                else:  # one more landed after the last ACK read; retrying this one is stale
                    with pytest.raises(StaleSequence):
                        _append(writer, batch)
            assert _table(writer) == rebuilt  # retries changed nothing
    batches = list(dict.fromkeys(_committed_batches(storage)))
    for index in range(CHILD_PRODUCERS):
        sequences = [sequence for producer, sequence in batches if producer == index]
        assert sequences == list(range(len(sequences)))  # each batch once, in order


def test_a_rebuild_replays_only_the_frames_after_the_snapshot(local_storage: Storage) -> None:
    writer = Writer.open(local_storage, STREAM, snapshot_interval=10**9)
    _fill(writer)
    middle = writer.checkpoint
    writer.write_snapshot()
    _append(writer, _batch(P, 4))
    end = writer.checkpoint
    store = local_storage.open_stream(STREAM)  # while the writer is still open: no final save
    rebuilt = rebuild_table(store, end)
    assert (rebuilt.snapshot, rebuilt.scanned, rebuilt.problem) == (
        middle.length,
        end.length - middle.length,
        None,
    )
    assert list(rebuilt.table) == _table(writer)
    assert rebuild_table(_ScanOnly(store), end).scanned == end.length
    store.close()
    writer.close()


# The server's options ----------------------------------------------------------------------


def _serve(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """``messagevault serve`` in process with bad options: it must stop before serving."""
    variables = {
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path / 'data'}",
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        **env,
    }
    result = CliRunner().invoke(
        main, ["serve", "--port", "0", *args], env=variables, prog_name="messagevault"
    )
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    ("arguments", "env"),
    [
        (["--max-producers", "0"], {}),
        (["--max-producers", "many"], {}),
        (["--producer-max-age", "0"], {}),
        (["--producer-max-age", "-5"], {}),
        (["--producer-max-age", "nan"], {}),
        (["--producer-max-age", "inf"], {}),
        ([], {"MESSAGEVAULT_MAX_PRODUCERS": "-1"}),
        ([], {"MESSAGEVAULT_PRODUCER_MAX_AGE": "a week"}),
    ],
)
def test_serve_refuses_bad_producer_bounds_in_one_line(
    tmp_path: Path, arguments: list[str], env: dict[str, str]
) -> None:
    code, err = _serve(tmp_path, *arguments, **env)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "--max-producers" in err or "--producer-max-age" in err
    assert not (tmp_path / "data").exists()  # nothing was set up


def test_serve_passes_the_producer_bounds_to_its_writers(tmp_path: Path) -> None:
    """One producer remembered: a second producer's batch makes the first forget its last."""
    log = tmp_path / "serve.log"
    arguments = ["--max-producers", "1", "--producer-max-age", "3600"]
    with serve_process(tmp_path / "data", "admin", "pw", arguments=arguments, log=log) as url:
        first = _post(url, _batch(P, 0))
        assert _post(url, _batch(P, 0)) == first  # remembered: the original receipts
        _post(url, _batch(Q, 0))
        again = _post(url, _batch(P, 0))  # forgotten: appended again
    assert again["messages"][0]["position"] > first["messages"][0]["position"]
    listening = next(
        json.loads(line) for line in log.read_text().splitlines() if '"listening"' in line
    )
    assert (listening["max_producers"], listening["producer_max_age"]) == (1, 3600)


def _post(url: str, batch: EncodedBatch) -> dict[str, Any]:
    token = base64.b64encode(b"admin:pw").decode()
    request = urllib.request.Request(
        f"{url}/streams/{STREAM}",
        data=batch.frame(),
        headers={
            "Content-Type": "application/x-messagevault-batch",
            "Authorization": f"Basic {token}",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


async def test_the_hub_opens_writers_with_its_producer_bounds() -> None:
    with pytest.raises(ValueError, match="max_producers must be at least 1"):
        StreamHub(MemoryStorage(), max_producers=0)
    hub = StreamHub(MemoryStorage(), max_producers=3, producer_max_age=60)
    try:
        await hub.append(STREAM, _batch(P, 0))
        writer = hub.committers()[STREAM].writer
        assert (writer.producers.max_producers, writer.producers.max_age) == (3, 60)
    finally:
        await hub.close()
