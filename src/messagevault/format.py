"""Format v1: the bytes of a stream's frames (the checkpoint is in ``checkpoint.py``).

docs/FORMAT.md is the reference; this module is its executable form.

A stream is a sequence of *frames* laid end to end from byte 0. One frame holds
one producer batch. Its body is *columnar*, so that encoding, validating and
decoding a batch are a handful of C-level operations over whole columns (joins,
``array`` conversions, one CRC) instead of a Python loop per message:

    offset            size           field
    0                 64             header (``FRAME_HEADER``, below)
    64                4 * count      slots: u32 i for i in 0..count-1
    64 + 4n           4 * count      value lengths, u32 each
    64 + 8n           count          key lengths, u8 each
    64 + 9n           keys_size      keys, concatenated
    ...               values_size    values, concatenated

Positions: message 0 of a frame is at the frame's own position; message i >= 1
is at the stream offset of its slot, ``frame_position + 64 + 4*i``. So the
position after a frame's last message is the next frame's (and next message's)
position, and the committed length is the position of the next message to be
written. A slot stores its own index, so from any position a reader finds the
frame start (``position - 64 - 4*i``) and confirms it: that header's CRC must
hold and its ``base_position`` must equal the offset it was found at.

All integers are little-endian. CRCs are CRC-32 (ISO-HDLC, ``zlib.crc32``).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, repeat
from typing import Final, NamedTuple

from messagevault.errors import CorruptData, InvalidBatch, UnsupportedVersion

FORMAT_VERSION: Final = 1

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
FRAME_HEADER_CRC: Final = struct.Struct("<I")  # CRC-32 of header bytes [0, 60)
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size + FRAME_HEADER_CRC.size
SLOT_SIZE: Final = 4
PER_MESSAGE_OVERHEAD: Final = SLOT_SIZE + 4 + 1  # slot, value length, key length

assert FRAME_HEADER_SIZE == 64

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
    """The decoded, checked header of one frame."""

    frame_size: int
    message_count: int
    base_position: int
    base_sequence: int
    timestamp: int
    keys_size: int
    values_size: int
    body_crc: int

    @property
    def end(self) -> int:
        """Stream offset just past this frame: the next frame's position."""
        return self.base_position + self.frame_size

    def message_position(self, index: int) -> int:
        return message_position(self.base_position, index)


def message_position(frame_position: int, index: int) -> int:
    """Stream position of message ``index`` of the frame at ``frame_position``."""
    if index == 0:
        return frame_position
    return frame_position + FRAME_HEADER_SIZE + SLOT_SIZE * index


def message_positions(frame_position: int, first: int, count: int) -> Sequence[int]:
    """Positions of messages ``first..count-1`` of a frame, cheaply (ranges, no loop)."""
    slots = frame_position + FRAME_HEADER_SIZE
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


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A validated batch body, ready to be framed at any position.

    The body is kept as its parts so that the writer copies the value bytes
    once, into its storage write buffer.
    """

    count: int
    keys_size: int
    values_size: int
    body_crc: int
    parts: tuple[bytes | memoryview, ...]

    @property
    def frame_size(self) -> int:
        return (
            FRAME_HEADER_SIZE
            + PER_MESSAGE_OVERHEAD * self.count
            + self.keys_size
            + self.values_size
        )

    def header(self, base_position: int, base_sequence: int, timestamp: int) -> bytes:
        head = FRAME_HEADER.pack(
            FRAME_MAGIC,
            FORMAT_VERSION,
            0,
            FRAME_HEADER_SIZE,
            self.frame_size,
            self.count,
            base_position,
            base_sequence,
            timestamp,
            self.keys_size,
            self.values_size,
            self.body_crc,
        )
        return head + FRAME_HEADER_CRC.pack(zlib.crc32(head))

    def frame(self, base_position: int = 0, base_sequence: int = 0, timestamp: int = 0) -> bytes:
        """The whole frame as one ``bytes`` (also the client-to-server wire form)."""
        return b"".join((self.header(base_position, base_sequence, timestamp), *self.parts))


def encode_batch(messages: Iterable[tuple[bytes | str, bytes]]) -> EncodedBatch:
    """Validate ``(key, value)`` pairs and encode them as a frame body.

    Keys may be ``str`` (encoded as UTF-8); values must be bytes-like.
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
        return encode_columns(keys, values)
    except InvalidBatch:
        # A 2-byte string also unpacks into two "columns"; name the real fault.
        bad = next((i for i, row in enumerate(rows) if not _is_pair(row)), None)
        if bad is not None:
            raise InvalidBatch(f"message {bad} must be a (key, value) pair") from None
        raise


def _is_pair(row: object) -> bool:
    return isinstance(row, tuple | list) and len(row) == 2


