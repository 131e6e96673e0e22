"""Golden files pin format v1: stored bytes must never change meaning.

``tests/data/golden-v1.*`` were written once by ``tests/data/make_golden.py``.
A stream written today must still be readable by every later version, and a
later version must not silently write different bytes; if one of these tests
fails after a change to ``format.py``, the change broke the format. Regenerate
the files only together with a new format version (and docs/FORMAT.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zlib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from messagevault.checkpoint import Checkpoint
from messagevault.format import (
    decode_messages,
    encode_batch,
    message_id,
    verify_frame,
)

DATA = Path(__file__).resolve().parent / "data"
STREAM_FILE = DATA / "golden-v1.mvlog"
CHECKPOINT_FILE = DATA / "golden-v1.checkpoint"
JSON_FILE = DATA / "golden-v1.json"

# Pinned here rather than derived, so that regenerating the files (which would
# make every other test pass again) still fails loudly.
STREAM_SIZE = 1240
STREAM_CRC32 = 0xE874C62B
STREAM_SHA256 = "18873bf0f15372f5fc8ef64829d95e2aeda548aa40e97427a070cce8f2f878b8"
CHECKPOINT_CRC32 = 0x2144DF1C
CHECKPOINT_SHA256 = "f772f1cec829ae3bcdd53d42d19d06455d2824c837a807f5900d7201f8d150c9"


@cache
def _generator() -> ModuleType:
    # Loaded by path: tests/data is a folder of data, not a package.
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _expected() -> dict[str, Any]:
    expected: dict[str, Any] = json.loads(JSON_FILE.read_text(encoding="utf-8"))
    return expected


def _u(buf: bytes, offset: int, size: int) -> int:
    return int.from_bytes(buf[offset : offset + size], "little")


# --- (c) the files themselves are pinned --------------------------------------


def test_golden_files_are_pinned() -> None:
    stream = STREAM_FILE.read_bytes()
    checkpoint = CHECKPOINT_FILE.read_bytes()
    assert len(stream) == STREAM_SIZE == _expected()["stream_size"]
    assert zlib.crc32(stream) == STREAM_CRC32
    assert hashlib.sha256(stream).hexdigest() == STREAM_SHA256
    assert len(checkpoint) == 64
    assert zlib.crc32(checkpoint) == CHECKPOINT_CRC32
    assert hashlib.sha256(checkpoint).hexdigest() == CHECKPOINT_SHA256


# --- (a) encoding today gives the same bytes ----------------------------------


def test_generator_reproduces_the_golden_files() -> None:
    generator = _generator()
    stream, checkpoint, expected = generator.build()
    assert stream == STREAM_FILE.read_bytes()
    assert checkpoint == CHECKPOINT_FILE.read_bytes()
    assert expected == _expected()
    assert generator.render_json(expected) == JSON_FILE.read_text(encoding="utf-8")


def test_encoding_the_listed_messages_reproduces_the_stream() -> None:
    # Independent of the generator: the JSON alone says what was encoded where.
    expected = _expected()
    stream = b""
    for index, frame in enumerate(expected["frames"]):
        pairs = [
            (bytes.fromhex(m["key_hex"]), bytes.fromhex(m["value_hex"]))
            for m in expected["messages"]
            if m["frame"] == index
        ]
        assert frame["position"] == len(stream)
        stream += encode_batch(pairs).frame(
            frame["position"], frame["base_sequence"], frame["timestamp"]
        )
    assert stream == STREAM_FILE.read_bytes()
    assert Checkpoint(**expected["checkpoint"]).encode() == CHECKPOINT_FILE.read_bytes()


def test_str_keys_encode_as_their_utf8_bytes() -> None:
    keys = [bytes.fromhex(m["key_hex"]) for m in _expected()["messages"]]
    assert "Ünïcode".encode() in keys
    assert "ключ".encode() in keys
    assert b"" in keys
    assert b"K" * 255 in keys


# --- (b) decoding the golden bytes gives the listed messages -------------------


def test_decoding_the_golden_stream_yields_the_listed_messages() -> None:
    stream = STREAM_FILE.read_bytes()
    expected = _expected()
    decoded = []
    position = 0
    while position < len(stream):
        header = verify_frame(stream, position, position)
        decoded += decode_messages(stream, position, header)
        position = header.end
    assert position == len(stream)
    frame_of = {frame["position"]: i for i, frame in enumerate(expected["frames"])}
    starts = sorted(frame_of)
    got = [
        {
            "frame": frame_of[max(start for start in starts if start <= message.position)],
            "position": message.position,
            "sequence": message.sequence,
            "timestamp": message.timestamp,
            "key_hex": message.key.hex(),
            "value_hex": message.value.hex(),
            "next_position": message.next_position,
            "id_hex": message.id.hex(),
        }
        for message in decoded
    ]
    assert got == expected["messages"]
    assert len(got) == 9


def test_decoding_the_golden_checkpoint() -> None:
    checkpoint = Checkpoint.decode(CHECKPOINT_FILE.read_bytes())
    assert checkpoint == Checkpoint(**_expected()["checkpoint"])
    assert checkpoint == Checkpoint(
        commit=3,
        length=STREAM_SIZE,
        next_sequence=9,
        last_frame_position=495,
        last_timestamp=1_700_000_000_002,
    )


def test_listed_ids_follow_the_documented_layout() -> None:
    for m in _expected()["messages"]:
        raw = bytes.fromhex(m["id_hex"])
        assert raw[:6] == m["timestamp"].to_bytes(6, "big")
        assert raw[6:12] == m["position"].to_bytes(6, "big")
        assert raw[12:] == (m["sequence"] % 2**32).to_bytes(4, "big")
        assert raw == message_id(m["timestamp"], m["position"], m["sequence"])
    ids = [m["id_hex"] for m in _expected()["messages"]]
    assert ids == sorted(ids)


# --- (d) the bytes sit where docs/FORMAT.md says ------------------------------


def test_frame_headers_match_the_documented_offsets() -> None:
    stream = STREAM_FILE.read_bytes()
    assert stream[0:4] == b"MVLB"
    assert stream[4] == 1
    for frame in _expected()["frames"]:
        start = frame["position"]
        head = stream[start : start + 64]
        assert head[0:4] == b"MVLB"
        assert head[4] == 1  # version
        assert head[5] == 0  # flags
        assert _u(head, 6, 2) == 64  # header size
        assert _u(head, 8, 4) == frame["frame_size"]
        assert _u(head, 12, 4) == frame["count"]
        assert _u(head, 16, 8) == start  # base position
        assert _u(head, 24, 8) == frame["base_sequence"]
        assert _u(head, 32, 8) == frame["timestamp"]
        assert _u(head, 40, 4) == frame["keys_size"]
        assert _u(head, 44, 4) == frame["values_size"]
        end = start + frame["frame_size"]
        assert _u(head, 48, 4) == frame["body_crc"] == zlib.crc32(stream[start + 64 : end])
        assert head[52:60] == bytes(8)  # reserved
        assert _u(head, 60, 4) == zlib.crc32(head[:60])
        assert frame["frame_size"] == 64 + 9 * frame["count"] + (
            frame["keys_size"] + frame["values_size"]
        )


def test_frame_bodies_match_the_documented_columns() -> None:
    stream = STREAM_FILE.read_bytes()
    expected = _expected()
    for index, frame in enumerate(expected["frames"]):
        messages = [m for m in expected["messages"] if m["frame"] == index]
        n = frame["count"]
        assert len(messages) == n
        body = frame["position"] + 64
        slots = [_u(stream, body + 4 * i, 4) for i in range(n)]
        value_lengths = [_u(stream, body + 4 * n + 4 * i, 4) for i in range(n)]
        key_lengths = list(stream[body + 8 * n : body + 9 * n])
        assert slots == list(range(n))
        assert key_lengths == [len(m["key_hex"]) // 2 for m in messages]
        assert value_lengths == [len(m["value_hex"]) // 2 for m in messages]
        keys_start = body + 9 * n
        values_start = keys_start + frame["keys_size"]
        assert stream[keys_start:values_start].hex() == "".join(m["key_hex"] for m in messages)
        values_end = values_start + frame["values_size"]
        assert stream[values_start:values_end].hex() == "".join(m["value_hex"] for m in messages)
        assert values_end == frame["position"] + frame["frame_size"]


def test_message_positions_point_at_their_slots() -> None:
    # From any position a reader finds the frame: message i >= 1 sits on the
    # slot that holds i, and its frame header is 64 + 4*i bytes before it.
    stream = STREAM_FILE.read_bytes()
    expected = _expected()
    for m in expected["messages"]:
        frame = expected["frames"][m["frame"]]
        i = m["sequence"] - frame["base_sequence"]
        if i == 0:
            assert m["position"] == frame["position"]
            assert stream[m["position"] : m["position"] + 4] == b"MVLB"
        else:
            assert _u(stream, m["position"], 4) == i
            assert m["position"] - 64 - 4 * i == frame["position"]
    assert expected["messages"][-1]["next_position"] == STREAM_SIZE


def test_checkpoint_matches_the_documented_offsets() -> None:
    raw = CHECKPOINT_FILE.read_bytes()
    fields = _expected()["checkpoint"]
    assert raw[0:4] == b"MVCP"
    assert raw[4] == 1
    assert raw[5:8] == bytes(3)
    assert _u(raw, 8, 8) == fields["commit"]
    assert _u(raw, 16, 8) == fields["length"]
    assert _u(raw, 24, 8) == fields["next_sequence"]
    assert _u(raw, 32, 8) == fields["last_frame_position"]
    assert _u(raw, 40, 8) == fields["last_timestamp"]
    assert raw[48:60] == bytes(12)
    assert _u(raw, 60, 4) == zlib.crc32(raw[:60])
