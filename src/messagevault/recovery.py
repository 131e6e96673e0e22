"""Rolling a stream forward: adopting the whole batches a stale checkpoint leaves out.

A commit makes its frames durable before it writes the checkpoint that names
them, and file storage flushes that checkpoint lazily (docs/FORMAT.md,
"Commit protocol"). After a power cut the durable checkpoint may therefore
lag durable, acknowledged frames. The writer opening the stream walks the
frames after the checkpoint and adopts them while each continues the chain
(both CRCs hold, it claims the position it is at, the running sequence, a
timestamp not before the last) and only up to the end of a whole batch: a
batch of several frames flags all but its last ``MORE`` and all but its
first ``FOLLOWS``, and a value in pieces must be whole. Torn frames, the
tail of a torn batch, leftovers of an older write, zeros and padding all
break the chain, so what is adopted is exactly what some commit wrote in
full.
"""

from __future__ import annotations

import logging
from typing import Final

from messagevault.checkpoint import Checkpoint
from messagevault.errors import CorruptData, InvalidBatch, UnsupportedVersion
from messagevault.format import MAX_HEADER_SIZE, FrameHeader, PieceCheck, read_header, verify_frame
from messagevault.storage.base import Storage, StreamStore

log = logging.getLogger("messagevault.recovery")

# Frames after the checkpoint are read this much at a time (a bigger frame is read whole).
READ_SIZE: Final = 1024 * 1024


def roll_forward(store: StreamStore, checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint after the last whole, valid batch that follows ``checkpoint`` in storage.

    ``checkpoint`` itself when no such batch follows it. The commit number
    goes up by one: it counts commits as storage remembers them. Reads the
    frames in storage; writes nothing.
    """
    frames = _Frames(store, checkpoint.length)
    adopted = checkpoint
    position, sequence, timestamp = (
        checkpoint.length,
        checkpoint.next_sequence,
        checkpoint.last_timestamp,
    )
    pieces = PieceCheck()
    batch_first: FrameHeader | None = None  # the first frame of the batch being walked
    head_at = -1  # the position of the last HEAD frame walked
    while True:
        header = frames.valid_frame(position)
        if header is None or header.base_sequence != sequence or header.timestamp < timestamp:
            break
        if batch_first is None:
            if header.follows:
                break  # the tail of a batch whose first frames are gone
        elif not _same_batch(batch_first, header) or (batch_first.more and not header.follows):
            break
        try:
            pieces.take(header, position)
        except InvalidBatch:
            break  # a HEAD without its pieces, a piece of no value
        if header.is_head:
            head_at = position
        elif header.is_continuation and header.chunk != head_at:
            break  # the piece of some other value
        batch_first = batch_first or header
        position, sequence, timestamp = (
            header.end,
            sequence + header.message_count,
            header.timestamp,
        )
        if not header.more and not pieces.pending:
            adopted = Checkpoint(
                checkpoint.commit + 1,
                position,
                sequence,
                header.base_position,
                timestamp,
                checkpoint.first_position,
            )
            batch_first = None
    return adopted


def adopt(store: StreamStore, found: Checkpoint, name: str) -> Checkpoint:
    """Roll the stream behind writable ``store`` forward from ``found``; the checkpoint now.

    Commits the new checkpoint (conditionally on ``found``) when whole
    batches follow ``found``, and says so in the log.
    """
    rolled = roll_forward(store, found)
    if rolled == found:
        return found
    store.advance_checkpoint(rolled, expected=found)
    log.warning(
        "stream %r rolled forward past its checkpoint from %d to %d bytes "
        "(sequence %d to %d): the checkpoint lagged committed frames",
        name,
        found.length,
        rolled.length,
        found.next_sequence,
        rolled.next_sequence,
        extra={"stream": name},
    )
    return rolled


def recover(storage: Storage, name: str) -> Checkpoint:
    """Roll stream ``name`` forward as the next writer would, without writing anything else.

    For a server that reads a stream before it writes it: after a power cut
    the durable checkpoint may lag acknowledged messages, and readers see
    them only once some writer has rolled the stream forward. Takes the
    writer lock for the moment it needs (``StreamLocked`` if a writer holds
    it: that writer has rolled forward already); ``StreamNotFound`` if the
    stream does not exist (nothing is created).
    """
    store = storage.open_stream(name, write=True)
    try:
        return adopt(store, store.read_checkpoint(), name)
    finally:
        store.close()


def _same_batch(first: FrameHeader, header: FrameHeader) -> bool:
    """Whether ``header`` can belong to the batch whose first frame is ``first``."""
    return (first.producer, first.producer_seq, first.timestamp) == (
        header.producer,
        header.producer_seq,
        header.timestamp,
    )


class _Frames:
    """The data object from a position on, read ``READ_SIZE`` at a time."""

    def __init__(self, store: StreamStore, start: int) -> None:
        self._store = store
        self._buffer = b""
        self._start = start

    def _bytes(self, position: int, size: int) -> tuple[bytes, int]:
        """A buffer holding ``[position, position + size)`` where storage has it, and the offset."""
        offset = position - self._start
        if offset < 0 or len(self._buffer) < offset + size:
            self._buffer = self._store.read(position, max(size, READ_SIZE))
            self._start, offset = position, 0
        return self._buffer, offset

    def valid_frame(self, position: int) -> FrameHeader | None:
        """The header of the frame at ``position`` if the whole frame is valid there, else None."""
        try:
            buffer, offset = self._bytes(position, MAX_HEADER_SIZE)
            header = read_header(buffer, offset, position)
            buffer, offset = self._bytes(position, header.frame_size)
            verify_frame(buffer, offset, position)
        except (CorruptData, UnsupportedVersion):
            return None
        return header
