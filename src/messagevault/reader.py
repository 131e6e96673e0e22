"""Reading a stream straight from storage: replay, resume, follow the tail.

A reader never reads past the checkpoint it loaded, so it never sees a torn
or uncommitted write. Any number of readers, in any process, can read while
the writer appends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from itertools import chain
from types import TracebackType
from typing import NamedTuple, TypeVar

from messagevault.checkpoint import Checkpoint
from messagevault.errors import AccessDenied, CorruptData, InvalidPosition, PositionTrimmed
from messagevault.format import (
    FRAME_HEADER_SIZE,
    MAX_HEADER_SIZE,
    SLOT_SIZE,
    FrameAssembler,
    FrameHeader,
    Message,
    check_continuation_start,
    read_header,
    slot_index,
    verify_frame,
)
from messagevault.polling import DEFAULT_POLL_INTERVAL, PollBackoff
from messagevault.storage import open_read_access
from messagevault.storage.base import ReadAccess, Storage, StreamStore

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
# How long a reader goes on using the index size it last asked storage for.
INDEX_SIZE_TTL = 1.0
# A remote read costs a round trip (and some milliseconds of SDK work) however
# small: bigger reads amortise it. 8 MiB reached the raw download rate on Azurite.
REMOTE_CHUNK_SIZE = 8 * 1024 * 1024
T = TypeVar("T")
# What a frame holding one piece of a large value has besides the piece: a v2
# header, one message's columns and a key of at most 255 bytes.
_PIECE_FRAME_SLACK = 512


class RawFrames(NamedTuple):
    data: bytes  # whole frames, laid end to end as in storage
    skip: int  # leading messages of the first frame before the requested position
    next_position: int  # position just after the last frame


class VerifyReport(NamedTuple):
    frames: int
    messages: int
    bytes: int


def _is_remote(store: StreamStore) -> bool:
    """Optional capability: a store whose reads are round trips (Azure) says ``remote``."""
    return bool(getattr(store, "remote", False))


class _ReadAhead:
    """Downloads the next chunk in a background thread while this one is decoded.

    Only for remote storage, where a 4 MiB read is a 10-30 ms round trip that
    would otherwise alternate with decoding instead of overlapping it.
    """

    def __init__(self, store: StreamStore, chunk_size: int, end: int) -> None:
        self._store = store
        self._chunk_size = chunk_size
        self._end = end
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="messagevault-read")
        self._pending: tuple[int, Future[bytes]] | None = None

    def refill(self, kept: bytes, position: int, needed: int) -> bytes:
        """``kept`` (the bytes from ``position`` already held) plus at least one new chunk."""
        pieces = [kept]
        have = len(kept)
        at = position + have
        while at < self._end and (have < needed or len(pieces) == 1):
            chunk = self._fetch(at)
            if not chunk:
                break
            pieces.append(chunk)
            have += len(chunk)
            at += len(chunk)
        if at < self._end:
            self._pending = (at, self._pool.submit(self._read, at))
        return b"".join(pieces)

    def _fetch(self, at: int) -> bytes:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == at:
            return pending[1].result()
        return self._read(at)

    def _read(self, at: int) -> bytes:
        return self._store.read(at, min(self._chunk_size, self._end - at))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RenewingStore:
    """A read-only store behind expiring access: renews it when expired or refused."""

    def __init__(self, access: ReadAccess, refresh: Callable[[], ReadAccess]) -> None:
        self._refresh = refresh
        if access.expires_at is not None and time.time() >= access.expires_at:
            access = refresh()  # saved and handed back after it expired: renew before use
        self._access = access
        try:
            self._store, self.name = open_read_access(access)
        except AccessDenied:  # revoked, or expired early (clock skew): one fresh try
            self._access = refresh()
            self._store, self.name = open_read_access(self._access)

    def _renew(self) -> None:
        self._store.close()
        self._access = self._refresh()
        self._store, self.name = open_read_access(self._access)

    def _call(self, operation: Callable[[StreamStore], T]) -> T:
        expires_at = self._access.expires_at
        if expires_at is not None and time.time() >= expires_at:
            self._renew()
        try:
            return operation(self._store)
        except AccessDenied:
            self._renew()  # revoked or expired early (clock skew): one fresh try
            return operation(self._store)

    @property
    def page_size(self) -> int:
        return self._store.page_size

    @property
    def max_write_size(self) -> int:
        return self._store.max_write_size

    @property
    def remote(self) -> bool:
        return _is_remote(self._store)

    def read(self, offset: int, size: int) -> bytes:
        return self._call(lambda store: store.read(offset, size))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise AccessDenied("a reader's access is read-only")

    def read_checkpoint(self) -> Checkpoint:
        return self._call(lambda store: store.read_checkpoint())

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        raise AccessDenied("a reader's access is read-only")

    def read_side(self, name: str) -> bytes | None:
        return self._call(lambda store: store.read_side(name))

    def write_side(self, name: str, data: bytes) -> None:
        raise AccessDenied("a reader's access is read-only")

    def index_size(self) -> int:
        return self._call(lambda store: store.index_size())

    def read_index(self, offset: int, size: int) -> bytes:
        return self._call(lambda store: store.read_index(offset, size))

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        raise AccessDenied("a reader's access is read-only")

    def truncate_index(self, size: int) -> None:
        raise AccessDenied("a reader's access is read-only")

    def release(self, below: int) -> int:
        raise AccessDenied("a reader's access is read-only")

    def read_access(self) -> ReadAccess:
        return self._access

    def close(self) -> None:
        self._store.close()


class Reader:
    """Reads one stream from storage.

    >>> from messagevault.storage import MemoryStorage
    >>> from messagevault.writer import Writer
    >>> storage = MemoryStorage()
    >>> with Writer.open(storage, "orders") as writer:
    ...     _ = writer.append([(b"k", b"v1"), (b"k", b"v2")])
    >>> [m.value for m in Reader.open(storage, "orders").read()]
    [b'v1', b'v2']
    """

    def __init__(
        self,
        store: StreamStore,
        name: str,
        *,
        chunk_size: int | None = None,
        read_ahead: bool | None = None,
    ):
        self.name = name
        self._store = store
        remote = _is_remote(store)
        if chunk_size is None:
            chunk_size = REMOTE_CHUNK_SIZE if remote else DEFAULT_CHUNK_SIZE
        self._chunk_size = chunk_size
        # Fetching the next chunk during decoding pays off for scans of
        # remote storage; a caller reading short pages turns it off.
        self._read_ahead = remote if read_ahead is None else read_ahead
        self._stop = threading.Event()
        self._index_size_asked: tuple[float, int] | None = None  # (when, size)

    @classmethod
    def open(
        cls,
        storage: Storage,
        name: str,
        *,
        chunk_size: int | None = None,
        read_ahead: bool | None = None,
    ) -> Reader:
        """Open ``name`` for reading, in ``chunk_size`` reads from storage.

        ``read_ahead`` fetches the next chunk in a thread while one is
        decoded; by default on for remote storage (Azure).
        """
        return cls(storage.open_stream(name), name, chunk_size=chunk_size, read_ahead=read_ahead)

    @classmethod
    def from_read_access(
        cls,
        access: ReadAccess,
        *,
        refresh: Callable[[], ReadAccess] | None = None,
        chunk_size: int | None = None,
    ) -> Reader:
        """A reader from a ``ReadAccess`` alone (e.g. a SAS URL handed out by the server).

        SAS URLs expire (an hour by default). With ``refresh``, a function that
        fetches a new ``ReadAccess`` (from the server, say), the reader renews
        its access when it has expired or storage refuses it, and carries on.
        """
        if refresh is None:
            store, name = open_read_access(access)
        else:
            store = RenewingStore(access, refresh)
            name = store.name
        return cls(store, name, chunk_size=chunk_size)

    def checkpoint(self) -> Checkpoint:
        """The stream's committed state, fresh from storage."""
        return self._store.read_checkpoint()

    def read(
        self,
        position: int = 0,
        *,
        end: int | None = None,
        committed: int | None = None,
        first_position: int | None = None,
        max_bytes: int | None = None,
    ) -> Iterator[Message]:
        """Iterate committed messages from ``position`` up to the current committed length.

        ``position`` must be a message position (``Message.position`` or
        ``Message.next_position`` of an earlier read, an ``AppendResult``
        position, or 0); a bad one raises ``InvalidPosition`` here, before
        iteration starts. A position inside a value in pieces (a
        CONTINUATION frame) is refused naming the value's own position.
        ``end`` stops early, at a frame boundary such as an earlier committed
        length. ``committed`` is the committed length when the caller knows
        it for certain (the server that writes the stream): it saves reading
        the checkpoint, a round trip on Azure; ``first_position`` is then the
        first readable position it knows (see below). ``max_bytes`` stops
        before a frame, or a value in pieces, whose values would take those
        read past it, once at least one message came: a page of a stream of
        large values then never reads one it will not hand out.

        A trimmed stream (``Writer.trim``) starts at its checkpoint's
        ``first_position``: position 0 means the start of the stream and
        reads from there (Kafka's "earliest"); any other position below it
        raises ``PositionTrimmed`` naming the first readable position, as
        does a read overtaken by a trim while it scans.
        """
        frame_position, first, committed = self._start(position, committed, first_position)
        limit = committed if end is None else min(end, committed)
        # Frames decode to lists; chaining them keeps per-message iteration in C.
        return chain.from_iterable(
            self._overtaken(self._frames(frame_position, first, limit, max_bytes), frame_position)
        )

    def follow(
        self,
        position: int = 0,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Message]:
        """Iterate messages from ``position`` forever, waiting for new commits.

        At the tail it checks the checkpoint (a storage request) after
        ``poll_interval`` seconds, then waits twice as long after each check
        that found nothing, up to ``max_poll_interval`` (default 2.0, or
        ``poll_interval`` if longer); new data brings it back to
        ``poll_interval``. So an idle follower costs at most one request per
        ceiling, and a message after a silence is seen within the ceiling.
        Both are more than 0 and at most 60 s (else ``InvalidInput``).
        Ends cleanly when ``stop`` is set, when ``close()`` is called (seen
        at the next check when a ``stop`` is given), or when the caller
        closes the iterator. Position 0 and trimmed positions are as for
        ``read``; a follower that falls behind a trim gets ``PositionTrimmed``.
        """
        backoff = PollBackoff(poll_interval, max_poll_interval)
        frame_position, first, _ = self._start(position, None, None)
        return chain.from_iterable(self._follow_frames(frame_position, first, backoff, stop))

    def _follow_frames(
        self, frame_position: int, first: int, backoff: PollBackoff, stop: threading.Event | None
    ) -> Iterator[Iterator[Message]]:
        waiter = stop if stop is not None else self._stop
        while not self._stopped(stop):
            checkpoint = self._store.read_checkpoint()
            committed = checkpoint.length
            if frame_position < checkpoint.first_position:
                raise self._trimmed(frame_position, checkpoint)
            if frame_position < committed:
                backoff.found()
                frames = self._frames(frame_position, first, committed)
                for messages in self._overtaken(frames, frame_position):
                    yield messages
                    if self._stopped(stop):
                        return
                frame_position, first = committed, 0
            else:
                waiter.wait(backoff.idle())

    def seek(
        self,
        *,
        sequence: int | None = None,
        time: datetime | float | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> int:
        """Where to read from for message ``sequence``, or the first message at or after ``time``.

        Give exactly one. ``sequence`` counts messages from 0; the next one to
        be written (``next_sequence``) gives the committed length, a larger
        one ``InvalidPosition``. ``time`` is an aware ``datetime`` or Unix
        seconds; a time after the last message gives the committed length
        (where the next message will be), a time before the first readable
        message gives its position. Either below the stream's first readable
        position (a trimmed stream) raises ``PositionTrimmed``.

        ``checkpoint``: the committed state when the caller knows it (the
        server writing the stream, whose checkpoint storage may show a moment
        later); read from storage otherwise.

        Uses the stream's sparse index where there is one (``index.py``):
        O(log n) small index reads and one bounded scan of frame headers,
        checked against the frames, so a damaged index costs time, never a
        wrong answer.
        """
        if (sequence is None) == (time is None):
            raise ValueError("seek needs exactly one of sequence= and time=")
        from messagevault.index import seek_position, timestamp_ms

        checkpoint = checkpoint or self._store.read_checkpoint()
        if sequence is not None:
            return seek_position(
                self._store, self.name, checkpoint, sequence=sequence, index_size=self._index_size()
            )
        assert time is not None
        return seek_position(
            self._store,
            self.name,
            checkpoint,
            timestamp=timestamp_ms(time),
            index_size=self._index_size(),
        )

    def frame_at_or_after(self, position: int, checkpoint: Checkpoint | None = None) -> int:
        """The first frame start at or after byte ``position`` that is no piece of a value.

        The committed length when there is none (``index.frame_at_or_after``).
        """
        from messagevault.index import frame_at_or_after

        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidPosition(f"position must be a non-negative integer, not {position!r}")
        checkpoint = checkpoint or self._store.read_checkpoint()
        return frame_at_or_after(self._store, self.name, checkpoint, position, self._index_size())

    def _index_size(self) -> int:
        """The index's size, asked of storage at most every ``INDEX_SIZE_TTL`` seconds.

        On Azure asking is a round trip of its own, a sixth of a seek's. Any
        size is safe for a seek: one a moment old only misses the newest
        entries, which lengthens that seek's scan a little.
        """
        now = time.monotonic()
        if self._index_size_asked is None or now - self._index_size_asked[0] > INDEX_SIZE_TTL:
            self._index_size_asked = (now, self._store.index_size())
        return self._index_size_asked[1]

    def position_of_sequence(self, sequence: int) -> int:
        """The position of message number ``sequence`` (counting from 0).

        The next sequence to be written gives the committed length. Positions
        are byte offsets, so no arithmetic leads from a sequence to its
        position: this reads the last frame's header, and for an earlier
        message walks the frame headers from the first readable one, one
        small read per frame, skipping each frame's body. A sequence trimmed
        away raises ``PositionTrimmed``.
        """
        checkpoint = self._store.read_checkpoint()
        if not isinstance(sequence, int) or not 0 <= sequence <= checkpoint.next_sequence:
            raise InvalidPosition(
                f"stream {self.name!r} has messages 0-{checkpoint.next_sequence - 1}; "
                f"there is no sequence {sequence!r}"
                if checkpoint.next_sequence
                else f"stream {self.name!r} is empty; there is no sequence {sequence!r}"
            )
        if sequence == checkpoint.next_sequence:
            return checkpoint.length
        if checkpoint.first_position == checkpoint.length:
            raise self._trimmed(None, checkpoint, sequence=sequence)
        position = checkpoint.last_frame_position
        header = read_header(self._store.read(position, MAX_HEADER_SIZE), 0, position)
        if header.is_continuation:  # the last message is a value in pieces: go to its head
            position = header.chunk
            header = read_header(self._store.read(position, MAX_HEADER_SIZE), 0, position)
        if header.base_sequence > sequence:
            first = checkpoint.first_position
            if position == first:  # the last message is the first readable one
                raise self._trimmed(None, checkpoint, sequence=sequence)
            position = first  # before the last frame: walk from the first
            while position < checkpoint.last_frame_position:
                header = read_header(self._store.read(position, MAX_HEADER_SIZE), 0, position)
                if position == first and sequence < header.base_sequence:
                    raise self._trimmed(None, checkpoint, sequence=sequence)
                if sequence < header.base_sequence + header.message_count:
                    break
                position = header.end
        index = sequence - header.base_sequence
        if not 0 <= index < header.message_count:
            raise CorruptData(
                f"stream {self.name!r}: no frame holds sequence {sequence} although "
                f"the checkpoint counts {checkpoint.next_sequence} messages",
                position=position,
            )
        return header.message_position(index)

    def header_at(self, position: int, *, committed: int | None = None) -> FrameHeader:
        """The checked header of the committed frame that starts at ``position``.

        For tools that work frame by frame (a copy checking its last frame:
        when that is a CONTINUATION, its ``chunk`` is where its value starts).
        """
        if committed is None:
            committed = self._store.read_checkpoint().length
        if not isinstance(position, int) or not 0 <= position < committed:
            raise InvalidPosition(
                f"no frame of stream {self.name!r} starts at {position!r} "
                f"(committed length {committed})"
            )
        raw = self._store.read(position, min(MAX_HEADER_SIZE, committed - position))
        header = read_header(raw, 0, position)
        if header.end > committed:
            raise CorruptData(
                f"frame at position {position} runs past the committed length {committed}",
                position=position,
            )
        return header

    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._stop.is_set() or (stop is not None and stop.is_set())

    def frame_of(self, position: int, checkpoint: Checkpoint | None = None) -> int:
        """The start of the frame holding message ``position``, checked as ``read`` checks it.

        The committed length gives itself; position 0 of a trimmed stream its
        first readable position. ``checkpoint``: the committed one, if the
        caller holds it (a writer).
        """
        if checkpoint is None:
            checkpoint = self._store.read_checkpoint()
        return self._locate(position, checkpoint.length, checkpoint.first_position)[0]

    def _start(
        self, position: int, committed: int | None, first_position: int | None
    ) -> tuple[int, int, int]:
        """Where a read from ``position`` starts: (frame position, index in frame, committed).

        ``committed`` and ``first_position`` as the caller knows them, else
        read from the checkpoint. A position that fails its checks is tried
        against a fresh checkpoint before it is refused: a trim since the
        caller's checkpoint may be why it fails.
        """
        if committed is None:
            checkpoint = self._store.read_checkpoint()
            committed, first_position = checkpoint.length, checkpoint.first_position
        known_first = first_position or 0
        try:
            return (*self._locate(position, committed, known_first), committed)
        except PositionTrimmed:
            raise
        except (InvalidPosition, CorruptData):
            if not isinstance(position, int) or not 0 <= position <= committed:
                raise
            latest = self._store.read_checkpoint()
            if position >= latest.first_position or latest.first_position <= known_first:
                raise
            located = self._locate(position, latest.length, latest.first_position)
            return (*located, latest.length)

    def _trimmed(
        self, position: int | None, checkpoint: Checkpoint, *, sequence: int | None = None
    ) -> PositionTrimmed:
        """The error for a read below ``checkpoint``'s first readable position."""
        first = checkpoint.first_position
        where = f"position {first}"
        if first < checkpoint.length:
            try:  # one small read names the first readable sequence too
                raw = self._store.read(first, min(MAX_HEADER_SIZE, checkpoint.length - first))
                where += f" (sequence {read_header(raw, 0, first).base_sequence})"
            except CorruptData:
                pass  # trimmed again meanwhile: the position alone
        else:
            where += f" (sequence {checkpoint.next_sequence}, the next to be written)"
        asked = f"sequence {sequence}" if sequence is not None else f"position {position}"
        return PositionTrimmed(
            f"stream {self.name!r} was trimmed: its first readable message is at {where}; "
            f"{asked} is gone",
            first_position=first,
        )

    def _overtaken(self, frames: Iterator[T], start: int) -> Iterator[T]:
        """``frames``, but a scan a trim overtook raises ``PositionTrimmed``, not ``CorruptData``.

        Released bytes read as zeros: a scan that met them where its
        checkpoint promised frames was overtaken if the stream now starts
        past the damage.
        """
        try:
            yield from frames
        except CorruptData as exc:
            trimmed = self._trimmed_since(exc, start)
            if trimmed is None:
                raise
            raise trimmed from exc

    def _trimmed_since(self, exc: CorruptData, start: int) -> PositionTrimmed | None:
        """``PositionTrimmed`` if a trim since a scan from ``start`` began explains ``exc``."""
        where = start if exc.position is None else exc.position
        checkpoint = self._store.read_checkpoint()
        if where >= checkpoint.first_position:
            return None
        return self._trimmed(where, checkpoint)

    def _locate(self, position: int, committed: int, first_position: int = 0) -> tuple[int, int]:
        """Map a message position to (frame position, index in frame), or raise.

        Position 0 of a trimmed stream is its first readable position; any
        other below that is gone (``PositionTrimmed``).
        """
        if not isinstance(position, int) or position < 0:
            raise InvalidPosition(f"position must be a non-negative integer, not {position!r}")
        if position < first_position:
            if position == 0:
                return first_position, 0
            raise self._trimmed(position, self._store.read_checkpoint())
        if position > committed:
            raise InvalidPosition(
                f"position {position} is beyond the end of stream {self.name!r} "
                f"(committed length {committed})"
            )
        if position == committed:
            return position, 0
        not_a_message = InvalidPosition(
            f"position {position} is not the position of a message in stream {self.name!r}"
        )
        raw = self._store.read(position, min(MAX_HEADER_SIZE, committed - position))
        try:
            header = read_header(raw, 0, position)
        except CorruptData:
            pass
        else:
            if header.end <= committed:
                check_continuation_start(header, self.name)
                return position, 0  # the start of a frame: message 0 of it
        if len(raw) < SLOT_SIZE:
            raise not_a_message
        index = slot_index(raw[:SLOT_SIZE], position)
        if index < 1:
            raise not_a_message
        frame_position = self._frame_of_slot(position, index, committed)
        if frame_position is None:
            raise not_a_message
        return frame_position, index

    def _frame_of_slot(self, position: int, index: int, committed: int) -> int | None:
        """The frame whose message ``index`` is at ``position``, if one is.

        A v2 header is 32 bytes longer than a v1 one, so the frame starts at
        one of two offsets; one read covers both candidate headers.
        """
        v1_start = position - FRAME_HEADER_SIZE - SLOT_SIZE * index
        if v1_start < 0:
            return None
        low = max(position - MAX_HEADER_SIZE - SLOT_SIZE * index, 0)
        window = self._store.read(low, v1_start + FRAME_HEADER_SIZE - low)
        for header_size in (FRAME_HEADER_SIZE, MAX_HEADER_SIZE):
            frame_position = position - header_size - SLOT_SIZE * index
            if frame_position < 0:
                continue
            try:
                header = read_header(window, frame_position - low, frame_position)
            except CorruptData:
                continue
            if (
                header.header_size == header_size
                and index < header.message_count
                and header.end <= committed
            ):
                return frame_position
        return None

    def _frames(
        self, position: int, first: int, end: int, max_bytes: int | None = None
    ) -> Iterator[Iterator[Message]]:
        """Check the frames from ``position`` (a frame start) to ``end``; one iterator each.

        A value in pieces comes out whole, as one message, once its last
        CONTINUATION frame has been read. With ``max_bytes``, see ``read``.
        """
        assembler = FrameAssembler(first)
        taken = 0  # value bytes of the frames fed so far (a value in pieces: all of it)
        for buffer, offset, header in self._raw_frames(position, end):
            if max_bytes is not None and not header.is_continuation:
                size = header.chunk if header.is_head else header.values_size
                # Resumed here, the caller took every message fed before.
                if taken and taken + size > max_bytes:
                    return
                taken += size or 1  # an empty value still counts as a message read
            yield assembler.feed(buffer, offset, header)
        if assembler.pending:
            raise CorruptData(
                f"stream {self.name!r} ends at {end} inside a value in pieces", position=end
            )

    def read_frames(
        self,
        position: int = 0,
        *,
        max_bytes: int = DEFAULT_CHUNK_SIZE,
        max_messages: int | None = None,
        committed: int | None = None,
        first_position: int | None = None,
    ) -> RawFrames:
        """Whole committed frames from ``position``, as stored, each checked.

        For relaying a stream without decoding it (the server's binary read
        route): at least one frame, then more while they fit ``max_bytes``
        and, with ``max_messages``, until they hold that many messages from
        ``position`` on. If ``position`` is inside a frame, that frame comes
        whole and ``skip`` says how many of its leading messages the caller
        did not ask for. A value in pieces comes with all its frames, even
        past ``max_bytes``. ``committed``, ``first_position`` and trimmed
        positions are as for ``read``.
        """
        frame_position, skip, committed = self._start(position, committed, first_position)
        pieces: list[bytes] = []
        size = 0
        wanted = -skip  # messages from ``position`` on, so far
        end = frame_position
        # Without a message limit the answer is max_bytes of frames: from
        # remote storage, read them in one round trip rather than chunk by
        # chunk. (Locally, one big read measured slower than chunks: 0.57 s
        # against 0.31 s for 116 MB.)
        bulk = max_messages is None and _is_remote(self._store)
        chunk_size = max(self._chunk_size, max_bytes) if bulk else None
        missing = 0  # bytes of a value in pieces still to come: its frames go together
        raw_frames = self._raw_frames(frame_position, committed, chunk_size)
        frames = self._overtaken(raw_frames, frame_position)
        for buffer, offset, header in frames:
            if pieces and not missing and size + header.frame_size > max_bytes:
                break
            try:
                verify_frame(buffer, offset, header.base_position)
            except CorruptData as exc:  # bytes released as they were read
                trimmed = self._trimmed_since(exc, frame_position)
                if trimmed is None:
                    raise
                raise trimmed from exc
            pieces.append(buffer[offset : offset + header.frame_size])
            size += header.frame_size
            wanted += header.message_count
            end = header.end
            if header.is_head:
                missing = header.chunk
            if header.is_head or header.is_continuation:
                missing -= header.values_size
            if max_messages is not None and wanted >= max_messages and not missing:
                break  # before the next frame is fetched
        return RawFrames(b"".join(pieces), skip, end)

    def verify(
        self, position: int = 0, *, progress: Callable[[int, int], None] | None = None
    ) -> VerifyReport:
        """Check every frame's CRCs and columns from ``position`` to the committed end.

        Raises ``CorruptData`` naming the first bad position. ``progress(done,
        total)``, in bytes, is called after each frame.
        """
        committed = self._store.read_checkpoint()
        frame_position, _ = self._locate(position, committed.length, committed.first_position)
        frames = messages = 0
        last: FrameHeader | None = None
        # A value in pieces is checked by joining it as a reader would: its
        # pieces must follow their head and add up (and unpack, if compressed).
        pieces = FrameAssembler()
        raw_frames = self._raw_frames(frame_position, committed.length)
        for buffer, offset, header in self._overtaken(raw_frames, frame_position):
            if header.is_head or header.is_continuation or pieces.pending:
                for _ in pieces.feed(buffer, offset, header):
                    pass
            else:
                verify_frame(buffer, offset, header.base_position)
            frames += 1
            messages += header.message_count
            last = header
            if progress is not None:
                progress(header.end - frame_position, committed.length - frame_position)
        if pieces.pending:
            raise CorruptData(
                f"stream {self.name!r} ends at {committed.length} inside a value in pieces",
                position=committed.length,
            )
        if (
            last is not None
            and position == 0
            and last.base_sequence + last.message_count != committed.next_sequence
        ):
            raise CorruptData(
                f"stream {self.name!r} holds {last.base_sequence + last.message_count} messages "
                f"but its checkpoint says {committed.next_sequence}",
                position=last.base_position,
            )
        return VerifyReport(frames, messages, committed.length - frame_position)

    def _raw_frames(
        self, position: int, end: int, chunk_size: int | None = None
    ) -> Iterator[tuple[bytes, int, FrameHeader]]:
        """Yield (buffer, offset, checked header) for each whole frame up to ``end``.

        Storage is read ``chunk_size`` bytes at a time (default: the reader's).
        """
        chunk_size = chunk_size or self._chunk_size
        read_ahead = _ReadAhead(self._store, chunk_size, end) if self._read_ahead else None
        buffer = b""
        buffer_start = position

        def holding(needed: int) -> int:
            """Make ``buffer`` hold ``needed`` bytes from ``position``; return their offset."""
            nonlocal buffer, buffer_start
            offset = position - buffer_start
            if len(buffer) - offset >= needed:
                return offset
            if read_ahead is None:
                buffer = self._refill(position, needed, end, chunk_size)
            else:
                buffer = read_ahead.refill(buffer[offset:], position, needed)
            buffer_start = position
            self._check_filled(buffer, position, needed, end)
            return 0

        try:
            while position < end:
                # A v2 header is longer than a v1 one; the last frame may be shorter than either.
                offset = holding(min(MAX_HEADER_SIZE, end - position))  # ``buffer`` may change
                header = read_header(buffer, offset, position)
                if header.end > end:
                    raise CorruptData(
                        f"frame at position {position} runs past the committed length {end}",
                        position=position,
                    )
                offset = holding(header.frame_size)
                yield buffer, offset, header
                position = header.end
        finally:
            if read_ahead is not None:
                read_ahead.close()

    def _refill(self, position: int, needed: int, end: int, chunk_size: int) -> bytes:
        """A buffer starting at ``position`` that should hold ``needed`` bytes (local storage).

        The partial frame at the end of the old buffer is read again rather
        than joined to the new chunk: that rereads part of a frame instead of
        copying a whole chunk. A little over a chunk is read, so that a frame
        holding a 4 MiB piece of a large value (its header, key and columns
        besides) comes whole in the read that finds its header, not twice.
        """
        size = max(chunk_size + _PIECE_FRAME_SLACK, needed)
        return self._store.read(position, min(size, end - position))

    def _check_filled(self, buffer: bytes, position: int, needed: int, end: int) -> None:
        if len(buffer) < needed:
            raise CorruptData(
                f"stream {self.name!r} ends at {position + len(buffer)}, inside the frame at "
                f"{position}, although the checkpoint says {end}",
                position=position,
            )

    def close(self) -> None:
        """Stop any ``follow`` loop and release the storage handle."""
        self._stop.set()
        self._store.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
