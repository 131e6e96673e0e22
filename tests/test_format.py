"""Format v1 (frames, checkpoints, ids): round trips, corruption, limits, bad input.

The corruption tests insist on *CorruptData naming the frame's position*: a
reader that raised anything else, or returned different data, would hand a
consumer garbage or an unexplained crash instead of "damaged at position N".
"""

from __future__ import annotations

import dataclasses
import random
import re
import struct
import zlib
from array import array
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from messagevault.checkpoint import CHECKPOINT, CHECKPOINT_CRC, CHECKPOINT_SIZE, Checkpoint
from messagevault.errors import CorruptData, InvalidBatch, UnsupportedVersion
from messagevault.format import (
    CONTINUATION,
    FRAME_HEADER,
    FRAME_HEADER_CRC,
    FRAME_HEADER_SIZE,
    FRAME_HEADER_V2_SIZE,
    HEAD,
    MAX_BATCH_COUNT,
    MAX_FRAME_SIZE,
    MAX_KEY_SIZE,
    MAX_VALUE_SIZE,
    PER_MESSAGE_OVERHEAD,
    EncodedBatch,
    FrameBody,
    Message,
    decode_messages,
    encode_batch,
    encode_columns,
    frame_columns,
    message_id,
    message_positions,
    parse_batch,
    read_header,
    verify_frame,
)

# Modest example counts keep the whole module in a few seconds; the
# exhaustive loops below cover the small cases completely instead.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

U64 = 2**64 - 1

# --- strategies ---------------------------------------------------------------


def _pseudo_random_bytes(size: int, seed: int) -> bytes:
    # Large values built from a seed: hypothesis cannot draw 5000 random bytes
    # for hundreds of messages within its buffer, but a seed is one draw.
    return random.Random(seed).randbytes(size)


str_keys = st.text(max_size=100).filter(lambda key: len(key.encode("utf-8")) <= MAX_KEY_SIZE)
byte_keys = st.one_of(
    st.binary(max_size=MAX_KEY_SIZE),
    st.binary(min_size=MAX_KEY_SIZE, max_size=MAX_KEY_SIZE),
)
keys = st.one_of(byte_keys, str_keys)
values = st.one_of(
    st.binary(max_size=64),
    st.builds(_pseudo_random_bytes, st.integers(0, 5000), st.integers(0, 2**32)),
)
# Non-ASCII of every UTF-8 width, so str keys exercise multi-byte encoding.
_KEY_ALPHABET = "aZ09-_ éÜßж中€😀"


def _pseudo_random_batch(count: int, seed: int) -> list[tuple[bytes | str, bytes]]:
    # Hypothesis draws lists of a few dozen pairs at most; this reaches the
    # full 300 messages x 5000 bytes from two draws (count and seed).
    rng = random.Random(seed)
    pairs: list[tuple[bytes | str, bytes]] = []
    for _ in range(count):
        key: bytes | str
        if rng.random() < 0.5:
            key = rng.randbytes(rng.choice([0, 1, rng.randrange(MAX_KEY_SIZE + 1), MAX_KEY_SIZE]))
        else:  # at most 60 characters of at most 4 bytes: within the key limit
            key = "".join(rng.choices(_KEY_ALPHABET, k=rng.randrange(61)))
        value = rng.randbytes(rng.choice([0, rng.randrange(5001), 5000]))
        pairs.append((key, value))
    return pairs


batches = st.one_of(
    st.lists(st.tuples(keys, values), min_size=1, max_size=300),
    st.builds(_pseudo_random_batch, st.integers(1, 300), st.integers(0, 2**32)),
)
small_batches = st.lists(
    st.tuples(st.one_of(st.binary(max_size=20), st.text(max_size=5)), st.binary(max_size=40)),
    min_size=1,
    max_size=8,
)
positions = st.integers(0, 2**48)
sequences = st.integers(0, 2**63)
timestamps = st.integers(0, U64)


# --- helpers ------------------------------------------------------------------


def _key_bytes(key: bytes | str) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


_HEADER_FIELDS = (
    "magic",
    "version",
    "flags",
    "header_size",
    "frame_size",
    "count",
    "base_position",
    "base_sequence",
    "timestamp",
    "keys_size",
    "values_size",
    "body_crc",
)


def _header_fields(frame: bytes) -> dict[str, Any]:
    return dict(zip(_HEADER_FIELDS, FRAME_HEADER.unpack_from(frame), strict=True))


def _reheader(frame: bytes, **changes: Any) -> bytes:
    """``frame`` with header fields replaced and a *valid* header CRC: a header that lies."""
    fields = _header_fields(frame)
    fields.update(changes)
    head = FRAME_HEADER.pack(*(fields[name] for name in _HEADER_FIELDS))
    return head + FRAME_HEADER_CRC.pack(zlib.crc32(head)) + frame[FRAME_HEADER_SIZE:]


