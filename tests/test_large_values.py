"""Values of any size: a value over ``MAX_VALUE_SIZE`` is a HEAD frame and CONTINUATION pieces.

Every reader hands it out whole (the direct ``Reader``, SAS URLs, the
client's binary route, the server's JSON, NDJSON and SSE routes, consumers,
copies); a CONTINUATION position is refused naming the value's own; a value
torn by a crash or a failing storage mid-commit is never half visible; and
reading one needs about two copies of it in memory.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from messagevault import (
    CorruptData,
    FileStorage,
    InvalidPosition,
    MemoryStorage,
    Message,
    Reader,
    StorageError,
    Writer,
)
from messagevault.cli import main
from messagevault.cli_output import pages
from messagevault.client import AsyncClient, Client
from messagevault.consumer import Consumer
from messagevault.format import (
    CHUNK_SIZE,
    MAX_KEY_SIZE,
    MAX_VALUE_SIZE,
    encode_batch,
    read_header,
)
from messagevault.positions import MemoryPositionStore
from messagevault.producer import Producer
from messagevault.replicate import ReaderFrames, copy_stream, frames_from_messages
from messagevault.server import Limits, StreamHub, create_app
from messagevault.server.hub import _read_messages
from messagevault.storage.base import Storage, StreamStore
from messagevault.wire import DEFAULT_MAX_BODY
from tests.conftest import BACKENDS
from tests.large_value_writer import STREAM, MiB
from tests.large_value_writer import pattern_value as _value
from tests.served import ServedApp


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingStore:
    """A stream store that counts the bytes read and can fail writes (a storage outage)."""

    def __init__(self, store: StreamStore) -> None:
        self._store = store
        self.bytes_read = 0
        self.writes = 0
        self.fail_after: int | None = None  # writes that succeed before storage "goes down"

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def read(self, offset: int, size: int) -> bytes:
        data = self._store.read(offset, size)
        self.bytes_read += len(data)
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.fail_after is not None and self.writes >= self.fail_after:
            raise StorageError("storage is down (test)")
        self.writes += 1
        self._store.write(offset, data)


# Boundaries --------------------------------------------------------------------------


BOUNDARY_SIZES = [0, MAX_VALUE_SIZE - 1, MAX_VALUE_SIZE, MAX_VALUE_SIZE + 1, 40 * MiB]


def _boundary_batches() -> list[list[tuple[bytes, bytes]]]:
    batches = [[(b"size-%d" % size, _value(size, size))] for size in BOUNDARY_SIZES]
    batches.append([(b"", _value(MAX_VALUE_SIZE + 1, 1))])  # empty key
    batches.append([(b"k" * MAX_KEY_SIZE, _value(2 * MAX_VALUE_SIZE + 7, 2))])  # longest key
    mixed = [(b"small", b"s"), (b"", _value(CHUNK_SIZE * 2 + 1, 3)), (b"tiny", b"")]
    batches.append(mixed)  # small, large, small in one batch
    return batches


def test_values_at_every_boundary_read_back_whole(storage: Storage) -> None:
    batches = _boundary_batches()
    with Writer.open(storage, STREAM) as writer:
        results = [writer.append(batch) for batch in batches]
        access = writer.read_access()
    expected = [pair for batch in batches for pair in batch]
    receipts = [receipt for result in results for receipt in result]
    with Reader.open(storage, STREAM) as reader:
        messages = list(reader.read())
        assert [(m.key, m.value) for m in messages] == expected
        assert [(m.position, m.sequence, m.id) for m in messages] == [tuple(r) for r in receipts]
        assert [m.sequence for m in messages] == list(range(len(expected)))
        assert [m.next_position for m in messages[:-1]] == [m.position for m in messages[1:]]
        assert messages[-1].next_position == results[-1].committed_length
        # The frames: a value up to the limit is in a frame's columns, one past it in pieces.
        frames = [_frame_flags(reader, result.frame_position, result.end) for result in results]
        assert frames[:5] == [[0], [0], [0], ["head", "cont"], ["head"] + ["cont"] * 9]
        assert frames[-1] == [0, "head", "cont", "cont", 0]
        for message in messages:  # a read may start at any message, a large one too
            assert next(reader.read(message.position)) == message
            assert reader.position_of_sequence(message.sequence) == message.position
            raw = reader.read_frames(message.position, max_bytes=1)
            if len(message.value) > MAX_VALUE_SIZE:  # all its pieces, past max_bytes
                assert raw.next_position == message.next_position
        report = reader.verify()
        assert (report.messages, report.frames) == (len(expected), 1 + 1 + 1 + 2 + 10 + 2 + 3 + 5)
        stop = threading.Event()
        followed = reader.follow(messages[4].position, poll_interval=0.01, stop=stop)
        assert next(followed) == messages[4]
        stop.set()
    handled: list[str] = []
    with Consumer(storage, STREAM, "audit", MemoryPositionStore(), save_every=2) as consumer:
        consumer.run(lambda message: handled.append(_digest(message.value)), follow=False)
    assert handled == [_digest(value) for _, value in expected]
    if storage.__class__ is not MemoryStorage:  # another process's view: a folder, a SAS URL
        with Reader.from_read_access(access) as direct:
            assert [_digest(m.value) for m in direct.read()] == [_digest(v) for _, v in expected]


def _frame_flags(reader: Reader, start: int, end: int) -> list[object]:
    flags: list[object] = []
    while start < end:
        header = reader.header_at(start)
        flags.append("head" if header.is_head else "cont" if header.is_continuation else 0)
        start = header.end
    return flags


# Start positions ---------------------------------------------------------------------


def _positions_stream(storage: Storage) -> dict[str, int]:
    """v1 frame, v2 frame, a value in pieces, one more message; every kind of position."""
    with Writer.open(storage, STREAM) as writer:
        v1 = writer.append([(b"a", b"1"), (b"a", b"2"), (b"a", b"3")])
        v2_batch = encode_batch([(b"b", b"1"), (b"b", b"2"), (b"b", b"3")])
        (v2,) = writer.append_batches([v2_batch.with_producer(b"p" * 16, 0)])
        large = writer.append([(b"c", _value(2 * CHUNK_SIZE + 100, 9))])
        last = writer.append([(b"d", b"last")])
    head = large.frame_position
    with Reader.open(storage, STREAM) as reader:
        first_piece = reader.header_at(head).end
        second_piece = reader.header_at(first_piece).end
    assert v1.header_size == 64 and v2.header_size == 96
    return {
        "v1 frame": v1.frame_position,
        "v1 slot": v1[1].position,
        "v2 frame": v2.frame_position,
        "v2 slot": v2[2].position,
        "head": head,
        "continuation": first_piece,
        "last continuation": second_piece,
        "inside the head": head + 200,
        "inside a piece": first_piece + 4000,
        "after the value": last.frame_position,
        "end": last.committed_length,
    }


@pytest.mark.parametrize("backend", ["memory-paged", "file", "azure"])
def test_a_reader_starts_at_every_kind_of_position(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage = BACKENDS[backend](request, tmp_path)
    at = _positions_stream(storage)
    with Reader.open(storage, STREAM) as reader:
        every = list(reader.read())
        by_position = {message.position: index for index, message in enumerate(every)}
        for kind in ("v1 frame", "v1 slot", "v2 frame", "v2 slot", "head", "after the value"):
            assert list(reader.read(at[kind])) == every[by_position[at[kind]] :], kind
            assert reader.read_frames(at[kind]).data, kind
        assert list(reader.read(at["end"])) == []
        for kind in ("continuation", "last continuation"):
            for start in (reader.read, reader.read_frames, reader.follow, reader.verify):
                with pytest.raises(InvalidPosition) as refused:
                    start(at[kind])
                message = str(refused.value)
                assert f"position {at[kind]}" in message
                assert f"read from {at['head']}" in message  # names where the value starts
        for kind in ("inside the head", "inside a piece"):
            with pytest.raises(InvalidPosition, match="not the position of a message"):
                reader.read(at[kind])


# Torn commits ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory-paged", "file", "azure"])
def test_a_value_in_pieces_torn_by_failing_storage_is_never_seen(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage = BACKENDS[backend](request, tmp_path)
    before = [(b"k", b"before"), (b"k", b"again")]
    with Writer.open(storage, STREAM) as writer:
        writer.append(before)
    store = CountingStore(storage.open_stream(STREAM, write=True))
    writer = Writer(store, STREAM, commit_timeout=0.2)  # type: ignore[arg-type]
    try:
        committed = writer.checkpoint.length
        store.fail_after = store.writes + 3  # three 4 MiB writes land, then storage fails
        with pytest.raises(StorageError):
            writer.append([(b"big", _value(6 * CHUNK_SIZE, 4))])
        assert store.writes == 3  # the pieces written so far lie past the committed length
        with Reader.open(storage, STREAM) as reader:
            assert [(m.key, m.value) for m in reader.read()] == before
            assert reader.checkpoint().length == committed
            assert reader.verify().messages == 2
            # (page storage rewrites the last page whole: from its start)
            garbage = reader._store.read(committed, 3 * CHUNK_SIZE)
            assert len(garbage) >= 3 * CHUNK_SIZE - 512 and any(garbage)
        store.fail_after = None  # storage is back: the next commit goes over the garbage
        after = writer.append([(b"k", b"after")])
        assert after.frame_position == committed
    finally:
        writer.close()
    with Reader.open(storage, STREAM) as reader:
        assert [(m.key, m.value) for m in reader.read()] == [*before, (b"k", b"after")]
        assert reader.verify().messages == 3


LARGE_WRITER = Path(__file__).with_name("large_value_writer.py")


def test_a_writer_killed_while_writing_a_64_mib_value_leaves_it_invisible(
    tmp_path: Path,
) -> None:
    """SIGKILL after some of the value's 4 MiB writes, before and after its commit."""
    seen: list[tuple[int, bool]] = []
    rng = random.Random(11)
    # Kill after this many storage writes of the value (it takes 17); 0: after its ACK.
    for writes in (*rng.sample(range(1, 17), 4), 0):
        with subprocess.Popen(
            [sys.executable, str(LARGE_WRITER), str(tmp_path), str(len(seen)), str(writes)],
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                committed = int(_line(child, "READY").split()[1])
                _line(child, f"WROTE {writes}" if writes else "ACK")
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                assert child.wait(timeout=30) == -signal.SIGKILL
        with Reader.open(FileStorage(tmp_path), STREAM) as reader:
            messages = list(reader.read())
            assert reader.verify().messages == len(messages)
        keys = [m.key for m in messages]
        assert keys[-1] in (b"small-%d" % len(seen), b"large-%d" % len(seen))  # nothing half
        landed = keys[-1].startswith(b"large")
        if landed:
            assert _digest(messages[-1].value) == _digest(_value(64 * MiB, len(seen)))
            assert messages[-1].position == committed
        else:
            assert messages[-1].next_position == committed
        assert landed == (writes == 0)  # killed before its commit: not there at all
        if not landed:  # what the killed writes left lies past the committed end
            assert (tmp_path / STREAM / "data").stat().st_size >= committed + writes * 4 * MiB
        seen.append((len(messages), landed))
    # Each round's child went on from the last commit, over the garbage left before.
    assert [count for count, _ in seen] == [
        sum(1 + landed for _, landed in seen[:round_]) + 1 + seen[round_][1]
        for round_ in range(len(seen))
    ]


def _line(child: subprocess.Popen[str], prefix: str) -> str:
    assert child.stdout is not None
    for _ in range(100):
        line = child.stdout.readline()
        assert line, f"the writer ended before {prefix!r}"
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} from the writer")


