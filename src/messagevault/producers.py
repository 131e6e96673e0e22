"""Idempotent producers: per stream, the last batch each producer committed.

A producer names itself with a random 16-byte id and numbers its batches 0,
1, 2, ... (its *batch sequence*); both travel in the batch's frames. The
writer keeps a ``ProducerTable`` per stream: producer id -> ``ProducerRecord``
of its last committed batch. A batch with a producer id is then judged by
``check_sequence`` against that record:

* unknown producer: accepted, whatever its sequence (a new id starts fresh);
* the last sequence again: a **duplicate** (a retry whose answer was lost):
  nothing is appended and the caller gets the original batch's receipts;
* the last sequence + 1: accepted;
* further ahead: ``SequenceGap``; below the last: ``StaleSequence``.

The table is bounded, least recently committed first out: at most
``max_producers`` entries, and none whose last commit is more than
``max_age`` older than the newest commit recorded. Age is measured in the
stream's own commit timestamps, never the wall clock, so replaying the
stream's batches in order (``record`` for a batch with a producer,
``expire`` for one without) rebuilds exactly the table the live writer had.
Every operation is O(1) (amortised, for the evictions).

A *snapshot* saves the table as of a stream position (the ``producers``
side object, docs/FORMAT.md "Producer table snapshot"), so that a writer
opening the stream replays only the frames after that position:

    offset   size     field
    0        4        magic, b"MVPS"
    4        1        version, 1
    5        3        reserved, zero
    8        8        position: the table reflects every frame before it
    16       8        sequence: the stream's next message sequence there
    24       4        count: entries that follow
    28       4        reserved, zero
    32       48 * n   entries, least recently committed first:
                        producer id 16 | batch sequence u64 | start u64 |
                        end u64 | commit timestamp u64
    32 + 48n 4        CRC-32 of bytes [0, 32 + 48n)

All integers little-endian; the CRC is ``zlib.crc32``.

``rebuild_table`` is how a writer opening a stream gets its table: the
snapshot, if there is a sound one, then ``replay`` of every frame after it,
read header by header (a body is skipped by its ``frame_size``, not read).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from messagevault.checkpoint import Checkpoint
from messagevault.errors import CorruptData, SequenceGap, StaleSequence, UnsupportedVersion
from messagevault.format import (
    MAX_HEADER_SIZE,
    NO_PRODUCER,
    PRODUCER_ID_SIZE,
    FrameHeader,
    read_header,
)
from messagevault.storage.base import StreamStore

DEFAULT_MAX_PRODUCERS: Final = 100_000
DEFAULT_PRODUCER_MAX_AGE: Final = 7 * 24 * 3600.0  # seconds
# A writer snapshots its table after this many bytes of appended frames (and
# when it closes), so that a writer taking over replays at most about this.
DEFAULT_SNAPSHOT_BYTES: Final = 64 * 1024 * 1024
# Frames are scanned in reads of this size, bodies and all, while they are
# small; a frame at least SCAN_SKIP_FROM big is skipped with its frame_size.
SCAN_READ_SIZE: Final = 4 * 1024 * 1024
SCAN_SKIP_FROM: Final = 256 * 1024

SNAPSHOT_NAME: Final = "producers"  # the side object (``StreamStore.write_side``)
SNAPSHOT_MAGIC: Final = b"MVPS"
SNAPSHOT_VERSION: Final = 1
_SNAPSHOT_HEADER: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVPS"
    "B"  # version, 1
    "3x"  # reserved, zero
    "Q"  # position the table is as of
    "Q"  # the stream's next sequence at that position
    "I"  # entry count
    "4x"  # reserved, zero
)
_SNAPSHOT_ENTRY: Final = struct.Struct(
    "<"
    "16s"  # producer id
    "Q"  # batch sequence of its last committed batch
    "Q"  # start: position of that batch's first frame
    "Q"  # end: position just past its last frame
    "Q"  # commit timestamp, milliseconds since the Unix epoch
)
_SNAPSHOT_CRC: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class ProducerRecord:
    """A producer's last committed batch: its sequence, where it is, when it was committed."""

    sequence: int  # the producer's batch sequence
    start: int  # stream position of the batch's first frame
    end: int  # position just past its last frame
    timestamp: int  # commit timestamp, milliseconds since the Unix epoch