def _craft_frame(
    key_lengths: list[int],
    value_lengths: list[int],
    keys_blob: bytes,
    values_blob: bytes,
    *,
    base_position: int = 0,
    **changes: Any,
) -> bytes:
    """Build a frame by hand from its columns, independent of ``encode_columns``."""
    count = len(key_lengths)
    body = (
        struct.pack(f"<{count}I", *range(count))
        + struct.pack(f"<{count}I", *value_lengths)
        + bytes(key_lengths)
        + keys_blob
        + values_blob
    )
    fields = {
        "magic": b"MVLB",
        "version": 1,
        "flags": 0,
        "header_size": FRAME_HEADER_SIZE,
        "frame_size": FRAME_HEADER_SIZE + len(body),
        "count": count,
        "base_position": base_position,
        "base_sequence": 0,
        "timestamp": 0,
        "keys_size": len(keys_blob),
        "values_size": len(values_blob),
        "body_crc": zlib.crc32(body),
    }
    fields.update(changes)
    head = FRAME_HEADER.pack(*(fields[name] for name in _HEADER_FIELDS))
    return head + FRAME_HEADER_CRC.pack(zlib.crc32(head)) + body


def _corruption_fault(read: Callable[[], object], position: int) -> str | None:
    """``None`` if ``read()`` raised CorruptData naming ``position``; else what went wrong."""
    try:
        result = read()
    except CorruptData as exc:
        if exc.position != position:
            return f"CorruptData.position is {exc.position}, expected {position}: {exc}"
        if not re.search(rf"\b{position}\b", str(exc)):
            return f"message does not name position {position}: {exc}"
        return None
    except Exception as exc:
        return f"raised {exc!r} instead of CorruptData"
    return f"accepted damaged data: {result!r:.300}"


def _stream_faults(buf: bytes, offset: int, position: int) -> list[str]:
    """Faults of every reading path over a frame stored at stream ``position``."""
    faults = [
        _corruption_fault(lambda: verify_frame(buf, offset, position), position),
        _corruption_fault(
            lambda: decode_messages(buf, offset, read_header(buf, offset, position)), position
        ),
        _corruption_fault(
            lambda: frame_columns(buf, offset, read_header(buf, offset, position)), position
        ),
    ]
    return [fault for fault in faults if fault is not None]


def _batch_faults(frame: bytes | memoryview) -> list[str]:
    """Faults of ``parse_batch`` (a producer's batch: positions are offsets, i.e. 0)."""
    fault = _corruption_fault(lambda: parse_batch(frame), 0)
    return [] if fault is None else [fault]


def _flip(buf: bytes, index: int, mask: int) -> bytes:
    damaged = bytearray(buf)
    damaged[index] ^= mask
    return bytes(damaged)


SMALL_PAIRS: list[tuple[bytes | str, bytes]] = [
    (b"OrderPlaced", b"{}"),
    ("Ünï", b""),
    (b"", b"\x00\xff" * 3),
]
SMALL_POSITION = 1_000_003


# --- round trip ---------------------------------------------------------------


@THOROUGH
@given(pairs=batches, base=positions, sequence=sequences, timestamp=timestamps, data=st.data())
def test_round_trip(
    pairs: list[tuple[bytes | str, bytes]],
    base: int,
    sequence: int,
    timestamp: int,
    data: st.DataObject,
) -> None:
    batch = encode_batch(pairs)
    frame = batch.frame(base, sequence, timestamp)
    count = len(pairs)
    assert len(frame) == batch.frame_size
    assert batch.frame_size == (
        FRAME_HEADER_SIZE
        + PER_MESSAGE_OVERHEAD * count
        + sum(len(_key_bytes(key)) for key, _ in pairs)
        + sum(len(value) for _, value in pairs)
    )
    assert batch.header(base, sequence, timestamp) == frame[:FRAME_HEADER_SIZE]

    header = read_header(frame, 0, base)
    assert verify_frame(frame, 0, base) == header
    assert (header.message_count, header.base_position) == (count, base)
    assert (header.base_sequence, header.timestamp) == (sequence, timestamp)
    assert header.end == base + len(frame)

    messages = decode_messages(frame, 0, header)
    expected_positions = list(message_positions(base, 0, count))
    assert [m.key for m in messages] == [_key_bytes(key) for key, _ in pairs]
    assert [m.value for m in messages] == [value for _, value in pairs]
    assert all(type(m.key) is bytes and type(m.value) is bytes for m in messages)
    assert [m.position for m in messages] == expected_positions
    assert [m.sequence for m in messages] == list(range(sequence, sequence + count))
    assert {m.timestamp for m in messages} == {timestamp}
    assert [m.next_position for m in messages] == [*expected_positions[1:], base + len(frame)]
    assert all(m.id == message_id(timestamp, m.position, m.sequence) for m in messages)

    # The same frame inside a larger buffer (a reader's read-ahead window).
    prefix = data.draw(st.binary(max_size=70), label="prefix")
    suffix = data.draw(st.binary(max_size=70), label="suffix")
    window = prefix + frame + suffix
    assert read_header(window, len(prefix), base) == header
    assert decode_messages(window, len(prefix), header) == messages
    assert verify_frame(memoryview(window), len(prefix), base) == header

    first = data.draw(st.integers(0, count - 1), label="first")
    assert decode_messages(frame, 0, header, first=first) == messages[first:]
    keys, values = frame_columns(window, len(prefix), header, first)
    assert list(keys) == [m.key for m in messages[first:]]
    assert list(values) == [m.value for m in messages[first:]]

    # A producer's batch: base fields are ignored and re-assigned.
    parsed = parse_batch(frame)
    assert parsed.frame(base, sequence, timestamp) == frame
    assert parsed.frame_size == batch.frame_size
    assert parse_batch(memoryview(frame)).frame(0, 1, 2) == batch.frame(0, 1, 2)

    unzipped_keys, unzipped_values = zip(*pairs, strict=True)
    assert encode_columns(unzipped_keys, unzipped_values).frame(base, sequence, timestamp) == frame