# Memory ------------------------------------------------------------------------------

MEMORY_CHECK = """
import sys, tracemalloc
from messagevault import FileStorage, Reader, Writer
storage = FileStorage(sys.argv[1], fsync="never")
size = int(sys.argv[2])
with Writer.open(storage, "big") as writer:
    writer.append([(b"small", b"s"), (b"big", b"%d" * size)])
    writer.append([(b"after", b"a")])
tracemalloc.start()
with Reader.open(storage, "big") as reader:
    sizes = [len(message.value) for message in reader.read()]
print(sizes[1], tracemalloc.get_traced_memory()[1])
"""


def test_reading_a_256_mib_value_needs_about_two_copies_of_it(tmp_path: Path) -> None:
    size = 256 * MiB
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHECK % 7, str(tmp_path), str(size)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    read, peak = map(int, done.stdout.split())
    assert read == size
    assert size < peak < 2.5 * size, f"reading a {size}-byte value peaked at {peak} bytes"


# Through the server ------------------------------------------------------------------


def test_a_256_mib_value_through_the_server_and_client(tmp_path: Path) -> None:
    value = b"0123456789abcdef" * (16 * MiB)  # 256 MiB, made cheaply; checked by hash
    digest = _digest(value)
    storage = FileStorage(tmp_path, fsync="never")
    with ServedApp(create_app(StreamHub(storage))) as served, Client(served.url) as client:
        result = client.publish(STREAM, [(b"first", b"1"), (b"large", value), (b"last", b"2")])
        assert result.message_count == 3
        position = result[1].position
        del value
        (message,) = client.read(STREAM, position, limit=1)
        assert (message.position, message.key) == (position, b"large")
        assert _digest(message.value) == digest
        assert message.next_position == result[2].position
        del message
        with client.open_reader(STREAM) as reader:  # the same storage, directly
            keys = [
                (m.key, _digest(m.value) if m.key == b"large" else m.value) for m in reader.read()
            ]
        assert keys == [(b"first", b"1"), (b"large", digest), (b"last", b"2")]


