"""Copying a stream into another storage frame for frame: replicas and local caches.

A copy is faithful: the same frames, byte for byte, at the same positions, so
a position saved by a consumer of the source names the same message in the
copy, and ids, sequences and timestamps agree. Copying is incremental: a
second run appends only what the source committed since, once it has checked
that the copy's last frame is the source's frame at that position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

from messagevault.errors import CorruptData, InvalidInput, InvalidPosition
from messagevault.format import EncodedBatch, Message, encode_batch, message_position
from messagevault.reader import Reader
from messagevault.writer import Writer

COPY_CHUNK_SIZE = 8 * 1024 * 1024  # frame bytes per destination commit


class FrameSource(Protocol):
    """Where a copy comes from: whole, checked frames of one stream."""

    def length(self) -> int:
        """The stream's committed length now."""
        ...

    def frames(self, position: int, end: int) -> Iterator[bytes]:
        """Whole frames from ``position`` (a frame start) to ``end``, in chunks."""
        ...


class ReaderFrames:
    """Frames read straight from storage (a folder, an account, a SAS URL)."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def length(self) -> int:
        return self._reader.checkpoint().length

    def frames(self, position: int, end: int) -> Iterator[bytes]:
        while position < end:
            chunk = self._reader.read_frames(position, max_bytes=COPY_CHUNK_SIZE, committed=end)
            yield chunk.data
            position = chunk.next_position


def frames_from_messages(messages: Iterable[Message]) -> Iterator[bytes]:
    """Rebuild the stored frames from messages read in order (from a server, say).

    Message ``i`` of a frame sits at a position fixed by the frame's start
    (``format.message_position``), which a following frame's first message
    can never take, so the frame boundaries show in the positions alone.
    Encoding is deterministic, so a rebuilt frame is the stored one byte for
    byte; each is checked against where the next message starts. A batch
    of several frames (v2 headers, all but the last flagged ``MORE``) is
    rebuilt whole: its frames share a timestamp, and a frame of its small
    messages shows by its v2 header's size. (Two such batches committed in
    one millisecond, or two values in pieces in one batch, cannot be told
    apart from one and the other: their rebuild fails its check.)
    """
    run: list[tuple[list[Message], EncodedBatch]] = []
    member = False  # whether the last group was a frame of small messages of a bigger batch
    for group in frame_groups(messages):
        batch = _encoded(group)
        extent = group[-1].next_position - group[0].position
        last_member, member = member, len(batch.frames) == 1 and batch.frame_size != extent
        in_pieces = len(batch.frames) > 1
        joins = (
            run
            and group[0].timestamp == run[0][0][0].timestamp
            and (member or (in_pieces and last_member))
        )
        if run and not joins:
            yield _rebuilt(run)
            run = []
        run.append((group, batch))
    if run:
        yield _rebuilt(run)


def frame_groups(messages: Iterable[Message]) -> Iterator[list[Message]]:
    """The messages of each frame together, told apart by their positions alone."""
    group: list[Message] = []
    for message in messages:
        if group and message.position != message_position(group[0].position, len(group)):
            yield group
            group = []
        group.append(message)
    if group:
        yield group


def _encoded(group: list[Message]) -> EncodedBatch:
    return encode_batch([(m.key, m.value) for m in group])


def _rebuilt(run: list[tuple[list[Message], EncodedBatch]]) -> bytes:
    """The frames of one batch: its messages grouped by frame, each group encoded."""
    first = run[0][0][0]
    frames = tuple(body for _, batch in run for body in batch.frames)
    frame = EncodedBatch(frames).frame(
        first.position, first.sequence, first.timestamp, batch_ends=True
    )
    if first.position + len(frame) != run[-1][0][-1].next_position:
        raise CorruptData(
            f"messages from position {first.position} do not rebuild the frame they came from",
            position=first.position,
        )
    return frame


def chunked(frames: Iterator[bytes], size: int = COPY_CHUNK_SIZE) -> Iterator[bytes]:
    """Join small frames into chunks of about ``size`` bytes (fewer commits)."""
    pending: list[bytes] = []
    held = 0
    for frame in frames:
        pending.append(frame)
        held += len(frame)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


class CopyReport(NamedTuple):
    start: int  # the copy's length before this run
    end: int  # and after it: the source's length when the run began
    messages: int  # copied by this run


def copy_stream(
    source: FrameSource,
    writer: Writer,
    destination: Reader,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Append to ``writer``'s stream what ``source`` holds beyond it.

    ``destination`` reads the writer's stream (to compare its last frame
    with the source's). ``progress(done, total)`` is called in bytes after
    each commit. Raises ``InvalidInput`` if the destination is not a copy of
    this source; every frame is checked on the way in.
    """
    start = writer.checkpoint
    end = source.length()
    if start.length > end:
        raise InvalidInput(
            f"the copy of {writer.name!r} is longer than the source ({start.length:,} bytes "
            f"against {end:,}): it is not a copy of this source"
        )
    if start.length:
        _check_same_tail(source, destination, start.last_frame_position, start.length, end)
    total = end - start.length
    if progress is not None:
        progress(0, total)
    for data in source.frames(start.length, end):
        writer.append_frames(data)
        if progress is not None:
            progress(writer.checkpoint.length - start.length, total)
    return CopyReport(start.length, end, writer.checkpoint.next_sequence - start.next_sequence)


def _check_same_tail(
    source: FrameSource, destination: Reader, position: int, length: int, source_length: int
) -> None:
    last = destination.header_at(position, committed=length)
    if last.is_continuation:
        position = last.chunk  # the copy ends with a value in pieces: compare all of it
    mine = destination.read_frames(position, committed=length).data
    try:
        theirs = next(source.frames(position, source_length), b"")
    except InvalidPosition:
        theirs = b""  # no frame starts there in the source
    if theirs[: len(mine)] != mine:
        raise InvalidInput(
            f"the copy of {destination.name!r} differs from the source in its last frame "
            f"(position {position:,}): it is not a copy of this source; copy into a new "
            "stream or storage"
        )