def test_message_positions_follow_the_slot_rule() -> None:
    assert list(message_positions(1000, 0, 4)) == [1000, 1068, 1072, 1076]
    assert list(message_positions(1000, 2, 4)) == [1072, 1076]
    assert list(message_positions(1000, 0, 1)) == [1000]


def test_bytes_like_inputs_encode_like_bytes() -> None:
    plain = encode_batch([(b"key", b"value"), (b"k2", b"")]).frame(5, 6, 7)
    alike = encode_batch(
        [(bytearray(b"key"), memoryview(b"value")), (memoryview(b"k2"), bytearray())]  # type: ignore[list-item]
    ).frame(5, 6, 7)
    assert alike == plain


def test_decoded_messages_behave_like_messages() -> None:
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 9, 10)
    messages = decode_messages(frame, 0, read_header(frame, 0, SMALL_POSITION))
    first = messages[0]
    assert isinstance(first, Message)
    assert first == Message(SMALL_POSITION, 9, 10, b"OrderPlaced", b"{}", SMALL_POSITION + 68)
    assert first._replace(value=b"x").value == b"x"
    assert first.id == message_id(10, SMALL_POSITION, 9)


# --- corruption: bit flips ----------------------------------------------------


@THOROUGH
@given(
    pairs=small_batches,
    base=positions,
    sequence=sequences,
    timestamp=timestamps,
    data=st.data(),
)
def test_any_single_bit_flip_is_detected(
    pairs: list[tuple[bytes | str, bytes]],
    base: int,
    sequence: int,
    timestamp: int,
    data: st.DataObject,
) -> None:
    batch = encode_batch(pairs)
    frame = batch.frame(base, sequence, timestamp)
    bit = data.draw(st.integers(0, 8 * len(frame) - 1), label="bit")
    damaged = _flip(frame, bit // 8, 1 << (bit % 8))
    assert _stream_faults(damaged, 0, base) == []
    # Framed at 0 so that the expected position (an offset) is unambiguous.
    assert _batch_faults(_flip(batch.frame(0, sequence, timestamp), bit // 8, 1 << (bit % 8))) == []


def test_every_byte_of_a_small_frame_is_protected() -> None:
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 77, 1_700_000_000_000)
    batch_frame = encode_batch(SMALL_PAIRS).frame(0, 77, 1_700_000_000_000)
    masks = [1 << bit for bit in range(8)] + [0xFF, 0x5A]
    faults = [
        (index, mask, fault)
        for index in range(len(frame))
        for mask in masks
        for fault in _stream_faults(_flip(frame, index, mask), 0, SMALL_POSITION)
        + _batch_faults(_flip(batch_frame, index, mask))
    ]
    assert faults == []


def test_a_frame_read_at_the_wrong_position_is_rejected() -> None:
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 0, 0)
    assert _stream_faults(frame, 0, SMALL_POSITION + 4) == []
    assert _stream_faults(frame, 0, 0) == []


# --- corruption: truncation ---------------------------------------------------


def test_every_truncation_of_a_small_frame_is_detected() -> None:
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 1, 2)
    batch_frame = encode_batch(SMALL_PAIRS).frame(0, 1, 2)
    header = read_header(frame, 0, SMALL_POSITION)
    faults = [
        (size, fault)
        for size in range(len(frame))
        for fault in _stream_faults(frame[:size], 0, SMALL_POSITION)
        + _batch_faults(batch_frame[:size])
    ]
    # A reader that already holds the header (from an earlier, shorter read).
    faults += [
        (size, fault)
        for size in range(FRAME_HEADER_SIZE, len(frame))
        if (
            fault := _corruption_fault(
                partial(decode_messages, frame[:size], 0, header), SMALL_POSITION
            )
        )
    ]
    assert faults == []


@FAST
@given(pairs=small_batches, base=positions, data=st.data())
def test_any_truncation_is_detected(
    pairs: list[tuple[bytes | str, bytes]], base: int, data: st.DataObject
) -> None:
    batch = encode_batch(pairs)
    frame = batch.frame(base, 3, 4)
    size = data.draw(st.integers(0, len(frame) - 1), label="size")
    assert _stream_faults(frame[:size], 0, base) == []
    assert _batch_faults(batch.frame(0, 3, 4)[:size]) == []


