"""The single writer of a stream: frames batches and commits them.

A commit writes the new frames just past the committed length, then advances
the checkpoint conditionally. Until the checkpoint moves, the new bytes are
invisible to readers. Storage may make a checkpoint durable later than the
frames it names (file storage flushes it lazily), so after a crash the
checkpoint may lag frames that were committed: opening a writer rolls the
stream forward over the whole valid batches after it (``recovery``), and
anything else past it is garbage that the next commit overwrites.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import NamedTuple, overload

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    CorruptData,
    InvalidInput,
    InvalidPosition,
    MessageVaultError,
    SequenceGap,
    SequenceReused,
    StaleSequence,
    StaleWriter,
    StorageError,
)
from messagevault.format import (
    FRAME_HEADER_SIZE,
    MAX_HEADER_SIZE,
    NO_PRODUCER,
    EncodedBatch,
    FrameHeader,
    FrameLayout,
    PieceCheck,
    encode_batch,
    message_id,
    message_positions,
    read_header,
    verify_frame,
)
from messagevault.index import DEFAULT_INDEX_POLICY, Indexer, IndexPolicy
from messagevault.producers import (
    DEFAULT_MAX_PRODUCERS,
    DEFAULT_PRODUCER_MAX_AGE,
    DEFAULT_SNAPSHOT_BYTES,
    SNAPSHOT_NAME,
    ProducerRecord,
    ProducerTable,
    check_sequence,
    frame_headers,
    rebuild_table,
    replay,
)
from messagevault.reader import Reader
from messagevault.recovery import adopt
from messagevault.retention import trim_position
from messagevault.storage.base import ReadAccess, Storage, StreamStore
from messagevault.storage.leases import HeldLease

log = logging.getLogger("messagevault.writer")

# What a producer's batch was judged, before a group commit: None to append
# it; the index of an earlier batch of the group it repeats; the record of
# the committed batch it repeats; or why it is refused.
_Verdict = int | ProducerRecord | SequenceGap | StaleSequence | None


class Receipt(NamedTuple):
    """Where one appended message landed."""

    position: int
    sequence: int
    id: bytes


@dataclass(frozen=True, slots=True)
class AppendResult(Sequence[Receipt]):
    """The outcome of appending one batch: a sequence of ``Receipt``, one per message.

    Receipts are computed on demand, so appending a large batch costs no
    per-message Python objects unless the caller asks for them.
    """

    frame_position: int
    frame_size: int
    base_sequence: int
    message_count: int
    timestamp: int  # milliseconds since the Unix epoch, shared by the whole batch
    committed_length: int  # stream length after the commit that carried this batch
    header_size: int = FRAME_HEADER_SIZE  # of a one-frame batch: 64 (v1) or 96 (v2)
    # Where the frames holding messages sit in a batch of several (large
    # values, more than a frame's worth): None for one frame.
    layout: tuple[FrameLayout, ...] | None = None
    duplicate: bool = False  # the original result of a batch committed before

    @classmethod
    def of_batch(
        cls, batch: EncodedBatch, position: int, sequence: int, timestamp: int, committed: int
    ) -> AppendResult:
        """The result of ``batch`` placed at ``position`` with ``sequence``."""
        layout = batch.layout
        single = len(layout) == 1 and layout[0].offset == 0
        return cls(
            position,
            batch.frame_size,
            sequence,
            batch.count,
            timestamp,
            committed,
            layout[0].header_size if single else FRAME_HEADER_SIZE,
            None if single else layout,
        )

    @property
    def positions(self) -> Sequence[int]:
        if self.layout is None:
            return message_positions(self.frame_position, 0, self.message_count, self.header_size)
        positions: list[int] = []
        for frame in self.layout:
            positions.extend(
                message_positions(
                    self.frame_position + frame.offset, 0, frame.messages, frame.header_size
                )
            )
        return positions

    @property
    def sequences(self) -> range:
        return range(self.base_sequence, self.base_sequence + self.message_count)

    @property
    def end(self) -> int:
        """Position just past this batch: where the next message goes."""
        return self.frame_position + self.frame_size

    def __len__(self) -> int:
        return self.message_count

    @overload
    def __getitem__(self, index: int) -> Receipt: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Receipt]: ...
    def __getitem__(self, index: int | slice) -> Receipt | Sequence[Receipt]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.message_count))]
        if index < 0:
            index += self.message_count
        if not 0 <= index < self.message_count:
            raise IndexError("receipt index out of range")
        if self.layout is None:
            position = message_positions(self.frame_position, index, index + 1, self.header_size)[0]
        else:
            position = self.positions[index]
        sequence = self.base_sequence + index
        return Receipt(position, sequence, message_id(self.timestamp, position, sequence))

    def __iter__(self) -> Iterator[Receipt]:
        for index in range(self.message_count):
            yield self[index]


@dataclass(frozen=True, slots=True)
class TrimResult:
    """The outcome of ``Writer.trim``: where the stream's readable messages now start."""

    first_position: int  # the first readable byte: a frame start, or the committed length
    first_sequence: int  # the sequence of the message there (next_sequence if none is left)
    released_bytes: int  # storage given back by this trim (0 where holes cannot be punched)
    trimmed: bool = True  # False: the stream already started at or past that point


