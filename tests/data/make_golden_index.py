"""Writes tests/data/golden-index.* : the sparse index (format v1) and a trimmed checkpoint (v2).

Both describe the golden v2 stream (``golden-v2.mvlog``), which they are
derived from: the index as a writer opening that stream builds it with the
policy below, and the checkpoint as trimming below its second frame leaves
it. Run once; ``tests/test_golden_index.py`` pins the bytes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from messagevault.checkpoint import Checkpoint
from messagevault.index import (
    ENTRY_SIZE,
    INDEX_HEADER_SIZE,
    IndexPolicy,
    decode_entry,
    entry_offset,
)
from messagevault.storage import MemoryStorage
from messagevault.writer import Writer

HERE = Path(__file__).resolve().parent
STREAM_FILE = HERE / "golden-v2.mvlog"
CHECKPOINT_FILE = HERE / "golden-v2.checkpoint"
INDEX_FILE = HERE / "golden-index.mvix"
TRIMMED_FILE = HERE / "golden-v2-trimmed.checkpoint"
JSON_FILE = HERE / "golden-index.json"
# Small bounds, so that four frames give entries and gaps both.
POLICY = IndexPolicy(every_bytes=256, every_frames=2, flush_interval=0)
TRIMMED_BELOW = 115  # the golden v2 stream's second frame


def build() -> tuple[bytes, bytes, dict[str, Any]]:
    stream = STREAM_FILE.read_bytes()
    checkpoint = Checkpoint.decode(CHECKPOINT_FILE.read_bytes())
    storage = MemoryStorage()
    store = storage.open_stream("golden", write=True, create=True)
    store.write(0, stream)
    store.advance_checkpoint(checkpoint, expected=store.read_checkpoint())
    store.close()
    Writer.open(storage, "golden", index=POLICY).close()  # builds the index at open
    reader = storage.open_stream("golden")
    index = reader.read_index(0, reader.index_size())
    slots = (len(index) - INDEX_HEADER_SIZE) // ENTRY_SIZE
    entries = [decode_entry(index, entry_offset(slot)) for slot in range(slots)]
    trimmed = dataclasses.replace(
        checkpoint, commit=checkpoint.commit + 1, first_position=TRIMMED_BELOW
    )
    expected = {
        "policy": {"every_bytes": POLICY.every_bytes, "every_frames": POLICY.every_frames},
        "index_size": len(index),
        "entries": [entry._asdict() if entry else None for entry in entries],
        "trimmed_checkpoint": dataclasses.asdict(trimmed),
    }
    return index, trimmed.encode(), expected


def render_json(expected: dict[str, Any]) -> str:
    return json.dumps(expected, indent=2) + "\n"


if __name__ == "__main__":
    index, trimmed, expected = build()
    INDEX_FILE.write_bytes(index)
    TRIMMED_FILE.write_bytes(trimmed)
    JSON_FILE.write_text(render_json(expected), encoding="utf-8")
    print(f"wrote {INDEX_FILE.name} ({len(index)} bytes), {TRIMMED_FILE.name}, {JSON_FILE.name}")