# --- corruption: lengths that lie behind valid CRCs ---------------------------

# Frame of SMALL_PAIRS: count 3, keys_size 11 + 5 + 0 = 16, values_size 2 + 0 + 6 = 8.
LIES: list[Any] = [
    pytest.param({"count": 2}, id="count-1"),
    pytest.param({"count": 4}, id="count+1"),
    pytest.param({"count": 2, "frame_size": -PER_MESSAGE_OVERHEAD}, id="count-1,size-9"),
    pytest.param({"count": 4, "frame_size": PER_MESSAGE_OVERHEAD}, id="count+1,size+9"),
    pytest.param({"count": 0, "frame_size": -3 * PER_MESSAGE_OVERHEAD}, id="count=0"),
    pytest.param(
        {"count": MAX_BATCH_COUNT + 1, "frame_size": (MAX_BATCH_COUNT - 2) * PER_MESSAGE_OVERHEAD},
        id="count>max",
    ),
    pytest.param({"count": 2**32 - 1}, id="count=u32max"),
    pytest.param({"keys_size": 15}, id="keys-1"),
    pytest.param({"keys_size": 17}, id="keys+1"),
    pytest.param({"keys_size": 15, "frame_size": -1}, id="keys-1,size-1"),
    pytest.param({"keys_size": 17, "frame_size": 1}, id="keys+1,size+1"),
    pytest.param({"values_size": 7}, id="values-1"),
    pytest.param({"values_size": 9}, id="values+1"),
    pytest.param({"values_size": 7, "frame_size": -1}, id="values-1,size-1"),
    pytest.param({"values_size": 9, "frame_size": 1}, id="values+1,size+1"),
    pytest.param({"values_size": 2**32 - 1}, id="values=u32max"),
    pytest.param({"frame_size": -1}, id="size-1"),
    pytest.param({"frame_size": 1}, id="size+1"),
    pytest.param({"frame_size": 4}, id="size+4"),
    pytest.param({"values_size": MAX_FRAME_SIZE, "frame_size": MAX_FRAME_SIZE - 8}, id="size>max"),
    pytest.param(
        {"keys_size": 17, "values_size": 7},
        id="keys+1,values-1",
    ),
    pytest.param(
        {"keys_size": 15, "values_size": 9},
        id="keys-1,values+1",
    ),
]


@pytest.mark.parametrize("followed", [False, True], ids=["at-end", "followed-by-a-frame"])
@pytest.mark.parametrize("lie", LIES)
def test_header_that_lies_about_lengths_is_rejected(lie: dict[str, int], followed: bool) -> None:
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 0, 0)
    fields = _header_fields(frame)
    assert (fields["count"], fields["keys_size"], fields["values_size"]) == (3, 16, 8)
    changes = dict(lie)
    # frame_size in a lie is relative; the other fields are absolute.
    changes["frame_size"] = fields["frame_size"] + lie.get("frame_size", 0)
    lying = _reheader(frame, **changes)
    # Followed by another frame, a size that grows is not caught by running
    # out of bytes: the lie itself must be detected.
    following = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION + len(frame), 3, 0)
    buf = lying + following if followed else lying
    assert _stream_faults(buf, 0, SMALL_POSITION) == []
    assert _batch_faults(_reheader(lying, base_position=0)) == []


def _small_body() -> bytes:
    return encode_batch(SMALL_PAIRS).frame()[FRAME_HEADER_SIZE:]


def _patch(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(body)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


def _rebody_valid(frame: bytes, body: bytes) -> bytes:
    """``frame`` with another body of the same size and both CRCs made valid."""
    return _reheader(frame[:FRAME_HEADER_SIZE] + body, body_crc=zlib.crc32(body))


# Body offsets for count 3: slots at 0, value lengths at 12, key lengths at 24.
BODY_LIES: list[Any] = [
    pytest.param(lambda body: _patch(body, 4, "<I", 2), id="slot1=2"),
    pytest.param(lambda body: _patch(body, 0, "<I", 1), id="slot0=1"),
    pytest.param(lambda body: _patch(body, 8, "<I", 2**32 - 1), id="slot2=u32max"),
    pytest.param(lambda body: _patch(body, 12, "<I", 3), id="value0+1"),
    pytest.param(lambda body: _patch(body, 20, "<I", 5), id="value2-1"),
    pytest.param(lambda body: _patch(body, 16, "<I", 2**32 - 1), id="value1=u32max"),
    pytest.param(lambda body: _patch(body, 16, "<I", 5000), id="value1=5000"),
    pytest.param(lambda body: _patch(body, 24, "B", 12), id="key0+1"),
    pytest.param(lambda body: _patch(body, 25, "B", 4), id="key1-1"),
    pytest.param(lambda body: _patch(body, 26, "B", 255), id="key2=255"),
    pytest.param(
        # Message 0: key 12 bytes, value 1 byte. The columns still add up to
        # keys_size + values_size, but no longer to keys_size alone.
        lambda body: _patch(_patch(body, 24, "B", 12), 12, "<I", 1),
        id="key0+1,value0-1",
    ),
]


@pytest.mark.parametrize("lie", BODY_LIES)
def test_body_columns_that_lie_are_rejected(lie: Callable[[bytes], bytes]) -> None:
    original = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 0, 0)
    body = lie(_small_body())
    assert body != original[FRAME_HEADER_SIZE:]
    lying = _rebody_valid(original, body)
    assert _stream_faults(lying, 0, SMALL_POSITION) == []
    assert _batch_faults(_reheader(lying, base_position=0)) == []


