"""Faithful, incremental copies of a stream (``replicate``), and the log calls they rest on:
``Writer.append_frames`` and ``Reader.position_of_sequence``."""

from __future__ import annotations

import dataclasses

import pytest

from messagevault import CorruptData, InvalidPosition, Reader, Writer
from messagevault.errors import InvalidInput
from messagevault.replicate import ReaderFrames, chunked, copy_stream, frames_from_messages
from messagevault.storage import MemoryStorage
from messagevault.storage.base import Storage


def _fill(storage: Storage, name: str, sizes: list[int], tag: str = "m") -> None:
    with Writer.open(storage, name) as writer:
        for n, count in enumerate(sizes):
            writer.append(
                [(f"k{n}".encode(), f"{tag}{n}:{i}".encode() * (i % 5)) for i in range(count)]
            )


def _stored(storage: Storage, name: str) -> bytes:
    store = storage.open_stream(name)
    try:
        return store.read(0, store.read_checkpoint().length)
    finally:
        store.close()


def _copy(source: Storage, destination: Storage, name: str) -> tuple[int, int]:
    with Reader.open(source, name) as reader, Writer.open(destination, name) as writer:
        dest = Reader(destination.open_stream(name), name)
        try:
            report = copy_stream(ReaderFrames(reader), writer, dest)
        finally:
            dest.close()
    return report.messages, report.end


def test_copy_is_byte_for_byte_and_incremental(storage: Storage) -> None:
    source = MemoryStorage()
    _fill(source, "orders", [1, 3, 200, 2])
    assert _copy(source, storage, "orders")[0] == 206
    assert _stored(storage, "orders") == _stored(source, "orders")
    _fill(source, "orders", [5, 1])
    copied, end = _copy(source, storage, "orders")
    assert (copied, end) == (6, len(_stored(source, "orders")))
    assert _stored(storage, "orders") == _stored(source, "orders")
    assert _copy(source, storage, "orders")[0] == 0  # nothing new: nothing copied
    original = list(Reader.open(source, "orders").read())
    assert list(Reader.open(storage, "orders").read()) == original  # ids and timestamps too
    assert Reader.open(storage, "orders").verify().messages == 212


def test_a_diverged_copy_is_refused_and_left_alone() -> None:
    source, other = MemoryStorage(), MemoryStorage()
    _fill(source, "orders", [3, 3])
    _fill(other, "orders", [3, 3], tag="x")  # same shape, other bytes
    before = _stored(other, "orders")
    with pytest.raises(InvalidInput, match="not a copy of this source"):
        _copy(source, other, "orders")
    _fill(other, "orders", [1])  # now longer than the source
    with pytest.raises(InvalidInput, match="longer than the source"):
        _copy(source, other, "orders")
    assert _stored(other, "orders").startswith(before)


def test_append_frames_takes_only_frames_that_continue_the_stream() -> None:
    source, copy = MemoryStorage(), MemoryStorage()
    _fill(source, "orders", [2, 2])
    frames = Reader.open(source, "orders").read_frames().data
    first = Reader.open(source, "orders").read_frames(max_bytes=1).data  # one frame at least
    with Writer.open(copy, "orders") as writer:
        with pytest.raises(InvalidInput, match="no frames"):
            writer.append_frames(b"")
        first_frame_end = len(first)
        with pytest.raises(InvalidInput, match="starts at position"):
            writer.append_frames(frames[first_frame_end:])  # skips the first frame
        damaged = bytearray(frames)
        damaged[-1] ^= 1
        with pytest.raises(CorruptData):
            writer.append_frames(bytes(damaged))
        assert writer.checkpoint.length == 0
        checkpoint = writer.append_frames(frames)
    assert checkpoint == dataclasses.replace(Reader.open(source, "orders").checkpoint(), commit=1)
    assert _stored(copy, "orders") == frames


def test_frames_rebuild_from_messages_exactly() -> None:
    storage = MemoryStorage()
    _fill(storage, "orders", [1, 1, 2, 7, 1, 300])
    stored = _stored(storage, "orders")
    rebuilt = list(frames_from_messages(Reader.open(storage, "orders").read()))
    assert len(rebuilt) == 6
    assert b"".join(rebuilt) == stored
    assert list(chunked(iter(rebuilt), size=1)) == rebuilt
    assert list(chunked(iter(rebuilt))) == [stored]


def test_position_of_every_sequence(storage: Storage) -> None:
    with Writer.open(storage, "empty") as _:
        pass
    with Reader.open(storage, "empty") as reader:
        assert reader.position_of_sequence(0) == 0  # the next message's: the end
        with pytest.raises(InvalidPosition, match="is empty"):
            reader.position_of_sequence(1)
    _fill(storage, "orders", [1, 4, 1, 3])
    with Reader.open(storage, "orders") as reader:
        messages = list(reader.read())
        assert [reader.position_of_sequence(m.sequence) for m in messages] == [
            m.position for m in messages
        ]
        assert reader.position_of_sequence(len(messages)) == reader.checkpoint().length
        for bad in (-1, len(messages) + 1):
            with pytest.raises(InvalidPosition, match="messages 0-8"):
                reader.position_of_sequence(bad)
