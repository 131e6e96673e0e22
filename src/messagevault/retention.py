"""Where a trim by position, sequence or time cuts a stream (``Writer.trim`` does the cut).

A trim keeps the frame holding its target and releases the whole frames
below it: trimming below sequence N leaves N readable, and trimming below a
time leaves the first message at or after that time readable. Positions
never move; the checkpoint's ``first_position`` records where the stream
now starts.

>>> from messagevault.storage import MemoryStorage
>>> from messagevault.writer import Writer
>>> with Writer.open(MemoryStorage(), "orders") as writer:
...     for n in range(3):
...         _ = writer.append([(b"k", b"v%d" % n)])
...     writer.trim_below(sequence=2).first_sequence
2
"""

from __future__ import annotations

from datetime import datetime

from messagevault.checkpoint import Checkpoint
from messagevault.errors import InvalidPosition, PositionTrimmed
from messagevault.index import seek_position, timestamp_ms
from messagevault.storage.base import StreamStore


def trim_position(
    store: StreamStore,
    checkpoint: Checkpoint,
    *,
    name: str = "",
    position: int | None = None,
    sequence: int | None = None,
    time: datetime | float | None = None,
) -> int:
    """The position to hand ``Writer.trim`` for a trim below one of these; give exactly one.

    ``position``: a message position or the committed length, returned as it
    is (``Writer.trim`` checks it). ``sequence``: message N stays readable,
    those before it go; ``next_sequence`` trims every message. ``time``: an
    aware ``datetime`` or Unix seconds; the messages older than it go (all of
    them for a time after the last). A target already trimmed away gives the
    first readable position (a trim there changes nothing). A sequence past
    ``next_sequence`` raises ``InvalidPosition``; a naive datetime
    ``ValueError``.
    """
    given = [value for value in (position, sequence, time) if value is not None]
    if len(given) != 1:
        raise ValueError("a trim needs exactly one of position, sequence and time")
    if position is not None:
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidPosition(f"position must be a non-negative integer, not {position!r}")
        return position
    try:
        if sequence is not None:
            return seek_position(store, name, checkpoint, sequence=sequence)
        assert time is not None
        return seek_position(store, name, checkpoint, timestamp=timestamp_ms(time))
    except PositionTrimmed:
        return checkpoint.first_position