@pytest.mark.parametrize(
    "change",
    [
        {"version": 0},
        {"version": 3},
        {"version": 255},
        {"flags": 1},
        {"flags": 0x80},
        {"header_size": 128},
        {"header_size": 0},
    ],
    ids=repr,
)
def test_unknown_versions_and_flags_are_unsupported(change: dict[str, int]) -> None:
    frame = _reheader(encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 0, 0), **change)
    readers: list[Callable[[], object]] = [
        lambda: verify_frame(frame, 0, SMALL_POSITION),
        lambda: read_header(frame, 0, SMALL_POSITION),
    ]
    for read in readers:
        with pytest.raises(UnsupportedVersion) as info:
            read()
        assert info.value.position == SMALL_POSITION
        assert str(SMALL_POSITION) in str(info.value)
    with pytest.raises(UnsupportedVersion):
        parse_batch(_reheader(frame, base_position=0))
    assert issubclass(UnsupportedVersion, CorruptData)


@pytest.mark.parametrize("where", ["body", "slots", "lengths", "size"])
def test_batch_faults_are_reported_as_offsets_into_the_batch(where: str) -> None:
    # The producer's base_position is meaningless (the server assigns one);
    # read_header documents that position=None reports offsets into the batch.
    frame = encode_batch(SMALL_PAIRS).frame(SMALL_POSITION, 0, 0)
    if where == "body":
        damaged = _flip(frame, len(frame) - 1, 1)
    elif where == "slots":
        damaged = _rebody_valid(frame, _patch(_small_body(), 4, "<I", 2))
    elif where == "lengths":
        damaged = _rebody_valid(frame, _patch(_small_body(), 12, "<I", 3))
    else:
        damaged = frame[:-1]
    assert _batch_faults(damaged) == []
    window = b"\0" * 16 + damaged
    assert _corruption_fault(lambda: verify_frame(window, 16, None), 16) is None


# --- parse_batch --------------------------------------------------------------


def test_parse_batch_rejects_trailing_bytes() -> None:
    frame = encode_batch(SMALL_PAIRS).frame()
    for extra in (b"\0", b"x" * 64, frame[:-1]):
        with pytest.raises(CorruptData) as info:
            parse_batch(frame + extra)
        assert info.value.position == len(frame)  # where the bytes that are no frame start
    # Since format v2 a batch may be several whole frames, committed together.
    assert parse_batch(frame + frame).count == 2 * len(SMALL_PAIRS)


def test_parse_batch_rejects_a_short_frame() -> None:
    frame = encode_batch(SMALL_PAIRS).frame()
    assert _batch_faults(frame[:-1]) == []
    assert _batch_faults(frame[:FRAME_HEADER_SIZE]) == []


def test_parse_batch_rejects_empty_input() -> None:
    assert _batch_faults(b"") == []
    assert _batch_faults(memoryview(b"")) == []


@FAST
@given(garbage=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(b"MVLB".__add__)))
def test_parse_batch_rejects_garbage(garbage: bytes) -> None:
    assert _batch_faults(garbage) == []


SMALL_BODY_SIZE = encode_batch(SMALL_PAIRS).frame_size - FRAME_HEADER_SIZE


@FAST
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.binary(min_size=SMALL_BODY_SIZE, max_size=SMALL_BODY_SIZE),
    )
)
def test_parse_batch_rejects_a_valid_header_over_garbage(body: bytes) -> None:
    frame = encode_batch(SMALL_PAIRS).frame()
    assume(body != frame[FRAME_HEADER_SIZE:])
    assert _batch_faults(frame[:FRAME_HEADER_SIZE] + body) == []


def test_parse_batch_rejects_a_value_over_the_limit() -> None:
    # encode_batch refuses to build this; a producer could send it anyway.
    size = MAX_VALUE_SIZE + 1
    frame = _craft_frame([1], [size], b"k", b"v" * size)
    verify_frame(frame, 0, 0)  # well-formed: only the limit is broken
    with pytest.raises(InvalidBatch, match=str(MAX_VALUE_SIZE)):
        parse_batch(frame)


def test_parse_batch_accepts_a_value_at_the_limit() -> None:
    frame = _craft_frame([1, 0], [MAX_VALUE_SIZE, 0], b"k", b"v" * MAX_VALUE_SIZE)
    assert parse_batch(frame).frame() == frame


