"""The single writer of a stream: frames batches and commits them.

A commit writes the new frames just past the committed length, then advances
the checkpoint conditionally. Until the checkpoint moves, the new bytes are
invisible to readers, and a crash leaves them as garbage that the next commit
overwrites, so opening a stream never needs a repair step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, overload

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    CorruptData,
    InvalidInput,
    MessageVaultError,
    StaleWriter,
    StorageError,
)
from messagevault.format import (
    FRAME_HEADER_SIZE,
    EncodedBatch,
    FrameLayout,
    PieceCheck,
    encode_batch,
    message_id,
    message_positions,
    read_header,
    verify_frame,
)
from messagevault.storage.base import ReadAccess, Storage, StreamStore


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

    def __init__(self, store: StreamStore, name: str, *, commit_timeout: float = 30.0) -> None:
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
        self._tail = self._read_tail_page()

    @classmethod
    def open(
        cls,
        storage: Storage,
        name: str,
        *,
        create: bool = True,
        takeover: bool = False,
        commit_timeout: float = 30.0,
    ) -> Writer:
        """Open ``name`` for writing (creating it by default) and take its writer lock.

        ``takeover=True`` deposes a current writer where the backend can fence
        it (see ``Storage.open_stream``). ``commit_timeout`` bounds how long an
        append rides out storage faults before it raises ``StorageError``.
        """
        store = storage.open_stream(name, write=True, create=create, takeover=takeover)
        try:
            return cls(store, name, commit_timeout=commit_timeout)
        except BaseException:
            store.close()
            raise

    @property
    def checkpoint(self) -> Checkpoint:
        """The last checkpoint this writer committed or found."""
        return self._checkpoint

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

        All of them are committed, or (on an exception) none of them.
        """
        if not batches:
            return []
        self._check_usable()
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
        new = Checkpoint(start.commit + 1, position, sequence, last_frame, timestamp)
        self._commit_as(pieces, new, start)
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
            last_frame, position = position, header.end
            sequence += header.message_count
            timestamp = header.timestamp
            offset += header.frame_size
        if offset == 0:
            raise InvalidInput("no frames to append")
        pieces.finish()  # never commit half of a value in pieces
        new = Checkpoint(start.commit + 1, position, sequence, last_frame, timestamp)
        self._commit_as([view], new, start)
        return new

    def _commit_as(
        self, pieces: list[bytes | memoryview], new: Checkpoint, start: Checkpoint
    ) -> None:
        """``_commit``, then adopt ``new``; a failure leaves this writer stale or in doubt."""
        try:
            self._commit(pieces, new, start)
        except StaleWriter as exc:
            self._broken = exc
            raise
        except BaseException:
            self._needs_resync = True
            self._in_doubt = new  # it may yet turn out to have landed
            raise
        self._checkpoint = new
        self._confirmed_at = time.monotonic()

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
        if checkpoint.length == 0:
            return
        start = checkpoint.last_frame_position
        raw = self._store.read(start, checkpoint.length - start)
        header = verify_frame(raw, 0, start)
        if header.end != checkpoint.length:
            raise CorruptData(
                f"stream {self.name!r}: last frame ends at {header.end}, "
                f"checkpoint says {checkpoint.length}",
                position=start,
            )

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
        self._checkpoint = stored
        self._confirmed_at = time.monotonic()
        self._in_doubt = None
        self._tail = self._read_tail_page()
        self._needs_resync = False

    def close(self) -> None:
        """Release the stream's writer lock. Idempotent."""
        if not self._closed:
            self._closed = True
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
