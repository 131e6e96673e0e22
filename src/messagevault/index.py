"""Seeking by sequence and by time from storage alone: the sparse index and the checked scan.

Positions are byte offsets, so nothing computes where message #N or "the
first message after 14:00" is. Each stream keeps a small **index object**
beside its data (docs/FORMAT.md, "Index"): a header, then fixed-size entries
``(position, sequence, timestamp)`` of frames at most ``every_bytes`` bytes or
``every_frames`` frames apart, in stream order. A seek binary-searches the
entries (a few small reads), then walks frame headers from the entry it
found (one bounded scan, reading windows and hopping by ``frame_size``).

The index is derived data with no commit protocol. The writer appends
entries behind its commits (``Indexer``), so it may lag the checkpoint; a
crash may tear or lose its tail; it may be missing altogether (streams
written before it existed). None of that can give a wrong answer: a seek
starts only from an entry whose frame header it has read and found to
agree, and otherwise scans from the first readable position; every answer
comes from the frame headers themselves. The writer checks the index's tail
when it opens and rebuilds what is missing or wrong in the background.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    CorruptData,
    InvalidPosition,
    MessageVaultError,
    PositionTrimmed,
    StaleWriter,
)
from messagevault.format import MAX_HEADER_SIZE, FrameHeader, read_header
from messagevault.storage.base import StreamStore

log = logging.getLogger("messagevault.index")

INDEX_MAGIC: Final = b"MVIX"
INDEX_VERSION: Final = 1
INDEX_HEADER: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVIX"
    "B"  # format version, 1
    "3x"  # reserved, zero
    "I"  # entry size, 32: lets a later version grow the entries
    "I"  # every_bytes the writer used (informational: bounds a seek's scan)
    "I"  # every_frames the writer used (informational)
    "40x"  # reserved, zero
)
INDEX_HEADER_SIZE: Final = INDEX_HEADER.size + 4  # and a CRC-32 of the bytes before it
ENTRY: Final = struct.Struct(
    "<"
    "Q"  # position: a frame's stream offset (never a CONTINUATION frame)
    "Q"  # sequence: that frame's base_sequence
    "Q"  # timestamp: that frame's timestamp, ms
    "4x"  # reserved, zero
)
ENTRY_SIZE: Final = ENTRY.size + 4  # and a CRC-32 of the bytes before it
_CRC: Final = struct.Struct("<I")

assert INDEX_HEADER_SIZE == 64
assert ENTRY_SIZE == 32

# An entry per scan window: a seek then reads about one window of frame
# headers (1 MiB spacing measured four reads a seek). The index costs 128
# bytes per MiB of stream.
DEFAULT_EVERY_BYTES: Final = 256 * 1024
DEFAULT_EVERY_FRAMES: Final = 1024
DEFAULT_FLUSH_INTERVAL: Final = 1.0
# Entries waiting beyond this are written at once, whatever the interval.
_FLUSH_ENTRIES: Final = 256
# A seek reads the index in blocks: 128 entries a block locally; remote reads
# are round trips, so 512 (the binary search then ends two probes sooner).
_BLOCK = 4096
_REMOTE_BLOCK = 16384
# What one scan reads at a time: a frame header needs 96 bytes, but remote
# reads cost a round trip each, so the scan reads generous windows; after a
# frame larger than a window it reads just enough for the next header.
SCAN_WINDOW: Final = 256 * 1024
_HOP_WINDOW: Final = 4096
# A writer catches up on a lagging index while it opens when the lag is at
# most this; beyond it (a stream from before the index, a rebuild) a thread
# builds it while the writer appends.
_CATCH_UP_AT_OPEN: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IndexPolicy:
    """How densely a writer indexes: an entry once either bound is reached."""

    every_bytes: int = DEFAULT_EVERY_BYTES
    every_frames: int = DEFAULT_EVERY_FRAMES
    flush_interval: float = DEFAULT_FLUSH_INTERVAL

    def __post_init__(self) -> None:
        if not 1 <= self.every_bytes <= 2**32 - 1 or not 1 <= self.every_frames <= 2**32 - 1:
            raise ValueError("every_bytes and every_frames must be 1 to 2**32-1")
        if not self.flush_interval >= 0:
            raise ValueError("flush_interval must be >= 0")


DEFAULT_INDEX_POLICY: Final = IndexPolicy()


class IndexEntry(NamedTuple):
    position: int
    sequence: int
    timestamp: int

    def encode(self) -> bytes:
        body = ENTRY.pack(*self)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def of(cls, header: FrameHeader) -> IndexEntry:
        return cls(header.base_position, header.base_sequence, header.timestamp)


def encode_index_header(policy: IndexPolicy) -> bytes:
    body = INDEX_HEADER.pack(
        INDEX_MAGIC, INDEX_VERSION, ENTRY_SIZE, policy.every_bytes, policy.every_frames
    )
    return body + _CRC.pack(zlib.crc32(body))


def index_header_problem(raw: bytes | memoryview) -> str | None:
    """Why ``raw`` is no index header this version reads; None when it is one."""
    if len(raw) < INDEX_HEADER_SIZE:
        return f"index header is {len(raw)} bytes, expected {INDEX_HEADER_SIZE}"
    magic, version, entry_size, _, _ = INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        return f"not an index (magic {bytes(magic)!r})"
    if zlib.crc32(memoryview(raw)[: INDEX_HEADER.size]) != _CRC.unpack_from(raw, 60)[0]:
        return "index header CRC mismatch"
    if version != INDEX_VERSION or entry_size != ENTRY_SIZE:
        return f"index format version {version} (entries of {entry_size} bytes)"
    return None


def decode_entry(raw: bytes | memoryview, offset: int = 0) -> IndexEntry | None:
    """The entry at ``offset``; None for one never written (zeros), torn or damaged."""
    if len(raw) - offset < ENTRY_SIZE:
        return None
    (stored,) = _CRC.unpack_from(raw, offset + ENTRY.size)
    if zlib.crc32(memoryview(raw)[offset : offset + ENTRY.size]) != stored:
        return None
    return IndexEntry._make(ENTRY.unpack_from(raw, offset))


def entry_offset(slot: int) -> int:
    return INDEX_HEADER_SIZE + ENTRY_SIZE * slot


def timestamp_ms(when: datetime | float) -> int:
    """``when`` (an aware ``datetime`` or Unix seconds) in whole ms, rounded up.

    Rounded up because a seek looks for the first message *at or after*
    ``when``, and message timestamps are whole milliseconds.
    """
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(
                f"time {when.isoformat()} has no time zone: give an aware datetime (UTC, say)"
            )
        seconds = when.timestamp()
    elif isinstance(when, int | float) and not isinstance(when, bool) and math.isfinite(when):
        seconds = float(when)
    else:
        raise ValueError(f"time must be an aware datetime or Unix seconds, not {when!r}")
    return max(0, math.ceil(round(seconds * 1000, 3)))


# --- seeking ---------------------------------------------------------------------


def seek_position(
    store: StreamStore,
    name: str,
    checkpoint: Checkpoint,
    *,
    sequence: int | None = None,
    timestamp: int | None = None,
    index_size: int | None = None,
) -> int:
    """Where message ``sequence`` is, or the first message at or after ``timestamp`` (ms).

    The answer is always read off frame headers: the index only says where
    to start reading them, and a start is used only once its frame header
    agrees with its entry.
    """
    if (sequence is None) == (timestamp is None):
        raise ValueError("seek needs exactly one of sequence and timestamp")
    if sequence is not None:
        _check_sequence(name, checkpoint, sequence)
        if sequence == checkpoint.next_sequence:
            return checkpoint.length
    elif not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError(f"timestamp must be non-negative milliseconds, not {timestamp!r}")
    if checkpoint.first_position >= checkpoint.length:
        if sequence is not None:  # all trimmed: no sequence below next_sequence is left
            raise _trimmed(name, checkpoint, checkpoint.next_sequence, sequence)
        return checkpoint.length
    # Start from the last entry at or before the target: for a sequence, at or
    # below it; for a time, strictly before it (the first message at that time
    # may sit in an earlier frame than an entry stamped with that very time).
    walk = _HeaderWalk(store, name, checkpoint.length)
    if sequence is not None:
        entry = _search(store, checkpoint, lambda e: e.sequence <= sequence, index_size)
        start = _checked_start(walk, name, checkpoint, entry)
        return _scan_for_sequence(walk, name, checkpoint, start, sequence)
    assert timestamp is not None
    entry = _search(store, checkpoint, lambda e: e.timestamp < timestamp, index_size)
    start = _checked_start(walk, name, checkpoint, entry)
    for header in walk.headers(start):
        if not header.is_continuation and header.timestamp >= timestamp:
            return header.base_position
    return checkpoint.length


def _scan_for_sequence(
    walk: _HeaderWalk, name: str, checkpoint: Checkpoint, start: int, sequence: int
) -> int:
    for header in walk.headers(start):
        if header.is_continuation:
            continue
        if sequence < header.base_sequence:
            # Only the first readable frame can start past the target: the scan
            # starts at or below it otherwise.
            raise _trimmed(name, checkpoint, header.base_sequence, sequence)
        if sequence < header.base_sequence + header.message_count:
            return header.message_position(sequence - header.base_sequence)
    raise CorruptData(
        f"stream {name!r}: no frame holds sequence {sequence} although the checkpoint "
        f"counts {checkpoint.next_sequence} messages",
        position=checkpoint.length,
    )


def frame_at_or_after(
    store: StreamStore,
    name: str,
    checkpoint: Checkpoint,
    position: int,
    index_size: int | None = None,
) -> int:
    """The first frame start at or after byte ``position`` that is no piece of a value.

    The committed length when there is none; the first readable position for
    any ``position`` below it. Retention by size asks this: where whole
    frames start once the bytes before ``position`` go. The same search as a
    seek, on positions: O(log n) index reads and one bounded scan.
    """
    if position >= checkpoint.length:
        return checkpoint.length
    if position <= checkpoint.first_position:
        return checkpoint.first_position
    walk = _HeaderWalk(store, name, checkpoint.length)
    entry = _search(store, checkpoint, lambda e: e.position <= position, index_size)
    for header in walk.headers(_checked_start(walk, name, checkpoint, entry)):
        if header.base_position >= position and not header.is_continuation:
            return header.base_position
    return checkpoint.length


def _trimmed(name: str, checkpoint: Checkpoint, first_sequence: int, asked: int) -> PositionTrimmed:
    return PositionTrimmed(
        f"stream {name!r} was trimmed: its first readable message is sequence "
        f"{first_sequence} at position {checkpoint.first_position}; sequence {asked} is gone",
        first_position=checkpoint.first_position,
    )


def _check_sequence(name: str, checkpoint: Checkpoint, sequence: object) -> None:
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise InvalidPosition(f"sequence must be a non-negative integer, not {sequence!r}")
    if sequence > checkpoint.next_sequence:
        raise InvalidPosition(
            f"stream {name!r} has messages up to sequence {checkpoint.next_sequence - 1}; "
            f"there is no sequence {sequence} yet"
            if checkpoint.next_sequence
            else f"stream {name!r} is empty; there is no sequence {sequence} yet"
        )


def _checked_start(
    walk: _HeaderWalk, name: str, checkpoint: Checkpoint, entry: IndexEntry | None
) -> int:
    """Where the scan starts: ``entry``'s frame if its header agrees, else the first readable."""
    if entry is None or entry.position <= checkpoint.first_position:
        return checkpoint.first_position
    try:
        header = walk.header(entry.position)
    except CorruptData:
        header = None
    if header is None or header.is_continuation or IndexEntry.of(header) != entry:
        log.warning(
            "index of stream %r disagrees with its frames at position %d: scanning from "
            "the first readable position instead (`messagevault index %s --rebuild` mends it)",
            name,
            entry.position,
            name,
            extra={"stream": name},
        )
        return checkpoint.first_position
    return entry.position