def test_parse_batch_value_limit_cannot_be_dodged_by_a_lying_split() -> None:
    # Column says: key 0 bytes, value MAX+1 bytes; the header moves one byte
    # of the values into keys_size so that values_size is exactly the limit.
    size = MAX_VALUE_SIZE + 1
    frame = _craft_frame([0], [size], b"", b"v" * size, keys_size=1, values_size=size - 1)
    with pytest.raises((InvalidBatch, CorruptData)):
        parse_batch(frame)


# --- checkpoint ---------------------------------------------------------------

checkpoints = st.builds(
    Checkpoint,
    commit=st.integers(0, U64),
    length=st.integers(0, U64),
    next_sequence=st.integers(0, U64),
    last_frame_position=st.integers(0, U64),
    last_timestamp=st.integers(0, U64),
).flatmap(
    # A trimmed stream's first position lies within its length.
    lambda c: st.builds(
        lambda first: dataclasses.replace(c, first_position=first), st.integers(0, c.length)
    )
)


@FAST
@given(checkpoint=checkpoints)
def test_checkpoint_round_trip(checkpoint: Checkpoint) -> None:
    raw = checkpoint.encode()
    assert len(raw) == CHECKPOINT_SIZE == 64
    assert Checkpoint.decode(raw) == checkpoint
    assert Checkpoint.decode(memoryview(raw)) == checkpoint


def test_empty_checkpoint_round_trip() -> None:
    assert Checkpoint.decode(Checkpoint().encode()) == Checkpoint(0, 0, 0, 0, 0)


def _checkpoint_fault(raw: bytes) -> str | None:
    try:
        result = Checkpoint.decode(raw)
    except CorruptData:
        return None
    except Exception as exc:
        return f"raised {exc!r} instead of CorruptData"
    return f"accepted damaged checkpoint: {result!r}"


