"""Golden files pin the index format (v1) and the trimmed checkpoint (v2).

``tests/data/golden-index.mvix`` is the index a writer builds for the golden
v2 stream, ``golden-v2-trimmed.checkpoint`` that stream's checkpoint after a
trim below its second frame; ``tests/data/make_golden_index.py`` wrote them.
If these fail after a change to ``index.py`` or ``checkpoint.py``, the change
broke the stored format: give it a new version instead (docs/FORMAT.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from messagevault.checkpoint import Checkpoint
from messagevault.errors import PositionTrimmed
from messagevault.format import read_header
from messagevault.index import IndexEntry, decode_entry, entry_offset, index_header_problem
from messagevault.reader import Reader
from messagevault.storage import MemoryStorage

DATA = Path(__file__).resolve().parent / "data"
INDEX_SHA256 = "304b1b27bba67573d199e83fa00717b5cbdb1031bd44c50b9f77d649a834e137"
TRIMMED_SHA256 = "62264e38b6d866b094aa29a6fbd99f47eb17cdb1aa6d142188ddb976b6fa34e9"


@cache
def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_golden_index", DATA / "make_golden_index.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _expected() -> dict[str, Any]:
    expected: dict[str, Any] = json.loads((DATA / "golden-index.json").read_text("utf-8"))
    return expected


def _index() -> bytes:
    return (DATA / "golden-index.mvix").read_bytes()


def test_golden_index_files_are_pinned() -> None:
    assert hashlib.sha256(_index()).hexdigest() == INDEX_SHA256
    trimmed = (DATA / "golden-v2-trimmed.checkpoint").read_bytes()
    assert hashlib.sha256(trimmed).hexdigest() == TRIMMED_SHA256


def test_generator_reproduces_the_golden_index_files() -> None:
    index, trimmed, expected = _generator().build()
    assert index == _index()
    assert trimmed == (DATA / "golden-v2-trimmed.checkpoint").read_bytes()
    assert _generator().render_json(expected) == (DATA / "golden-index.json").read_text("utf-8")


def test_the_index_header_and_entries_byte_by_byte() -> None:
    """Independent of index.py's structs: the layout docs/FORMAT.md gives."""
    raw = _index()
    assert index_header_problem(raw) is None
    assert raw[:4] == b"MVIX" and raw[4] == 1 and raw[5:8] == bytes(3)
    entry_size, every_bytes, every_frames = struct.unpack_from("<III", raw, 8)
    assert (entry_size, every_bytes, every_frames) == (32, 256, 2)
    assert raw[20:60] == bytes(40)
    assert len(raw) == _expected()["index_size"] == 64 + 32 * len(_expected()["entries"])
    stream = (DATA / "golden-v2.mvlog").read_bytes()
    for slot, listed in enumerate(_expected()["entries"]):
        at = 64 + 32 * slot
        position, sequence, timestamp = struct.unpack_from("<QQQ", raw, at)
        assert raw[at + 24 : at + 28] == bytes(4)
        assert (position, sequence, timestamp) == tuple(listed.values())
        assert decode_entry(raw, entry_offset(slot)) == IndexEntry(**listed)
        header = read_header(stream, position, position)
        assert (header.base_sequence, header.timestamp) == (sequence, timestamp)


def test_the_trimmed_checkpoint_byte_by_byte() -> None:
    raw = (DATA / "golden-v2-trimmed.checkpoint").read_bytes()
    assert raw[4] == 2  # version 2: it has a first position
    assert struct.unpack_from("<Q", raw, 48)[0] == 115
    assert Checkpoint.decode(raw) == Checkpoint(**_expected()["trimmed_checkpoint"])


def _golden_storage(checkpoint_file: str) -> MemoryStorage:
    storage = MemoryStorage()
    store = storage.open_stream("golden", write=True, create=True)
    store.write(0, (DATA / "golden-v2.mvlog").read_bytes())
    checkpoint = Checkpoint.decode((DATA / checkpoint_file).read_bytes())
    store.advance_checkpoint(checkpoint, expected=store.read_checkpoint())
    store.write_index(0, _index())
    store.close()
    return storage


def test_seeks_through_the_golden_index() -> None:
    reader = Reader.open(_golden_storage("golden-v2.checkpoint"), "golden")
    messages = list(reader.read())
    for message in messages:
        assert reader.seek(sequence=message.sequence) == message.position
        first_at_time = next(m for m in messages if m.timestamp >= message.timestamp)
        assert reader.seek(time=message.timestamp / 1000) == first_at_time.position


def test_seeks_below_the_golden_trim_point_are_refused() -> None:
    reader = Reader.open(_golden_storage("golden-v2-trimmed.checkpoint"), "golden")
    assert reader.seek(sequence=2) == 115
    with pytest.raises(PositionTrimmed) as refused:
        reader.seek(sequence=1)
    assert refused.value.first_position == 115
    assert reader.seek(time=0) == 115