@dataclass(frozen=True, slots=True)
class ProducerSnapshot:
    """A decoded snapshot: the table as of stream ``position``, where ``sequence`` was next."""

    position: int
    sequence: int
    entries: tuple[tuple[bytes, ProducerRecord], ...]  # least recently committed first


def check_sequence(producer: bytes, last: int | None, sequence: int) -> bool:
    """Judge a batch ``sequence`` of ``producer`` whose last committed one was ``last``.

    Returns True for a duplicate of that last batch, False for a batch to
    append (``last`` is None for a producer the table does not know).
    Raises ``SequenceGap`` or ``StaleSequence`` for one that must be refused.
    """
    if last is None or sequence == last + 1:
        return False
    if sequence == last:
        return True
    who = f"producer {producer.hex()}"
    if sequence > last:
        raise SequenceGap(
            f"{who}: expected batch sequence {last + 1}, got {sequence} "
            f"(batches {last + 1}..{sequence - 1} were never committed)"
        )
    raise StaleSequence(
        f"{who}: batch sequence {sequence} is older than its last committed batch ({last}); "
        "its receipts are no longer remembered"
    )


class ProducerTable:
    """Producer id -> ``ProducerRecord``, least recently committed first, bounded.

    >>> table = ProducerTable()
    >>> producer = bytes.fromhex("0f" * 16)
    >>> table.check(producer, 7) is None  # unknown: starts fresh
    True
    >>> table.record(producer, ProducerRecord(sequence=7, start=0, end=100, timestamp=1))
    >>> table.check(producer, 7)  # the same batch again: a duplicate of this one
    ProducerRecord(sequence=7, start=0, end=100, timestamp=1)
    """

    def __init__(
        self,
        *,
        max_producers: int = DEFAULT_MAX_PRODUCERS,
        max_age: float = DEFAULT_PRODUCER_MAX_AGE,
    ) -> None:
        if isinstance(max_producers, bool) or not isinstance(max_producers, int):
            raise TypeError(f"max_producers must be an int, not {type(max_producers).__name__}")
        if max_producers < 1:
            raise ValueError(f"max_producers must be at least 1, not {max_producers}")
        if not (math.isfinite(max_age) and max_age > 0):
            raise ValueError(f"producer max age must be positive and finite, not {max_age} seconds")
        self.max_producers = max_producers
        self.max_age = max_age
        self._max_age_ms = max(1, round(max_age * 1000))
        self._records: OrderedDict[bytes, ProducerRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[tuple[bytes, ProducerRecord]]:
        """(producer id, record) pairs, least recently committed first."""
        return iter(self._records.items())

    def get(self, producer: bytes) -> ProducerRecord | None:
        return self._records.get(producer)

    def check(self, producer: bytes, sequence: int) -> ProducerRecord | None:
        """The record a batch ``sequence`` duplicates, or None to append it.

        Raises ``SequenceGap`` or ``StaleSequence`` (see ``check_sequence``).
        Changes nothing: only committed batches are recorded.
        """
        found = self._records.get(producer)
        last = None if found is None else found.sequence
        return found if check_sequence(producer, last, sequence) else None

    def record(self, producer: bytes, record: ProducerRecord) -> None:
        """Remember a committed batch of ``producer``, then evict by count and by age.

        Call it for every committed batch with a producer, in stream order
        (and ``expire`` for those without), live and when rebuilding alike.
        """
        if len(producer) != PRODUCER_ID_SIZE or producer == NO_PRODUCER:
            raise ValueError(f"not a producer id: {producer.hex()}")
        records = self._records
        records[producer] = record
        records.move_to_end(producer)
        while len(records) > self.max_producers:
            records.popitem(last=False)
        self.expire(record.timestamp)

    def expire(self, timestamp: int) -> None:
        """Forget producers whose last commit is more than ``max_age`` before ``timestamp``."""
        records = self._records
        oldest = timestamp - self._max_age_ms
        # Commit timestamps never go backwards, so the least recently
        # committed entry is also the oldest: stop at the first young one.
        while records and next(iter(records.values())).timestamp < oldest:
            records.popitem(last=False)

    def snapshot(self, position: int, sequence: int) -> bytes:
        """The table as a snapshot (module docstring) of the stream up to ``position``."""
        entries = b"".join(
            _SNAPSHOT_ENTRY.pack(
                producer, record.sequence, record.start, record.end, record.timestamp
            )
            for producer, record in self._records.items()
        )
        body = (
            _SNAPSHOT_HEADER.pack(
                SNAPSHOT_MAGIC, SNAPSHOT_VERSION, position, sequence, len(self._records)
            )
            + entries
        )
        return body + _SNAPSHOT_CRC.pack(zlib.crc32(body))

    def restore(self, snapshot: ProducerSnapshot) -> None:
        """Replace the contents with a snapshot's (evicting by this table's own bounds)."""
        self._records.clear()
        for producer, record in snapshot.entries:
            self.record(producer, record)


def decode_snapshot(data: bytes) -> ProducerSnapshot:
    """Decode and check a snapshot; ``CorruptData`` names the first fault found.

    ``UnsupportedVersion`` (a ``CorruptData``) for a snapshot of a newer version.
    """
    header_size = _SNAPSHOT_HEADER.size
    if len(data) < header_size + _SNAPSHOT_CRC.size:
        raise CorruptData(f"producer snapshot of {len(data)} bytes is too short for its header")
    magic, version, position, sequence, count = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise CorruptData(f"producer snapshot has magic {magic!r}, not {SNAPSHOT_MAGIC!r}")
    if version != SNAPSHOT_VERSION:
        raise UnsupportedVersion(f"producer snapshot version {version} (this code reads 1)")
    expected = header_size + count * _SNAPSHOT_ENTRY.size + _SNAPSHOT_CRC.size
    if len(data) != expected:
        raise CorruptData(
            f"producer snapshot of {count} entries should be {expected} bytes, not {len(data)}"
        )
    (crc,) = _SNAPSHOT_CRC.unpack_from(data, expected - _SNAPSHOT_CRC.size)
    if zlib.crc32(memoryview(data)[: expected - _SNAPSHOT_CRC.size]) != crc:
        raise CorruptData("producer snapshot fails its CRC")
    entries: list[tuple[bytes, ProducerRecord]] = []
    seen: set[bytes] = set()
    newest = 0
    for index, fields in enumerate(
        _SNAPSHOT_ENTRY.iter_unpack(data[header_size : expected - _SNAPSHOT_CRC.size])
    ):
        producer, batch_sequence, start, end, timestamp = fields
        record = ProducerRecord(batch_sequence, start, end, timestamp)
        problem = _entry_problem(producer, record, position, newest, seen)
        if problem:
            raise CorruptData(f"producer snapshot entry {index}: {problem}")
        seen.add(producer)
        newest = timestamp
        entries.append((producer, record))
    return ProducerSnapshot(position, sequence, tuple(entries))


def _entry_problem(
    producer: bytes, record: ProducerRecord, position: int, newest: int, seen: set[bytes]
) -> str:
    """What makes a (CRC-valid) entry impossible, or "" (a bug wrote it, not the disk)."""
    if producer == NO_PRODUCER:
        return "has no producer id"
    if producer in seen:
        return f"repeats producer {producer.hex()}"
    if not record.start < record.end <= position:
        return f"batch [{record.start}, {record.end}) is not within [0, {position})"
    if record.timestamp < newest:
        return "was committed before the entry ahead of it (entries go oldest first)"
    return ""


# Rebuilding from storage ----------------------------------------------------------------


def replay(table: ProducerTable, header: FrameHeader) -> None:
    """Apply one committed frame to ``table``, as the writer did when it committed it.

    A batch of several frames (a large value in pieces, more messages than
    one frame holds) is recorded frame by frame: a frame of the producer's
    last batch (same sequence and timestamp, right after it) extends its
    record, so the table ends up as if the batch had been recorded whole.
    """
    producer = header.producer
    if producer == NO_PRODUCER:
        table.expire(header.timestamp)
        return
    start = header.base_position
    last = table.get(producer)
    if (
        last is not None
        and last.sequence == header.producer_seq
        and last.end == start
        and last.timestamp == header.timestamp
    ):
        start = last.start
    table.record(producer, ProducerRecord(header.producer_seq, start, header.end, header.timestamp))


def frame_headers(
    store: StreamStore, start: int, end: int, *, read_size: int = SCAN_READ_SIZE
) -> Iterator[FrameHeader]:
    """The checked headers of the committed frames in ``[start, end)``, in order.

    Small frames come ``read_size`` bytes at a time; after a frame of
    ``SCAN_SKIP_FROM`` bytes or more, only the next header is read.
    ``CorruptData`` names the position of a damaged header.
    """
    buffer = b""
    buffer_start = position = start
    chunk = read_size
    while position < end:
        offset = position - buffer_start
        if len(buffer) - offset < min(MAX_HEADER_SIZE, end - position):
            buffer = store.read(position, min(max(chunk, MAX_HEADER_SIZE), end - position))
            buffer_start, offset = position, 0
        header = read_header(buffer, offset, position)
        if header.end > end:
            raise CorruptData(
                f"frame at position {position} runs past the committed length {end}",
                position=position,
            )
        yield header
        position = header.end
        chunk = MAX_HEADER_SIZE if header.frame_size >= SCAN_SKIP_FROM else read_size


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A table rebuilt from storage, and how: ``snapshot`` is where the snapshot used ends.

    ``snapshot`` is None when there was none to use (``problem`` says why, if
    there was one but it was damaged or did not fit the stream).
    """

    table: ProducerTable
    snapshot: int | None
    problem: str | None
    scanned: int  # bytes of frames replayed after the snapshot


def rebuild_table(
    store: StreamStore,
    checkpoint: Checkpoint,
    *,
    max_producers: int = DEFAULT_MAX_PRODUCERS,
    max_age: float = DEFAULT_PRODUCER_MAX_AGE,
) -> Rebuilt:
    """The producer table of the stream up to ``checkpoint``: the snapshot, then the frames after.

    A missing, damaged or misplaced snapshot (one that does not describe
    this stream at a frame boundary) means a replay from position 0, or
    from the first readable position of a trimmed stream (the producers
    whose last batches were trimmed are then forgotten).
    """
    table = ProducerTable(max_producers=max_producers, max_age=max_age)
    problem = None
    try:
        snapshot = _fitting_snapshot(store, checkpoint)
    except CorruptData as exc:
        snapshot, problem = None, str(exc)
    start = checkpoint.first_position
    if snapshot is not None:
        table.restore(snapshot)
        start = snapshot.position
    for header in frame_headers(store, start, checkpoint.length):
        replay(table, header)
    return Rebuilt(
        table,
        None if snapshot is None else snapshot.position,
        problem,
        checkpoint.length - start,
    )


def _fitting_snapshot(store: StreamStore, checkpoint: Checkpoint) -> ProducerSnapshot | None:
    """The stream's snapshot, None if it has none; ``CorruptData`` if it does not fit the stream."""
    data = store.read_side(SNAPSHOT_NAME)
    if data is None:
        return None
    snapshot = decode_snapshot(data)
    where = f"producer snapshot at position {snapshot.position}, sequence {snapshot.sequence}"
    if snapshot.position > checkpoint.length:
        raise CorruptData(f"{where} lies past the committed length {checkpoint.length}")
    if snapshot.position < checkpoint.first_position:
        raise CorruptData(f"{where} lies below the first readable position (trimmed)")
    if snapshot.position == checkpoint.length:
        sequence = checkpoint.next_sequence
    else:
        try:
            first = next(frame_headers(store, snapshot.position, checkpoint.length))
        except CorruptData as exc:
            raise CorruptData(f"{where} is not at a frame: {exc}") from exc
        if first.is_continuation:
            raise CorruptData(f"{where} is at a piece of a value, not a batch")
        sequence = first.base_sequence
    if snapshot.sequence != sequence:
        raise CorruptData(f"{where} does not fit the stream there (sequence {sequence})")
    return snapshot