@FAST
@given(checkpoint=checkpoints, data=st.data())
def test_any_checkpoint_bit_flip_is_detected(checkpoint: Checkpoint, data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, 8 * CHECKPOINT_SIZE - 1), label="bit")
    assert _checkpoint_fault(_flip(checkpoint.encode(), bit // 8, 1 << (bit % 8))) is None


def test_every_checkpoint_bit_and_truncation_is_protected() -> None:
    raw = Checkpoint(7, 123_456, 789, 120_000, 1_700_000_000_000).encode()
    faults = [
        (index, bit, fault)
        for index in range(CHECKPOINT_SIZE)
        for bit in range(8)
        if (fault := _checkpoint_fault(_flip(raw, index, 1 << bit)))
    ]
    faults += [(size, -1, fault) for size in range(64) if (fault := _checkpoint_fault(raw[:size]))]
    faults += [(65, -1, fault) for fault in [_checkpoint_fault(raw + b"\0")] if fault]
    assert faults == []


def test_untrimmed_checkpoint_stays_version_1_and_a_trimmed_one_is_version_2() -> None:
    untrimmed = Checkpoint(1, 2, 3, 4, 5).encode()
    assert untrimmed[4] == 1 and untrimmed[48:60] == bytes(12)  # what readers before v2 read
    trimmed = Checkpoint(1, 9_000, 3, 4, 5, first_position=4_096)
    raw = trimmed.encode()
    assert raw[4] == 2 and int.from_bytes(raw[48:56], "little") == 4_096
    assert Checkpoint.decode(raw) == trimmed


@pytest.mark.parametrize(
    ("version", "first", "length"), [(1, 10, 20), (2, 21, 20)], ids=["v1-with-first", "past-end"]
)
def test_checkpoint_first_position_out_of_place_is_corrupt(
    version: int, first: int, length: int
) -> None:
    fields = list(CHECKPOINT.unpack(Checkpoint(1, length, 3, 4, 5).encode()[: CHECKPOINT.size]))
    fields[1], fields[-1] = version, first
    body = CHECKPOINT.pack(*fields)
    with pytest.raises(CorruptData, match="first position"):
        Checkpoint.decode(body + CHECKPOINT_CRC.pack(zlib.crc32(body)))


@pytest.mark.parametrize("version", [0, 3, 255])
def test_checkpoint_of_another_version_is_unsupported(version: int) -> None:
    fields = list(CHECKPOINT.unpack(Checkpoint(1, 2, 3, 4, 5).encode()[: CHECKPOINT.size]))
    fields[1] = version
    body = CHECKPOINT.pack(*fields)
    with pytest.raises(UnsupportedVersion):
        Checkpoint.decode(body + CHECKPOINT_CRC.pack(zlib.crc32(body)))


def test_checkpoint_with_other_magic_is_corrupt() -> None:
    fields = list(CHECKPOINT.unpack(Checkpoint(1, 2, 3, 4, 5).encode()[: CHECKPOINT.size]))
    fields[0] = b"MVLB"
    body = CHECKPOINT.pack(*fields)
    assert _checkpoint_fault(body + CHECKPOINT_CRC.pack(zlib.crc32(body))) is None


# --- message ids --------------------------------------------------------------


def test_message_id_layout() -> None:
    assert message_id(0x0102_0304_0506, 0x0708_090A_0B0C, 0x0D0E_0F10) == bytes(range(1, 17))
    assert message_id(0, 0, 2**32 + 5)[-4:] == (5).to_bytes(4, "big")


@FAST
@given(
    inputs=st.lists(
        st.tuples(st.integers(0, 2**48 - 1), st.integers(0, 2**48 - 1), st.integers(0, U64)),
        min_size=2,
        max_size=50,
        unique_by=lambda t: t[:2],
    )
)
def test_message_ids_sort_like_timestamp_then_position(
    inputs: list[tuple[int, int, int]],
) -> None:
    ordered = sorted(inputs, key=lambda t: t[:2])
    ids = [message_id(*t) for t in ordered]
    assert all(len(i) == 16 for i in ids)
    assert all(a < b for a, b in pairwise(ids))
    assert sorted(message_id(*t) for t in inputs) == ids


# --- bad input ----------------------------------------------------------------


def _assert_names_message(info: pytest.ExceptionInfo[InvalidBatch], index: int) -> None:
    assert re.search(rf"\bmessage {index}\b", str(info.value)), str(info.value)


def test_empty_batch_is_invalid() -> None:
    makers: list[Callable[[], object]] = [
        lambda: encode_batch([]),
        lambda: encode_batch(iter([])),
        lambda: encode_columns([], []),
    ]
    for make in makers:
        with pytest.raises(InvalidBatch, match="at least one"):
            make()


def test_batch_count_limit() -> None:
    batch = encode_batch([(b"", b"")] * MAX_BATCH_COUNT)
    assert batch.frame_size == FRAME_HEADER_SIZE + PER_MESSAGE_OVERHEAD * MAX_BATCH_COUNT
    frame = batch.frame(0, 0, 0)
    header = verify_frame(frame, 0, 0)
    assert header.message_count == MAX_BATCH_COUNT
    messages = decode_messages(frame, 0, header, first=MAX_BATCH_COUNT - 1)
    assert [m.next_position for m in messages] == [len(frame)]
    with pytest.raises(InvalidBatch, match=str(MAX_BATCH_COUNT + 1)):
        encode_batch([(b"", b"")] * (MAX_BATCH_COUNT + 1))
    with pytest.raises(InvalidBatch, match=str(MAX_BATCH_COUNT + 1)):
        encode_columns([b""] * (MAX_BATCH_COUNT + 1), [b""] * (MAX_BATCH_COUNT + 1))


@pytest.mark.parametrize(
    ("ok", "too_long"),
    [
        (b"k" * MAX_KEY_SIZE, b"k" * (MAX_KEY_SIZE + 1)),
        # Limits count UTF-8 bytes, not characters: "é" is two bytes.
        ("é" * 127 + "a", "é" * 128),
    ],
    ids=["bytes", "str"],
)
def test_key_size_limit(ok: bytes | str, too_long: bytes | str) -> None:
    assert len(_key_bytes(ok)) == MAX_KEY_SIZE
    frame = encode_batch([(b"a", b""), (ok, b"v")]).frame()
    assert decode_messages(frame, 0, verify_frame(frame, 0, 0))[1].key == _key_bytes(ok)
    with pytest.raises(InvalidBatch) as info:
        encode_batch([(b"a", b""), (b"b", b""), (too_long, b"v"), (b"c", b"")])
    _assert_names_message(info, 2)
    assert str(MAX_KEY_SIZE + 1) in str(info.value)


def test_value_size_limit() -> None:
    at_limit = bytes(MAX_VALUE_SIZE)
    batch = encode_batch([(b"a", b"x"), (b"big", at_limit)])
    assert len(batch.frames) == 1  # at the limit a value is native: one frame, format v1
    frame = batch.frame()
    assert decode_messages(frame, 0, verify_frame(frame, 0, 0))[1].value == at_limit
    # One byte more and the value travels in pieces: a HEAD frame and a
    # CONTINUATION, in the same batch (format v2).
    over = encode_batch([(b"a", b"x"), (b"big", at_limit + b"!")])
    assert [body.flags for body in over.frames] == [0, HEAD, CONTINUATION]
    assert over.count == 2


def test_frame_size_limit() -> None:
    # A frame is planned with room for the v2 header, so that giving the
    # batch a producer id (32 header bytes more) never takes it over the limit.
    overhead = FRAME_HEADER_V2_SIZE + PER_MESSAGE_OVERHEAD * 4
    big = bytes(MAX_VALUE_SIZE)
    exact = [(b"", big), (b"", big), (b"", big), (b"", big[overhead:])]
    plain = encode_batch(exact)
    assert (len(plain.frames), plain.frame_size) == (1, MAX_FRAME_SIZE - 32)  # a v1 frame
    batch = plain.with_producer(bytes(range(1, 17)), 0)
    assert batch.frame_size == MAX_FRAME_SIZE
    frame = batch.frame(0, 0, 0)
    assert verify_frame(frame, 0, 0).frame_size == MAX_FRAME_SIZE
    assert parse_batch(frame).frame_size == MAX_FRAME_SIZE
    # A byte more than a frame holds: the batch is split into whole frames.
    for pairs in ([*exact[:3], (b"k", big[overhead:])], [(b"", big)] * 4):
        split = encode_batch(pairs)
        assert len(split.frames) == 2
        assert all(body.body_size + FRAME_HEADER_SIZE <= MAX_FRAME_SIZE for body in split.frames)
        assert parse_batch(split.frame()).count == 4


def test_frame_over_the_size_limit_is_corrupt_on_read() -> None:
    # Only a hand-made frame can be this big; readers must not trust it.
    size = MAX_VALUE_SIZE
    frame = _craft_frame([0] * 5, [size] * 5, b"", bytes(5 * size), base_position=0)
    assert _stream_faults(frame, 0, 0) == []
    assert _batch_faults(frame) == []


non_pairs = st.one_of(
    st.tuples(),
    st.tuples(st.binary(max_size=3)),
    st.tuples(st.binary(max_size=3), st.binary(max_size=3), st.binary(max_size=3)),
    st.lists(st.binary(max_size=3), min_size=3, max_size=5),
    st.none(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=5),
    st.text(max_size=5),
)
bad_keys = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.lists(st.binary(), max_size=2)
)
bad_values = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.floats(allow_nan=False),
    st.lists(st.binary(), max_size=2),
)