def _sse_events(url: str, count: int) -> list[dict[str, object]]:
    """The first ``count`` events of the stream's SSE tail (an event may be megabytes long)."""

    async def collect() -> list[dict[str, object]]:
        received = b""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{url}/streams/{STREAM}/messages",
                headers={"Accept": "text/event-stream"},
                timeout=aiohttp.ClientTimeout(total=60),
            ) as answer,
        ):
            async for chunk in answer.content.iter_any():
                received += chunk
                if received.count(b"\n\n") >= count:
                    break
        events = received.split(b"\n\n")[:count]
        return [json.loads(event.split(b"\ndata: ", 1)[1]) for event in events]

    return asyncio.run(collect())


def test_large_values_through_every_server_route(tmp_path: Path) -> None:
    large = _value(MAX_VALUE_SIZE + 2, 5).hex().encode()  # 8 MiB of text: UTF-8 in JSON
    binary = bytes(range(256)) * (MAX_VALUE_SIZE // 128)  # 8 MiB, not UTF-8: base64 in JSON
    sent = [(b"a", b"small"), (b"big", large), (b"bin", binary), (b"z", b"")]
    storage = FileStorage(tmp_path, fsync="never")
    # A read answer holds 1 KiB of values at most, yet always one message.
    limits = Limits(max_read_bytes=1024)
    with ServedApp(create_app(StreamHub(storage), limits)) as served, Client(served.url) as client:
        with Producer(client, max_batch_bytes=4096) as producer:
            futures = [producer.send(STREAM, value, key=key) for key, value in sent]
        receipts = [future.result() for future in futures]
        assert [r.sequence for r in receipts] == [0, 1, 2, 3]
        expected = [
            (r.position, key, value) for r, (key, value) in zip(receipts, sent, strict=True)
        ]

        assert [(m.position, m.key, m.value) for m in client.read(STREAM)] == expected
        stop = threading.Event()
        followed = []
        for message in client.follow(STREAM, receipts[1].position, stop=stop):
            followed.append(message)
            if len(followed) == 3:
                stop.set()
        assert [(m.key, m.value) for m in followed] == sent[1:]

        async def read_async() -> list[Message]:
            async with AsyncClient(served.url) as aclient:
                return [m async for m in aclient.read(STREAM, receipts[2].position)]

        assert [(m.key, m.value) for m in asyncio.run(read_async())] == sent[2:]

        pages = []
        position = 0
        for _ in range(len(sent) + 1):  # one message a page: each is over 1 KiB or follows one
            page = _get_json(served.url, f"/streams/{STREAM}/messages?from={position}")
            if not page["messages"]:
                break
            pages.append(page["messages"])
            position = page["next"]
        assert [len(page) for page in pages] == [1, 1, 1, 1]
        records = [page[0] for page in pages]
        assert records[1]["value"].encode() == large
        assert records[2]["encoding"] == "base64"
        assert base64.b64decode(records[2]["value"]) == binary

        ndjson = _get(
            served.url,
            f"/streams/{STREAM}/messages?from={receipts[1].position}",
            "application/x-ndjson",
        )
        (line,) = ndjson.splitlines()
        assert json.loads(line)["value"].encode() == large

        events = _sse_events(served.url, 4)
        assert [event["key"] for event in events] == ["a", "big", "bin", "z"]
        assert events[1]["value"].encode() == large  # type: ignore[union-attr]

        with Consumer(client, STREAM, "audit", MemoryPositionStore(), save_every=1) as consumer:
            handled: list[bytes] = []
            consumer.run(lambda message: handled.append(message.value), follow=False)
        assert handled == [value for _, value in sent]

        head = receipts[1].position
        piece = head + read_header(_raw(storage, head), 0, head).frame_size
        with pytest.raises(InvalidPosition, match=f"read from {head}"):
            client.read(STREAM, piece)
        refused = _get_error(served.url, f"/streams/{STREAM}/messages?from={piece}")
        assert refused == (400, "invalid_position")

        info = client.info(STREAM)
        assert info.messages == 4


def _raw(storage: Storage, position: int) -> bytes:
    store = storage.open_stream(STREAM)
    try:
        return store.read(position, 96)
    finally:
        store.close()


def _get(url: str, path: str, accept: str = "application/json") -> str:
    request = urllib.request.Request(url + path, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return str(answer.read().decode())


def _get_json(url: str, path: str) -> dict[str, list[dict[str, str]]]:
    return json.loads(_get(url, path))  # type: ignore[no-any-return]


def _get_error(url: str, path: str) -> tuple[int, str]:
    try:
        _get(url, path)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]
    raise AssertionError("no error")


class CountingStorage:
    """A storage whose streams count the bytes read from them (``CountingStore``)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.stores: list[CountingStore] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    def open_stream(self, *args: object, **options: object) -> CountingStore:
        store = CountingStore(self._storage.open_stream(*args, **options))  # type: ignore[arg-type]
        self.stores.append(store)
        return store

    @property
    def bytes_read(self) -> int:
        return sum(store.bytes_read for store in self.stores)


def test_stream_info_of_a_stream_that_starts_with_a_large_value(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, fsync="never")
    with Writer.open(storage, STREAM) as writer:
        first = writer.append([(b"big", _value(3 * MAX_VALUE_SIZE, 6))])
    counting = CountingStorage(storage)
    hub = StreamHub(counting)  # type: ignore[arg-type]
    with ServedApp(create_app(hub)) as served, Client(served.url) as client:
        info = client.info(STREAM)
    assert info.first_write is not None
    assert int(info.first_write.timestamp() * 1000) == first.timestamp
    assert counting.bytes_read < 4096  # the first frame's header, not its 12 MiB value


# Pages read no more than they hand out ----------------------------------------------


def test_a_page_does_not_read_a_large_value_it_will_not_hand_out() -> None:
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append([(b"a", b"small")])
        writer.append([(b"big", _value(40 * MiB, 7))])
        writer.append([(b"z", b"after")])
    store = CountingStore(storage.open_stream(STREAM))
    reader = Reader(store, STREAM)  # type: ignore[arg-type]
    assert [m.key for m in reader.read(max_bytes=1024)] == [b"a"]
    assert store.bytes_read < 10 * MiB  # a chunk and the value's head frame, not 40 MiB
    assert [m.key for m in reader.read(max_bytes=1024)] == [b"a"]
    store.bytes_read = 0
    messages, next_position = _read_messages(reader, None, 0, 1, 64 * MiB)  # limit 1
    assert [m.key for m in messages] == [b"a"] and store.bytes_read < 10 * MiB
    messages, _ = _read_messages(reader, None, next_position, 10, 1024)
    assert [m.key for m in messages] == [b"big"]  # at least one message, whatever its size


def test_the_sequence_of_a_last_large_value_is_found_from_its_head() -> None:
    """``tail -n 1`` of a stream that ends with a value in pieces reads two headers."""
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        for _ in range(50):
            writer.append([(b"a", b"small")])
        last = writer.append([(b"big", _value(3 * MAX_VALUE_SIZE, 14))])
    store = CountingStore(storage.open_stream(STREAM))
    reader = Reader(store, STREAM)  # type: ignore[arg-type]
    assert reader.position_of_sequence(50) == last.frame_position
    assert store.bytes_read < 1024  # the checkpoint, the last piece's and the head's headers
    assert reader.position_of_sequence(49) == last.frame_position - 79  # a walk, as before


# Copies ------------------------------------------------------------------------------


def test_copies_keep_large_values_whole_and_go_on_after_one() -> None:
    source, copy = MemoryStorage(), MemoryStorage(page_size=512)
    with Writer.open(source, STREAM) as writer:
        writer.append([(b"a", b"1")])
        writer.append([(b"big", _value(MAX_VALUE_SIZE * 2 + 1, 8))])  # the copy ends on a piece

    def copied() -> int:
        with (
            Reader.open(source, STREAM) as reader,
            Writer.open(copy, STREAM) as writer,
            Reader.open(copy, STREAM) as destination,
        ):
            return copy_stream(ReaderFrames(reader), writer, destination).messages

    assert copied() == 2
    with Writer.open(source, STREAM) as writer:
        writer.append([(b"z", b"2"), (b"big2", _value(MAX_VALUE_SIZE + 5, 9))])
    assert copied() == 2  # incremental, after a copy that ended inside... at a value's last piece
    assert copied() == 0
    with Reader.open(source, STREAM) as original, Reader.open(copy, STREAM) as replica:
        assert list(replica.read()) == list(original.read())
        rebuilt = b"".join(frames_from_messages(original.read()))
        assert rebuilt == original.read_frames(max_bytes=64 * MiB).data


def _frames_of(messages: Iterator[Message]) -> list[int]:
    return [m.position for m in messages]


# Frames as a reader meets them -------------------------------------------------------


def test_readers_cut_storage_reads_anywhere_in_v1_and_v2_headers() -> None:
    """A 96-byte v2 header may straddle the end of a read chunk; so may a value's pieces."""
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        for number in range(12):
            batch = encode_batch([(b"k", b"v" * number)])
            if number % 2:
                batch = batch.with_producer(bytes([number + 1]) * 16, 0)  # a v2 frame
            writer.append_batches([batch])
        writer.append([(b"big", _value(MAX_VALUE_SIZE + 300, 10))])
        writer.append([(b"k", b"last")])
    with Reader.open(storage, STREAM) as reader:
        expected = list(reader.read())
    for chunk_size in range(97, 300):  # every cut of the first frames, with any header size
        with Reader.open(storage, STREAM, chunk_size=chunk_size) as reader:
            assert list(reader.read()) == expected, chunk_size


def test_a_stream_that_ends_inside_a_value_is_reported_corrupt() -> None:
    """Only a damaged stream can end between a HEAD and its last piece: verify and read say so."""
    storage = MemoryStorage()
    with Writer.open(storage, STREAM) as writer:
        writer.append([(b"a", b"1")])
    batch = encode_batch([(b"big", _value(2 * CHUNK_SIZE + 1, 12))])
    store = storage.open_stream(STREAM, write=True)
    try:
        start = store.read_checkpoint()
        frames = batch.frame(start.length, start.next_sequence, start.last_timestamp)
        head = read_header(frames, 0, None)
        piece = read_header(frames, head.frame_size, None)
        cut = head.frame_size + piece.frame_size  # the head and one of its two pieces
        for offset in range(0, cut, CHUNK_SIZE):  # in writes storage takes
            store.write(start.length + offset, frames[offset : min(offset + CHUNK_SIZE, cut)])
        store.advance_checkpoint(
            dataclasses.replace(
                start,
                commit=start.commit + 1,
                length=start.length + cut,
                next_sequence=start.next_sequence + 1,
                last_frame_position=start.length + head.frame_size,
            ),
            expected=start,
        )
    finally:
        store.close()
    with Reader.open(storage, STREAM) as reader:
        with pytest.raises(CorruptData, match="inside a value in pieces"):
            reader.verify()
        with pytest.raises(CorruptData, match="inside a value in pieces"):
            list(reader.read())


def test_printing_pages_hold_a_large_value_alone() -> None:
    large = _value(MAX_VALUE_SIZE, 13)
    messages = [Message(n, n, 0, b"", large if n in (2, 3) else b"v", n + 1) for n in range(6)]
    assert [len(page) for page in pages(messages, 4096)] == [3, 1, 2]
    assert [len(page) for page in pages(messages, 2)] == [2, 1, 1, 2]


def test_serve_takes_large_bodies_by_default() -> None:
    assert Limits().max_body == DEFAULT_MAX_BODY == 512 * MiB
    shown = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).stdout
    assert f"default: {DEFAULT_MAX_BODY}" in shown.replace("\n", " ")
