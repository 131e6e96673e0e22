"""Compressed values end to end: the options that turn it on, every reader, damaged data.

Compression happens where the batch is encoded (client, producer, writer,
CLI); the server stores the frames it is sent and every reader unpacks them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import tracemalloc
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from messagevault import FileStorage, MemoryStorage, Reader, Writer
from messagevault.cli import main
from messagevault.client import AsyncClient, Client
from messagevault.errors import CorruptData, InvalidBatch
from messagevault.format import (
    BATCH_FLAGS,
    CHUNK_SIZE,
    COMPRESSED,
    CONTINUATION,
    FOLLOWS,
    FRAME_HEADER_SIZE,
    HEAD,
    MAX_FRAME_SIZE,
    MORE,
    SLOT_SIZE,
    EncodedBatch,
    FrameAssembler,
    FrameBody,
    FrameHeader,
    Message,
    encode_batch,
    parse_batch,
    read_header,
    verify_frame,
)
from messagevault.producer import AsyncProducer, Producer
from messagevault.server import Limits, StreamHub, create_app
from messagevault.storage.base import Storage
from messagevault.wire import BATCH_CONTENT_TYPE
from tests.served import ServedApp

Pairs = list[tuple[bytes, bytes]]
MiB = 1024 * 1024


def _records(count: int, seed: int = 1) -> list[bytes]:
    """JSON-like values, as event streams carry: they compress well."""
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "id": i,
                "type": "OrderPlaced",
                "customer": f"customer-{rng.randrange(1000):04d}",
                "items": [{"sku": f"SKU-{rng.randrange(100)}", "qty": rng.randrange(9)}] * 3,
            }
        ).encode()
        for i in range(count)
    ]


def _large_text(size: int, seed: int = 2) -> bytes:
    """Hex of random bytes: text that zstd packs to about half, so still over 4 MiB stored."""
    return random.Random(seed).randbytes(size // 2).hex().encode()


def _frames(data: bytes | memoryview, start: int = 0) -> Iterator[FrameHeader]:
    """The checked headers of the frames laid end to end in ``data`` from stream ``start``."""
    offset = 0
    while offset < len(data):
        header = read_header(data, offset, start + offset)
        yield header
        offset += header.frame_size


def _decode(data: bytes, start: int = 0) -> list[Message]:
    """Every message of frames placed at stream position ``start``, values in pieces joined."""
    assembler = FrameAssembler()
    messages: list[Message] = []
    for header in _frames(data, start):
        verify_frame(data, header.base_position - start, header.base_position)
        messages.extend(assembler.feed(data, header.base_position - start, header))
    assert not assembler.pending
    return messages


def _pairs(messages: Sequence[Message]) -> Pairs:
    return [(m.key, m.value) for m in messages]


def _stream_bytes(root: Path, stream: str) -> bytes:
    return (root / stream / "data").read_bytes()


# --- the options, and readers on storage ---------------------------------------------


def test_writer_compress_is_read_back_by_the_reader_on_every_backend(storage: Storage) -> None:
    small = [(b"OrderPlaced", value) for value in _records(200)]
    noise = [(b"Noise", os.urandom(300)) for _ in range(5)]
    large = [(b"Report", b'{"row": "same again"}, ' * (5 * MiB // 23))]  # one value in pieces
    with Writer.open(storage, "orders") as writer:
        results = [
            writer.append(small, compress=True),
            writer.append(noise, compress=True),
            writer.append(large, compress=True),
            writer.append(small[:3]),
        ]
        length = writer.checkpoint.length
    with Reader.open(storage, "orders") as reader:
        raw = reader.read_frames(0, max_bytes=length).data
        messages = list(reader.read())
        # A reader may start on any message, compressed or not.
        for result in results:
            assert _pairs(list(reader.read(result[-1].position))[:1]) == [
                (m.key, m.value) for m in messages if m.position == result[-1].position
            ]
    assert _pairs(messages) == small + noise + large + small[:3]
    assert [m.position for m in messages] == [r.position for res in results for r in res]
    flags = [header.flags for header in _frames(raw)]
    # Incompressible values stay as they are; a large value is compressed whole.
    assert flags == [COMPRESSED, 0, HEAD | COMPRESSED, 0]


# --- through the server ----------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedApp]:
    server = ServedApp(create_app(StreamHub(FileStorage(tmp_path / "data", fsync="never"))))
    server.start()
    yield server
    server.stop()


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        f"{url}/streams/orders", body, {"Content-Type": BATCH_CONTENT_TYPE}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


# Header bytes the writer assigns: base position, base sequence, timestamp; a
# continuation's chunk (its head's position); and the header CRC over them.
_ASSIGNED = {1: ((16, 40), (60, 64)), 2: ((16, 40), (92, 96))}


def _unassigned(frame: bytes, header: FrameHeader) -> bytes:
    kept = bytearray(frame)
    spans = list(_ASSIGNED[header.version])
    if header.is_continuation:
        spans.append((76, 84))
    for start, end in spans:
        kept[start:end] = bytes(end - start)
    kept[5] &= ~BATCH_FLAGS  # where a batch starts and ends, marked as it is stored
    return bytes(kept)


def test_the_server_stores_the_compressed_frames_it_is_sent(
    served: ServedApp, tmp_path: Path
) -> None:
    batches = [
        encode_batch([(b"OrderPlaced", value) for value in _records(500)], compress=True),
        encode_batch([(b"Big", _large_text(10 * MiB))], compress=True),  # HEAD + CONTINUATIONs
        encode_batch([(b"Noise", os.urandom(1000))], compress=True),
    ]
    for batch in batches:
        _post(served.url, batch.frame())
    stored = _stream_bytes(tmp_path / "data", "orders")
    sent = b"".join(batch.frame() for batch in batches)
    assert len(stored) == len(sent)
    stored_headers = list(_frames(stored))
    # 10 MiB of hex text is about 5.2 MiB stored: a HEAD and one CONTINUATION.
    assert [h.flags for h in stored_headers] == [
        COMPRESSED,
        HEAD | COMPRESSED | MORE,
        CONTINUATION | COMPRESSED | FOLLOWS,
        0,
    ]
    for header in stored_headers:
        start, end = header.base_position, header.end
        # The producer framed them at 0; only the fields the writer assigns differ.
        assert read_header(sent, start, None).frame_size == header.frame_size
        assert _unassigned(stored[start:end], header) == _unassigned(sent[start:end], header)
    assert _decode(stored) == list(Reader.open(FileStorage(tmp_path / "data"), "orders").read())


def _record_pair(record: dict[str, str]) -> tuple[bytes, bytes]:
    """(key, value) of a JSON record as the read routes print it (docs/HTTP.md)."""
    value = record["value"]
    raw = base64.b64decode(value) if record.get("encoding") == "base64" else value.encode()
    return record["key"].encode(), raw


def _json_read(url: str, position: int = 0, pages: int = 50) -> Pairs:
    """The JSON read route, page after page to the end (at most ``pages``)."""
    pairs: Pairs = []
    for _ in range(pages):
        request = urllib.request.Request(
            f"{url}/streams/orders/messages?from={position}",
            headers={"Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.loads(answer.read())
        records = body["messages"]
        if not records:
            return pairs
        pairs += map(_record_pair, records)
        position = body["next"]
    raise AssertionError(f"the JSON route did not reach the end in {pages} pages")


def _cli_read(url: str) -> Pairs:
    result = CliRunner().invoke(
        main, ["read", "orders", "--url", url, "--format", "ndjson"], prog_name="messagevault"
    )
    assert result.exit_code == 0, result.stderr
    return [_record_pair(json.loads(line)) for line in result.stdout.splitlines()]


async def _async_read(url: str) -> tuple[list[Message], list[int]]:
    """Publish with ``AsyncClient`` and ``AsyncProducer``, compressed; all messages, and where."""
    async with AsyncClient(url) as client:
        result = await client.publish("orders", [(b"Async", b"x" * 5000)], compress=True)
        async with AsyncProducer(client, compress=True) as producer:
            future = await producer.send("orders", b"y" * 5000, key="AsyncProduced")
            receipt = await future
        return [m async for m in client.read("orders")], [result[0].position, receipt.position]


def test_every_reader_unpacks_what_clients_and_producers_compressed(
    served: ServedApp, tmp_path: Path
) -> None:
    records = [(b"OrderPlaced", value) for value in _records(300)]
    large = [(b"Export", _large_text(20 * MiB))]
    with Client(served.url) as client:
        published = [
            client.publish("orders", records, compress=True),
            client.publish("orders", large, compress=True),
        ]
        with Producer(client, compress=True) as producer:
            for value in _records(50, seed=3):
                producer.send("orders", value, key="Produced")
            producer.flush()
            noise = [os.urandom(2000) for _ in range(20)]
            futures = [producer.send("orders", value, key="Noise") for value in noise]
        receipts = [future.result() for future in futures]
        expected = (
            records
            + large
            + [(b"Produced", v) for v in _records(50, seed=3)]
            + [(b"Noise", v) for v in noise]
        )
        from_client = list(client.read("orders"))
        assert _pairs(from_client) == expected
        # The receipts of compressed batches are where the messages are.
        assert [r.position for result in published for r in result] == [
            m.position for m in from_client[:301]
        ]
        # A reader starting at the large value, and at one just after it.
        at_large = next(m for m in from_client if m.key == b"Export")
        assert _pairs(list(client.read("orders", at_large.position, limit=2))) == expected[300:302]
    async_read, async_positions = asyncio.run(_async_read(served.url))
    expected += [(b"Async", b"x" * 5000), (b"AsyncProduced", b"y" * 5000)]
    assert _pairs(async_read) == expected
    assert [m.position for m in async_read[-2:]] == async_positions
    with Reader.open(FileStorage(tmp_path / "data"), "orders") as reader:
        assert list(reader.read()) == async_read
    assert _json_read(served.url) == expected
    assert _json_read(served.url, at_large.position)[:1] == large
    assert _cli_read(served.url) == expected

    headers = list(_frames(_stream_bytes(tmp_path / "data", "orders")))
    by_position = {h.base_position: h for h in headers}
    assert by_position[at_large.position].flags & (HEAD | COMPRESSED) == HEAD | COMPRESSED
    assert any(h.is_continuation for h in headers)  # the 20 MiB value is over 4 MiB stored
    # The producer's random values did not shrink: stored as they were sent.
    noise_frame = by_position[receipts[0].position]
    assert not noise_frame.compressed
    assert noise_frame.message_count == len(noise)
    produced = [h for h in headers if h.base_sequence == 301 and h.message_count]
    assert produced[0].compressed
    assert all(by_position[position].compressed for position in async_positions)


def test_cli_publish_compress(tmp_path: Path) -> None:
    lines = b"\n".join(_records(100)) + b"\n"
    env = {"MESSAGEVAULT_STORAGE": f"file:{tmp_path}", "MESSAGEVAULT_URL": None}
    runner = CliRunner()
    result = runner.invoke(
        main, ["publish", "orders", "--stdin", "--compress", "--key", "Line"], input=lines, env=env
    )
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(main, ["publish", "orders", "plain"], env=env)
    assert result.exit_code == 0, result.stderr
    assert [h.compressed for h in _frames(_stream_bytes(tmp_path, "orders"))] == [True, False]
    with Reader.open(FileStorage(tmp_path), "orders") as reader:
        assert _pairs(list(reader.read())) == [(b"Line", v) for v in _records(100)] + [
            (b"", b"plain")
        ]


# --- damaged compressed data -------------------------------------------------------------


def _body(
    count: int, keys: bytes, key_lengths: bytes, value_lengths: Sequence[int], stored: bytes
) -> FrameBody:
    parts = (
        b"".join(i.to_bytes(SLOT_SIZE, "little") for i in range(count)),
        b"".join(n.to_bytes(4, "little") for n in value_lengths),
        key_lengths,
        keys,
        stored,
    )
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return FrameBody(count, len(keys), len(stored), crc, parts, COMPRESSED)


def _compressed_frame(value_lengths: Sequence[int], stored: bytes) -> EncodedBatch:
    count = len(value_lengths)
    return EncodedBatch((_body(count, b"k" * count, bytes([1] * count), value_lengths, stored),))


def _value_in_pieces(stored: bytes, flags: int = COMPRESSED) -> EncodedBatch:
    first = stored[:CHUNK_SIZE]
    head = _body(1, b"k", b"\x01", [len(first)], first)
    frames = [FrameBody(1, 1, len(first), head.body_crc, head.parts, HEAD | flags, len(stored))]
    for offset in range(CHUNK_SIZE, len(stored), CHUNK_SIZE):
        piece = stored[offset : offset + CHUNK_SIZE]
        frames.append(
            FrameBody(0, 0, len(piece), zlib.crc32(piece), (piece,), CONTINUATION | flags)
        )
    return EncodedBatch(tuple(frames))


def _with_content_size(packed: bytes, size: int) -> bytes:
    """The zstd frame ``packed``, its header rewritten to declare ``size`` (RFC 8878 3.1.1.1)."""
    descriptor = packed[4]
    single_segment = descriptor >> 5 & 1
    dictionary_id = (0, 1, 2, 4)[descriptor & 3]
    size_field = (single_segment, 2, 4, 8)[descriptor >> 6]
    fixed = 5 + (not single_segment) + dictionary_id  # magic, descriptor, window, dictionary
    rewritten = bytes([0xC0 | descriptor & 0x3F])  # an 8-byte content size
    return (
        packed[:4]
        + rewritten
        + packed[5:fixed]
        + size.to_bytes(8, "little")
        + (packed[fixed + size_field :])
    )


PREFIX = encode_batch([(b"before", b"an undamaged frame first")]).frame()
AT = len(PREFIX)  # where the damaged frame sits in the stream


def _stream_with(damaged: EncodedBatch) -> bytes:
    return PREFIX + damaged.frame(AT, 1, 1_700_000_000_000)


def _flip_in_values(batch: EncodedBatch) -> EncodedBatch:
    """The same frames with one byte flipped in the middle of the stored values, CRCs fixed."""
    (body,) = batch.frames
    stored = bytearray(body.parts[-1])
    stored[len(stored) // 2] ^= 0x40
    return EncodedBatch(
        (
            _body(
                body.count,
                bytes(body.parts[3]),
                bytes(body.parts[2]),
                _lengths(body),
                bytes(stored),
            ),
        )
    )


def _lengths(body: FrameBody) -> list[int]:
    raw = bytes(body.parts[1])
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


def _packed(data: bytes) -> bytes:
    """``data`` as a writer compresses it: with its content size and checksum."""
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def _damaged_cases() -> dict[str, EncodedBatch]:
    values = _records(40)
    good = encode_batch([(b"k", v) for v in values], compress=True)
    assert good.frames[0].flags == COMPRESSED
    lengths = [len(v) for v in values]
    joined = b"".join(values)
    big = b"".join(_records(4000))
    big_piece = _value_in_pieces(_packed(_large_text(12 * MiB)))
    flipped_pieces = list(big_piece.frames)
    piece = bytearray(flipped_pieces[1].parts[0])
    piece[1000] ^= 0x01
    flipped_pieces[1] = FrameBody(
        0, 0, len(piece), zlib.crc32(piece), (bytes(piece),), CONTINUATION | COMPRESSED
    )
    return {
        "a flipped byte in the zstd payload": _flip_in_values(good),
        "a content size over the lengths": _compressed_frame(
            lengths, _with_content_size(_packed(joined), len(joined) + 1)
        ),
        "a content size under the lengths": _compressed_frame(
            [*lengths[:-1], lengths[-1] + 10], _packed(joined)
        ),
        "no content size": _compressed_frame(
            lengths, zstandard.ZstdCompressor(write_content_size=False).compress(joined)
        ),
        "lengths that claim over 16 MiB": _compressed_frame(
            [MAX_FRAME_SIZE, MAX_FRAME_SIZE], _packed(bytes(2 * MAX_FRAME_SIZE))
        ),
        "a value in pieces declaring 1 TiB": _value_in_pieces(
            _with_content_size(_packed(big), 2**40)
        ),
        "a value in pieces declaring more than it holds": _value_in_pieces(
            _with_content_size(_packed(big), len(big) + 4096)
        ),
        "a value in pieces with a flipped byte": EncodedBatch(tuple(flipped_pieces)),
        "a value in pieces that is not zstd": _value_in_pieces(b"not zstd at all" * 1000),
    }


@pytest.fixture(scope="module")
def damaged_cases() -> dict[str, EncodedBatch]:
    return _damaged_cases()


@pytest.mark.parametrize(
    "case",
    [
        "a flipped byte in the zstd payload",
        "a content size over the lengths",
        "a content size under the lengths",
        "no content size",
        "lengths that claim over 16 MiB",
        "a value in pieces declaring 1 TiB",
        "a value in pieces declaring more than it holds",
        "a value in pieces with a flipped byte",
        "a value in pieces that is not zstd",
    ],
)
def test_damaged_compressed_data_is_corrupt_data_at_its_position(
    case: str, damaged_cases: dict[str, EncodedBatch], tmp_path: Path
) -> None:
    stream = _stream_with(damaged_cases[case])
    tracemalloc.start()
    try:
        with pytest.raises(CorruptData) as raised:
            _decode(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value.position == AT
    assert f"position {AT}" in str(raised.value)
    assert "\n" not in str(raised.value)
    # Never more than the stored bytes and a value's honest size (here at most 12 MiB).
    assert peak < 64 * MiB
    # A server refuses it as an upload (value-size checks, or unpacking the
    # frame; a value in pieces by unpacking it bit by bit, output dropped),
    # so no producer can put a value into a stream that stops every reader.
    tracemalloc.start()
    try:
        with pytest.raises((CorruptData, InvalidBatch)):
            parse_batch(damaged_cases[case].frame())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    # And a reader of a stream holding it stops at it, after the good frame before it.
    (tmp_path / "orders").mkdir()
    storage = FileStorage(tmp_path)
    with Writer.open(storage, "orders") as writer:
        writer.append([(b"before", b"an undamaged frame first")])
    with (tmp_path / "orders" / "data").open("r+b") as data:
        data.seek(0)
        data.write(stream)
    with Reader.open(storage, "orders") as reader:
        messages = reader.read(0, committed=len(stream))
        assert next(messages).key == b"before"
        with pytest.raises(CorruptData) as raised:
            next(messages)
    assert raised.value.position == AT


def test_an_undamaged_frame_built_by_hand_reads_back() -> None:
    # The helpers above build valid frames: the damage alone is what fails.
    values = _records(40)
    frame = _compressed_frame([len(v) for v in values], _packed(b"".join(values)))
    assert _pairs(_decode(_stream_with(frame))[1:]) == [(b"k", v) for v in values]
    big = b"".join(_records(4000))
    assert _decode(_stream_with(_value_in_pieces(_packed(big))))[1].value == big
    large = _large_text(12 * MiB)
    assert _decode(_stream_with(_value_in_pieces(_packed(large))))[1].value == large


# --- round trips -----------------------------------------------------------------------

_keys = st.one_of(st.binary(max_size=20), st.text(max_size=10).map(str.encode))
_words = st.sampled_from([b"order", b"customer", b'"id": ', b"\x00\x00", b"{}", b" "])
_values = st.one_of(
    st.binary(max_size=300),  # mostly incompressible
    st.lists(_words, max_size=200).map(b"".join),  # compressible
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_keys, _values), min_size=1, max_size=40), st.integers(0, 10**9))
def test_compressed_batches_round_trip(pairs: Pairs, position: int) -> None:
    batch = encode_batch(pairs, compress=True)
    wire = batch.frame()
    parsed = parse_batch(wire)
    assert parsed.frame() == wire
    stored = parsed.frame(position, 7, 1_700_000_000_000)
    messages = _decode(stored, position)
    assert _pairs(messages) == pairs
    assert [m.sequence for m in messages] == list(range(7, 7 + len(pairs)))
    plain = sum(map(len, (v for _, v in pairs)))
    if batch.frames[0].flags & COMPRESSED:
        assert batch.frames[0].values_size < plain
    else:
        assert len(wire) == FRAME_HEADER_SIZE + 9 * len(pairs) + plain + sum(
            len(k) for k, _ in pairs
        )


@settings(max_examples=5, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**16), st.booleans())
def test_compressed_values_in_pieces_round_trip(pieces: int, extra: int, text: bool) -> None:
    size = pieces * CHUNK_SIZE + extra
    value = _large_text(size * 2)[:size] if text else os.urandom(size)
    pairs = [(b"small", b"a" * 100), (b"large", value), (b"after", b"b" * 100)]
    wire = encode_batch(pairs, compress=True).frame()
    assert _pairs(_decode(parse_batch(wire).frame(4096, 0, 1), 4096)) == pairs


def test_memory_storage_reads_a_compressed_value_in_pieces() -> None:
    storage = MemoryStorage(page_size=512)
    value = _large_text(9 * MiB)
    with Writer.open(storage, "big") as writer:
        result = writer.append([(b"k", value)], compress=True)
    with Reader.open(storage, "big") as reader:
        (message,) = list(reader.read(result[0].position))
    assert message.value == value
    assert message.next_position == result.end


# --- what a server takes --------------------------------------------------------------


def test_a_compressed_value_may_unpack_to_no_more_than_the_request_limit(tmp_path: Path) -> None:
    # 64 MiB of zeros packs into a few KiB: without a bound a small request
    # would make every reader of the stream hold whatever it declares.
    value = bytes(64 * MiB)
    batch = encode_batch([(b"k", value)], compress=True)
    assert batch.frame_size < MiB
    body = batch.frame()
    assert parse_batch(body).count == 1  # no bound asked: the zstd frame itself is sound
    with pytest.raises(InvalidBatch, match=f"unpacks to {64 * MiB} bytes; this server takes"):
        parse_batch(body, max_value_size=64 * MiB - 1)
    assert parse_batch(body, max_value_size=64 * MiB).count == 1
    # The server bounds it by its --max-body, and stores nothing.
    app = create_app(
        StreamHub(FileStorage(tmp_path / "data", fsync="never")), limits=Limits(max_body=MiB)
    )
    with ServedApp(app) as server:
        request = urllib.request.Request(
            f"{server.url}/streams/orders", body, {"Content-Type": BATCH_CONTENT_TYPE}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert json.loads(refused.value.read())["error"] == "invalid_batch"
    assert (
        not (tmp_path / "data" / "orders").exists()
        or Reader.open(FileStorage(tmp_path / "data"), "orders").checkpoint().length == 0
    )


@pytest.mark.parametrize("head_compressed", [True, False])
def test_every_piece_of_a_value_carries_its_heads_compression_flag(head_compressed: bool) -> None:
    raw = os.urandom(5 * MiB)  # incompressible: stored in two pieces either way
    stored = _packed(raw) if head_compressed else raw
    batch = _value_in_pieces(stored, COMPRESSED if head_compressed else 0)
    parse_batch(batch.frame())  # consistent: taken
    head, *rest = batch.frames
    assert rest
    flipped = [
        FrameBody(0, 0, body.values_size, body.body_crc, body.parts, body.flags ^ COMPRESSED)
        for body in rest
    ]
    mixed = EncodedBatch((head, *flipped))
    with pytest.raises(InvalidBatch, match="unlike the HEAD of its value at 0"):
        parse_batch(mixed.frame())
