"""Writer and reader, through every storage backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from messagevault import (
    MAX_BATCH_COUNT,
    MAX_KEY_SIZE,
    CorruptData,
    InvalidBatch,
    InvalidPosition,
    InvalidStreamName,
    Message,
    MessageVaultError,
    Reader,
    StaleWriter,
    Writer,
    errors,
)
from messagevault.checkpoint import CHECKPOINT_SIZE, Checkpoint
from messagevault.format import (
    encode_batch,
)
from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.base import Storage


def _batch(tag: str, count: int, size: int = 20) -> list[tuple[bytes, bytes]]:
    return [(f"{tag}-key".encode(), f"{tag}:{i}:".encode().ljust(size, b".")) for i in range(count)]


def _snapshot(storage: Storage, name: str) -> tuple[Checkpoint, bytes]:
    store = storage.open_stream(name)
    checkpoint = store.read_checkpoint()
    data = store.read(0, checkpoint.length)
    store.close()
    return checkpoint, data


def test_append_returns_what_readers_see(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        results = [writer.append(_batch(f"b{n}", n + 1)) for n in range(5)]
    messages = list(Reader.open(storage, "orders").read())
    receipts = [receipt for result in results for receipt in result]
    assert [m.position for m in messages] == [r.position for r in receipts]
    assert [m.sequence for m in messages] == list(range(15))
    assert [m.id for m in messages] == [r.id for r in receipts]
    expected = [pair for n in range(5) for pair in _batch(f"b{n}", n + 1)]
    assert [(m.key, m.value) for m in messages] == expected
    # Each message's next_position is the following message's position.
    assert [m.next_position for m in messages[:-1]] == [m.position for m in messages[1:]]
    assert messages[-1].next_position == results[-1].committed_length == results[-1].end
    assert len({m.id for m in messages}) == 15
    assert sorted(m.id for m in messages) == [m.id for m in messages]


def test_read_from_every_message_position(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        for n in range(4):
            writer.append(_batch(f"b{n}", 3))
    reader = Reader.open(storage, "orders")
    everything = list(reader.read())
    for index, message in enumerate(everything):
        assert list(reader.read(message.position)) == everything[index:]
        assert list(reader.read(message.next_position)) == everything[index + 1 :]


def test_every_other_position_is_rejected(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        writer.append(_batch("a", 3))
        writer.append([(b"", b"")])
        length = writer.append(_batch("b", 2)).committed_length
    reader = Reader.open(storage, "orders")
    valid = {m.position for m in reader.read()} | {length}
    for position in range(length + 1):
        if position in valid:
            list(reader.read(position))
        else:
            with pytest.raises(InvalidPosition, match=str(position)):
                reader.read(position)
    with pytest.raises(InvalidPosition, match="beyond the end"):
        reader.read(length + 1)
    with pytest.raises(InvalidPosition):
        reader.read(-1)


def test_reading_at_the_end_yields_nothing(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        end = writer.append(_batch("a", 2)).end
    assert list(Reader.open(storage, "orders").read(end)) == []
    storage.open_stream("empty", create=True).close()
    assert list(Reader.open(storage, "empty").read()) == []


def test_reopened_writer_continues(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        first = writer.append(_batch("a", 3))
    with Writer.open(storage, "orders") as writer:
        second = writer.append(_batch("b", 2))
    assert second.frame_position == first.end
    assert second.base_sequence == 3
    assert second.timestamp >= first.timestamp
    assert [m.sequence for m in Reader.open(storage, "orders").read()] == [0, 1, 2, 3, 4]


def test_large_batch_is_split_into_writes_but_committed_once() -> None:
    storage = MemoryStorage(page_size=512)
    big = [(b"k", bytes([i]) * (1024 * 1024)) for i in range(9)]  # ~9 MiB: three 4 MiB writes
    with Writer.open(storage, "orders") as writer:
        writer.append([(b"k", b"small")])
        before = storage.storage_writes("orders")
        result = writer.append(big)
    assert storage.storage_writes("orders") - before == 3
    assert writer.checkpoint.commit == 2
    values = [m.value for m in Reader.open(storage, "orders").read(result.frame_position)]
    assert values == [value for _, value in big]


def test_page_backend_rewrites_the_tail_page() -> None:
    storage = MemoryStorage(page_size=512)
    with Writer.open(storage, "orders") as writer:
        for n in range(50):  # lengths that fall at every offset within a page
            writer.append(_batch(f"b{n}", 1 + n % 4, size=7 + n * 13))
    with Writer.open(storage, "orders") as writer:  # a reopened writer reads its tail page back
        writer.append(_batch("last", 2))
    messages = list(Reader.open(storage, "orders").read())
    assert len(messages) == sum(1 + n % 4 for n in range(50)) + 2
    assert messages[-1].value.startswith(b"last:1:")


def test_group_commit_is_one_storage_commit(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        results = writer.append_batches([encode_batch(_batch(f"g{n}", 2)) for n in range(4)])
        assert writer.checkpoint.commit == 1
    assert [r.committed_length for r in results] == [results[-1].end] * 4
    assert [r.frame_position for r in results[1:]] == [r.end for r in results[:-1]]
    assert len(list(Reader.open(storage, "orders").read())) == 8


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one"),
        ([(b"k" * (MAX_KEY_SIZE + 1), b"v")], "message 0: key is 256 bytes"),
        ([(b"k", b"")] * (MAX_BATCH_COUNT + 1), "at most"),
        ([(b"k", "text")], "message 0: value must be a contiguous bytes-like"),
        ([(3, b"v")], "message 0: key must be bytes or str"),
        ([(b"k", b"v", b"extra")], "pair"),
        ([b"kv"], "pair"),
    ],
)
def test_bad_batches_change_nothing(storage: Storage, messages: list, match: str) -> None:  # type: ignore[type-arg]
    with Writer.open(storage, "orders") as writer:
        writer.append(_batch("a", 2))
        # On Azure the stored checkpoint trails the acknowledgement (storage/azure.py):
        # the writer's own read waits for its update to land.
        writer._store.read_checkpoint()
        before = _snapshot(storage, "orders")
        with pytest.raises(InvalidBatch, match=match):
            writer.append(messages)
        assert _snapshot(storage, "orders") == before
        writer.append(_batch("b", 1))  # the writer is still usable
    assert len(list(Reader.open(storage, "orders").read())) == 3


def test_bad_stream_names_are_typed_errors(storage: Storage) -> None:
    with pytest.raises(InvalidStreamName):
        Writer.open(storage, "Bad_Name")
    with pytest.raises(InvalidStreamName):
        Reader.open(storage, "x")
    assert storage.list_streams() == []


def test_every_error_shares_one_root() -> None:
    classes = [getattr(errors, name) for name in dir(errors) if name[0].isupper()]
    exceptions = [c for c in classes if isinstance(c, type) and issubclass(c, Exception)]
    assert len(exceptions) >= 12
    assert all(issubclass(c, MessageVaultError) for c in exceptions)
    assert len({c.code for c in exceptions}) == len(exceptions)


def test_follow_sees_new_commits_and_stops(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        writer.append(_batch("a", 2))
        stop = threading.Event()
        seen: list[Message] = []

        def consume() -> None:
            seen.extend(Reader.open(storage, "orders").follow(poll_interval=0.01, stop=stop))

        thread = threading.Thread(target=consume)
        thread.start()
        for n in range(5):
            writer.append(_batch(f"f{n}", 3))
        deadline = time.monotonic() + 10
        while len(seen) < 17 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert [m.sequence for m in seen] == list(range(17))


def test_close_stops_follow() -> None:
    storage = MemoryStorage()
    storage.open_stream("orders", create=True).close()
    reader = Reader.open(storage, "orders")
    done = threading.Event()

    def consume() -> None:
        for _ in reader.follow(poll_interval=0.01):
            pass
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.05)
    reader.close()
    thread.join(timeout=5)
    assert done.is_set()


def test_follow_from_a_bad_position_fails_at_once(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        end = writer.append(_batch("a", 2)).end
    with pytest.raises(InvalidPosition):
        Reader.open(storage, "orders").follow(end + 5)


def test_stale_writer_is_fenced(file_storage: FileStorage, tmp_path: Path) -> None:
    """A writer whose checkpoint moved underneath it fails and writes nothing visible."""
    writer = Writer.open(file_storage, "orders")
    writer.append(_batch("a", 2))
    # Another writer that ignored the lock commits: simulate with a direct checkpoint write.
    rogue = Checkpoint(commit=writer.checkpoint.commit + 1, length=writer.checkpoint.length)
    path = tmp_path / "data" / "orders" / "checkpoint"
    with path.open("r+b") as handle:
        handle.seek((rogue.commit % 2) * CHECKPOINT_SIZE)
        handle.write(rogue.encode())
    with pytest.raises(StaleWriter):
        writer.append(_batch("b", 1))
    with pytest.raises(StaleWriter):
        writer.append(_batch("c", 1))
    writer.close()
    assert [m.value for m in Reader.open(file_storage, "orders").read()] == [
        v for _, v in _batch("a", 2)
    ]


def test_damaged_tail_is_found_when_a_writer_opens(
    file_storage: FileStorage, tmp_path: Path
) -> None:
    with Writer.open(file_storage, "orders") as writer:
        writer.append(_batch("a", 2))
        end = writer.append(_batch("b", 2)).end
    data = tmp_path / "data" / "orders" / "data"
    raw = bytearray(data.read_bytes())
    raw[end - 3] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptData, match="CRC"):
        Writer.open(file_storage, "orders")
    with pytest.raises(CorruptData) as excinfo:
        list(Reader.open(file_storage, "orders").read())
    assert excinfo.value.position is not None
    assert str(excinfo.value.position) in str(excinfo.value)


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
def test_fsync_policies(tmp_path: Path, policy: str) -> None:
    storage = FileStorage(tmp_path, fsync=policy)
    with Writer.open(storage, "orders") as writer:
        for n in range(3):
            writer.append(_batch(f"b{n}", 2))
    assert len(list(Reader.open(storage, "orders").read())) == 6


def test_unknown_fsync_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="always, batch, never"):
        FileStorage(tmp_path, fsync="sometimes")


def test_read_frames_relays_whole_checked_frames(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        results = [writer.append(_batch(f"b{n}", 3, size=100)) for n in range(6)]
    reader = Reader.open(storage, "orders")
    everything = reader.read_frames(0, max_bytes=10**9)
    assert everything.skip == 0
    assert everything.next_position == results[-1].end
    # The relayed bytes are the stream itself: a reader of them sees the same messages.
    relay = MemoryStorage()
    store = relay.open_stream("orders", write=True, create=True)
    store.write(0, everything.data)
    store.advance_checkpoint(
        Checkpoint(1, len(everything.data), 18, results[-1].frame_position, 0),
        expected=Checkpoint(),
    )
    assert list(Reader.open(relay, "orders").read()) == list(reader.read())
    # Bounded by max_bytes, but never less than one frame; mid-frame starts say what to skip.
    one = reader.read_frames(results[2][1].position, max_bytes=1)
    assert (one.skip, one.next_position) == (1, results[2].end)
    assert len(one.data) == results[2].frame_size
    assert reader.read_frames(results[-1].end).data == b""


def test_read_frames_stops_once_it_holds_max_messages(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        results = [writer.append(_batch(f"b{n}", 3)) for n in range(4)]
    reader = Reader.open(storage, "orders")
    # From message 1 of frame 0: that frame gives 2, so 3 messages need frame 1 too.
    frames = reader.read_frames(results[0][1].position, max_messages=3)
    assert (frames.skip, frames.next_position) == (1, results[1].end)
    assert reader.read_frames(results[0][1].position, max_messages=2).next_position == (
        results[0].end
    )
    assert reader.read_frames(0, max_messages=1).next_position == results[0].end  # whole frame
    assert reader.read_frames(0, max_messages=12).next_position == results[-1].end
    assert reader.read_frames(0).next_position == results[-1].end


def test_a_known_committed_length_bounds_reads_without_the_checkpoint(storage: Storage) -> None:
    with Writer.open(storage, "orders") as writer:
        first = writer.append(_batch("a", 2))
        writer.append(_batch("b", 2))
    reader = Reader.open(storage, "orders")
    assert [m.value for m in reader.read(0, committed=first.end)] == [
        m.value for m in reader.read(0, end=first.end)
    ]
    assert len(list(reader.read(0, committed=first.end))) == 2
    assert len(list(reader.read(0))) == 4
    frames = reader.read_frames(0, committed=first.end)
    assert frames.next_position == first.end
    with pytest.raises(InvalidPosition):
        list(reader.read(first.end + 1, committed=first.end))
