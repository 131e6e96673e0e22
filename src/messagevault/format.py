"""Frame formats v1 and v2: the bytes of a stream's frames (the checkpoint is in ``checkpoint.py``).

docs/FORMAT.md is the reference; this module is its executable form.

A stream is a sequence of *frames* laid end to end from byte 0. One frame holds
one producer batch, or one piece of it. Its body is *columnar*, so that
encoding, validating and decoding a batch are a handful of C-level operations
over whole columns (joins, ``array`` conversions, one CRC) instead of a Python
loop per message:

    offset            size           field
    0                 H              header: 64 bytes in v1, 96 in v2
    H                 4 * count      slots: u32 i for i in 0..count-1
    H + 4n            4 * count      value lengths, u32 each
    H + 8n            count          key lengths, u8 each
    H + 9n            keys_size      keys, concatenated
    ...               values_size    values, concatenated (v2: maybe zstd)

Positions: message 0 of a frame is at the frame's own position; message i >= 1
is at the stream offset of its slot, ``frame_position + H + 4*i``. So the
position after a frame's last message is the next frame's (and next message's)
position, and the committed length is the position of the next message to be
written. A slot stores its own index, so from any position a reader finds the
frame start (``position - H - 4*i``, trying both header sizes) and confirms
it: that header's CRC must hold and its ``base_position`` must equal the
offset it was found at.

Version 2 adds a producer id and batch sequence (exactly-once publishing),
value compression, and values of any size: a value over ``MAX_VALUE_SIZE``
is a HEAD frame (its key and first piece) followed by CONTINUATION frames
(count 0, the next pieces), all in one batch and so in one commit. A batch
of several frames flags all but its last ``MORE`` and all but its first
``FOLLOWS``, so that its ends show in storage. A one-frame batch that needs
none of this is still written as v1.

All integers are little-endian. CRCs are CRC-32 (ISO-HDLC, ``zlib.crc32``).
"""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import chain, repeat
from typing import Final, NamedTuple

import zstandard

from messagevault.errors import CorruptData, InvalidBatch, InvalidPosition, UnsupportedVersion

FORMAT_VERSION: Final = 2  # the newest version this module reads and writes
FORMAT_V1: Final = 1
# The checkpoint did not change with frame format v2. Version 2 adds the first
# readable position (a trimmed stream); a stream never trimmed keeps writing
# version 1, so that readers from before trimming still read it.
CHECKPOINT_V1: Final = 1
CHECKPOINT_VERSION: Final = 2

MAX_KEY_SIZE: Final = 255
MAX_VALUE_SIZE: Final = 4 * 1024 * 1024
MAX_BATCH_COUNT: Final = 100_000
MAX_FRAME_SIZE: Final = 16 * 1024 * 1024

FRAME_MAGIC: Final = b"MVLB"
FRAME_HEADER: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVLB"
    "B"  # format version, 1
    "B"  # flags, 0 in v1 (any other value is rejected)
    "H"  # header size, 64: lets a later version grow the header
    "I"  # frame size: header + body, so a reader can skip the frame
    "I"  # count: messages in the frame, 1..MAX_BATCH_COUNT
    "Q"  # base position: stream offset of this frame's first byte
    "Q"  # base sequence: sequence number of message 0
    "Q"  # timestamp: milliseconds since the Unix epoch, assigned at commit
    "I"  # keys size: bytes of the concatenated keys
    "I"  # values size: bytes of the concatenated values
    "I"  # body CRC: CRC-32 of bytes [64, frame size)
    "8x"  # reserved, zero
)
FRAME_HEADER_CRC: Final = struct.Struct("<I")  # CRC-32 of the header bytes before it
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size + FRAME_HEADER_CRC.size  # v1
FRAME_HEADER_V2: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVLB"
    "B"  # format version, 2
    "B"  # flags: COMPRESSED | HEAD | CONTINUATION | MORE | FOLLOWS
    "H"  # header size, 96
    "I"  # frame size
    "I"  # count: 1..MAX_BATCH_COUNT; 1 in a HEAD frame, 0 in a CONTINUATION
    "Q"  # base position
    "Q"  # base sequence (a CONTINUATION: the sequence after its head's)
    "Q"  # timestamp
    "I"  # keys size
    "I"  # values size: bytes stored (compressed, if COMPRESSED)
    "I"  # body CRC
    "16s"  # producer id, all zero for none
    "Q"  # producer sequence: the producer's batch number
    "Q"  # chunk: HEAD, the value's stored size; CONTINUATION, its head's position
    "8x"  # reserved, zero
)
FRAME_HEADER_V2_SIZE: Final = FRAME_HEADER_V2.size + FRAME_HEADER_CRC.size
HEADER_SIZES: Final = (FRAME_HEADER_SIZE, FRAME_HEADER_V2_SIZE)
MAX_HEADER_SIZE: Final = FRAME_HEADER_V2_SIZE
SLOT_SIZE: Final = 4
PER_MESSAGE_OVERHEAD: Final = SLOT_SIZE + 4 + 1  # slot, value length, key length

assert FRAME_HEADER_SIZE == 64
assert FRAME_HEADER_V2_SIZE == 96

# v2 frame flags
COMPRESSED: Final = 0x01  # the values region is one zstd frame
HEAD: Final = 0x02  # one message whose value goes on in the CONTINUATION frames after it
CONTINUATION: Final = 0x04  # no messages: the next piece of the value of the HEAD before it
# Another frame of this batch follows. Set on every stored frame of a batch
# but its last, so that a writer rolling a stream forward past a stale
# checkpoint after a crash adopts whole batches only (docs/FORMAT.md).
MORE: Final = 0x08
# This frame follows another of its batch: set on every stored frame of a
# batch but its first, so that the leftover tail of a batch a crash tore is
# never taken for a batch of its own.
FOLLOWS: Final = 0x10
KNOWN_FLAGS: Final = COMPRESSED | HEAD | CONTINUATION | MORE | FOLLOWS
BATCH_FLAGS: Final = MORE | FOLLOWS  # assigned when a batch is stored, never sent

NO_PRODUCER: Final = bytes(16)
PRODUCER_ID_SIZE: Final = 16
MAX_PRODUCER_SEQ: Final = 2**63 - 1
# The stored bytes of a value over MAX_VALUE_SIZE travel in pieces this big.
CHUNK_SIZE: Final = 4 * 1024 * 1024

# A frame body carries 32-bit columns; array('I') is the fastest way to produce
# and consume them, provided it really is 4 bytes wide in our byte order.
_U32: Final = "I" if array("I").itemsize == 4 else "L"
assert array(_U32).itemsize == 4
_SWAP: Final = sys.byteorder != "little"
_SLOTS: Final = array(_U32, range(MAX_BATCH_COUNT))
if _SWAP:
    _SLOTS.byteswap()
