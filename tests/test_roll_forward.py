"""Rolling forward: a writer adopts the whole valid batches a stale checkpoint leaves out.

With ``fsync=always`` file storage flushes each commit's data but its
checkpoint lazily, so after a power cut the durable checkpoint may lag
durable frames (docs/FORMAT.md, "Recovery"). These tests put an older
checkpoint back (``MemoryStorage.lose_checkpoint``, or the file's older
bytes) and check what ``Writer.open`` adopts, and what stops it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from messagevault import FileStorage, MemoryStorage, Reader, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.format import (
    CHUNK_SIZE,
    FOLLOWS,
    FRAME_HEADER_V2_SIZE,
    MORE,
    EncodedBatch,
    encode_batch,
    parse_batch,
    read_header,
)
from messagevault.recovery import roll_forward
from messagevault.storage import open_storage
from messagevault.storage.file import CHECKPOINT_FILE, DATA_FILE

STREAM = "orders"
DATA = Path(__file__).resolve().parent / "data"
PRODUCER = bytes(range(1, 17))


def _rows(number: int, count: int = 3) -> list[tuple[bytes, bytes]]:
    return [(b"k%d" % number, b"value %d.%d" % (number, i)) for i in range(count)]


def _values(storage: MemoryStorage | FileStorage) -> list[bytes]:
    with Reader.open(storage, STREAM) as reader:
        return [message.value for message in reader.read()]


def _stale_after(storage: MemoryStorage, kept: int, appended: int) -> tuple[Checkpoint, Checkpoint]:
    """Append ``kept + appended`` batches, then put the checkpoint after ``kept`` back."""
    with Writer.open(storage, STREAM) as writer:
        for number in range(kept):
            writer.append(_rows(number))
        stale = writer.checkpoint
        for number in range(kept, kept + appended):
            writer.append(_rows(number))
        latest = writer.checkpoint
    storage.lose_checkpoint(STREAM, stale)
    return stale, latest


def _overwrite(storage: MemoryStorage, offset: int, data: bytes) -> None:
    store = storage.open_stream(STREAM, write=True)
    try:
        for start in range(0, len(data), CHUNK_SIZE):  # in writes storage takes
            store.write(offset + start, data[start : start + CHUNK_SIZE])
    finally:
        store.close()


def _expected_values(batches: int) -> list[bytes]:
    return [value for number in range(batches) for _, value in _rows(number)]


@pytest.mark.parametrize("page_size", [1, 512])
def test_whole_batches_after_a_stale_checkpoint_are_adopted(page_size: int) -> None:
    storage = MemoryStorage(page_size=page_size)
    stale, latest = _stale_after(storage, kept=2, appended=3)
    # Readers never read past the checkpoint they see, whatever follows it.
    assert _values(storage) == _expected_values(2)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == dataclasses.replace(latest, commit=stale.commit + 1)
        assert storage.open_stream(STREAM).read_checkpoint() == writer.checkpoint
        writer.append(_rows(5))  # the stream goes on right after them
    assert _values(storage) == _expected_values(6)
    with Reader.open(storage, STREAM) as reader:
        assert reader.verify().frames == 6


def test_nothing_after_the_checkpoint_changes_nothing() -> None:
    storage = MemoryStorage()
    stale, _ = _stale_after(storage, kept=2, appended=0)
    writes = storage.storage_writes(STREAM)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == stale
    assert storage.storage_writes(STREAM) == writes


def test_a_torn_frame_stops_it_at_the_batch_before() -> None:
    storage = MemoryStorage()
    stale, _ = _stale_after(storage, kept=1, appended=3)
    with Writer.open(storage, STREAM) as writer:
        pass
    # Tear the third batch (the second after the stale checkpoint): one flipped body byte.
    storage.lose_checkpoint(STREAM, stale)
    frames = _frame_positions(storage, stale.length)
    third = frames[1]
    store = storage.open_stream(STREAM)
    byte = store.read(third + 70, 1)
    store.close()
    _overwrite(storage, third + 70, bytes([byte[0] ^ 0x40]))
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint.length == third
        writer.append(_rows(9))
    assert _values(storage) == _expected_values(2) + [v for _, v in _rows(9)]


def _frame_positions(storage: MemoryStorage, start: int) -> list[int]:
    """Where the frames after ``start`` begin, as far as valid headers go."""
    store = storage.open_stream(STREAM)
    try:
        positions = []
        position = start
        while True:
            try:
                header = read_header(store.read(position, FRAME_HEADER_V2_SIZE), 0, position)
            except Exception:
                return positions
            positions.append(position)
            position = header.end
    finally:
        store.close()


def _placed_after(storage: MemoryStorage, batch: EncodedBatch, **change: int) -> bytes:
    """``batch`` framed where the stream ends, as the writer would, or with ``change``d fields."""
    checkpoint = storage.open_stream(STREAM).read_checkpoint()
    fields = {
        "base_position": checkpoint.length,
        "base_sequence": checkpoint.next_sequence,
        "timestamp": checkpoint.last_timestamp,
    }
    fields.update(change)
    return batch.frame(**fields, batch_ends=True)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, "valid: adopted"),
        ({"base_sequence": 1}, "sequence does not follow on"),
        ({"base_position": 1}, "claims another position"),
        ({"timestamp": -1}, "timestamp goes back"),
    ],
)
def test_a_frame_that_breaks_the_chain_stops_it(change: dict[str, int], why: str) -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
    start = storage.open_stream(STREAM).read_checkpoint()
    shifted = {
        "base_sequence": start.next_sequence + change.get("base_sequence", 0),
        "base_position": start.length + change.get("base_position", 0),
        "timestamp": start.last_timestamp + change.get("timestamp", 0),
    }
    frame = _placed_after(storage, encode_batch(_rows(1)), **shifted)
    _overwrite(storage, start.length, frame)
    with Writer.open(storage, STREAM) as writer:
        adopted = writer.checkpoint.length != start.length
    assert adopted == (not change), why


@pytest.mark.parametrize("content", [b"\x00" * 300, os.urandom(300), b"MVLB" + os.urandom(296)])
def test_zeros_and_garbage_after_the_checkpoint_are_left_alone(content: bytes) -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    _overwrite(storage, start.length, content)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start
        writer.append(_rows(1))  # overwrites them
    assert _values(storage) == _expected_values(2)


def _two_frame_batch() -> EncodedBatch:
    """A batch of two frames of small messages (as a batch over 16 MiB would be)."""
    return EncodedBatch(encode_batch(_rows(1)).frames + encode_batch(_rows(2)).frames)


def test_a_batch_of_several_frames_is_adopted_whole_or_not_at_all() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    frames = _placed_after(storage, _two_frame_batch())
    first = read_header(frames, 0, start.length)
    assert first.more and first.header_size == FRAME_HEADER_V2_SIZE
    assert not read_header(frames, first.frame_size, start.length + first.frame_size).more
    # Only its first frame made it: the MORE flag says the batch goes on.
    _overwrite(storage, start.length, frames[: first.frame_size])
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start
    # All of it: adopted, both frames.
    _overwrite(storage, start.length, frames)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint.length == start.length + len(frames)
        assert writer.checkpoint.last_frame_position == start.length + first.frame_size
    assert _values(storage) == _expected_values(3)


def test_a_value_in_pieces_is_adopted_whole_or_not_at_all() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    value = bytes(range(256)) * (2 * CHUNK_SIZE // 256 + 1)  # a HEAD and two pieces
    frames = _placed_after(storage, encode_batch([(b"big", value)]))
    head = read_header(frames, 0, start.length)
    piece = read_header(frames, head.frame_size, start.length + head.frame_size)
    assert head.more and piece.more  # the last piece alone ends the batch
    cut = head.frame_size + piece.frame_size
    _overwrite(storage, start.length, frames[:cut])
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start
    _overwrite(storage, start.length + cut, frames[cut:])
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint.length == start.length + len(frames)
    assert _values(storage)[-1] == value


def test_frames_from_before_the_more_flag_roll_forward_batch_by_batch() -> None:
    """The golden v2 frames carry no MORE: each is its own batch, a value in pieces is whole."""
    storage = MemoryStorage()
    with Writer.open(storage, STREAM):
        pass
    stream = (DATA / "golden-v2.mvlog").read_bytes()
    _overwrite(storage, 0, stream)
    with Writer.open(storage, STREAM) as writer:
        checkpoint = writer.checkpoint
    golden = Checkpoint.decode((DATA / "golden-v2.checkpoint").read_bytes())
    assert checkpoint == dataclasses.replace(golden, commit=1)
    # Its value in pieces, the HEAD alone, is not a whole batch.
    generator_frames = _golden_pieces()
    head = read_header(generator_frames, 0, len(stream))
    assert not head.more  # written before the flag: the pieces tell where it ends
    _overwrite(storage, len(stream), generator_frames[: head.frame_size])
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == checkpoint
    _overwrite(storage, len(stream), generator_frames)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint.length == len(stream) + len(generator_frames)
    with Reader.open(storage, STREAM) as reader:
        assert len(list(reader.read())) == 27


def _golden_pieces() -> bytes:
    from tests.test_golden_v2 import _pieces

    return _pieces()


def test_the_golden_v1_stream_rolls_forward_whole() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM):
        pass
    _overwrite(storage, 0, (DATA / "golden-v1.mvlog").read_bytes())
    golden = Checkpoint.decode((DATA / "golden-v1.checkpoint").read_bytes())
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == dataclasses.replace(golden, commit=1)


def test_the_producer_table_knows_the_batches_rolled_forward() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        stale = writer.checkpoint
        original = writer.append_batches([encode_batch(_rows(1)).with_producer(PRODUCER, 0)])[0]
    storage.lose_checkpoint(STREAM, stale)
    with Writer.open(storage, STREAM) as writer:
        retry = writer.append_batches([encode_batch(_rows(1)).with_producer(PRODUCER, 0)])[0]
    assert retry.duplicate
    assert list(retry) == list(original)
    assert _values(storage) == _expected_values(2)


def test_file_storage_rolls_forward_after_losing_its_checkpoint(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
    stale = (tmp_path / STREAM / CHECKPOINT_FILE).read_bytes()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(1))
        writer.append(_rows(2))
        latest = writer.checkpoint
    (tmp_path / STREAM / CHECKPOINT_FILE).write_bytes(stale)  # as a power cut may leave it
    assert _values(storage) == _expected_values(1)
    with Writer.open(storage, STREAM) as writer:
        assert (writer.checkpoint.length, writer.checkpoint.next_sequence) == (
            latest.length,
            latest.next_sequence,
        )
        writer.append(_rows(3))
    assert _values(storage) == _expected_values(4)
    assert (tmp_path / STREAM / DATA_FILE).stat().st_size == writer.checkpoint.length


def test_roll_forward_reads_but_never_writes() -> None:
    storage = MemoryStorage()
    stale, latest = _stale_after(storage, kept=1, appended=2)
    writes = storage.storage_writes(STREAM)
    store = storage.open_stream(STREAM)
    try:
        assert roll_forward(store, stale) == dataclasses.replace(latest, commit=stale.commit + 1)
        assert roll_forward(store, latest) == latest
    finally:
        store.close()
    assert storage.storage_writes(STREAM) == writes


# The file backend's flushes ----------------------------------------------------


def _counting_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the descriptors ``os.fdatasync`` is called on (data and checkpoint).

    Not the index's: it is flushed when the writer closes, off every commit's path.
    """
    calls: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("/index"):
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    return calls