def _trimmed_repeat(
    batch: EncodedBatch, record: ProducerRecord, checkpoint: Checkpoint
) -> StaleSequence:
    """A retry of a batch committed, then trimmed: refused, as its bytes cannot be compared.

    It is not appended again (exactly once holds); its receipts are gone with
    its frames, so the producer hears that rather than a made-up answer.
    """
    return StaleSequence(
        f"batch {batch.producer_seq} of producer {batch.producer.hex()} was committed at "
        f"position {record.start} and has since been trimmed (the stream now starts at "
        f"{checkpoint.first_position}): not appended again"
    )


def _crcs(batch: EncodedBatch) -> list[int]:
    return [body.body_crc for body in batch.frames]


def _reused(batch: EncodedBatch) -> SequenceReused:
    return SequenceReused(
        f"producer {batch.producer.hex()} sent batch {batch.producer_seq} again with other "
        "content: a retry must send the same bytes; nothing appended"
    )


class Writer:
    """Appends batches to one stream; the only writer while it is open.

    Not thread-safe: one thread appends at a time (the server funnels each
    stream's appends through one task).

    >>> from messagevault.storage import MemoryStorage
    >>> with Writer.open(MemoryStorage(), "orders") as writer:
    ...     result = writer.append([(b"OrderPlaced", b'{"id": 1}')])
    >>> result[0].sequence
    0
    """

    def __init__(
        self,
        store: StreamStore,
        name: str,
        *,
        commit_timeout: float = 30.0,
        max_producers: int = DEFAULT_MAX_PRODUCERS,
        producer_max_age: float = DEFAULT_PRODUCER_MAX_AGE,
        snapshot_interval: int = DEFAULT_SNAPSHOT_BYTES,
        roll_forward: bool = True,
        index: IndexPolicy | None = DEFAULT_INDEX_POLICY,
        rebuild_index: bool = False,
    ) -> None:
        _check_producer_options(max_producers, producer_max_age, snapshot_interval)
        self.name = name
        self._store = store
        self._closed = False
        self._broken: MessageVaultError | None = None
        self._needs_resync = False
        self._in_doubt: Checkpoint | None = None
        self.commit_timeout = commit_timeout
        self._checkpoint = store.read_checkpoint()
        self._confirmed_at = time.monotonic()  # when storage last agreed with _checkpoint
        self._verify_tail()
        if roll_forward:  # before the producer table replays the frames up to the checkpoint
            self._roll_forward()
        self._tail = self._read_tail_page()
        self._release_trimmed()  # finishes a trim that crashed between its commit and release
        self._in_doubt_landed: Callable[[], None] | None = None
        self.snapshot_interval = snapshot_interval
        rebuilt = rebuild_table(
            store, self._checkpoint, max_producers=max_producers, max_age=producer_max_age
        )
        self._producers = rebuilt.table
        self._snapshot_at = rebuilt.snapshot  # the position the stored snapshot is of
        self._next_snapshot = (rebuilt.snapshot or 0) + snapshot_interval
        if rebuilt.problem is not None:
            log.warning(
                "producer snapshot of stream %r not used (%s): replayed all its frames",
                name,
                rebuilt.problem,
                extra={"stream": name},
            )
        if (rebuilt.snapshot is None and self._checkpoint.length) or (
            rebuilt.scanned >= snapshot_interval
        ):
            self.write_snapshot()  # spare the next writer this replay
        self.indexer = self._open_index(index, rebuild_index)

    def _open_index(self, policy: IndexPolicy | None, rebuild: bool) -> Indexer | None:
        """The stream's indexer; None without a policy, or when its index cannot be read.

        An index only saves seeks time: a writer never fails to open for it.
        """
        if policy is None:
            return None
        try:
            return Indexer(self._store, self.name, self._checkpoint, policy, rebuild=rebuild)
        except StaleWriter:
            raise
        except MessageVaultError as exc:
            log.warning(
                "stream %r opened without its index (%s): seeks scan frame headers",
                self.name,
                exc,
                extra={"stream": self.name},
            )
            return None

    @classmethod
    def open(
        cls,
        storage: Storage,
        name: str,
        *,
        create: bool = True,
        takeover: bool = False,
        lease: HeldLease | None = None,
        commit_timeout: float = 30.0,
        max_producers: int = DEFAULT_MAX_PRODUCERS,
        producer_max_age: float = DEFAULT_PRODUCER_MAX_AGE,
        snapshot_interval: int = DEFAULT_SNAPSHOT_BYTES,
        index: IndexPolicy | None = DEFAULT_INDEX_POLICY,
        rebuild_index: bool = False,
    ) -> Writer:
        """Open ``name`` for writing (creating it by default) and take its writer lock.

        ``takeover=True`` deposes a current writer where the backend can fence
        it (see ``Storage.open_stream``). Opening rolls the stream forward over
        the whole batches a stale checkpoint leaves out (``recovery``), except
        after a takeover on a backend whose checkpoint never lags (memory):
        there, what lies past it is the deposed writer's commit in progress,
        which that writer reports failed. ``commit_timeout`` bounds how long an
        append rides out storage faults before it raises ``StorageError``.

        ``lease``: the ``streams/<name>`` lease this writer writes under (a
        server node of several); opening under it deposes the previous
        holder's writer as a takeover does, and every write then fails with
        ``StaleWriter`` once another node holds the lease (``open_stream``).

        The producer table (``producers``) remembers at most
        ``max_producers`` producers, none for longer than
        ``producer_max_age`` seconds of commit timestamps after its last
        commit, and is saved every ``snapshot_interval`` bytes of appended
        frames and on ``close``. Opening rebuilds it from that snapshot and
        the frames after it.

        ``index``: how densely the stream's sparse index (``index.py``, which
        seeks by sequence and time use) is kept; None keeps none. Opening
        checks its tail and catches up on what it lacks, in a thread when
        that is much (a stream written before the index existed);
        ``rebuild_index`` throws it away and builds it again.
        """
        _check_producer_options(max_producers, producer_max_age, snapshot_interval)
        store = (
            storage.open_stream(name, write=True, create=create, takeover=takeover)
            if lease is None
            else storage.open_stream(name, write=True, create=create, lease=lease)
        )
        # A lease's previous holder is deposed as by a takeover (and recovered from as after one).
        takeover = takeover or lease is not None
        try:
            return cls(
                store,
                name,
                commit_timeout=commit_timeout,
                max_producers=max_producers,
                producer_max_age=producer_max_age,
                snapshot_interval=snapshot_interval,
                index=index,
                rebuild_index=rebuild_index,
                # Past the checkpoint of a stream taken from a live writer may be
                # that writer's commit in progress, which it will report failed:
                # not to be adopted where checkpoints never lag (memory). Where
                # they may (files: flushed lazily; Azure: updated behind the
                # acknowledgement), what lies past it may be acknowledged, and the
                # lease fences the deposed writer's later writes: roll forward.
                roll_forward=not takeover or getattr(store, "checkpoint_may_lag", False),
            )
        except BaseException:
            store.close()
            raise

    @property
    def checkpoint(self) -> Checkpoint:
        """The last checkpoint this writer committed or found."""
        return self._checkpoint

    @property
    def producers(self) -> ProducerTable:
        """The stream's producers and their last committed batches (read it, don't change it)."""
        return self._producers

    def recent_checkpoint(self, max_age: float) -> Checkpoint | None:
        """The committed checkpoint, if storage confirmed it within ``max_age`` seconds.

        None while a failed commit is in doubt (it may have landed) or when
        this writer has not committed for longer: another writer may have
        deposed it meanwhile. Safe to call from another thread than the one
        appending: it may then lag one commit behind, never run ahead.
        """
        if self._needs_resync or time.monotonic() - self._confirmed_at > max_age:
            return None
        return self._checkpoint

    @property
    def max_commit_bytes(self) -> int:
        """The most frame bytes one commit can carry in a single storage write.

        One page less than the storage's write limit: a commit on page storage
        starts by rewriting the partly filled tail page.
        """
        return self._store.max_write_size - self._store.page_size

    def read_access(self) -> ReadAccess:
        """What to hand a direct consumer (a read-only SAS URL on Azure)."""
        return self._store.read_access()

    def append(
        self, messages: Iterable[tuple[bytes | str, bytes]], *, compress: bool = False
    ) -> AppendResult:
        """Append one batch of ``(key, value)`` pairs as one atomic commit.

        Returns once the batch is committed (durable per the storage's policy).
        Invalid input raises ``InvalidBatch`` and leaves the stream unchanged.
        ``compress=True`` stores the values zstd-compressed where that makes
        them smaller (docs/FORMAT.md); readers unpack them.
        """
        return self.append_batches([encode_batch(messages, compress=compress)])[0]

    def append_batches(self, batches: Sequence[EncodedBatch]) -> list[AppendResult]:
        """Commit several encoded batches with one storage commit (group commit).

        All of them are committed, or (on an exception) none of them. A batch
        with a producer is judged by the producer table first
        (``producers.check_sequence``): one that repeats the producer's last
        committed batch is not appended again, and its result is that
        batch's original one, with ``duplicate=True``; one that skips ahead
        or comes too late raises ``SequenceGap``/``StaleSequence``.
        """
        if not batches:
            return []
        self._check_usable()
        verdicts = self._judge(batches)
        refused = next((v for v in verdicts if isinstance(v, SequenceGap | StaleSequence)), None)
        if refused is not None:
            raise refused
        results = [r for r in self._carry_out(batches, verdicts) if isinstance(r, AppendResult)]
        self.snapshot_if_due()
        self.index_if_due()
        return results

    def append_group(
        self, batches: Sequence[EncodedBatch]
    ) -> list[AppendResult | SequenceGap | StaleSequence]:
        """``append_batches`` for batches from many callers: each gets its own outcome.

        A batch refused by the producer table gets its ``SequenceGap`` or
        ``StaleSequence`` in its place and the others are committed; a batch
        repeating one earlier in the group (a retry that overtook the answer
        to it) gets that one's result, with ``duplicate=True``. An exception
        (storage, a deposed writer) is about the whole group: then nothing
        was committed, as far as this writer knows. Unlike
        ``append_batches``, this leaves ``snapshot_if_due`` and
        ``index_if_due`` to the caller, to be called once the outcomes are
        handed out.
        """
        if not batches:
            return []
        self._check_usable()
        return self._carry_out(batches, self._judge(batches))

    def _judge(self, batches: Sequence[EncodedBatch]) -> list[_Verdict]:
        """What becomes of each batch, as if they came one after the other."""
        verdicts: list[_Verdict] = []
        in_group: dict[bytes, tuple[int, int]] = {}  # producer -> (sequence, batch index)
        for index, batch in enumerate(batches):
            producer = batch.producer
            if producer == NO_PRODUCER:
                verdicts.append(None)
                continue
            try:
                # A repeat must be the same bytes (a retry); its frames'
                # body CRCs tell, against the stored headers or the batch
                # earlier in the group.
                if producer in in_group:
                    sequence, first = in_group[producer]
                    if check_sequence(producer, sequence, batch.producer_seq):
                        same = _crcs(batch) == _crcs(batches[first])
                        verdicts.append(first if same else _reused(batch))
                        continue
                else:
                    found = self._producers.check(producer, batch.producer_seq)
                    if found is not None and found.start < self._checkpoint.first_position:
                        verdicts.append(_trimmed_repeat(batch, found, self._checkpoint))
                        continue
                    if found is not None:
                        stored = [header.body_crc for header in self._headers_of(found)]
                        verdicts.append(found if stored == _crcs(batch) else _reused(batch))
                        continue
            except (SequenceGap, StaleSequence) as exc:
                verdicts.append(exc)
                continue
            in_group[producer] = (batch.producer_seq, index)
            verdicts.append(None)
        return verdicts

    def _carry_out(
        self, batches: Sequence[EncodedBatch], verdicts: list[_Verdict]
    ) -> list[AppendResult | SequenceGap | StaleSequence]:
        # Duplicates are read back before the commit: a storage error then
        # fails the group before anything of it is written.
        originals = {
            index: self._original_result(verdict)
            for index, verdict in enumerate(verdicts)
            if isinstance(verdict, ProducerRecord)
        }
        appending = [
            batch for batch, verdict in zip(batches, verdicts, strict=True) if verdict is None
        ]
        appended = iter(self._commit_batches(appending) if appending else [])
        outcomes: list[AppendResult | SequenceGap | StaleSequence] = []
        for index, verdict in enumerate(verdicts):
            if verdict is None:
                outcomes.append(next(appended))
            elif isinstance(verdict, ProducerRecord):
                outcomes.append(originals[index])
            elif isinstance(verdict, int):
                original = outcomes[verdict]
                assert isinstance(original, AppendResult)
                outcomes.append(dataclasses.replace(original, duplicate=True))
            else:
                outcomes.append(verdict)
        return outcomes

    def _headers_of(self, record: ProducerRecord) -> list[FrameHeader]:
        return list(frame_headers(self._store, record.start, record.end, read_size=MAX_HEADER_SIZE))

    def _original_result(self, record: ProducerRecord) -> AppendResult:
        """The result a committed batch had, rebuilt from its frame headers.

        Exact but for ``committed_length``, which is the batch's own end: the
        length after the commit that carried it is not kept (a scan cannot
        tell where a group commit ended).
        """
        headers = self._headers_of(record)
        layout = tuple(
            FrameLayout(
                header.base_position - record.start, header.header_size, header.message_count
            )
            for header in headers
            if header.message_count
        )
        single = len(layout) == 1 and layout[0].offset == 0
        first = headers[0]
        return AppendResult(
            record.start,
            record.end - record.start,
            first.base_sequence,
            sum(frame.messages for frame in layout),
            first.timestamp,
            record.end,
            layout[0].header_size if single else FRAME_HEADER_SIZE,
            None if single else layout,
            duplicate=True,
        )

    def _commit_batches(self, batches: list[EncodedBatch]) -> list[AppendResult]:
        """Place ``batches`` after the committed length and commit them; record their producers."""
        start = self._checkpoint
        timestamp = max(time.time_ns() // 1_000_000, start.last_timestamp)
        pieces: list[bytes | memoryview] = []
        placed: list[tuple[int, EncodedBatch, int]] = []
        position, sequence = start.length, start.next_sequence
        for batch in batches:
            if len(batch.frames) == 1:
                pieces.append(batch.header(position, sequence, timestamp))
                pieces.extend(batch.frames[0].parts)
            else:
                pieces.extend(batch.pieces(position, sequence, timestamp))
            placed.append((position, batch, sequence))
            position += batch.frame_size
            sequence += batch.count
        last_batch_at, last_batch, _ = placed[-1]
        last_frame = last_batch_at + last_batch.frame_size - last_batch.last_frame_size
        new = Checkpoint(
            start.commit + 1, position, sequence, last_frame, timestamp, start.first_position
        )

        def landed() -> None:
            for at, batch, _ in placed:
                if batch.producer == NO_PRODUCER:
                    self._producers.expire(timestamp)
                else:
                    record = ProducerRecord(
                        batch.producer_seq, at, at + batch.frame_size, timestamp
                    )
                    self._producers.record(batch.producer, record)

        if self.indexer is not None:
            indexer = self.indexer
            noted = [(at, base, timestamp, len(batch.frames)) for at, batch, base in placed]

            def landed_and_noted() -> None:
                landed()
                indexer.note(noted, position)

            self._commit_as(pieces, new, start, landed_and_noted)
        else:
            self._commit_as(pieces, new, start, landed)
        return [
            AppendResult.of_batch(batch, at, base, timestamp, position)
            for at, batch, base in placed
        ]

    def append_frames(self, frames: bytes | memoryview) -> Checkpoint:
        """Commit whole frames exactly as they are: a replica's copy of another stream.

        ``frames`` (``Reader.read_frames`` data, say) must start at this
        stream's committed length and next sequence and follow on from each
        other, so the copy keeps the source's positions, sequences, timestamps
        and ids. Every frame is checked first: one that does not fit raises
        ``InvalidInput`` (a damaged one ``CorruptData``) and nothing is
        written. Returns the new checkpoint.
        """
        self._check_usable()
        start = self._checkpoint
        view = memoryview(frames)
        position, sequence, timestamp = start.length, start.next_sequence, start.last_timestamp
        last_frame = offset = 0
        headers: list[FrameHeader] = []
        pieces = PieceCheck()
        while offset < len(view):
            header = read_header(view, offset, None)
            pieces.take(header, offset)
            if (header.base_position, header.base_sequence) != (position, sequence):
                raise InvalidInput(
                    f"stream {self.name!r} ends at position {position}, sequence {sequence}; "
                    f"the frame given starts at position {header.base_position}, "
                    f"sequence {header.base_sequence}"
                )
            if header.timestamp < timestamp:
                raise InvalidInput(
                    f"frame at position {position} has a timestamp ({header.timestamp}) "
                    f"older than the one before it ({timestamp})"
                )
            verify_frame(view, offset, position)
            headers.append(header)
            last_frame, position = position, header.end
            sequence += header.message_count
            timestamp = header.timestamp
            offset += header.frame_size
        if offset == 0:
            raise InvalidInput("no frames to append")
        pieces.finish()  # never commit half of a value in pieces
        new = Checkpoint(
            start.commit + 1, position, sequence, last_frame, timestamp, start.first_position
        )

        def landed() -> None:
            for header in headers:
                replay(self._producers, header)
            if self.indexer is not None:
                self.indexer.note_headers(headers, new.length)

        self._commit_as([view], new, start, landed)
        self.index_if_due()
        return new

    def trim(self, position: int) -> TrimResult:
        """Make the stream start at the frame holding ``position``; free the bytes below.

        ``position`` is a message position or the committed length, as
        ``Reader.read`` takes (``InvalidPosition`` otherwise, and nothing
        changes). Positions never move: the frames below simply become
        unreadable (``PositionTrimmed``) and their storage is released
        (``StreamStore.release``). A value in pieces goes whole or not at
        all. Never backwards: at or below the current first position this
        changes nothing and says so (``trimmed=False``).

        A trim is a commit of the checkpoint alone (the same one, but for
        its ``first_position``), then the release. A crash between the two
        leaves bytes unreadable but held, and the next writer to open the
        stream releases them.
        """
        self._check_usable()
        start = self._checkpoint
        if not isinstance(position, int) or isinstance(position, bool):
            raise InvalidPosition(f"position must be a non-negative integer, not {position!r}")
        if 0 <= position <= start.first_position:
            return self._trim_result(start, trimmed=False)
        frame_position = self._frame_holding(position, start)
        if frame_position <= start.first_position:
            return self._trim_result(start, trimmed=False)
        # The producer table must not need the frames that go: a writer
        # opening later rebuilds it from the snapshot, never from below the
        # first position.
        if self._snapshot_at is None or self._snapshot_at < frame_position:
            self.write_snapshot()
        new = dataclasses.replace(start, commit=start.commit + 1, first_position=frame_position)
        self._commit_as([], new, start, lambda: None)
        log.info(
            "stream %r trimmed below position %d",
            self.name,
            frame_position,
            extra={"stream": self.name},
        )
        return self._trim_result(new, released=self._release_trimmed())

    def trim_below(
        self,
        *,
        position: int | None = None,
        sequence: int | None = None,
        time: datetime | float | None = None,
    ) -> TrimResult:
        """``trim`` below a position, a sequence (it stays) or a time; exactly one.

        See ``retention.trim_position``: a target already trimmed away
        changes nothing.
        """
        at = trim_position(
            self._store,
            self._checkpoint,
            name=self.name,
            position=position,
            sequence=sequence,
            time=time,
        )
        return self.trim(at)

    def _frame_holding(self, position: int, checkpoint: Checkpoint) -> int:
        """The start of the frame holding message ``position`` (the length for the length)."""
        # The reader's check of a message position, on this writer's store
        # (never closed: the reader is only borrowed for the check).
        frame_position = Reader(self._store, self.name, read_ahead=False).frame_of(
            position, checkpoint
        )
        if frame_position < checkpoint.length:
            raw = self._store.read(
                frame_position, min(MAX_HEADER_SIZE, checkpoint.length - frame_position)
            )
            if read_header(raw, 0, frame_position).is_continuation:
                raise InvalidPosition(
                    f"position {position} in stream {self.name!r} is inside a value in "
                    "pieces, not a message"
                )
        return frame_position

    def _trim_result(
        self, checkpoint: Checkpoint, *, released: int = 0, trimmed: bool = True
    ) -> TrimResult:
        first = checkpoint.first_position
        sequence = checkpoint.next_sequence
        if first < checkpoint.length:
            raw = self._store.read(first, min(MAX_HEADER_SIZE, checkpoint.length - first))
            sequence = read_header(raw, 0, first).base_sequence
        return TrimResult(first, sequence, released, trimmed)

    def _release_trimmed(self) -> int:
        """Release the storage below the committed first position; the bytes freed.

        Idempotent and cheap once done. A failure is logged, not raised: the
        trim holds (readers stop at the first position) and the next writer
        to open the stream tries again.
        """
        below = self._checkpoint.first_position
        if not below:
            return 0
        try:
            return self._store.release(below)
        except StaleWriter:
            raise
        except StorageError as exc:
            log.warning(
                "stream %r: storage below position %d not released yet: %s",
                self.name,
                below,
                exc,
                extra={"stream": self.name},
            )
            return 0

    def _commit_as(
        self,
        pieces: list[bytes | memoryview],
        new: Checkpoint,
        start: Checkpoint,
        landed: Callable[[], None],
    ) -> None:
        """``_commit``, then adopt ``new`` and call ``landed``.

        A failure leaves this writer stale or in doubt; ``landed`` is then
        called by the resync that finds the commit did land after all.
        """
        try:
            self._commit(pieces, new, start)
        except StaleWriter as exc:
            self._broken = exc
            raise
        except BaseException:
            self._needs_resync = True
            self._in_doubt = new  # it may yet turn out to have landed
            self._in_doubt_landed = landed
            raise
        self._checkpoint = new
        self._confirmed_at = time.monotonic()
        landed()

    def _commit(self, pieces: list[bytes | memoryview], new: Checkpoint, start: Checkpoint) -> None:
        """Write the frames and advance the checkpoint, riding out transient faults.

        A failed storage call may still have taken effect (a lost response),
        so before trying again the checkpoint is read back: if it already says
        ``new`` the commit happened and must not happen twice; if it still says
        ``start`` the whole commit is repeated (same bytes, same offsets). Gives
        up after ``commit_timeout`` seconds with a ``StorageError``.
        """
        tail = self._tail_after(new.length, pieces)
        deadline = time.monotonic() + self.commit_timeout
        delay = 0.05
        while True:
            try:
                self._write_after_tail(pieces)
                self._store.advance_checkpoint(new, expected=start)
            except StorageError as exc:
                failure: StorageError = exc
            else:
                self._tail = tail
                return
            while True:  # learn whether that commit landed
                if time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"stream {self.name!r}: commit not confirmed within "
                        f"{self.commit_timeout:g} s; last error: {failure}"
                    ) from failure
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    stored = self._store.read_checkpoint()
                except StorageError as exc:
                    failure = exc
                    continue
                break
            if stored == new:
                self._tail = tail
                return
            if stored != start:
                raise StaleWriter(
                    f"stream {self.name!r} was committed by another writer "
                    f"(commit {stored.commit}, expected {start.commit})"
                )

    def _tail_after(self, length: int, pieces: list[bytes | memoryview]) -> bytes:
        """The partly filled last page once ``pieces`` are committed (page backends).

        Taken from the last pieces only, without joining the whole commit.
        """
        page = self._store.page_size
        needed = length % page
        if page == 1 or needed == 0:
            return b""
        chunks: list[bytes] = []
        for piece in reversed([self._tail, *pieces]):
            chunks.append(bytes(piece[-needed:]) if len(piece) > needed else bytes(piece))
            needed -= len(chunks[-1])
            if needed == 0:
                break
        return b"".join(reversed(chunks))

    def _write_after_tail(self, pieces: list[bytes | memoryview]) -> None:
        """Write ``pieces`` at the committed length, in whole pages where required."""
        store = self._store
        page = store.page_size
        committed = self._checkpoint.length
        tail = self._tail
        if tail:
            pieces = [tail, *pieces]
        used = sum(map(len, pieces))
        if page > 1 and used % page:
            pieces = [*pieces, bytes(page - used % page)]  # page blobs take whole pages only
        at = committed - len(tail)
        step = store.max_write_size
        if used <= step:
            store.write(at, b"".join(pieces))
            return
        # A big commit (a large value) goes out a write at a time, without a
        # copy of the whole of it in memory.
        buffer = bytearray()
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view:
                room = step - len(buffer)
                buffer += view[:room]
                view = view[room:]
                if len(buffer) == step:
                    store.write(at, bytes(buffer))
                    at += step
                    buffer.clear()
        if buffer:
            store.write(at, bytes(buffer))

    def _read_tail_page(self) -> bytes:
        """The committed bytes of the partly filled last page (page backends only)."""
        page = self._store.page_size
        length = self._checkpoint.length
        if page == 1 or length % page == 0:
            return b""
        start = length - length % page
        tail = self._store.read(start, length - start)
        if len(tail) != length - start:
            raise CorruptData(
                f"stream {self.name!r} is shorter than its checkpoint ({length} bytes)",
                position=start,
            )
        return tail

    def _verify_tail(self) -> None:
        """Check the last committed frame, so damage is found before we build on it."""
        checkpoint = self._checkpoint
        if checkpoint.length in (0, checkpoint.first_position):
            return  # nothing committed, or everything trimmed
        start = checkpoint.last_frame_position
        raw = self._store.read(start, checkpoint.length - start)
        header = verify_frame(raw, 0, start)
        if header.end != checkpoint.length:
            raise CorruptData(
                f"stream {self.name!r}: last frame ends at {header.end}, "
                f"checkpoint says {checkpoint.length}",
                position=start,
            )

    def _roll_forward(self) -> None:
        """Adopt the whole batches a stale checkpoint leaves out, with a new checkpoint."""
        self._checkpoint = adopt(self._store, self._checkpoint, self.name)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        if self._broken is not None:
            raise StaleWriter(f"writer of {self.name!r} lost the stream: {self._broken}")
        if self._needs_resync:
            self._resync()

    def _resync(self) -> None:
        """After a failed commit, learn from storage whether it happened."""
        stored = self._store.read_checkpoint()
        if stored not in (self._checkpoint, self._in_doubt):
            self._broken = StaleWriter(
                f"stream {self.name!r} was committed by another writer "
                f"(commit {stored.commit}, expected {self._checkpoint.commit})"
            )
            raise self._broken
        if stored == self._in_doubt and stored != self._checkpoint and self._in_doubt_landed:
            self._in_doubt_landed()  # it landed: its producers' batches count
        self._checkpoint = stored
        self._confirmed_at = time.monotonic()
        self._in_doubt = None
        self._in_doubt_landed = None
        self._tail = self._read_tail_page()
        self._needs_resync = False

    @property
    def snapshot_due(self) -> bool:
        """Whether ``snapshot_interval`` bytes were appended since the last producer snapshot."""
        return self._checkpoint.length >= self._next_snapshot and self._in_step()

    def snapshot_if_due(self) -> None:
        """Save the producer table if ``snapshot_interval`` bytes were appended since the last."""
        if self.snapshot_due:
            self.write_snapshot()

    def write_snapshot(self) -> bool:
        """Save the producer table as of the committed length (side object ``producers``).

        A failure is logged, not raised, and retried an interval later: the
        snapshot only shortens the next writer's rebuild. Returns whether it
        was saved.
        """
        checkpoint = self._checkpoint
        self._next_snapshot = checkpoint.length + self.snapshot_interval
        data = self._producers.snapshot(checkpoint.length, checkpoint.next_sequence)
        try:
            self._store.write_side(SNAPSHOT_NAME, data)
        except MessageVaultError as exc:  # storage gone, stream deleted: nothing depends on it
            log.warning(
                "producer snapshot of stream %r not saved: %s",
                self.name,
                exc,
                extra={"stream": self.name},
            )
            return False
        self._snapshot_at = checkpoint.length
        return True

    @property
    def index_due(self) -> bool:
        """Whether index entries wait to be written (``index_if_due``)."""
        return self.indexer is not None and self.indexer.flush_due and self._in_step()

    def index_due_in(self) -> float | None:
        """Seconds until noted index entries are due to be written; None: none wait."""
        if self.indexer is None or not self._in_step():
            return None
        return self.indexer.flush_due_in()

    def index_if_due(self) -> None:
        """Write the index entries noted since the last time, if the interval has passed."""
        if self.index_due:
            assert self.indexer is not None
            self.indexer.flush()

    def _in_step(self) -> bool:
        """Whether this writer's table is known to match storage (not deposed, not in doubt)."""
        return not self._closed and self._broken is None and not self._needs_resync

    def close(self) -> None:
        """Save the producer table if it changed; release the stream's writer lock. Idempotent."""
        if self._closed:
            return
        in_step = self._in_step()
        try:
            if in_step and self._snapshot_at != self._checkpoint.length:
                self.write_snapshot()
        finally:
            self._closed = True
            try:
                if self.indexer is not None:  # stops a build; a deposed writer writes nothing
                    self.indexer.close(flush=in_step)
            finally:
                self._store.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_producer_options(
    max_producers: int, producer_max_age: float, snapshot_interval: int
) -> None:
    """Refuse bad producer table options before anything is opened."""
    ProducerTable(max_producers=max_producers, max_age=producer_max_age)
    if isinstance(snapshot_interval, bool) or not isinstance(snapshot_interval, int):
        raise TypeError(f"snapshot_interval must be an int, not {type(snapshot_interval).__name__}")
    if snapshot_interval < 1:
        raise ValueError(f"snapshot_interval must be at least 1 byte, not {snapshot_interval}")
