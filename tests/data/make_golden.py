"""Generate the golden files that pin format v1 (run once; re-run only on purpose).

    .venv/bin/python tests/data/make_golden.py

Writes, next to this script:

* ``golden-v1.mvlog``: a three-frame stream, exactly as a writer lays it out
  from byte 0 (three commits, sequences from 0, one millisecond apart);
* ``golden-v1.checkpoint``: the checkpoint committing that stream;
* ``golden-v1.json``: every message and checkpoint field a reader must see.

tests/test_golden.py pins the sha256/CRC-32 of these files, so regenerating
them after a format change is a deliberate act, not an accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from messagevault.checkpoint import Checkpoint
from messagevault.format import (
    encode_batch,
    message_id,
    verify_frame,
)

HERE = Path(__file__).resolve().parent
STREAM_FILE = HERE / "golden-v1.mvlog"
CHECKPOINT_FILE = HERE / "golden-v1.checkpoint"
JSON_FILE = HERE / "golden-v1.json"

BASE_TIMESTAMP = 1_700_000_000_000

# The inputs cover: bytes and str (non-ASCII) keys, an empty key, empty
# values, every byte value, a key of the maximum size, and value lengths over
# 255 so that the u32 length column uses more than its low byte.
FRAMES: list[list[tuple[bytes | str, bytes]]] = [
    [
        (b"OrderPlaced", b'{"id": 7, "total": "12.50"}'),
        (b"", b""),
        ("Ünïcode", "naïve café ✓".encode()),
    ],
    [
        (b"OrderShipped", bytes(range(256))),
    ],
    [
        (b"a", b"x"),
        (b"\x00\xff", b"\x00"),
        (b"K" * 255, b""),
        ("ключ", b"value-" * 60),
        (b"last", b"\xde\xad\xbe\xef"),
    ],
]


def build() -> tuple[bytes, bytes, dict[str, Any]]:
    """Encode the golden stream; returns (stream bytes, checkpoint bytes, expectations)."""
    stream = bytearray()
    sequence = 0
    frames: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    last_frame_position = 0
    timestamp = BASE_TIMESTAMP
    for index, pairs in enumerate(FRAMES):
        timestamp = BASE_TIMESTAMP + index
        position = len(stream)
        frame = encode_batch(pairs).frame(position, sequence, timestamp)
        header = verify_frame(frame, 0, position)
        frames.append(
            {
                "position": position,
                "base_sequence": sequence,
                "timestamp": timestamp,
                "count": header.message_count,
                "frame_size": header.frame_size,
                "keys_size": header.keys_size,
                "values_size": header.values_size,
                "body_crc": header.body_crc,
            }
        )
        # Expected positions are spelled out from the documented rule (not
        # taken from the decoder) so the JSON states the format, not the code.
        positions = [position] + [position + 64 + 4 * i for i in range(1, len(pairs))]
        next_positions = [*positions[1:], position + len(frame)]
        for i, (key, value) in enumerate(pairs):
            raw_key = key.encode("utf-8") if isinstance(key, str) else key
            messages.append(
                {
                    "frame": index,
                    "position": positions[i],
                    "sequence": sequence + i,
                    "timestamp": timestamp,
                    "key_hex": raw_key.hex(),
                    "value_hex": value.hex(),
                    "next_position": next_positions[i],
                    "id_hex": message_id(timestamp, positions[i], sequence + i).hex(),
                }
            )
        stream += frame
        sequence += len(pairs)
        last_frame_position = position
    checkpoint = Checkpoint(
        commit=len(FRAMES),
        length=len(stream),
        next_sequence=sequence,
        last_frame_position=last_frame_position,
        last_timestamp=timestamp,
    )
    expected = {
        "format_version": 1,
        "stream_size": len(stream),
        "frames": frames,
        "messages": messages,
        "checkpoint": {
            "commit": checkpoint.commit,
            "length": checkpoint.length,
            "next_sequence": checkpoint.next_sequence,
            "last_frame_position": checkpoint.last_frame_position,
            "last_timestamp": checkpoint.last_timestamp,
        },
    }
    return bytes(stream), checkpoint.encode(), expected


def render_json(expected: dict[str, Any]) -> str:
    return json.dumps(expected, indent=2) + "\n"


def main() -> None:
    stream, checkpoint, expected = build()
    STREAM_FILE.write_bytes(stream)
    CHECKPOINT_FILE.write_bytes(checkpoint)
    JSON_FILE.write_text(render_json(expected), encoding="utf-8")


if __name__ == "__main__":
    main()