def test_a_commit_flushes_the_data_and_leaves_the_checkpoint_for_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path, checkpoint_flush_interval=3600)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))  # a handle's first checkpoint is flushed at once
        calls = _counting_flushes(monkeypatch)
        for number in range(1, 4):
            writer.append(_rows(number))
        assert len(calls) == 3  # the data of each commit, nothing else
        writer.close()
        assert len(calls) == 4  # closing flushes the checkpoint


def test_with_no_flush_interval_every_checkpoint_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(f"file:{tmp_path}", checkpoint_flush_interval=0)  # as serve opens it
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        calls = _counting_flushes(monkeypatch)
        writer.append(_rows(1))
        assert len(calls) == 2


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True, None])
def test_bad_checkpoint_flush_intervals_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="checkpoint_flush_interval must be a number"):
        FileStorage(tmp_path, checkpoint_flush_interval=bad)  # type: ignore[arg-type]
    assert not tmp_path.joinpath(STREAM).exists()


def test_batch_ends_are_flagged_in_storage_but_not_on_the_wire() -> None:
    batch = _two_frame_batch()
    stored = batch.frame(0, 0, 0, batch_ends=True)
    wire = batch.frame()
    assert len(stored) == len(wire)
    second = read_header(wire, 0, None).frame_size
    assert (stored[5], stored[second + 5]) == (wire[5] | MORE, wire[second + 5] | FOLLOWS)
    assert not wire[5] & (MORE | FOLLOWS) and not wire[second + 5] & (MORE | FOLLOWS)
    # The server assigns them, whatever a producer sent.
    assert parse_batch(stored).frame(0, 0, 0, batch_ends=True) == stored
    assert parse_batch(stored).frame() == wire


