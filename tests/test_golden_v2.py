"""Golden files pin format v2: a stream mixing v1 and v2 frames must always read the same.

``tests/data/golden-v2.*`` were written once by ``tests/data/make_golden_v2.py``
(see its docstring for what the stream holds). A later version must read
them unchanged and, for the same input, write the same bytes; if one of these
tests fails after a change to ``format.py``, the change broke the format.
Regenerate the files only together with a new format version (and
docs/FORMAT.md). The v1 files keep their own tests (test_golden.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import zlib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zstandard

from messagevault import FileStorage, Reader, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.errors import InvalidPosition
from messagevault.format import (
    COMPRESSED,
    CONTINUATION,
    HEAD,
    FrameAssembler,
    Message,
    message_id,
    parse_batch,
    verify_frame,
)

DATA = Path(__file__).resolve().parent / "data"
STREAM_FILE = DATA / "golden-v2.mvlog"
CHECKPOINT_FILE = DATA / "golden-v2.checkpoint"
JSON_FILE = DATA / "golden-v2.json"
PIECES_FILE = DATA / "golden-v2-pieces.json"

# Pinned here rather than derived, so that regenerating the files (which would
# make every other test pass again) still fails loudly.
STREAM_SIZE = 1779
STREAM_CRC32 = 0x1924D1DD
STREAM_SHA256 = "8c5f5a3d072b9fb9e0304e97ca87fa6120c6210878b7cf7c11f8ffab041575ed"
CHECKPOINT_SHA256 = "039bbc8f49e9fd057908146e321139acd25aca68c978baffc9c7a62fe12727d4"
PIECES_SIZE = 8_389_909
PIECES_SHA256 = "66a3b62243b33f319e967d7d155f12d9efc8f1d86aee10dcd7aa6f673446ffd1"


@cache
def _generator() -> ModuleType:
    # Loaded by path: tests/data is a folder of data, not a package.
    spec = importlib.util.spec_from_file_location("make_golden_v2", DATA / "make_golden_v2.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _expected() -> dict[str, Any]:
    expected: dict[str, Any] = json.loads(JSON_FILE.read_text(encoding="utf-8"))
    return expected


@cache
def _pieces_expected() -> dict[str, Any]:
    expected: dict[str, Any] = json.loads(PIECES_FILE.read_text(encoding="utf-8"))
    return expected


@cache
def _pieces() -> bytes:
    """The fifth commit's frames, built by today's writer from the recipe in the JSON."""
    recipe = _pieces_expected()["value"]
    assert recipe["recipe"] == "shake_256(seed).digest(size)"
    value = hashlib.shake_256(bytes.fromhex(recipe["seed_hex"])).digest(recipe["size"])
    generator = _generator()
    assert value == generator.pieces_value()
    first = _pieces_expected()["frames"][0]
    return bytes(
        generator.pieces_batch().frame(
            first["position"], first["base_sequence"], first["timestamp"]
        )
    )


def _u(buf: bytes, offset: int, size: int) -> int:
    return int.from_bytes(buf[offset : offset + size], "little")


def _decode(data: bytes, start: int = 0) -> list[Message]:
    assembler = FrameAssembler()
    messages: list[Message] = []
    offset = 0
    while offset < len(data):
        header = verify_frame(data, offset, start + offset)
        messages += assembler.feed(data, offset, header)
        offset += header.frame_size
    assert not assembler.pending
    return messages


def _listed(message: Message) -> dict[str, Any]:
    return _generator().message_fields(message)  # type: ignore[no-any-return]


# --- (c) the files themselves are pinned --------------------------------------


def test_golden_files_are_pinned() -> None:
    stream = STREAM_FILE.read_bytes()
    assert len(stream) == STREAM_SIZE == _expected()["stream_size"]
    assert zlib.crc32(stream) == STREAM_CRC32
    assert hashlib.sha256(stream).hexdigest() == STREAM_SHA256
    checkpoint = CHECKPOINT_FILE.read_bytes()
    assert len(checkpoint) == 64
    assert hashlib.sha256(checkpoint).hexdigest() == CHECKPOINT_SHA256
    assert _pieces_expected()["size"] == PIECES_SIZE
    assert _pieces_expected()["sha256"] == PIECES_SHA256


def test_the_stream_holds_each_kind_of_frame() -> None:
    kinds = [(f["version"], f["flags"], f["producer_seq"]) for f in _expected()["frames"]]
    assert kinds == [(1, 0, 0), (2, 0, 5), (2, COMPRESSED, 0), (2, HEAD | COMPRESSED, 0)]
    pieces = [(f["flags"], f["producer_seq"]) for f in _pieces_expected()["frames"]]
    assert pieces == [(HEAD, 6), (CONTINUATION, 6), (CONTINUATION, 6)]


# --- (a) encoding today gives the same bytes ----------------------------------


def test_generator_reproduces_the_golden_files() -> None:
    stream, checkpoint, expected, pieces = _generator().build()
    assert checkpoint == CHECKPOINT_FILE.read_bytes()
    assert pieces == _pieces_expected()
    if tuple(_expected()["zstd_version"]) != zstandard.ZSTD_VERSION:
        # Another libzstd may pack the same values into other (equally valid)
        # bytes; the format is what must not change: the same messages.
        assert _decode(stream) == _decode(STREAM_FILE.read_bytes())
        pytest.skip(f"compressed bytes come from libzstd {_expected()['zstd_version']}")
    assert stream == STREAM_FILE.read_bytes()
    assert expected == _expected()
    generator = _generator()
    assert generator.render_json(expected) == JSON_FILE.read_text(encoding="utf-8")
    assert generator.render_json(pieces) == PIECES_FILE.read_text(encoding="utf-8")


def test_the_value_in_pieces_is_rebuilt_exactly() -> None:
    pieces = _pieces()
    expected = _pieces_expected()
    assert len(pieces) == expected["size"]
    assert zlib.crc32(pieces) == expected["crc32"]
    assert hashlib.sha256(pieces).hexdigest() == expected["sha256"]
    offset = 0
    for frame in expected["frames"]:
        size = frame["header_size"]
        assert pieces[offset : offset + size].hex() == frame["header_hex"]
        end = offset + frame["frame_size"]
        assert zlib.crc32(pieces[offset + size : end]) == frame["body_crc"]
        offset = end
    assert offset == len(pieces)


def test_batches_sent_as_the_golden_frames_parse_back_to_them() -> None:
    # What a producer sends is the same frames at position 0: the server's parser
    # takes them, producer id and sequence included, and frames them again the same.
    stream = STREAM_FILE.read_bytes()
    for frame in _expected()["frames"]:
        start, end = frame["position"], frame["position"] + frame["frame_size"]
        batch = parse_batch(_generator().commits()[frame["commit"]].frame())
        assert batch.producer.hex() == frame["producer_hex"]
        assert batch.producer_seq == frame["producer_seq"]
        assert batch.frame(start, frame["base_sequence"], frame["timestamp"]) == stream[start:end]


# --- (b) decoding the golden bytes gives the listed messages -------------------


def test_decoding_the_golden_stream_yields_the_listed_messages() -> None:
    messages = _decode(STREAM_FILE.read_bytes())
    assert [_listed(m) for m in messages] == _expected()["messages"]
    assert len(messages) == 26
    assert messages[-1].next_position == STREAM_SIZE


def test_decoding_the_value_in_pieces_after_the_stream() -> None:
    expected = _pieces_expected()
    (message,) = _decode(_pieces(), expected["position"])
    assert [_listed(message)] == expected["messages"]
    assert message.value == _generator().pieces_value()


def test_a_reader_on_storage_reads_the_golden_frames(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    stream = STREAM_FILE.read_bytes()
    with Writer.open(storage, "golden") as writer:
        # append_frames keeps the frames as they are: positions, sequences, timestamps.
        writer.append_frames(stream)
        # One commit here for the four of the golden stream: all else must agree.
        golden = Checkpoint.decode(CHECKPOINT_FILE.read_bytes())
        assert writer.checkpoint == dataclasses.replace(golden, commit=1)
        writer.append_frames(_pieces())
        pieces = Checkpoint(**_pieces_expected()["checkpoint"])
        assert writer.checkpoint == dataclasses.replace(pieces, commit=2)
    with Reader.open(storage, "golden") as reader:
        messages = list(reader.read())
        assert [_listed(m) for m in messages] == (
            _expected()["messages"] + _pieces_expected()["messages"]
        )
        head = _pieces_expected()["frames"][0]["position"]
        for frame in _pieces_expected()["frames"][1:]:
            with pytest.raises(InvalidPosition, match=f"read from {head}"):
                reader.read(frame["position"])
        # A reader may start on every listed message.
        for message in _expected()["messages"]:
            assert next(reader.read(message["position"])).sequence == message["sequence"]


def test_decoding_the_golden_checkpoint() -> None:
    checkpoint = Checkpoint.decode(CHECKPOINT_FILE.read_bytes())
    assert checkpoint == Checkpoint(**_expected()["checkpoint"])
    assert checkpoint == Checkpoint(
        commit=4,
        length=STREAM_SIZE,
        next_sequence=26,
        last_frame_position=1182,
        last_timestamp=1_750_000_000_003,
    )


def test_listed_ids_follow_the_documented_layout() -> None:
    listed = _expected()["messages"] + _pieces_expected()["messages"]
    for m in listed:
        assert bytes.fromhex(m["id_hex"]) == message_id(
            m["timestamp"], m["position"], m["sequence"]
        )
    ids = [m["id_hex"] for m in listed]
    assert ids == sorted(ids)


# --- (d) the bytes sit where docs/FORMAT.md says ------------------------------


def _frames_with_bytes() -> list[tuple[dict[str, Any], bytes]]:
    stream = STREAM_FILE.read_bytes()
    pieces = _pieces()
    found = [
        (frame, stream[frame["position"] : frame["position"] + frame["frame_size"]])
        for frame in _expected()["frames"]
    ]
    start = _pieces_expected()["position"]
    for frame in _pieces_expected()["frames"]:
        at = frame["position"] - start
        found.append((frame, pieces[at : at + frame["frame_size"]]))
    return found


def test_frame_headers_match_the_documented_offsets() -> None:
    frames = _frames_with_bytes()
    for index, (frame, raw) in enumerate(frames):
        assert raw[0:4] == b"MVLB"
        assert raw[4] == frame["version"]
        assert raw[5] == frame["flags"]
        size = _u(raw, 6, 2)
        assert size == frame["header_size"] == (64 if frame["version"] == 1 else 96)
        assert raw[:size].hex() == frame["header_hex"]
        assert _u(raw, 8, 4) == frame["frame_size"] == len(raw)
        assert _u(raw, 12, 4) == frame["count"]
        assert _u(raw, 16, 8) == frame["position"]
        assert _u(raw, 24, 8) == frame["base_sequence"]
        assert _u(raw, 32, 8) == frame["timestamp"]
        assert _u(raw, 40, 4) == frame["keys_size"]
        assert _u(raw, 44, 4) == frame["values_size"]
        assert _u(raw, 48, 4) == frame["body_crc"] == zlib.crc32(raw[size:])
        if frame["version"] == 1:
            assert raw[52:60] == bytes(8)
            assert _u(raw, 60, 4) == zlib.crc32(raw[:60])
            continue
        assert raw[52:68].hex() == frame["producer_hex"]
        assert _u(raw, 68, 8) == frame["producer_seq"]
        assert _u(raw, 76, 8) == frame["chunk"]
        assert raw[84:92] == bytes(8)
        assert _u(raw, 92, 4) == zlib.crc32(raw[:92])
        if frame["flags"] & CONTINUATION:
            assert frame["count"] == frame["keys_size"] == 0
            assert frame["chunk"] == _pieces_expected()["frames"][0]["position"]
            assert frame["base_sequence"] == _pieces_expected()["messages"][0]["sequence"] + 1
        elif frame["flags"] & HEAD:
            assert frame["count"] == 1
            stored = frame["values_size"]
            for piece, _ in frames[index + 1 :]:
                if not piece["flags"] & CONTINUATION:
                    break
                stored += piece["values_size"]
            assert frame["chunk"] == stored  # the value's stored bytes, in all its pieces


def test_compressed_values_are_one_zstd_frame_with_size_and_checksum() -> None:
    for frame, raw in _frames_with_bytes():
        if not frame["flags"] & COMPRESSED:
            continue
        count, size = frame["count"], frame["header_size"]
        lengths = [_u(raw, size + 4 * count + 4 * i, 4) for i in range(count)]
        packed = raw[len(raw) - frame["values_size"] :]
        assert packed[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic
        assert packed[4] & 0x04  # content checksum flag
        params = zstandard.get_frame_parameters(packed)
        assert params.has_checksum
        if frame["flags"] & HEAD:
            value_size = next(
                m["value_size"]
                for m in _expected()["messages"]
                if m["position"] == frame["position"]
            )
            assert params.content_size == value_size
        else:
            assert params.content_size == sum(lengths)
            assert len(zstandard.ZstdDecompressor().decompress(packed)) == sum(lengths)


def test_message_positions_point_at_their_slots() -> None:
    stream = STREAM_FILE.read_bytes()
    frames = _expected()["frames"]
    for m in _expected()["messages"]:
        frame = max(
            (f for f in frames if f["position"] <= m["position"]), key=lambda f: f["position"]
        )
        i = m["sequence"] - frame["base_sequence"]
        if i == 0:
            assert m["position"] == frame["position"]
            assert stream[m["position"] : m["position"] + 4] == b"MVLB"
        else:
            assert _u(stream, m["position"], 4) == i
            assert m["position"] - frame["header_size"] - 4 * i == frame["position"]
