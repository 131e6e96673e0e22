"""Trimming a stream (``Writer.trim``): what readers see after, on every backend, and bad trims."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from messagevault import FileStorage, MemoryStorage, Reader, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.committer import GroupCommitter
from messagevault.errors import CommitterClosed, InvalidPosition, PositionTrimmed
from messagevault.format import MAX_VALUE_SIZE, encode_batch
from messagevault.storage.base import Storage
from messagevault.writer import AppendResult

STREAM = "trimmed-stream"


def _fill(writer: Writer, batches: int = 12) -> list[AppendResult]:
    """Batches of 1-4 messages with values of varied sizes."""
    return [
        writer.append([(b"key", bytes([n]) * (40 + 300 * (n % 5)))] * (1 + n % 4))
        for n in range(batches)
    ]


def _sequences(reader: Reader, position: int = 0) -> list[int]:
    return [message.sequence for message in reader.read(position)]


def test_trim_then_read_follow_seek_below_and_above(storage: Storage) -> None:
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer)
        before = writer.checkpoint
        cut = results[6]  # of three messages
        # The second message of a batch: the whole frame holding it stays.
        trimmed = writer.trim(cut[1].position)
        assert (trimmed.first_position, trimmed.first_sequence) == (cut.frame_position, cut[0][1])
        assert trimmed.trimmed
        after = writer.checkpoint
        assert after == Checkpoint(
            before.commit + 1,
            before.length,
            before.next_sequence,
            before.last_frame_position,
            before.last_timestamp,
            cut.frame_position,
        )
        assert storage.open_stream(STREAM).read_checkpoint() == after

    with Reader.open(storage, STREAM) as reader:
        first = cut[0].sequence
        expected = list(range(first, before.next_sequence))
        assert _sequences(reader) == expected  # position 0: the start of what is left
        assert _sequences(reader, cut.frame_position) == expected
        assert _sequences(reader, cut[2].position)[0] == cut[2].sequence
        for gone in (results[1][1].position, results[5].frame_position, cut.frame_position - 1):
            with pytest.raises(PositionTrimmed, match=f"position {cut.frame_position}") as info:
                reader.read(gone)
            assert info.value.first_position == cut.frame_position
            with pytest.raises(PositionTrimmed):
                reader.follow(gone)
            with pytest.raises(PositionTrimmed):
                reader.read_frames(gone)
        followed = []
        for message in reader.follow(0, poll_interval=0.01):
            followed.append(message.sequence)
            if message.sequence == first + 1:
                break
        assert followed == [first, first + 1]
        assert reader.read_frames(0).data.startswith(
            storage.open_stream(STREAM).read(cut.frame_position, 16)
        )
        with pytest.raises(PositionTrimmed, match=f"sequence {first}"):
            reader.seek(sequence=first - 1)
        with pytest.raises(PositionTrimmed):
            reader.position_of_sequence(0)
        assert reader.position_of_sequence(first + 1) == cut[1].position
        assert reader.seek(sequence=first) == cut.frame_position
        assert reader.seek(time=0) == cut.frame_position
        assert reader.verify().messages == len(expected)

    # Never backwards; and a new writer carries the first position on.
    with Writer.open(storage, STREAM) as writer:
        again = writer.trim(results[2][0].position)
        assert not again.trimmed
        assert (again.first_position, again.first_sequence) == (cut.frame_position, first)
        assert writer.trim(cut[1].position).trimmed is False
        more = writer.append([(b"after", b"the trim")])
        assert writer.checkpoint.first_position == cut.frame_position
    with Reader.open(storage, STREAM) as reader:
        assert _sequences(reader)[-1] == more[0].sequence
        assert _sequences(reader)[0] == first


def test_trim_below_a_sequence_or_a_time_keeps_that_message() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer)
        target = results[3][2]  # the third message of a batch of four
        result = writer.trim_below(sequence=target.sequence)
        assert (result.first_position, result.first_sequence) == (
            results[3].frame_position,
            results[3][0].sequence,
        )
        assert not writer.trim_below(sequence=0).trimmed  # already gone: nothing changes
        # Every message shares its batch's timestamp: a time just after
        # batch 3's trims it and keeps batch 4 on.
        later = results[4]
        if later.timestamp > results[3].timestamp:
            at = datetime.fromtimestamp(later.timestamp / 1000, UTC)
            by_time = writer.trim_below(time=at)
            assert by_time.first_position <= later.frame_position
            assert by_time.first_sequence <= later[0].sequence
        end = writer.trim_below(time=time.time() + 3600)  # after the last message: everything
        assert (end.first_position, end.first_sequence) == (
            writer.checkpoint.length,
            writer.checkpoint.next_sequence,
        )
        with pytest.raises(InvalidPosition):
            writer.trim_below(sequence=writer.checkpoint.next_sequence + 1)
        with pytest.raises(ValueError, match="exactly one"):
            writer.trim_below(sequence=1, position=0)
        with pytest.raises(ValueError, match="time zone"):
            writer.trim_below(time=datetime(2026, 1, 1))


def test_trim_everything_then_append_and_reopen(storage: Storage) -> None:
    with Writer.open(storage, STREAM) as writer:
        _fill(writer, 4)
        length, count = writer.checkpoint.length, writer.checkpoint.next_sequence
        result = writer.trim(length)
        assert (result.first_position, result.first_sequence) == (length, count)
    with Reader.open(storage, STREAM) as reader:
        assert _sequences(reader) == []
        with pytest.raises(PositionTrimmed, match=f"sequence {count}"):
            reader.position_of_sequence(count - 1)
        assert reader.seek(sequence=count) == length
        assert reader.verify().messages == 0
    with Writer.open(storage, STREAM) as writer:  # its last frame is gone: opens all the same
        appended = writer.append([(b"k", b"new")])
        assert appended[0].sequence == count
    with Reader.open(storage, STREAM) as reader:
        assert [m.value for m in reader.read()] == [b"new"]


def _bad_trims(writer: Writer, results: list[AppendResult]) -> None:
    """Each must raise and change nothing."""
    start = writer.checkpoint
    length = start.length
    for bad in (-1, length + 1, results[3][0].position + 1, 1.5, "100", True, None):
        with pytest.raises(InvalidPosition):
            writer.trim(bad)  # type: ignore[arg-type]
        assert writer.checkpoint == start
    with pytest.raises(InvalidPosition):
        writer.trim_below(sequence=start.next_sequence + 1)
    with pytest.raises(InvalidPosition):
        writer.trim_below(sequence=-1)
    assert writer.checkpoint == start


def test_bad_trims_change_nothing(storage: Storage) -> None:
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer, 6)
        _bad_trims(writer, results)
        writer.trim(results[2].frame_position)
        _bad_trims(writer, results)
        assert writer.checkpoint.first_position == results[2].frame_position
    with Reader.open(storage, STREAM) as reader:
        assert _sequences(reader)[0] == results[2][0].sequence


def test_a_value_in_pieces_is_trimmed_whole_or_not_at_all() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        before = writer.append([(b"small", b"x"), (b"small", b"x2")])
        large = writer.append([(b"large", b"v" * (MAX_VALUE_SIZE + 10))])
        after = writer.append([(b"small", b"y")])
        piece = Reader.open(storage, STREAM).header_at(large.frame_position).end
        with pytest.raises(InvalidPosition, match="inside"):
            writer.trim(piece)  # a CONTINUATION frame: no message starts there
        assert writer.checkpoint.first_position == 0
        result = writer.trim(large[0].position)
        assert (result.first_position, result.first_sequence) == (large.frame_position, 2)
    with Reader.open(storage, STREAM) as reader:
        values = [len(m.value) for m in reader.read()]
        assert values == [MAX_VALUE_SIZE + 10, 1]
        with pytest.raises(PositionTrimmed):
            reader.read(before[1].position)
        assert [m.value for m in reader.read(after[0].position)] == [b"y"]


def test_storage_below_the_first_position_is_released_on_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, fsync="never")
    data = tmp_path / STREAM / "data"
    with Writer.open(storage, STREAM) as writer:
        results = [writer.append([(b"k", os.urandom(256 * 1024))]) for _ in range(16)]
        os.sync()
        held = data.stat().st_blocks
        result = writer.trim(results[12].frame_position)
        if result.released_bytes == 0:
            pytest.skip("this filesystem cannot punch holes")
        assert result.released_bytes >= 11 * 256 * 1024
        assert data.stat().st_blocks * 512 <= held * 512 - 11 * 256 * 1024
        assert data.stat().st_size >= writer.checkpoint.length  # positions never move
    with Reader.open(storage, STREAM) as reader:
        assert [m.sequence for m in reader.read()] == [12, 13, 14, 15]


def test_storage_below_the_first_position_is_released_on_azure(azure_storage: Storage) -> None:
    from messagevault.storage.azure import CONTAINER_PREFIX, DATA_BLOB, AzureStorage

    assert isinstance(azure_storage, AzureStorage)
    with Writer.open(azure_storage, STREAM) as writer:
        results = [writer.append([(b"k", os.urandom(64 * 1024))]) for _ in range(8)]
        blob = azure_storage.service.get_container_client(
            CONTAINER_PREFIX + STREAM
        ).get_blob_client(DATA_BLOB)
        cut = results[5].frame_position
        result = writer.trim(cut)
        assert result.released_bytes >= cut - 512
        stored = [
            (int(r.start or 0), int(r.end or 0)) for r in blob.list_page_ranges() if not r.cleared
        ]
        assert stored and min(start for start, _ in stored) >= cut // 512 * 512
    with Reader.open(azure_storage, STREAM) as reader:
        assert [m.sequence for m in reader.read()] == [5, 6, 7]


def test_trim_under_concurrent_appends_and_readers() -> None:
    storage = MemoryStorage()
    writer = Writer.open(storage, STREAM)
    committer = GroupCommitter(writer)
    stop = threading.Event()
    acknowledged: list[AppendResult] = []
    problems: list[BaseException] = []
    trimmed_readers = 0

    def append() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            acknowledged.append(committer.append([(b"k", b"%d" % n)] * 3))
            n += 1

    def follow() -> None:
        nonlocal trimmed_readers
        position = 0
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            reader = Reader.open(storage, STREAM, chunk_size=256)
            try:
                previous = None
                for message in reader.follow(position, poll_interval=0.001, stop=stop):
                    if previous is not None and message.sequence != previous + 1:
                        problems.append(AssertionError(f"{previous} then {message.sequence}"))
                    previous = message.sequence
                    position = message.next_position
                    time.sleep(0.0001)  # slow: trims overtake it
            except PositionTrimmed as exc:
                trimmed_readers += 1
                assert exc.first_position is not None
                position = exc.first_position
            except BaseException as exc:
                problems.append(exc)
                return
            finally:
                reader.close()

    threads = [threading.Thread(target=append) for _ in range(2)]
    threads += [threading.Thread(target=follow) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(40):
            length = committer.writer.checkpoint.length
            committer.run_exclusive(lambda w, at=length: w.trim_below(position=at))
            time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        committer.close()
    assert not problems, problems[:3]
    assert trimmed_readers > 0
    final = storage.open_stream(STREAM).read_checkpoint()
    kept = [r for r in acknowledged if r.frame_position >= final.first_position]
    with Reader.open(storage, STREAM) as reader:
        read = {(m.position, m.sequence) for m in reader.read()}
    assert read == {(receipt.position, receipt.sequence) for r in kept for receipt in r}
    assert final.next_sequence == 3 * len(acknowledged)


def test_run_exclusive_waits_for_the_commit_in_flight_and_refuses_once_closed() -> None:
    storage = MemoryStorage()
    committer = GroupCommitter(Writer.open(storage, STREAM))
    committer.append([(b"k", b"v")])
    seen = []
    assert committer.run_exclusive(lambda writer: seen.append(writer.checkpoint.length)) is None
    assert seen == [committer.writer.checkpoint.length]
    future = committer.submit(encode_batch([(b"k", b"w")]))
    committer.run_exclusive(lambda writer: writer.trim(writer.checkpoint.length))
    future.result(10)
    committer.close()
    with pytest.raises(CommitterClosed):
        committer.run_exclusive(lambda writer: None)


def test_a_reader_overtaken_by_a_trim_gets_position_trimmed_not_corrupt_data() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        results = [writer.append([(b"k", b"v" * 1000)]) for _ in range(50)]
        reader = Reader.open(storage, STREAM, chunk_size=4096)
        messages = reader.read(results[1].frame_position)
        assert next(messages).sequence == 1  # the scan has begun
        writer.trim(results[40].frame_position)
        with pytest.raises(PositionTrimmed) as info:
            for _ in messages:
                pass
        assert info.value.first_position == results[40].frame_position
        # A reader that knew the length but not the trim finds out on reading.
        with pytest.raises(PositionTrimmed):
            reader.read(results[2].frame_position, committed=writer.checkpoint.length)
        start = list(reader.read(0, committed=writer.checkpoint.length))
        assert start[0].sequence == 40


def test_a_writer_finishes_a_release_that_a_crash_left_undone() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer, 6)
    cut = results[4].frame_position
    # The commit of a trim without its release: what a crash between them leaves.
    raw = storage.open_stream(STREAM, write=True)
    checkpoint = raw.read_checkpoint()
    raw.advance_checkpoint(
        dataclasses.replace(checkpoint, commit=checkpoint.commit + 1, first_position=cut),
        expected=checkpoint,
    )
    raw.close()
    store = storage.open_stream(STREAM)
    assert store.read(0, cut) != bytes(cut)  # not released yet, but unreadable
    with Reader.open(storage, STREAM) as reader:
        with pytest.raises(PositionTrimmed):
            reader.read(results[1].frame_position)
        assert _sequences(reader)[0] == results[4][0].sequence
    with Writer.open(storage, STREAM):
        assert store.read(0, cut) == bytes(cut)
    with Reader.open(storage, STREAM) as reader:
        assert _sequences(reader)[0] == results[4][0].sequence


def test_trim_time_is_as_a_seek_takes_it() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        _fill(writer, 3)
        last = writer.checkpoint.last_timestamp
        keep = writer.trim_below(time=datetime.fromtimestamp(last / 1000, UTC) - timedelta(days=1))
        assert not keep.trimmed  # older than every message: nothing goes


def test_consumers_on_storage_positioned_before_the_trim_get_position_trimmed() -> None:
    from messagevault.consumer import AsyncConsumer, Consumer
    from messagevault.positions import MemoryPositionStore

    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer, 8)
        writer.trim(results[5].frame_position)
    first = results[5].frame_position
    stale = results[2].frame_position
    with pytest.raises(PositionTrimmed) as info:
        Consumer(storage, STREAM, "billing", MemoryPositionStore(), start=stale).run(
            lambda message: None, follow=False
        )
    assert info.value.first_position == first
    assert "billing" in str(info.value)

    async def run_async() -> None:
        consumer = AsyncConsumer(storage, STREAM, "audit", MemoryPositionStore(), start=stale)
        await consumer.run(lambda message: None, follow=False)

    import asyncio

    with pytest.raises(PositionTrimmed) as info:
        asyncio.run(run_async())
    assert info.value.first_position == first
    # From the beginning: the first readable message, no error.
    seen: list[int] = []
    Consumer(storage, STREAM, "fresh", MemoryPositionStore()).run(
        lambda message: seen.append(message.sequence), follow=False
    )
    assert seen[0] == results[5][0].sequence


def test_a_follower_that_falls_behind_a_trim_gets_position_trimmed() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        results = _fill(writer, 6)
        reader = Reader.open(storage, STREAM)
        follower = reader.follow(results[1].frame_position, poll_interval=0.001)
        for message in follower:  # read to the tail
            if message.sequence == results[-1][-1].sequence:
                break
        more = writer.append([(b"k", b"new")])
        newer = writer.append([(b"k", b"newer")])
        writer.trim(newer.frame_position)  # past the follower, which sits at ``more``
        with pytest.raises(PositionTrimmed) as info:
            next(follower)
        assert info.value.first_position == newer.frame_position
        assert more.frame_position < newer.frame_position
        reader.close()


def test_direct_readers_of_azure_honour_the_first_position(azure_storage: Storage) -> None:
    with Writer.open(azure_storage, STREAM) as writer:
        results = _fill(writer, 6)
        writer.trim(results[3].frame_position)
        access = writer.read_access()  # a read-only SAS URL
    with Reader.from_read_access(access) as reader:
        assert _sequences(reader)[0] == results[3][0].sequence
        with pytest.raises(PositionTrimmed) as info:
            reader.read(results[1].frame_position)
        assert info.value.first_position == results[3].frame_position
        assert reader.seek(sequence=results[3][0].sequence) == results[3].frame_position