def test_the_tail_of_a_torn_batch_is_never_adopted() -> None:
    """A batch whose first frame a cut lost leaves its last one behind, fitting the chain.

    Here the leftover frame claims the very position, sequence and timestamp
    that follow the checkpoint (as it can when the next writer's batch ends
    where it starts and the clock stepped back): FOLLOWS says it is no batch's
    first frame.
    """
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0, count=40))  # longer than the batch's first frame
        start = writer.checkpoint
    batch = _two_frame_batch()
    first_size = batch.frame_size - batch.last_frame_size
    frames = batch.frame(
        start.length - first_size,
        start.next_sequence - batch.frames[0].count,
        start.last_timestamp,
        batch_ends=True,
    )
    _overwrite(storage, start.length, frames[first_size:])
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start


def test_a_file_writer_cuts_off_the_leftovers_past_its_first_commit(tmp_path: Path) -> None:
    """A whole batch among leftovers could otherwise be adopted once a new batch ends before it."""
    storage = FileStorage(tmp_path)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    leftover = encode_batch(_rows(7)).frame(start.length + 500, 0, 0)
    with (tmp_path / STREAM / DATA_FILE).open("r+b") as file:
        file.seek(start.length)
        file.write(bytes(500) + leftover)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start
        end = writer.append(_rows(1)).end
    assert (tmp_path / STREAM / DATA_FILE).stat().st_size == end