def encode_columns(keys: Sequence[bytes | str], values: Sequence[bytes]) -> EncodedBatch:
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
        values_blob = b"".join(values)
    except TypeError:
        bad = next((i for i, value in enumerate(values) if not _joins(value)), 0)
        raise InvalidBatch(
            f"message {bad}: value must be a contiguous bytes-like object, "
            f"not {type(values[bad]).__name__}"
        ) from None
    value_lengths = array(_U32, map(len, values))
    if len(values_blob) > MAX_VALUE_SIZE and max(value_lengths) > MAX_VALUE_SIZE:
        bad = next(i for i, size in enumerate(value_lengths) if size > MAX_VALUE_SIZE)
        raise InvalidBatch(
            f"message {bad}: value is {value_lengths[bad]} bytes; the limit is {MAX_VALUE_SIZE}"
        )
    if len(values_blob) != sum(value_lengths):
        raise InvalidBatch("values must be flat byte strings (a memoryview of items > 1 byte?)")
    frame_size = (
        FRAME_HEADER_SIZE + PER_MESSAGE_OVERHEAD * count + len(keys_blob) + len(values_blob)
    )
    if frame_size > MAX_FRAME_SIZE:
        raise InvalidBatch(
            f"batch encodes to {frame_size} bytes; the limit is {MAX_FRAME_SIZE} "
            "(split it into several batches)"
        )
    parts = (
        _SLOT_BYTES[: SLOT_SIZE * count],
        _u32_bytes(value_lengths),
        key_lengths,
        keys_blob,
        values_blob,
    )
    body_crc = 0
    for part in parts:
        body_crc = zlib.crc32(part, body_crc)
    return EncodedBatch(count, len(keys_blob), len(values_blob), body_crc, parts)


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
    end = offset + FRAME_HEADER_SIZE
    if len(buf) < end:
        raise CorruptData(
            f"truncated frame header at position {position}: "
            f"{len(buf) - offset} of {FRAME_HEADER_SIZE} bytes",
            position=position,
        )
    fields = FRAME_HEADER.unpack_from(buf, offset)
    magic, version, flags, header_size = fields[:4]
    if magic != FRAME_MAGIC:
        raise CorruptData(
            f"no frame at position {position} (bad magic {magic!r})", position=position
        )
    (stored_crc,) = FRAME_HEADER_CRC.unpack_from(buf, offset + FRAME_HEADER.size)
    if zlib.crc32(memoryview(buf)[offset : offset + FRAME_HEADER.size]) != stored_crc:
        raise CorruptData(f"frame header CRC mismatch at position {position}", position=position)
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"frame at position {position} has format version {version}; "
            f"this MessageVault reads version {FORMAT_VERSION}",
            position=position,
        )
    if flags != 0 or header_size != FRAME_HEADER_SIZE:
        raise UnsupportedVersion(
            f"frame at position {position} uses flags {flags:#x} / header size {header_size} "
            "unknown to format v1",
            position=position,
        )
    if any(memoryview(buf)[offset + 52 : offset + 60]):
        raise UnsupportedVersion(
            f"frame at position {position} sets reserved header bytes", position=position
        )
    header = FrameHeader(*fields[4:])
    if in_stream and header.base_position != position:
        raise CorruptData(
            f"frame found at position {position} claims position {header.base_position}",
            position=position,
        )
    count = header.message_count
    expected_size = (
        FRAME_HEADER_SIZE + PER_MESSAGE_OVERHEAD * count + header.keys_size + header.values_size
    )
    if not 0 < count <= MAX_BATCH_COUNT or header.frame_size != expected_size:
        raise CorruptData(
            f"frame at position {position}: count {count} and sizes "
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
    return header


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
) -> struct.Struct:
    """Check the body CRC and columns; return a ``Struct`` that splits keys and values.

    The splitter's format (``"3s5s...100s..."``: every key, then every value)
    is built from the length columns in one formatting call; unpacking with it
    creates all key and value ``bytes`` in a single C call. Its size doubling
    as the sum of the lengths is what checks them against the header.
    """
    body_start = offset + FRAME_HEADER_SIZE
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
    if splitter.size != header.keys_size + header.values_size:
        raise CorruptData(
            f"frame at position {position}: key/value lengths do not match the header",
            position=position,
        )
    return splitter


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
    faster than materialising a list of them.
    """
    keys, values = frame_columns(buf, offset, header, first)
    count = header.message_count
    positions = message_positions(header.base_position, first, count)
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
    count = header.message_count
    fields = splitter.unpack_from(buf, offset + FRAME_HEADER_SIZE + PER_MESSAGE_OVERHEAD * count)
    return fields[first:count], fields[count + first :]


def verify_frame(buf: bytes | memoryview, offset: int, position: int | None) -> FrameHeader:
    """Fully check the frame at ``buf[offset:]`` without building messages."""
    header = read_header(buf, offset, position)
    _check_body(buf, offset, header, offset if position is None else position)
    return header


def parse_batch(frame: bytes | memoryview) -> EncodedBatch:
    """Check a frame received from a producer and return its body for re-framing.

    The producer's base position, sequence and timestamp are ignored: the
    writer assigns them. The frame must fill ``frame`` exactly.
    """
    view = memoryview(frame)
    header = read_header(view, 0, None)
    _check_body(view, 0, header, 0)
    if header.values_size > MAX_VALUE_SIZE:
        lengths_start = FRAME_HEADER_SIZE + SLOT_SIZE * header.message_count
        if (
            max(_u32_column(view[lengths_start : lengths_start + 4 * header.message_count]))
            > MAX_VALUE_SIZE
        ):
            raise InvalidBatch(f"batch holds a value over the {MAX_VALUE_SIZE}-byte limit")
    if header.frame_size != len(view):
        raise CorruptData(
            f"batch is {len(view)} bytes but its header says {header.frame_size}", position=0
        )
    return EncodedBatch(
        header.message_count,
        header.keys_size,
        header.values_size,
        header.body_crc,
        (view[FRAME_HEADER_SIZE:],),
    )


def slot_index(raw: bytes, position: int) -> int:
    """The index stored in the 4-byte slot read at ``position``."""
    if len(raw) != SLOT_SIZE:
        raise CorruptData(f"cannot read a slot at position {position}", position=position)
    (index,) = struct.unpack("<I", raw)
    return int(index)