@FAST
@given(pairs=small_batches, bad=non_pairs, data=st.data())
def test_non_pair_rows_are_named(
    pairs: list[tuple[bytes | str, bytes]], bad: object, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(pairs)), label="index")
    rows: list[Any] = [*pairs[:index], bad, *pairs[index:]]
    with pytest.raises(InvalidBatch) as info:
        encode_batch(rows)
    _assert_names_message(info, index)
    with pytest.raises(InvalidBatch) as info:
        encode_batch(iter(rows))
    _assert_names_message(info, index)


@FAST
@given(pairs=small_batches, bad_key=bad_keys, data=st.data())
def test_bad_keys_are_named(
    pairs: list[tuple[bytes | str, bytes]], bad_key: object, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(pairs)), label="index")
    rows: list[Any] = [*pairs[:index], (bad_key, b"value"), *pairs[index:]]
    with pytest.raises(InvalidBatch, match="key must be bytes or str") as info:
        encode_batch(rows)
    _assert_names_message(info, index)
    with pytest.raises(InvalidBatch, match="key must be bytes or str") as info:
        encode_columns([row[0] for row in rows], [row[1] for row in rows])
    _assert_names_message(info, index)


@FAST
@given(pairs=small_batches, bad_value=bad_values, data=st.data())
def test_bad_values_are_named(
    pairs: list[tuple[bytes | str, bytes]], bad_value: object, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(pairs)), label="index")
    rows: list[Any] = [*pairs[:index], (b"key", bad_value), *pairs[index:]]
    with pytest.raises(InvalidBatch, match="value must be a contiguous bytes-like") as info:
        encode_batch(rows)
    _assert_names_message(info, index)
    with pytest.raises(InvalidBatch, match="value must be a contiguous bytes-like") as info:
        encode_columns([row[0] for row in rows], [row[1] for row in rows])
    _assert_names_message(info, index)


def test_columns_of_different_lengths_are_invalid() -> None:
    with pytest.raises(InvalidBatch, match="2 keys but 1 values"):
        encode_columns([b"a", b"b"], [b"x"])


def test_wide_memoryview_values_are_invalid() -> None:
    # len() of a memoryview counts items, not bytes: the lengths would lie.
    with pytest.raises(InvalidBatch, match="flat byte strings"):
        encode_batch([(b"k", memoryview(array("I", [1, 2])))])  # type: ignore[list-item]


def test_wide_memoryview_keys_are_invalid_or_encoded_correctly() -> None:
    key = memoryview(array("I", [1]))
    try:
        batch = encode_batch([(key, b"value")])  # type: ignore[list-item]
    except InvalidBatch:
        return
    frame = batch.frame()
    assert decode_messages(frame, 0, verify_frame(frame, 0, 0))[0].key == key.tobytes()


def test_non_contiguous_memoryview_values_are_invalid_or_encoded_correctly() -> None:
    value = memoryview(b"abcdef")[::2]
    try:
        batch = encode_batch([(b"k", value)])  # type: ignore[list-item]
    except InvalidBatch:
        return
    frame = batch.frame()
    assert decode_messages(frame, 0, verify_frame(frame, 0, 0))[0].value == b"ace"


def test_with_producer_refuses_a_frame_with_no_room_for_the_longer_header() -> None:
    # encode_batch always leaves the 32 bytes; a body made by hand that fills
    # the v1 limit to the last byte cannot take a producer id.
    body = FrameBody(1, 0, MAX_FRAME_SIZE - FRAME_HEADER_SIZE - PER_MESSAGE_OVERHEAD, 0, ())
    assert EncodedBatch((body,)).frame_size == MAX_FRAME_SIZE
    with pytest.raises(InvalidBatch, match="no room for a producer id"):
        EncodedBatch((body,)).with_producer(bytes(range(1, 17)), 0)