class _Blocks:
    """The index object read in aligned blocks, each at most once per seek."""

    def __init__(self, store: StreamStore, size: int) -> None:
        self._store = store
        self._size = size
        self._block = _REMOTE_BLOCK if getattr(store, "remote", False) else _BLOCK
        self._cache: dict[int, bytes] = {}

    def read(self, offset: int, size: int) -> bytes:
        first, last = offset // self._block, (offset + size - 1) // self._block
        parts = [self._load(number) for number in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * self._block
        return joined[start : start + size]

    def _load(self, number: int) -> bytes:
        block = self._cache.get(number)
        if block is None:
            at = number * self._block
            block = self._store.read_index(at, min(self._block, self._size - at))
            self._cache[number] = block
        return block


def _search(
    store: StreamStore,
    checkpoint: Checkpoint,
    at_or_before: Callable[[IndexEntry], bool],
    size: int | None = None,
) -> IndexEntry | None:
    """The last entry for which ``at_or_before`` holds, or None (no index, none holds).

    A binary search over the entry slots. Slots that hold no valid entry
    (zeros past the end, a torn tail, damage) or an entry past the committed
    length count as "after the target", so the search only ever moves
    towards the start past them: damage costs a longer scan, not a wrong
    start, and the start is checked against its frame header anyway.
    ``size``: the index's size when the caller knows it; any size is safe
    (too small: newer entries unseen, a longer scan; too large: slots past
    the end read as nothing).
    """
    if size is None:
        size = store.index_size()
    slots = (size - INDEX_HEADER_SIZE) // ENTRY_SIZE
    if slots <= 0:
        return None
    blocks = _Blocks(store, size)
    if index_header_problem(blocks.read(0, INDEX_HEADER_SIZE)) is not None:
        return None
    best: IndexEntry | None = None
    low, high = 0, slots  # the answer's slot is in [low, high)
    while low < high:
        middle = (low + high) // 2
        entry = decode_entry(blocks.read(entry_offset(middle), ENTRY_SIZE))
        if entry is not None and entry.position < checkpoint.length and at_or_before(entry):
            if best is None or entry.position > best.position:
                best = entry
            low = middle + 1
        else:
            high = middle
    return best


class _HeaderWalk:
    """Checked frame headers from a frame start up to ``end``, read in windows."""

    def __init__(self, store: StreamStore, name: str, end: int) -> None:
        self._store = store
        self._name = name
        self._end = end
        self._window = b""
        self._window_at = 0
        self.reads = 0

    def headers(self, position: int) -> Iterator[FrameHeader]:
        while position < self._end:
            header = self.header(position)
            yield header
            position = header.end

    def header(self, position: int) -> FrameHeader:
        offset = position - self._window_at
        if offset < 0 or offset + min(MAX_HEADER_SIZE, self._end - position) > len(self._window):
            # Past a frame larger than a window, the next header is all that is wanted.
            jumped = offset - len(self._window) >= 0 and self._window
            size = _HOP_WINDOW if jumped and offset > SCAN_WINDOW else SCAN_WINDOW
            self._window = self._store.read(position, min(size, self._end - position))
            self._window_at, offset = position, 0
            self.reads += 1
        header = read_header(self._window, offset, position)
        if header.end > self._end:
            raise CorruptData(
                f"stream {self._name!r}: frame at {position} runs past the committed "
                f"length {self._end}",
                position=position,
            )
        return header


# --- writing -----------------------------------------------------------------------


class IndexStatus(NamedTuple):
    entries: int  # entries stored (written and flushed)
    pending: int  # entries noted, not yet written
    indexed_to: int  # the position up to which frames have been considered
    building: bool  # a background build is catching up


class Indexer:
    """Keeps a stream's index behind its writer: the writer notes commits, this adds entries.

    Not on the commit's path: ``note`` (called as a commit lands) only
    compares a few integers and sometimes appends an entry to a list; the
    entries are written by ``flush_if_due``, which the writer's owner calls
    once a commit has been answered (the group committer does), at most every
    ``flush_interval`` seconds. When the stored index lags the stream by
    more than a little at open (a stream from before the index, a lost
    index), a thread builds the missing part by walking frame headers, while
    the writer carries on; new commits are indexed once it has caught up.
    Writes of the index object happen only in the writer's thread, as the
    store's handle requires; the building thread only reads frames.
    """

    def __init__(
        self,
        store: StreamStore,
        name: str,
        checkpoint: Checkpoint,
        policy: IndexPolicy | None = None,
        *,
        rebuild: bool = False,
    ) -> None:
        self._store = store
        self._name = name
        self.policy = policy or IndexPolicy()
        self._page = max(1, store.page_size)
        self._lock = threading.Lock()
        self._pending: list[IndexEntry] = []
        self._count = 0  # entries stored
        self._tail = b""  # the stored bytes of the last, partly filled page (page backends)
        self._last: IndexEntry | None = None
        self._frames_since = 0
        self._committed = checkpoint.length
        self._next = checkpoint.length  # where the next noted batch must start
        self._live = True
        self._flushed_at = time.monotonic()
        self._stopping = threading.Event()
        self._builder: threading.Thread | None = None
        self._failed = False
        self.problem: str | None = None  # why the stored index was set aside, if it was
        resume = self._open(checkpoint, rebuild)
        if resume is not None and resume < checkpoint.length:
            self._live = False
            self._next = resume
            if checkpoint.length - resume <= _CATCH_UP_AT_OPEN:
                self._catch_up(resume)
            else:
                self._builder = threading.Thread(
                    target=self._build, args=(resume,), name=f"index-{name}", daemon=True
                )
                self._builder.start()

    def _open(self, checkpoint: Checkpoint, rebuild: bool) -> int | None:
        """Check the stored index; where indexing resumes (None: nothing to index)."""
        size = self._store.index_size()
        start = checkpoint.first_position
        if size == 0 or rebuild:
            if size:
                self._store.truncate_index(0)
            return start if start < checkpoint.length else None
        problem = index_header_problem(self._store.read_index(0, INDEX_HEADER_SIZE))
        last_slot = None
        if problem is None:
            last_slot, problem = self._last_good(size, checkpoint)
        if problem is not None or last_slot is None:
            self.problem = problem or "no entry is readable"
            log.warning(
                "index of stream %r set aside (%s): rebuilding it",
                self._name,
                self.problem,
                extra={"stream": self._name},
            )
            self._store.truncate_index(0)
            return start if start < checkpoint.length else None
        self._count = last_slot + 1
        end = entry_offset(self._count)
        kept = -(-end // self._page) * self._page
        if size > kept:
            self._store.truncate_index(kept)  # what follows the last good entry goes
        page_start = end - end % self._page
        self._tail = self._store.read_index(page_start, end - page_start) if self._page > 1 else b""
        assert self._last is not None
        # Entries below a trim point stay (harmless: seeks start at or above
        # it) but the frames there are gone: go on from the first readable one.
        return max(self._last.position, checkpoint.first_position)

    def _last_good(self, size: int, checkpoint: Checkpoint) -> tuple[int | None, str | None]:
        """The last stored entry that agrees with its frame, or why none does."""
        slots = self._written_slots(size)
        if slots <= 0:
            return None, "no entries"
        first_slot = max(0, slots - 128)
        raw = self._store.read_index(entry_offset(first_slot), (slots - first_slot) * ENTRY_SIZE)
        for slot in range(slots - 1, first_slot - 1, -1):
            entry = decode_entry(raw, (slot - first_slot) * ENTRY_SIZE)
            if entry is None or entry.position >= checkpoint.length:
                continue  # zeros past the end, a torn tail, or ahead of a lagging checkpoint
            if entry.position < checkpoint.first_position:
                self._last = entry  # trimmed away: indexing goes on from the first readable
                self._frames_since = 0
                return slot, None
            try:
                window = self._store.read(entry.position, MAX_HEADER_SIZE)
                header = read_header(window, 0, entry.position)
            except CorruptData as exc:
                return None, f"entry for position {entry.position}: {exc}"
            if header.is_continuation or IndexEntry.of(header) != entry:
                return None, f"entry for position {entry.position} disagrees with its frame"
            self._last = entry
            self._frames_since = 0
            return slot, None
        return None, f"none of the last {slots - first_slot} entries is readable"

    def _written_slots(self, size: int) -> int:
        """Slots up to the last one not all zeros: page storage pads the object with zeros.

        Entries are written in order from slot 0, so written slots come first
        and zeros after them: a binary search finds the boundary in
        log2(slots) small reads (none more when the last slot is written, as
        on file storage, whose index ends where its entries do).
        """
        slots = (size - INDEX_HEADER_SIZE) // ENTRY_SIZE
        low, high = 0, slots  # the first slot of the zero tail is in [low, high]
        while low < high:
            probe = high - 1 if high == slots and low == 0 else (low + high) // 2
            raw = self._store.read_index(entry_offset(probe), ENTRY_SIZE)
            if any(raw):
                low = probe + 1
            else:
                high = probe
        return low

    # The writer's side.

    def note(self, batches: list[tuple[int, int, int, int]], length: int) -> None:
        """A commit landed: ``(position, sequence, timestamp, frames)`` per batch; the length."""
        with self._lock:
            self._committed = length
            if not self._live or self._failed:
                return
            if batches and batches[0][0] != self._next:
                return  # not contiguous (cannot happen): leave the rest to the next open
            for position, sequence, timestamp, frames in batches:
                self._consider(position, sequence, timestamp, frames)
            self._next = length

    def note_headers(self, headers: list[FrameHeader], length: int) -> None:
        """A commit of whole frames landed (a replica's copy)."""
        self.note(
            [
                (h.base_position, h.base_sequence, h.timestamp, 1)
                for h in headers
                if not h.is_continuation
            ],
            length,
        )

    def _consider(self, position: int, sequence: int, timestamp: int, frames: int) -> None:
        last = self._last
        if (
            last is None
            or position - last.position >= self.policy.every_bytes
            or self._frames_since >= self.policy.every_frames
        ):
            entry = IndexEntry(position, sequence, timestamp)
            self._pending.append(entry)
            self._last = entry
            self._frames_since = frames
        else:
            self._frames_since += frames

    @property
    def flush_due(self) -> bool:
        pending = len(self._pending)
        return bool(pending) and (
            pending >= _FLUSH_ENTRIES
            or time.monotonic() - self._flushed_at >= self.policy.flush_interval
        )

    def flush_due_in(self) -> float | None:
        """Seconds until ``flush_due``; None while no entry waits."""
        if not self._pending:
            return None
        return self._flushed_at + self.policy.flush_interval - time.monotonic()

    def flush_if_due(self) -> None:
        if self.flush_due:
            self.flush()

    def flush(self) -> None:
        """Write the entries noted so far (in the writer's thread); a failure is logged."""
        with self._lock:
            entries, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        if not entries or self._failed:
            return
        data = b"".join(entry.encode() for entry in entries)
        offset = entry_offset(self._count)
        if self._count == 0:
            data = encode_index_header(self.policy) + data
            offset = 0
        start = offset - len(self._tail)
        payload = self._tail + data
        end = start + len(payload)
        padded = payload + bytes(-len(payload) % self._page)
        try:
            step = max(self._page, self._store.max_write_size // self._page * self._page)
            for at in range(0, len(padded), step):
                self._store.write_index(start + at, memoryview(padded)[at : at + step])
        except StaleWriter:
            self._failed = True  # deposed: the next writer keeps the index
            return
        except MessageVaultError as exc:
            log.warning(
                "index of stream %r not written (%s): it will be rebuilt from the frames",
                self._name,
                exc,
                extra={"stream": self._name},
            )
            self._failed = True
            return
        self._count += len(entries)
        self._tail = payload[len(payload) - end % self._page :] if self._page > 1 else b""

    def status(self) -> IndexStatus:
        with self._lock:
            return IndexStatus(self._count, len(self._pending), self._next, not self._live)

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait for a background build to catch up; whether it has."""
        if self._builder is not None:
            self._builder.join(timeout)
        return self._live

    def close(self, *, flush: bool = True) -> None:
        """Stop a build in progress and write what is noted (``flush``)."""
        self._stopping.set()
        if self._builder is not None:
            self._builder.join()
        if flush:
            self.flush()

    # Catching up by reading frames.

    def _build(self, position: int) -> None:
        try:
            self._catch_up(position)
        except BaseException as exc:  # noqa: BLE001 - a thread's last word: logged, never raised
            # Whatever stops it (storage gone, the store closed under it, the
            # process dying: tests' simulated power cuts raise BaseException
            # in every thread), a build only ever saves seeks time.
            if not self._stopping.is_set():
                log.warning(
                    "index of stream %r not built (%s): seeks scan meanwhile",
                    self._name,
                    exc,
                    extra={"stream": self._name},
                )

    def _catch_up(self, position: int) -> None:
        """Consider every frame from ``position`` (a frame start) up to the committed length.

        The length moves while appends go on; once the walk has reached it,
        under the lock that ``note`` takes, new commits are noted directly.
        The frame at ``position`` itself is the last entry's (when resuming)
        and is considered again only when there is no entry yet.
        """
        resuming = self._last is not None and self._last.position == position
        while not self._stopping.is_set():
            with self._lock:
                target = self._committed
                if position >= target:
                    self._live = True
                    self._next = position
                    return
            walk = _HeaderWalk(self._store, self._name, target)
            for header in walk.headers(position):
                if self._stopping.is_set():
                    return
                if resuming:  # the last entry's own frame
                    resuming = False
                    with self._lock:
                        self._frames_since = 1
                elif header.is_continuation:
                    with self._lock:
                        self._frames_since += 1
                else:
                    with self._lock:
                        self._consider(*IndexEntry.of(header), 1)
                position = header.end