_SLOT_BYTES: Final = _SLOTS.tobytes()


def _u32_column(raw: bytes | memoryview) -> array[int]:
    column = array(_U32)
    column.frombytes(raw)
    if _SWAP:
        column.byteswap()
    return column


def _u32_bytes(column: array[int]) -> bytes:
    if _SWAP:
        column = array(_U32, column)
        column.byteswap()
    return column.tobytes()


class FrameHeader(NamedTuple):
    """The decoded, checked header of one frame (either version)."""

    frame_size: int
    message_count: int
    base_position: int
    base_sequence: int
    timestamp: int
    keys_size: int
    values_size: int
    body_crc: int
    version: int = FORMAT_V1
    flags: int = 0
    producer: bytes = NO_PRODUCER
    producer_seq: int = 0
    chunk: int = 0  # HEAD: the value's stored size; CONTINUATION: the head's position

    @property
    def header_size(self) -> int:
        return FRAME_HEADER_SIZE if self.version == FORMAT_V1 else FRAME_HEADER_V2_SIZE

    @property
    def end(self) -> int:
        """Stream offset just past this frame: the next frame's position."""
        return self.base_position + self.frame_size

    @property
    def is_head(self) -> bool:
        return bool(self.flags & HEAD)

    @property
    def is_continuation(self) -> bool:
        return bool(self.flags & CONTINUATION)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & COMPRESSED)

    @property
    def more(self) -> bool:
        """Whether another frame of the same batch follows (not of frames stored before MORE)."""
        return bool(self.flags & MORE)

    @property
    def follows(self) -> bool:
        """Whether this frame follows another of its batch (not of frames stored before FOLLOWS)."""
        return bool(self.flags & FOLLOWS)

    @property
    def has_producer(self) -> bool:
        return self.producer != NO_PRODUCER

    def message_position(self, index: int) -> int:
        return message_position(self.base_position, index, self.header_size)


def message_position(frame_position: int, index: int, header_size: int = FRAME_HEADER_SIZE) -> int:
    """Stream position of message ``index`` of the frame at ``frame_position``."""
    if index == 0:
        return frame_position
    return frame_position + header_size + SLOT_SIZE * index


def message_positions(
    frame_position: int, first: int, count: int, header_size: int = FRAME_HEADER_SIZE
) -> Sequence[int]:
    """Positions of messages ``first..count-1`` of a frame, cheaply (ranges, no loop)."""
    slots = frame_position + header_size
    rest = range(slots + SLOT_SIZE * max(first, 1), slots + SLOT_SIZE * count, SLOT_SIZE)
    if first == 0:
        return [frame_position, *rest]
    return rest


class Message(NamedTuple):
    """One committed message as a reader sees it.

    ``next_position`` is where to resume after this message: save it, and a
    later ``read(next_position)`` continues with the following message.
    """

    position: int
    sequence: int
    timestamp: int  # milliseconds since the Unix epoch, assigned by the writer
    key: bytes
    value: bytes
    next_position: int

    @property
    def id(self) -> bytes:
        """16-byte binary-sortable id: timestamp (6) | position (6) | sequence (4)."""
        return message_id(self.timestamp, self.position, self.sequence)


class _DecodedMessage(Message):
    """A ``Message`` built straight from a row tuple by C code (no Python ``__new__``).

    Reading is dominated by creating one object per message; skipping the
    generated keyword ``__new__`` of ``NamedTuple`` makes that twice as fast.
    """

    __slots__ = ()
    __new__ = tuple.__new__  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[Message], tuple[int, int, int, bytes, bytes, int]]:
        return (Message, tuple(self))  # type: ignore[return-value]


_DecodedMessage.__name__ = _DecodedMessage.__qualname__ = "Message"


_ID_TIMESTAMP_MASK: Final = 0xFFFF_FFFF_FFFF
_ID_POSITION_MASK: Final = 0xFFFF_FFFF_FFFF
_ID_SEQUENCE_MASK: Final = 0xFFFF_FFFF


def message_id(timestamp: int, position: int, sequence: int) -> bytes:
    """Big-endian ``timestamp_ms:6 | position:6 | sequence mod 2**32:4``.

    Within a stream, timestamps never go backwards and positions only grow, so
    ids sort in stream order; across streams they sort roughly by time.
    """
    return (
        (timestamp & _ID_TIMESTAMP_MASK).to_bytes(6, "big")
        + (position & _ID_POSITION_MASK).to_bytes(6, "big")
        + (sequence & _ID_SEQUENCE_MASK).to_bytes(4, "big")
    )


def hex_id_format(
    timestamp: int, positions: Sequence[int], sequences: Sequence[int]
) -> tuple[bytes, Sequence[int], Sequence[int]]:
    """The hex ids of messages stamped ``timestamp``, as one ``%`` format and its arguments.

    ``format % (id_positions[i], id_sequences[i])`` is
    ``message_id(timestamp, positions[i], sequences[i]).hex()`` as bytes. An
    answer listing thousands of receipts repeats the format in its own
    template and formats them all in one ``%``: building each id on its own
    and splicing it in measured 1.5x slower for the whole answer.
    ``positions`` and ``sequences`` must be ascending, as a batch's are.
    """
    # Ascending, so the last says whether any needs masking to its id field.
    if positions and positions[-1] > _ID_POSITION_MASK:
        positions = [position & _ID_POSITION_MASK for position in positions]
    if sequences and sequences[-1] > _ID_SEQUENCE_MASK:
        sequences = [sequence & _ID_SEQUENCE_MASK for sequence in sequences]
    return b"%012x" % (timestamp & _ID_TIMESTAMP_MASK) + b"%012x%08x", positions, sequences


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """One compressor per thread: zstd contexts are reusable but not shareable."""
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if compressor is None:
        # The content checksum (4 bytes) catches what the body CRC cannot: a
        # producer that framed damaged zstd bytes (its CRC covers the damage).
        compressor = _local.compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


@dataclass(frozen=True, slots=True)
class FrameBody:
    """One frame's body, validated, ready to be framed at any position.

    The body is kept as its parts so that the writer copies the value bytes
    once, into its storage write buffer. ``flags`` and ``chunk`` are the v2
    header fields that belong to the body (``chunk`` of a CONTINUATION is
    its head's position, filled in when the batch is placed).
    """

    count: int
    keys_size: int
    values_size: int
    body_crc: int
    parts: tuple[bytes | memoryview, ...]
    flags: int = 0
    chunk: int = 0

    @property
    def body_size(self) -> int:
        return PER_MESSAGE_OVERHEAD * self.count + self.keys_size + self.values_size


