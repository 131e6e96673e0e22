"""Generate the golden files that pin format v2 (run once; re-run only on purpose).

    .venv/bin/python tests/data/make_golden_v2.py

Writes, next to this script:

* ``golden-v2.mvlog``: a four-commit stream as a writer lays it out from byte
  0: a v1 frame (no v2 feature used), a v2 frame with a producer id and batch
  sequence, a compressed frame, and a compressed value over 4 MiB (a HEAD
  frame; compressed, all of it fits in the head's piece);
* ``golden-v2.checkpoint``: the checkpoint committing that stream;
* ``golden-v2.json``: every frame header field and message a reader must see;
* ``golden-v2-pieces.json``: a fifth commit, a value in pieces (a HEAD and two
  CONTINUATION frames, with a producer) that follows the stream. Its 8 MiB
  body is not stored: its value is ``shake_256(PIECES_SEED)``, so the test
  generates the bytes again and checks them against the pinned headers,
  body CRCs and SHA-256.

tests/test_golden_v2.py pins the sha256/CRC-32 of these files. Compressed
bytes are zstd's output: the JSON records the libzstd version they came from.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import zstandard

from messagevault.checkpoint import Checkpoint
from messagevault.format import (
    MAX_VALUE_SIZE,
    EncodedBatch,
    FrameAssembler,
    FrameHeader,
    Message,
    encode_batch,
    verify_frame,
)

HERE = Path(__file__).resolve().parent
STREAM_FILE = HERE / "golden-v2.mvlog"
CHECKPOINT_FILE = HERE / "golden-v2.checkpoint"
JSON_FILE = HERE / "golden-v2.json"
PIECES_FILE = HERE / "golden-v2-pieces.json"

BASE_TIMESTAMP = 1_750_000_000_000
PRODUCER = bytes.fromhex("6d7661756c742d676f6c64656e2d7632")  # b"mvault-golden-v2"
PIECES_SEED = b"messagevault golden v2 pieces"
PIECES_SIZE = 2 * MAX_VALUE_SIZE + 1000  # a HEAD and two CONTINUATIONs
LISTED_VALUE_BYTES = 1024  # longer values are listed by size and SHA-256

# A compressible record, as event streams carry.
RECORD = b'{"type": "OrderPlaced", "customer": "c-0042", "items": [{"sku": "A-1", "qty": 2}]}'


def commits() -> list[EncodedBatch]:
    """The four stored commits, one batch each."""
    return [
        encode_batch([(b"v1", b"a frame that uses nothing of v2"), ("", b"")]),
        encode_batch(
            [(b"Produced", b"first"), (b"Produced", b"second"), (b"\x00\xff", bytes(range(256)))]
        ).with_producer(PRODUCER, 5),
        encode_batch(
            [(b"OrderPlaced", RECORD.replace(b"0042", b"%04d" % i)) for i in range(20)],
            compress=True,
        ),
        encode_batch([(b"Report", RECORD * (MAX_VALUE_SIZE // len(RECORD) + 1000))], compress=True),
    ]


def pieces_value() -> bytes:
    return hashlib.shake_256(PIECES_SEED).digest(PIECES_SIZE)


def pieces_batch() -> EncodedBatch:
    """The fifth commit: a value in pieces, from the same producer, its next batch."""
    return encode_batch([(b"Blob", pieces_value())]).with_producer(PRODUCER, 6)


def frame_fields(frame: bytes, header: FrameHeader) -> dict[str, Any]:
    size = header.header_size
    return {
        "position": header.base_position,
        "version": header.version,
        "flags": header.flags,
        "header_size": size,
        "frame_size": header.frame_size,
        "count": header.message_count,
        "base_sequence": header.base_sequence,
        "timestamp": header.timestamp,
        "keys_size": header.keys_size,
        "values_size": header.values_size,
        "body_crc": header.body_crc,
        "producer_hex": header.producer.hex(),
        "producer_seq": header.producer_seq,
        "chunk": header.chunk,
        "header_hex": frame[:size].hex(),
    }


def message_fields(message: Message) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "position": message.position,
        "sequence": message.sequence,
        "timestamp": message.timestamp,
        "key_hex": message.key.hex(),
        "next_position": message.next_position,
        "id_hex": message.id.hex(),
        "value_size": len(message.value),
    }
    if len(message.value) <= LISTED_VALUE_BYTES:
        fields["value_hex"] = message.value.hex()
    else:
        fields["value_sha256"] = hashlib.sha256(message.value).hexdigest()
    return fields


def place(
    batches: list[EncodedBatch], first_commit: int, position: int, sequence: int
) -> tuple[bytes, list[dict[str, Any]], list[dict[str, Any]], Checkpoint]:
    """Lay ``batches`` out one commit each from ``position``; frames, messages, checkpoint.

    Commit *n* (from 0 for the stream's first) is stamped ``BASE_TIMESTAMP + n``.
    """
    stream = bytearray()
    frames: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    start = position
    last_frame = 0
    for commit, batch in enumerate(batches, first_commit):
        at = start + len(stream)
        data = batch.frame(at, sequence, BASE_TIMESTAMP + commit)
        assembler = FrameAssembler()
        offset = 0
        while offset < len(data):
            header = verify_frame(data, offset, at + offset)
            frames.append({"commit": commit, **frame_fields(data[offset:], header)})
            messages += map(message_fields, assembler.feed(data, offset, header))
            last_frame = at + offset
            offset += header.frame_size
        stream += data
        sequence += batch.count
    checkpoint = Checkpoint(
        commit=first_commit + len(batches),
        length=start + len(stream),
        next_sequence=sequence,
        last_frame_position=last_frame,
        last_timestamp=BASE_TIMESTAMP + first_commit + len(batches) - 1,
    )
    return bytes(stream), frames, messages, checkpoint


def build() -> tuple[bytes, bytes, dict[str, Any], dict[str, Any]]:
    """(stream, checkpoint, golden-v2.json, golden-v2-pieces.json) as the writer lays them out."""
    stream, frames, messages, checkpoint = place(commits(), 0, 0, 0)
    expected = {
        "format_version": 2,
        "zstd_version": list(zstandard.ZSTD_VERSION),
        "stream_size": len(stream),
        "frames": frames,
        "messages": messages,
        "checkpoint": checkpoint_fields(checkpoint),
    }
    pieces, piece_frames, piece_messages, after = place(
        [pieces_batch()], checkpoint.commit, checkpoint.length, checkpoint.next_sequence
    )
    pieces_expected = {
        "value": {
            "recipe": "shake_256(seed).digest(size)",
            "seed_hex": PIECES_SEED.hex(),
            "size": PIECES_SIZE,
        },
        "position": checkpoint.length,
        "size": len(pieces),
        "crc32": zlib.crc32(pieces),
        "sha256": hashlib.sha256(pieces).hexdigest(),
        "frames": piece_frames,
        "messages": piece_messages,
        "checkpoint": checkpoint_fields(after),
    }
    return stream, checkpoint.encode(), expected, pieces_expected


def checkpoint_fields(checkpoint: Checkpoint) -> dict[str, int]:
    return {
        "commit": checkpoint.commit,
        "length": checkpoint.length,
        "next_sequence": checkpoint.next_sequence,
        "last_frame_position": checkpoint.last_frame_position,
        "last_timestamp": checkpoint.last_timestamp,
    }


def render_json(expected: dict[str, Any]) -> str:
    return json.dumps(expected, indent=2) + "\n"


def main() -> None:
    stream, checkpoint, expected, pieces = build()
    STREAM_FILE.write_bytes(stream)
    CHECKPOINT_FILE.write_bytes(checkpoint)
    JSON_FILE.write_text(render_json(expected), encoding="utf-8")
    PIECES_FILE.write_text(render_json(pieces), encoding="utf-8")


if __name__ == "__main__":
    main()
