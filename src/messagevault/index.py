"""Seeking by sequence and by time: the stream's sparse index, and the scan that checks it.

(Work in progress: the index object itself lands next; until then a seek
walks the frame headers from the first readable position.)
"""

from __future__ import annotations

import math
from datetime import datetime

from messagevault.checkpoint import Checkpoint
from messagevault.errors import CorruptData, InvalidPosition, PositionTrimmed
from messagevault.format import MAX_HEADER_SIZE, FrameHeader, read_header
from messagevault.storage.base import StreamStore

# What one scan reads at a time: a frame header needs 96 bytes, but on remote
# storage every read is a round trip, so a scan reads generous windows.
SCAN_WINDOW = 256 * 1024


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


def seek_position(
    store: StreamStore,
    name: str,
    checkpoint: Checkpoint,
    *,
    sequence: int | None = None,
    timestamp: int | None = None,
) -> int:
    """Where message ``sequence``, or the first message at or after ``timestamp`` (ms), is."""
    if sequence is not None:
        _check_sequence(name, checkpoint, sequence)
        if sequence == checkpoint.next_sequence:
            return checkpoint.length
    walker = _HeaderWalk(store, name, checkpoint)
    first = walker.first_header()
    if sequence is not None and first is not None and sequence < first.base_sequence:
        raise PositionTrimmed(
            f"stream {name!r} was trimmed: its first readable message is sequence "
            f"{first.base_sequence} at position {checkpoint.first_position}; "
            f"sequence {sequence} is gone",
            first_position=checkpoint.first_position,
        )
    for header in walker.headers(checkpoint.first_position):
        if header.is_continuation:
            continue
        if sequence is not None and sequence < header.base_sequence + header.message_count:
            return header.message_position(sequence - header.base_sequence)
        if timestamp is not None and header.timestamp >= timestamp:
            return header.base_position
    if sequence is not None:
        raise CorruptData(
            f"stream {name!r}: no frame holds sequence {sequence} although the checkpoint "
            f"counts {checkpoint.next_sequence} messages",
            position=checkpoint.length,
        )
    return checkpoint.length


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


class _HeaderWalk:
    """Frame headers from a frame start to the committed length, read in windows."""

    def __init__(self, store: StreamStore, name: str, checkpoint: Checkpoint) -> None:
        self._store = store
        self._name = name
        self._end = checkpoint.length
        self._first = checkpoint.first_position
        self._window = b""
        self._window_at = 0

    def first_header(self) -> FrameHeader | None:
        """The header of the first readable frame, or None for a stream with none."""
        if self._first >= self._end:
            return None
        return self._header(self._first)

    def headers(self, position: int):  # type: ignore[no-untyped-def]
        while position < self._end:
            header = self._header(position)
            yield header
            position = header.end

    def _header(self, position: int) -> FrameHeader:
        offset = position - self._window_at
        if not (offset >= 0 and offset + MAX_HEADER_SIZE <= len(self._window)):
            self._window = self._store.read(position, min(SCAN_WINDOW, self._end - position))
            self._window_at, offset = position, 0
        header = read_header(self._window, offset, position)
        if header.end > self._end:
            raise CorruptData(
                f"stream {self._name!r}: frame at {position} runs past the committed "
                f"length {self._end}",
                position=position,
            )
        return header