class FrameLayout(NamedTuple):
    """Where a frame of a batch sits, for receipts: offset in the batch, header size, messages."""

    offset: int
    header_size: int
    messages: int


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A validated batch: one or more frame bodies committed together, all or nothing.

    Most batches are one frame. A batch whose messages do not fit one frame,
    or that holds a value over ``MAX_VALUE_SIZE`` (a HEAD frame and its
    CONTINUATION frames), is several. ``producer`` and ``producer_seq``
    make its append idempotent (docs/FORMAT.md); every frame carries them.
    """

    frames: tuple[FrameBody, ...]
    producer: bytes = NO_PRODUCER
    producer_seq: int = 0

    @property
    def count(self) -> int:
        """Messages in the batch (a value in pieces counts once)."""
        return sum(body.count for body in self.frames)

    def header_size(self, body: FrameBody) -> int:
        # A batch of several frames is v2, whose MORE flag marks its end in storage.
        v2 = body.flags or self.producer != NO_PRODUCER or len(self.frames) > 1
        return FRAME_HEADER_V2_SIZE if v2 else FRAME_HEADER_SIZE

    @property
    def frame_size(self) -> int:
        """Bytes of all its frames together."""
        return sum(self.header_size(body) + body.body_size for body in self.frames)

    @property
    def last_frame_size(self) -> int:
        body = self.frames[-1]
        return self.header_size(body) + body.body_size

    @property
    def layout(self) -> tuple[FrameLayout, ...]:
        """The frames that hold messages: offset in the batch, header size, count."""
        layout = []
        offset = 0
        for body in self.frames:
            header_size = self.header_size(body)
            if body.count:
                layout.append(FrameLayout(offset, header_size, body.count))
            offset += header_size + body.body_size
        return tuple(layout)

    def with_producer(self, producer: bytes, producer_seq: int) -> EncodedBatch:
        """The same batch sent as batch number ``producer_seq`` of ``producer``."""
        check_producer(producer, producer_seq)
        if any(FRAME_HEADER_V2_SIZE + body.body_size > MAX_FRAME_SIZE for body in self.frames):
            raise InvalidBatch(
                f"a frame of this batch leaves no room for a producer id's header under "
                f"{MAX_FRAME_SIZE} bytes (encode_batch always leaves it)"
            )
        return replace(self, producer=bytes(producer), producer_seq=producer_seq)

    def pieces(
        self, base_position: int, base_sequence: int, timestamp: int, *, batch_ends: bool = True
    ) -> list[bytes | memoryview]:
        """Headers and body parts of every frame placed at ``base_position``, as stored.

        Every frame but the last is flagged ``MORE``, every frame but the
        first ``FOLLOWS``; ``batch_ends=False`` leaves both out (the wire
        form: the server assigns its own).
        """
        pieces: list[bytes | memoryview] = []
        position, sequence, head = base_position, base_sequence, 0
        last = len(self.frames) - 1
        for index, body in enumerate(self.frames):
            header_size = self.header_size(body)
            if body.flags & HEAD:
                head = position
            chunk = head if body.flags & CONTINUATION else body.chunk
            more = (MORE if index < last else 0) | (FOLLOWS if index else 0) if batch_ends else 0
            pieces.append(
                self._header(
                    body,
                    header_size,
                    position,
                    sequence=sequence,
                    timestamp=timestamp,
                    chunk=chunk,
                    more=more,
                )
            )
            pieces.extend(body.parts)
            position += header_size + body.body_size
            sequence += body.count
        return pieces

    def _header(
        self,
        body: FrameBody,
        header_size: int,
        position: int,
        *,
        sequence: int,
        timestamp: int,
        chunk: int,
        more: int = 0,
    ) -> bytes:
        if header_size == FRAME_HEADER_SIZE:
            head = FRAME_HEADER.pack(
                FRAME_MAGIC,
                FORMAT_V1,
                0,
                FRAME_HEADER_SIZE,
                FRAME_HEADER_SIZE + body.body_size,
                body.count,
                position,
                sequence,
                timestamp,
                body.keys_size,
                body.values_size,
                body.body_crc,
            )
        else:
            head = FRAME_HEADER_V2.pack(
                FRAME_MAGIC,
                FORMAT_VERSION,
                body.flags | more,
                FRAME_HEADER_V2_SIZE,
                FRAME_HEADER_V2_SIZE + body.body_size,
                body.count,
                position,
                sequence,
                timestamp,
                body.keys_size,
                body.values_size,
                body.body_crc,
                self.producer,
                self.producer_seq,
                chunk,
            )
        return head + FRAME_HEADER_CRC.pack(zlib.crc32(head))

    def header(self, base_position: int, base_sequence: int, timestamp: int) -> bytes:
        """The header of a one-frame batch (the writer's fast path)."""
        (body,) = self.frames
        return self._header(
            body,
            self.header_size(body),
            base_position,
            sequence=base_sequence,
            timestamp=timestamp,
            chunk=body.chunk,
        )

    def frame(
        self,
        base_position: int = 0,
        base_sequence: int = 0,
        timestamp: int = 0,
        *,
        batch_ends: bool = False,
    ) -> bytes:
        """All frames as one ``bytes``: the client-to-server wire form.

        The wire form leaves out the ``MORE`` and ``FOLLOWS`` flags, which the
        server assigns (so servers from before the flags take it too);
        ``batch_ends=True`` gives the frames exactly as a writer stores them.
        """
        return b"".join(self.pieces(base_position, base_sequence, timestamp, batch_ends=batch_ends))


def check_producer(producer: object, producer_seq: object) -> None:
    """Raise ``InvalidBatch`` unless these are a 16-byte id and a sequence in range."""
    if not isinstance(producer, bytes | bytearray) or len(producer) != PRODUCER_ID_SIZE:
        raise InvalidBatch(f"a producer id is {PRODUCER_ID_SIZE} bytes, not {producer!r:.60}")
    if bytes(producer) == NO_PRODUCER:
        raise InvalidBatch("a producer id must not be all zeros (that means no producer)")
    if (
        isinstance(producer_seq, bool)
        or not isinstance(producer_seq, int)
        or not 0 <= producer_seq <= MAX_PRODUCER_SEQ
    ):
        raise InvalidBatch(
            f"a producer sequence is an integer 0..{MAX_PRODUCER_SEQ}, not {producer_seq!r:.40}"
        )


def encode_batch(
    messages: Iterable[tuple[bytes | str, bytes]], *, compress: bool = False
) -> EncodedBatch:
    """Validate ``(key, value)`` pairs and encode them as a batch.

    Keys may be ``str`` (encoded as UTF-8); values must be bytes-like.
    ``compress`` stores values zstd-compressed where that makes them smaller.
    Raises ``InvalidBatch`` naming the first offending message.
    """
    rows = messages if isinstance(messages, Sequence) else list(messages)
    _check_count(len(rows))
    try:
        # strict=True makes every row the same length; two columns means pairs.
        columns = tuple(zip(*rows, strict=True))
    except (TypeError, ValueError):
        columns = ()
    try:
        if len(columns) != 2:
            raise InvalidBatch("not pairs")
        keys, values = columns
        return encode_columns(keys, values, compress=compress)
    except InvalidBatch:
        # A 2-byte string also unpacks into two "columns"; name the real fault.
        bad = next((i for i, row in enumerate(rows) if not _is_pair(row)), None)
        if bad is not None:
            raise InvalidBatch(f"message {bad} must be a (key, value) pair") from None
        raise


def _is_pair(row: object) -> bool:
    return isinstance(row, tuple | list) and len(row) == 2


def encode_columns(
    keys: Sequence[bytes | str], values: Sequence[bytes], *, compress: bool = False
) -> EncodedBatch:
    """Like ``encode_batch``, for callers that already hold keys and values apart."""
    count = len(keys)
    _check_count(count)
    if len(values) != count:
        raise InvalidBatch(f"{count} keys but {len(values)} values")
    try:
        keys_blob = b"".join(keys)  # type: ignore[arg-type]
    except TypeError:
        keys = [_key_bytes(i, key) for i, key in enumerate(keys)]
        keys_blob = b"".join(keys)  # type: ignore[arg-type]
    try:
        key_lengths = bytes(map(len, keys))
    except ValueError:
        bad = next(i for i, key in enumerate(keys) if len(key) > MAX_KEY_SIZE)
        raise InvalidBatch(
            f"message {bad}: key is {len(keys[bad])} bytes; the limit is {MAX_KEY_SIZE}"
        ) from None
    if len(keys_blob) != sum(key_lengths):  # len() counted items, not bytes
        bad = next(i for i, key in enumerate(keys) if len(key) != len(b"".join((key,))))  # type: ignore[arg-type]
        raise InvalidBatch(f"message {bad}: key must be a flat byte string")
    try:
        value_lengths: array[int] | None = array(_U32, map(len, values))
    except TypeError:
        raise _not_a_value(values) from None
    except OverflowError:  # a value of 4 GiB or more: it can only travel in pieces
        value_lengths = None
    total = sum(value_lengths) if value_lengths is not None else sum(map(len, values))
    # Sized for the longer v2 header, so that ``with_producer`` always fits.
    frame_size = FRAME_HEADER_V2_SIZE + PER_MESSAGE_OVERHEAD * count + len(keys_blob) + total
    if (
        value_lengths is not None
        and frame_size <= MAX_FRAME_SIZE
        and (total <= MAX_VALUE_SIZE or max(value_lengths) <= MAX_VALUE_SIZE)
    ):
        # The common case: the batch is one frame, built from whole columns.
        try:
            values_blob = b"".join(values)
        except TypeError:
            raise _not_a_value(values) from None
        if len(values_blob) != total:  # len() counted items, not bytes
            raise InvalidBatch("values must be flat byte strings (a memoryview of items > 1 byte?)")
        body = _frame_body(
            count, key_lengths, keys_blob, value_lengths, values_blob, compress=compress
        )
        return EncodedBatch((body,))
    for index, value in enumerate(values):
        if not _joins(value) or memoryview(value).nbytes != len(value):
            raise InvalidBatch(f"message {index}: value must be a flat, contiguous byte string")
    flat_keys = [key if isinstance(key, bytes) else b"".join((key,)) for key in keys]  # type: ignore[arg-type]
    return EncodedBatch(tuple(_split_frames(flat_keys, values, compress)))


def _not_a_value(values: Sequence[object]) -> InvalidBatch:
    bad = next((i for i, value in enumerate(values) if not _joins(value)), 0)
    return InvalidBatch(
        f"message {bad}: value must be a contiguous bytes-like object, "
        f"not {type(values[bad]).__name__}"
    )


def _frame_body(
    count: int,
    key_lengths: bytes,
    keys_blob: bytes,
    value_lengths: array[int],
    values_blob: bytes | memoryview,
    *,
    compress: bool,
) -> FrameBody:
    flags = 0
    stored: bytes | memoryview = values_blob
    if compress and values_blob:
        packed = _compressor().compress(values_blob)
        if len(packed) < len(values_blob):  # incompressible values are stored as they are
            stored, flags = packed, COMPRESSED
    parts = (
        _SLOT_BYTES[: SLOT_SIZE * count],
        _u32_bytes(value_lengths),
        key_lengths,
        keys_blob,
        stored,
    )
    return FrameBody(count, len(keys_blob), len(stored), _crc_of(parts), parts, flags)


def _crc_of(parts: Iterable[bytes | memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _split_frames(
    keys: Sequence[bytes], values: Sequence[bytes], compress: bool
) -> Iterator[FrameBody]:
    """Frames for a batch too big for one: runs of small messages, and large values in pieces."""
    start = 0
    size = FRAME_HEADER_V2_SIZE  # v2 headers, the larger, so that any frame fits
    for index, value in enumerate(values):
        length = len(value)
        grown = size + PER_MESSAGE_OVERHEAD + len(keys[index]) + length
        if length > MAX_VALUE_SIZE or grown > MAX_FRAME_SIZE:
            if index > start:
                yield _run_body(keys[start:index], values[start:index], compress)
            start, size = index, FRAME_HEADER_V2_SIZE
            grown = size + PER_MESSAGE_OVERHEAD + len(keys[index]) + length
        if length > MAX_VALUE_SIZE:
            yield from _value_in_pieces(keys[index], value, compress)
            start, size = index + 1, FRAME_HEADER_V2_SIZE
        else:
            size = grown
    if start < len(values):
        yield _run_body(keys[start:], values[start:], compress)


def _run_body(keys: Sequence[bytes], values: Sequence[bytes], compress: bool) -> FrameBody:
    return _frame_body(
        len(keys),
        bytes(map(len, keys)),
        b"".join(keys),
        array(_U32, map(len, values)),
        b"".join(values),
        compress=compress,
    )


def _value_in_pieces(key: bytes, value: bytes, compress: bool) -> Iterator[FrameBody]:
    """A HEAD frame and its CONTINUATION frames for one value over ``MAX_VALUE_SIZE``.

    Compressed, the whole value is one zstd frame (with its size in its
    header, so that a reader allocates the result once), cut into pieces.
    """
    stored: bytes | memoryview = memoryview(value).cast("B")
    flags = HEAD
    if compress:
        packed = _compressor().compress(stored)
        if len(packed) < len(stored):
            stored, flags = packed, HEAD | COMPRESSED
    view = memoryview(stored)
    first = view[:CHUNK_SIZE]
    parts = (
        _SLOT_BYTES[:SLOT_SIZE],
        _u32_bytes(array(_U32, [len(first)])),
        bytes((len(key),)),
        key,
        first,
    )
    yield FrameBody(1, len(key), len(first), _crc_of(parts), parts, flags, chunk=len(view))
    for offset in range(CHUNK_SIZE, len(view), CHUNK_SIZE):
        piece = view[offset : offset + CHUNK_SIZE]
        yield FrameBody(
            0, 0, len(piece), zlib.crc32(piece), (piece,), CONTINUATION | (flags & COMPRESSED)
        )


def _key_bytes(index: int, key: object) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if _is_bytes_like(key):
        return bytes(key)  # type: ignore[call-overload,no-any-return]
    raise InvalidBatch(f"message {index}: key must be bytes or str, not {type(key).__name__}")


def _joins(value: object) -> bool:
    """Whether ``bytes.join`` takes ``value``: the test that failed for the batch."""
    try:
        b"".join((value,))  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _is_bytes_like(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview)


def _check_count(count: int) -> None:
    if count == 0:
        raise InvalidBatch("a batch must hold at least one message")
    if count > MAX_BATCH_COUNT:
        raise InvalidBatch(f"a batch holds at most {MAX_BATCH_COUNT} messages, not {count}")


def read_header(buf: bytes | memoryview, offset: int, position: int | None) -> FrameHeader:
    """Decode and check the frame header at ``buf[offset:]``, found at stream ``position``.

    Checks magic, version, flags, header CRC, that the header claims to be
    where it was found, and that its sizes are consistent. ``CorruptData``
    names the stream position of the fault. ``position=None`` is for a batch
    that is not in a stream yet (a producer's upload): its base position is
    not checked and faults are reported as offsets into the batch.
    """
    in_stream = position is not None
    position = offset if position is None else position
    if len(buf) < offset + 6:
        raise _truncated(buf, offset, position, FRAME_HEADER_SIZE)
    magic = bytes(buf[offset : offset + 4])
    if magic != FRAME_MAGIC:
        raise CorruptData(
            f"no frame at position {position} (bad magic {magic!r})", position=position
        )
    version = buf[offset + 4]
    if version == FORMAT_V1:
        layout, size = FRAME_HEADER, FRAME_HEADER_SIZE
    elif version == FORMAT_VERSION:
        layout, size = FRAME_HEADER_V2, FRAME_HEADER_V2_SIZE
    else:
        layout, size = FRAME_HEADER, FRAME_HEADER_SIZE  # to check the CRC before judging
    if len(buf) < offset + size:
        raise _truncated(buf, offset, position, size)
    (stored_crc,) = FRAME_HEADER_CRC.unpack_from(buf, offset + layout.size)
    if zlib.crc32(memoryview(buf)[offset : offset + layout.size]) != stored_crc:
        raise CorruptData(f"frame header CRC mismatch at position {position}", position=position)
    if version not in (FORMAT_V1, FORMAT_VERSION):
        raise UnsupportedVersion(
            f"frame at position {position} has format version {version}; "
            f"this MessageVault reads versions {FORMAT_V1}-{FORMAT_VERSION}",
            position=position,
        )
    header = _header_fields(buf, offset, layout, position)
    if in_stream and header.base_position != position:
        raise CorruptData(
            f"frame found at position {position} claims position {header.base_position}",
            position=position,
        )
    _check_sizes(header, position, in_stream)
    return header


def _header_fields(
    buf: bytes | memoryview, offset: int, layout: struct.Struct, position: int
) -> FrameHeader:
    """The fields of a header whose CRC holds, checked against its version's rules."""
    fields = layout.unpack_from(buf, offset)
    flags, header_size = fields[2:4]
    version, known_flags, size = (
        (FORMAT_V1, 0, FRAME_HEADER_SIZE)
        if layout is FRAME_HEADER
        else (FORMAT_VERSION, KNOWN_FLAGS, FRAME_HEADER_V2_SIZE)
    )
    if flags & ~known_flags or header_size != size:
        raise UnsupportedVersion(
            f"frame at position {position} uses flags {flags:#x} / header size "
            f"{header_size} unknown to format v{version}",
            position=position,
        )
    # The reserved bytes are the 8 before the header CRC, in both versions.
    if any(memoryview(buf)[offset + size - 12 : offset + size - 4]):
        raise UnsupportedVersion(
            f"frame at position {position} sets reserved header bytes", position=position
        )
    if version == FORMAT_V1:
        return FrameHeader(*fields[4:])
    return FrameHeader._make((*fields[4:12], FORMAT_VERSION, flags, *fields[12:]))


def _truncated(buf: bytes | memoryview, offset: int, position: int, size: int) -> CorruptData:
    return CorruptData(
        f"truncated frame header at position {position}: "
        f"{max(len(buf) - offset, 0)} of {size} bytes",
        position=position,
    )


def _check_sizes(header: FrameHeader, position: int, in_stream: bool) -> None:
    count = header.message_count
    flags = header.flags
    expected_size = (
        header.header_size + PER_MESSAGE_OVERHEAD * count + header.keys_size + header.values_size
    )
    if flags & CONTINUATION:
        shape_ok = (
            count == 0
            and header.keys_size == 0
            and not flags & HEAD
            and header.values_size > 0
            and (header.chunk < position or not in_stream)
        )
    elif flags & HEAD:
        shape_ok = count == 1 and header.chunk >= header.values_size
    else:
        shape_ok = 0 < count <= MAX_BATCH_COUNT and header.chunk == 0
    if not shape_ok or header.frame_size != expected_size:
        raise CorruptData(
            f"frame at position {position}: count {count}, flags {flags:#x} and sizes "
            f"({header.keys_size} key bytes, {header.values_size} value bytes) "
            f"do not add up to frame size {header.frame_size}",
            position=position,
        )
    if header.frame_size > MAX_FRAME_SIZE:
        raise CorruptData(
            f"frame at position {position} is {header.frame_size} bytes; "
            f"the limit is {MAX_FRAME_SIZE}",
            position=position,
        )


# "0s", "1s", ... for the common lengths: a table lookup beats formatting an int.
_SPLIT_FORMATS: Final = [f"{size}s" for size in range(4096)]


def _splitter(length_columns: bytes) -> struct.Struct:
    """The ``Struct`` for one frame's value-length and key-length columns.

    Streams of fixed-size records (one event type, telemetry) repeat the same
    columns frame after frame; a small cache then skips building the format.
    Big frames are not cached, to bound the cache's memory.
    """
    if len(length_columns) <= _CACHED_COLUMNS_LIMIT:
        return _cached_splitter(length_columns)
    return _build_splitter(length_columns)


_CACHED_COLUMNS_LIMIT: Final = 5 * 4096


def _build_splitter(length_columns: bytes) -> struct.Struct:
    count = len(length_columns) // 5
    lengths = (*length_columns[4 * count :], *_u32_column(length_columns[: 4 * count]))
    try:
        layout = "".join(map(_SPLIT_FORMATS.__getitem__, lengths))
    except IndexError:  # some value is longer than the table: format every length
        layout = ("%ds" * (2 * count)) % lengths
    return struct.Struct(layout)


_cached_splitter = lru_cache(maxsize=32)(_build_splitter)


def _check_body(
    buf: bytes | memoryview, offset: int, header: FrameHeader, position: int
) -> struct.Struct | None:
    """Check the body CRC and columns; return a ``Struct`` that splits keys and values.

    The splitter's format (``"3s5s...100s..."``: every key, then every value)
    is built from the length columns in one formatting call; unpacking with it
    creates all key and value ``bytes`` in a single C call. Its size doubling
    as the sum of the lengths is what checks them against the header. A
    CONTINUATION frame has no columns: None.
    """
    body_start = offset + header.header_size
    body_end = offset + header.frame_size
    if len(buf) < body_end:
        raise CorruptData(
            f"frame at position {position} is truncated: {len(buf) - offset} of "
            f"{header.frame_size} bytes present",
            position=position,
        )
    view = memoryview(buf)
    if zlib.crc32(view[body_start:body_end]) != header.body_crc:
        raise CorruptData(f"frame body CRC mismatch at position {position}", position=position)
    count = header.message_count
    if count == 0:
        return None
    lengths_start = body_start + SLOT_SIZE * count
    key_lengths_start = lengths_start + 4 * count
    keys_start = key_lengths_start + count
    if bytes(view[body_start:lengths_start]) != _SLOT_BYTES[: SLOT_SIZE * count]:
        raise CorruptData(f"frame at position {position} has damaged slots", position=position)
    key_lengths = view[key_lengths_start:keys_start]
    if sum(key_lengths) != header.keys_size:
        raise CorruptData(
            f"frame at position {position}: key lengths do not add up to the header's "
            f"{header.keys_size} key bytes",
            position=position,
        )
    splitter = _splitter(bytes(view[lengths_start:keys_start]))
    values_size = header.values_size
    if header.compressed and not header.is_head:
        values_size = splitter.size - header.keys_size  # the lengths are of the values unpacked
        if not 0 < values_size <= MAX_FRAME_SIZE:
            raise CorruptData(
                f"frame at position {position}: compressed values would unpack to "
                f"{values_size} bytes",
                position=position,
            )
    if splitter.size != header.keys_size + values_size:
        raise CorruptData(
            f"frame at position {position}: key/value lengths do not match the header",
            position=position,
        )
    return splitter


def _unpacked_values(data: bytes | bytearray | memoryview, size: int, position: int) -> bytes:
    """Decompress a zstd frame that must hold exactly ``size`` bytes."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared != size:
            raise CorruptData(
                f"compressed values at position {position} declare {declared} bytes, "
                f"not the {size} their lengths add up to",
                position=position,
            )
        values = _decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise CorruptData(
            f"compressed values at position {position} do not decompress: {exc}",
            position=position,
        ) from None
    if len(values) != size:
        raise CorruptData(
            f"compressed values at position {position} unpack to {len(values)} bytes, not {size}",
            position=position,
        )
    return values


def decode_messages(buf: bytes, offset: int, header: FrameHeader, first: int = 0) -> list[Message]:
    """Check the frame body at ``buf[offset:]`` and return messages ``first..count-1``."""
    return list(iter_messages(buf, offset, header, first))


def iter_messages(
    buf: bytes, offset: int, header: FrameHeader, first: int = 0
) -> Iterator[Message]:
    """Like ``decode_messages``, but builds each ``Message`` only when it is consumed.

    The whole frame is checked before this returns. Building messages lazily
    means a consumer that drops each message before taking the next keeps the
    garbage collector's young generation empty, which makes reading ~15%
    faster than materialising a list of them. A HEAD frame's message needs
    its CONTINUATION frames: read it with ``FrameAssembler``.
    """
    if header.flags & (HEAD | CONTINUATION):
        raise CorruptData(
            f"frame at position {header.base_position} is part of a value in pieces; "
            "it is read with the frames that follow it",
            position=header.base_position,
        )
    keys, values = frame_columns(buf, offset, header, first)
    count = header.message_count
    positions = message_positions(header.base_position, first, count, header.header_size)
    next_positions = chain(positions[1:], (header.end,))
    sequences = range(header.base_sequence + first, header.base_sequence + count)
    rows = zip(positions, sequences, repeat(header.timestamp), keys, values, next_positions)
    return map(_DecodedMessage, rows)


def frame_columns(
    buf: bytes, offset: int, header: FrameHeader, first: int = 0
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Check the frame body and return the keys and values of messages ``first..count-1``.

    The columnar read: two tuples cut by one ``struct`` call, no per-message
    objects. Message *i*'s position, sequence and id follow from the header
    (``message_positions``, ``base_sequence + i``, ``message_id``).
    """
    splitter = _check_body(buf, offset, header, header.base_position)
    assert splitter is not None  # CONTINUATION frames are refused by the callers
    count = header.message_count
    columns_end = offset + header.header_size + PER_MESSAGE_OVERHEAD * count
    if header.compressed and not header.is_head:
        keys_end = columns_end + header.keys_size
        values = _unpacked_values(
            memoryview(buf)[keys_end : offset + header.frame_size],
            splitter.size - header.keys_size,
            header.base_position,
        )
        fields = splitter.unpack(bytes(buf[columns_end:keys_end]) + values)
    else:
        fields = splitter.unpack_from(buf, columns_end)
    return fields[first:count], fields[count + first :]


def verify_frame(buf: bytes | memoryview, offset: int, position: int | None) -> FrameHeader:
    """Fully check the frame at ``buf[offset:]`` without building messages.

    The values of a compressed frame are unpacked too (and dropped): a frame
    that passes is one every reader can read.
    """
    header = read_header(buf, offset, position)
    splitter = _check_body(buf, offset, header, offset if position is None else position)
    if splitter is not None and header.compressed and not header.is_head:
        values_start = (
            offset + header.header_size + PER_MESSAGE_OVERHEAD * header.message_count
        ) + header.keys_size
        _unpacked_values(
            memoryview(buf)[values_start : offset + header.frame_size],
            splitter.size - header.keys_size,
            header.base_position,
        )
    return header


class FrameAssembler:
    """Turns checked frames, in stream order, into messages, joining values in pieces.

    ``feed(buffer, offset, header)`` for each frame; it returns the messages
    complete so far: a frame's own, or, at the last CONTINUATION of a value,
    that value's message. Pieces are held as views of the buffers they
    were read into and joined once, at the end: a value costs its stored
    bytes (the buffers) plus the ``bytes`` handed out, about two copies at
    the peak, whether the frames come from storage or from a server's
    answer, and nothing is allocated on a header's word alone.
    """

    def __init__(self, first: int = 0) -> None:
        self._first = first  # messages of the first frame to leave out
        self._head: FrameHeader | None = None
        self._key = b""
        self._pieces: list[memoryview] = []
        self._filled = 0

    @property
    def pending(self) -> bool:
        """Whether a value in pieces is still missing some of them."""
        return self._head is not None

    def feed(self, buf: bytes | memoryview, offset: int, header: FrameHeader) -> Iterator[Message]:
        first, self._first = self._first, 0
        if self._head is not None:
            return self._continue(buf, offset, header)
        if header.is_continuation:
            raise CorruptData(
                f"frame at position {header.base_position} continues a value that starts "
                f"at position {header.chunk}, but the frames read do not start there",
                position=header.base_position,
            )
        if header.is_head:
            if first:
                raise CorruptData(
                    f"frame at position {header.base_position} holds one message",
                    position=header.base_position,
                )
            self._start(buf, offset, header)
            return self._continue(buf, offset, header) if header.chunk == self._filled else iter(())
        return iter_messages(buf, offset, header, first)  # type: ignore[arg-type]

    def _start(self, buf: bytes | memoryview, offset: int, header: FrameHeader) -> None:
        _check_body(buf, offset, header, header.base_position)
        key_start = offset + header.header_size + PER_MESSAGE_OVERHEAD
        self._head = header
        self._key = bytes(buf[key_start : key_start + header.keys_size])
        self._pieces = [_stored_piece(buf, offset, header)]
        self._filled = header.values_size

    def _continue(
        self, buf: bytes | memoryview, offset: int, header: FrameHeader
    ) -> Iterator[Message]:
        head = self._head
        assert head is not None
        if header is not head:
            if (
                not header.is_continuation
                or header.chunk != head.base_position
                or header.base_sequence != head.base_sequence + 1
                or header.timestamp != head.timestamp
                or header.producer != head.producer
                or self._filled + header.values_size > head.chunk
            ):
                raise CorruptData(
                    f"frame at position {header.base_position} does not continue the value "
                    f"at position {head.base_position}",
                    position=header.base_position,
                )
            _check_body(buf, offset, header, header.base_position)
            self._pieces.append(_stored_piece(buf, offset, header))
            self._filled += header.values_size
        if self._filled < head.chunk:
            return iter(())
        pieces, self._pieces, self._head = self._pieces, [], None
        stored = b"".join(pieces)
        del pieces  # the read buffers can go before a compressed value unpacks
        value = _unpacked_value(stored, head.base_position) if head.compressed else stored
        del stored
        message = Message(
            head.base_position, head.base_sequence, head.timestamp, self._key, value, header.end
        )
        return iter((message,))


def _stored_piece(buf: bytes | memoryview, offset: int, header: FrameHeader) -> memoryview:
    """The value bytes a HEAD or CONTINUATION frame stores: the last ``values_size`` of it."""
    end = offset + header.frame_size
    return memoryview(buf)[end - header.values_size : end]


# zstd's densest block (RLE: a 3-byte block header and one byte) stands for at
# most 128 KiB, so no zstd frame unpacks to more than this many times its size.
_ZSTD_MAX_RATIO: Final = 128 * 1024 // 4


def _unpacked_value(stored: bytes, position: int) -> bytes:
    """Decompress the joined pieces of a compressed value, which hold one zstd frame.

    The size the frame declares is the sender's word, so the result grows
    only as real output comes instead of being allocated up front: a few
    hundred bytes declaring a terabyte fail as ``CorruptData`` without
    asking for the terabyte.
    """
    size = _content_size(stored, position)
    if size > _ZSTD_MAX_RATIO * len(stored):
        raise CorruptData(
            f"compressed value at position {position} declares {size} bytes, more than "
            f"its {len(stored)} stored bytes can hold",
            position=position,
        )
    unpacker = _decompressor().decompressobj()
    try:
        value = unpacker.decompress(stored)
    except zstandard.ZstdError as exc:
        raise CorruptData(
            f"compressed value at position {position} does not decompress: {exc}",
            position=position,
        ) from None
    if len(value) != size or not unpacker.eof or unpacker.unused_data:
        raise CorruptData(
            f"compressed value at position {position} unpacks to {len(value)} bytes "
            f"(declared {size}){'' if unpacker.eof else ', cut short'}"
            f"{', with bytes after its end' if unpacker.unused_data else ''}",
            position=position,
        )
    return value


# Input fed to the check at a time: bounds what one call can unpack (densest
# zstd: 32,768 times) to 64 MiB of output, dropped at once.
_CHECK_SLICE: Final = 2048


def _check_packed_value(
    pieces: list[memoryview], position: int, max_value_size: int | None
) -> None:
    """Check that joined ``pieces`` are one zstd frame unpacking to its declared size.

    The output is counted and dropped, a little at a time, so a producer's
    compression bomb costs the server time, not memory; a declared size over
    ``max_value_size`` is refused before any of it.
    """
    stored = sum(map(len, pieces))
    size = _content_size(b"".join(piece[:32] for piece in pieces[:2]), position)
    if max_value_size is not None and size > max_value_size:
        raise InvalidBatch(
            f"compressed value at {position} of the batch unpacks to {size} bytes; this "
            f"server takes values of at most {max_value_size} (its --max-body)"
        )
    if size > _ZSTD_MAX_RATIO * stored:
        raise InvalidBatch(
            f"compressed value at {position} of the batch declares {size} bytes, more than "
            f"its {stored} stored bytes can hold"
        )
    unpacker = _decompressor().decompressobj()
    unpacked = 0
    slices = (
        piece[at : at + _CHECK_SLICE]
        for piece in pieces
        for at in range(0, len(piece), _CHECK_SLICE)
    )
    try:
        for data in slices:
            if unpacker.eof:
                raise InvalidBatch(
                    f"compressed value at {position} of the batch has bytes after its end"
                )
            unpacked += len(unpacker.decompress(data))
            if unpacked > size:
                break
    except zstandard.ZstdError as exc:
        raise InvalidBatch(
            f"compressed value at {position} of the batch does not decompress: {exc}"
        ) from None
    if unpacked != size or not unpacker.eof or unpacker.unused_data:
        raise InvalidBatch(
            f"compressed value at {position} of the batch unpacks to {unpacked} bytes, "
            f"not the {size} it declares, or is cut short"
        )


def _content_size(data: bytes | bytearray | memoryview, position: int) -> int:
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptData(
            f"compressed value at position {position}: {exc}", position=position
        ) from None
    if size < 0:
        raise CorruptData(
            f"compressed value at position {position} does not declare its size", position=position
        )
    return int(size)


def check_continuation_start(header: FrameHeader, name: str) -> None:
    """A reader asked to start at a CONTINUATION frame: say where the value starts instead."""
    if header.is_continuation:
        raise InvalidPosition(
            f"position {header.base_position} in stream {name!r} is inside the value of the "
            f"message at position {header.chunk} (a continuation piece), not a message; "
            f"read from {header.chunk}"
        )


def parse_batch(body: bytes | memoryview, *, max_value_size: int | None = None) -> EncodedBatch:
    """Check the frames a producer sent and return them as a batch for re-framing.

    The producer's base positions, sequences and timestamps are ignored: the
    writer assigns them. The frames must fill ``body`` exactly, share one
    producer id and sequence, and carry every value in pieces whole, with
    the COMPRESSED flag of its HEAD on every piece. ``max_value_size``
    bounds what a compressed value in pieces may unpack to (a server passes
    its request limit: no reader then holds more than a sender could send).
    """
    view = memoryview(body)
    frames: list[FrameBody] = []
    producer, producer_seq = NO_PRODUCER, 0
    pieces = PieceCheck()
    packed: list[memoryview] = []  # the stored pieces of a compressed value in pieces
    head_at = 0
    offset = 0
    while offset < len(view) or not frames:  # an empty body: no header to read
        header = read_header(view, offset, None)
        if header.frame_size > len(view) - offset:
            raise CorruptData(
                f"batch is {len(view)} bytes but its frame at {offset} says it ends at "
                f"{offset + header.frame_size}",
                position=offset,
            )
        verify_frame(view, offset, None)
        if not frames:
            producer, producer_seq = header.producer, header.producer_seq
        elif (header.producer, header.producer_seq) != (producer, producer_seq):
            raise InvalidBatch(
                f"frame at {offset} of the batch names another producer or sequence "
                "than the first: one batch is one producer's"
            )
        if not pieces.take(header, offset):
            _check_value_sizes(view, offset, header)
        elif header.compressed:  # every piece of it, by PieceCheck
            # Readers unpack a value in pieces only once it is whole, so its
            # zstd frame is checked here: a damaged one would stop every
            # reader at it for good.
            if header.is_head:
                head_at = offset
            end = offset + header.frame_size
            packed.append(view[end - header.values_size : end])
            if not pieces.pending:
                _check_packed_value(packed, head_at, max_value_size)
                packed = []
        start = offset + header.header_size
        frames.append(
            FrameBody(
                header.message_count,
                header.keys_size,
                header.values_size,
                header.body_crc,
                (view[start : offset + header.frame_size],),
                header.flags & ~BATCH_FLAGS,  # the writer marks the batch's ends in storage
                header.chunk if header.is_head else 0,
            )
        )
        offset += header.frame_size
    pieces.finish()
    if producer != NO_PRODUCER:
        check_producer(producer, producer_seq)
    elif producer_seq:
        raise InvalidBatch("a batch without a producer id has no producer sequence")
    return EncodedBatch(tuple(frames), producer, producer_seq)


class PieceCheck:
    """Follows the values in pieces of a batch: each HEAD's CONTINUATIONs, whole."""

    def __init__(self) -> None:
        self._head_at = 0
        self._size = 0  # 0: not inside a value in pieces
        self._gathered = 0
        self._compressed = False

    @property
    def pending(self) -> bool:
        """Whether a value in pieces has begun and is not whole yet."""
        return self._size != 0

    def take(self, header: FrameHeader, offset: int) -> bool:
        """Account for the frame at ``offset``; whether it is (part of) a value in pieces."""
        if self._size:
            if not header.is_continuation:
                raise InvalidBatch(
                    f"the value in pieces at {self._head_at} of the batch stops after "
                    f"{self._gathered} of its {self._size} bytes"
                )
            if header.compressed != self._compressed:
                raise InvalidBatch(
                    f"frame at {offset} of the batch is {'' if header.compressed else 'not '}"
                    f"flagged COMPRESSED, unlike the HEAD of its value at {self._head_at}"
                )
            self._gathered += header.values_size
            if self._gathered > self._size:
                raise InvalidBatch(
                    f"the value in pieces at {self._head_at} of the batch has more "
                    f"than its {self._size} bytes"
                )
        elif header.is_continuation:
            raise InvalidBatch(f"frame at {offset} of the batch continues no value")
        elif header.is_head:
            self._head_at, self._size, self._gathered = offset, header.chunk, header.values_size
            self._compressed = header.compressed
        else:
            return False
        if self._gathered == self._size:
            self._size = 0
        return True

    def finish(self) -> None:
        if self._size:
            raise InvalidBatch(
                f"the batch ends inside the value in pieces at {self._head_at} "
                f"({self._gathered} of its {self._size} bytes)"
            )


def _check_value_sizes(view: memoryview, offset: int, header: FrameHeader) -> None:
    """A value over ``MAX_VALUE_SIZE`` must come in pieces, not in a frame's columns."""
    if header.values_size <= MAX_VALUE_SIZE and not header.compressed:
        return
    lengths_start = offset + header.header_size + SLOT_SIZE * header.message_count
    lengths = _u32_column(view[lengths_start : lengths_start + 4 * header.message_count])
    if max(lengths) > MAX_VALUE_SIZE:
        raise InvalidBatch(f"batch holds a value over the {MAX_VALUE_SIZE}-byte limit")


def slot_index(raw: bytes, position: int) -> int:
    """The index stored in the 4-byte slot read at ``position``."""
    if len(raw) != SLOT_SIZE:
        raise CorruptData(f"cannot read a slot at position {position}", position=position)
    (index,) = struct.unpack("<I", raw)
    return int(index)
