"""The shapes server and client exchange (``messagevault.wire``), each both ways."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from messagevault import (
    AppendResult,
    CorruptData,
    EncodedBatch,
    InvalidBatch,
    MemoryStorage,
    Message,
    ReadAccess,
    Reader,
    encode_batch,
)
from messagevault.format import hex_id_format, message_id
from messagevault.server import Limits, StreamHub, create_app
from messagevault.wire import (
    BATCH_CONTENT_TYPE,
    EVENT_STREAM,
    NDJSON,
    StreamInfo,
    append_result_from_minimal,
    appended_json,
    appended_minimal,
    iso_time,
    json_append,
    json_batch,
    message_record,
    parse_json,
    parse_time,
    read_answer_json,
    record_json,
    record_pairs,
    records_ndjson,
    records_of_messages,
)

RESULTS = [
    AppendResult(0, 100, 0, 3, 1_700_000_000_123, 100),
    AppendResult(2**40 + 5, 4000, 2**33, 500, 2**47 + 9, 2**40 + 4005),
    AppendResult(2**49 - 100, 400, 2**32 - 3, 7, 1_800_000_000_001, 2**49 + 300),  # masked ids
    AppendResult(77, 68, 5, 1, 0, 145),
]
# Ids keep 48 bits of the timestamp too (a date ISO 8601 cannot write).
FAR_FUTURE = AppendResult(2**49 - 100, 400, 2**32 - 3, 7, 2**49 + 1, 2**49 + 300)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))  # up to the year 9999
def test_parse_time_reads_iso_time_back_exactly(timestamp: int) -> None:
    assert parse_time(iso_time(timestamp)) == timestamp


@pytest.mark.parametrize("result", [*RESULTS, FAR_FUTURE])
def test_hex_ids_are_message_ids(result: AppendResult) -> None:
    id_format, positions, sequences = hex_id_format(
        result.timestamp, result.positions, result.sequences
    )
    hex_ids = [id_format % pair for pair in zip(positions, sequences, strict=True)]
    assert hex_ids == [r.id.hex().encode() for r in result]


PRODUCER = bytes(range(1, 17))
BATCHES = [
    encode_batch([(b"k", b"v")] * 3),
    encode_batch([(b"k", b"v")] * 500).with_producer(PRODUCER, 7),
    encode_batch([(b"", b"x" * 10), (b"big", b"y" * (4 * 1024 * 1024 + 1)), (b"", b"z")]),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("placed", RESULTS)
def test_the_exact_result_comes_back_from_the_minimal_answer(
    batch: EncodedBatch, placed: AppendResult
) -> None:
    result = AppendResult.of_batch(
        batch,
        placed.frame_position,
        placed.base_sequence,
        placed.timestamp,
        placed.frame_position + batch.frame_size,
    )
    answer = json.loads(appended_minimal("orders", result))
    rebuilt = append_result_from_minimal(answer, batch)
    assert rebuilt == result
    assert list(rebuilt) == list(result)


@pytest.mark.parametrize("result", [*RESULTS, FAR_FUTURE])
def test_the_full_answer_lists_every_receipt(result: AppendResult) -> None:
    answer = json.loads(appended_json("orders", result))
    assert answer["position"] == result.committed_length
    assert answer["messages"] == [
        {"position": r.position, "sequence": r.sequence, "id": r.id.hex()} for r in result
    ]


def test_a_minimal_answer_for_another_batch_size_is_refused() -> None:
    batch = BATCHES[1]
    result = AppendResult.of_batch(batch, 2**40 + 5, 2**33, 2**47 + 9, 2**40 + 4005)
    answer = json.loads(appended_minimal("orders", result))
    # The frame size says where message 1.. lie only through the count: a
    # count that disagrees with the last receipt is caught.
    answer["count"] += 1
    with pytest.raises(CorruptData, match="does not describe"):
        append_result_from_minimal(answer, batch)
    with pytest.raises(CorruptData, match="lacks"):
        append_result_from_minimal({"count": 3}, batch)


KEYS_AND_VALUES = [
    (b"OrderPlaced", b'{"id": 1}'),
    (b"", b""),
    (b"\xff\xfe", b"\x00\xff binary"),
    ("caf\u00e9 \U0001f600".encode(), "\u00fcber".encode()),
    (b"\xed\xa0\x80", b"\xed\xa0\x80"),  # a lone surrogate as JSON may carry it
    (bytes(range(255)), bytes(range(256)) * 3),
]


@pytest.mark.parametrize(("key", "value"), KEYS_AND_VALUES)
def test_records_give_back_the_exact_key_and_value(key: bytes, value: bytes) -> None:
    message = Message(64, 1, 1_700_000_000_123, key, value, 140)
    record = json.loads(json.dumps(message_record(message)))
    assert record_pairs([record]) == [(key, value)]
    assert record["id"] == message_id(message.timestamp, 64, 1).hex()
    text_key = _is_utf8(key)
    assert ("key_encoding" in record) is not text_key
    assert record["encoding"] == ("utf-8" if _is_utf8(value) else "base64")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_text_keys_keep_the_record_shape_they_had() -> None:
    record = message_record(Message(0, 0, 0, b"OrderPlaced", b"v", 68))
    assert list(record) == [
        "position",
        "sequence",
        "id",
        "timestamp",
        "key",
        "next_position",
        "value",
        "encoding",
    ]


def test_append_records_default_and_accept_base64_keys() -> None:
    records = [
        {"value": "no key"},
        {"key": "//4=", "key_encoding": "base64", "value": "AP8=", "encoding": "base64"},
        {"key": "k", "key_encoding": "utf-8", "value": "v", "encoding": "utf-8"},
    ]
    assert record_pairs(records) == [(b"", b"no key"), (b"\xff\xfe", b"\x00\xff"), (b"k", b"v")]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "body must be"),
        (b'{"messages": {}}', "body must be"),
        (b'{"messages": [1]}', "message 0 must be an object"),
        (b'{"messages": [{"key": "k"}]}', "message 0: value must be a string"),
        (b'{"messages": [{"value": "v", "key": 5}]}', "message 0: key must be a string"),
        (b'{"messages": [{"value": "%%%", "encoding": "base64"}]}', "value is not valid base64"),
        (
            b'{"messages": [{"value": "v", "key": "%%%", "key_encoding": "base64"}]}',
            "key is not valid base64",
        ),
        (
            b'{"messages": [{"value": "v", "key": "k", "key_encoding": "hex"}]}',
            "key_encoding must be",
        ),
        (b'{"messages": [{"value": "v", "encoding": "latin-1"}]}', "encoding must be"),
    ],
)
def test_bad_json_batches_are_refused_naming_the_fault(body: bytes, match: str) -> None:
    with pytest.raises(InvalidBatch, match=match):
        json_batch(body)


def test_stream_info_round_trips_through_json() -> None:
    access = ReadAccess("azure-sas", "https://example.invalid/mv-orders?sig=x", 1_900_000_000.5)
    info = StreamInfo.from_timestamps(
        "orders",
        1000,
        12,
        first_write=1_700_000_000_123,
        last_write=1_700_000_100_456,
        read_access=access,
    )
    document = json.loads(json.dumps(info.to_json()))
    assert document["first_write"] == iso_time(1_700_000_000_123)
    assert document["read_access"] == {
        "kind": "azure-sas",
        "location": access.location,
        "expires_at": access.expires_at,
    }
    again = StreamInfo.from_json(document)
    assert again == info
    assert again.first_write == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    listed = StreamInfo.from_json({"stream": "orders", "length": 0, "messages": 0})
    assert (listed.first_write, listed.read_access) == (None, None)


# Through a real server --------------------------------------------------------------

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
BINARY_KEY = b"\xff\xfe"


async def test_a_binary_key_comes_back_exactly_from_every_read_path(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(create_app(StreamHub(MemoryStorage())))
    # Appended as JSON (base64 key) and as a binary batch: both land unchanged.
    response = await client.post(
        "/streams/keys",
        json={"messages": [{"key": "//4=", "key_encoding": "base64", "value": "as JSON"}]},
    )
    assert response.status == 200, await response.text()
    frame = encode_batch([(BINARY_KEY, b"as a batch")]).frame()
    response = await client.post(
        "/streams/keys", data=frame, headers={"Content-Type": BATCH_CONTENT_TYPE}
    )
    assert response.status == 200, await response.text()
    stored = [(BINARY_KEY, b"as JSON"), (BINARY_KEY, b"as a batch")]

    response = await client.get("/streams/keys/messages")
    records = (await response.json())["messages"]
    assert record_pairs(records) == stored

    response = await client.get("/streams/keys/messages", headers={"Accept": NDJSON})
    lines = (await response.text()).splitlines()
    assert record_pairs([json.loads(line) for line in lines]) == stored

    events: list[dict[str, object]] = []
    async with (
        asyncio.timeout(30),
        client.get("/streams/keys/messages", headers={"Accept": EVENT_STREAM}) as sse,
    ):
        async for line in sse.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: ") :]))
            if len(events) == len(stored):
                break
    assert record_pairs(events) == stored
    assert all(event["key_encoding"] == "base64" for event in events)


def test_a_record_with_an_unknown_field_is_refused_not_half_read() -> None:
    from messagevault.errors import InvalidBatch
    from messagevault.wire import record_pairs

    with pytest.raises(InvalidBatch, match="message 1 has unknown fields: value_encoding"):
        record_pairs([{"value": "ok"}, {"value": "ff00", "value_encoding": "hex"}])
    # A record as a read prints it can be appended again unchanged.
    read = {"position": 0, "sequence": 0, "id": "00" * 16, "timestamp": "t", "next_position": 9}
    assert record_pairs([{**read, "key": "k", "value": "v"}]) == [(b"k", b"v")]


async def test_json_read_answers_hold_the_records_field_by_field(
    aiohttp_client: MakeClient,
) -> None:
    # The read routes encode records with msgspec for speed: each answer must
    # hold what json.dumps of the records held, every field and value in the
    # same order, for every kind of key and value.
    storage = MemoryStorage()
    client = await aiohttp_client(create_app(StreamHub(storage)))
    pairs = [
        (b"plain", b'{"id": 1}'),
        (b"", b""),
        ("ünïcödé \u2028".encode(), 'quotes " and \\ and \n\t\x00 and 😀'.encode()),
        (BINARY_KEY, b"\xff not utf-8 \x80"),
        (b"k", b"\xed\xa0\x80"),  # an encoded surrogate: not valid UTF-8
    ]
    frame = encode_batch(pairs).frame()
    response = await client.post(
        "/streams/text", data=frame, headers={"Content-Type": BATCH_CONTENT_TYPE}
    )
    assert response.status == 200, await response.text()
    messages = list(Reader.open(storage, "text").read())
    records = [message_record(m) for m in messages]

    response = await client.get("/streams/text/messages")
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    expected = {"stream": "text", "messages": records, "next": messages[-1].next_position}
    assert _ordered(json.loads(await response.read())) == _ordered(expected)
    response = await client.get("/streams/text/messages", headers={"Accept": NDJSON})
    assert response.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
    text = (await response.read()).decode("utf-8")
    assert text.endswith("\n")
    assert [_ordered(json.loads(line)) for line in text.split("\n")[:-1]] == _ordered(records)
    events: list[str] = []
    async with (
        asyncio.timeout(30),
        client.get("/streams/text/messages", headers={"Accept": EVENT_STREAM}) as sse,
    ):
        async for line in sse.content:
            if line.startswith(b"data: "):
                events.append(line[len(b"data: ") :].decode().rstrip("\n"))
            if len(events) == len(records):
                break
    assert [_ordered(json.loads(event)) for event in events] == _ordered(records)


def _ordered(document: object) -> object:
    """``document`` with every object as a list of its items: equal only in the same order."""
    if isinstance(document, dict):
        return [(name, _ordered(value)) for name, value in document.items()]
    if isinstance(document, list):
        return [_ordered(value) for value in document]
    return document


TEXT = st.text(max_size=100).map(str.encode)


@given(
    # Pages all of text (the encoder's fast path) and pages with bytes that are not UTF-8.
    st.lists(st.tuples(TEXT, TEXT), max_size=20)
    | st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=300) | TEXT), max_size=20),
    st.integers(min_value=0, max_value=2**63 - 100),  # ids keep the low bits of these two
    st.integers(min_value=0, max_value=2**63 - 100),
    st.integers(min_value=0, max_value=253_402_300_799_999),  # up to the year 9999
)
def test_records_encode_as_json_dumps_of_message_record(
    pairs: list[tuple[bytes, bytes]], start: int, first_sequence: int, timestamp: int
) -> None:
    messages = [
        Message(
            start + 4 * i,
            first_sequence + i,
            timestamp,
            key,
            value,
            start + 4 * i + 4,
        )
        for i, (key, value) in enumerate(pairs)
    ]
    records = [message_record(m) for m in messages]
    expected = _ordered([json.loads(json.dumps(record)) for record in records])
    answer = json.loads(read_answer_json("s", records_of_messages(messages), 7))
    assert _ordered(answer) == [("stream", "s"), ("messages", expected), ("next", 7)]
    lines = records_ndjson(messages).decode("utf-8").split("\n")
    assert lines.pop() == ""
    assert [_ordered(json.loads(line)) for line in lines] == expected
    assert [_ordered(json.loads(record_json(m))) for m in messages] == expected


# JSON values as json.dumps may write them: NaN and infinities, integers
# beyond 64 bits, lone surrogates, duplicate keys (json.dumps of pairs).
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(alphabet=st.characters(codec=None), max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _outcome(parse: Callable[[bytes], object], body: bytes) -> tuple[str, object]:
    try:
        return "value", repr(_ordered(parse(body)))  # repr: NaN equals NaN, 1 is not 1.0
    except ValueError as exc:
        return "error", str(exc)


def _json_texts() -> st.SearchStrategy[bytes]:
    dumped = st.builds(
        lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(
            "utf-8", "surrogatepass"
        ),
        JSON_VALUES,
        st.booleans(),
    )
    # Damaged texts: a byte dropped or changed, so that both parsers must refuse alike.
    damaged = st.builds(
        lambda text, at, byte: text[:at] + byte + text[at + 1 :],
        dumped,
        st.integers(min_value=0, max_value=40),
        st.sampled_from([b"", b"\xff", b"\\", b'"', b"}", b"\x00", b"\xed"]),
    )
    return dumped | damaged | st.binary(max_size=30)


@given(_json_texts())
def test_parse_json_reads_what_json_loads_reads(body: bytes) -> None:
    # msgspec first, json.loads for what msgspec refuses: the same values,
    # and the same error message for every text json.loads refuses.
    assert _outcome(parse_json, body) == _outcome(json.loads, body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": NaN, "b": -Infinity}', {"a": float("nan"), "b": float("-inf")}),
        (b'{"a": 1, "a": 2}', {"a": 2}),  # the last of a duplicate key, as json.loads
        (b'{"a": 18446744073709551616}', {"a": 2**64}),  # exact, not a float
        (b'["\\ud800"]', ["\ud800"]),  # a lone surrogate
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a byte order mark
        ('{"a": 1}'.encode("utf-16"), {"a": 1}),
    ],
)
def test_parse_json_takes_what_json_loads_takes(body: bytes, expected: object) -> None:
    assert repr(parse_json(body)) == repr(expected)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "body is not valid JSON: arrays or objects nested"),
        (
            b'{"messages": [], "sequence": ' + b"7" * 5000 + b"}",
            "body is not valid JSON: a number with too many digits",
        ),
        (b'{"messages": [{"value": "\xff"}]}', "body is not valid JSON: 'utf-8' codec"),
        (b'{"messages": [{"value": NaN}]}', "message 0: value must be a string"),
        (b'{"messages": [{"value": "v"}], "sequence": NaN}', '"sequence" was given without'),
        (
            b'{"messages": [{"value": "v"}], "producer": "' + b"1" * 32 + b'", '
            b'"sequence": 18446744073709551616}',
            '"sequence" must be an integer 0..9223372036854775807, not 18446744073709551616',
        ),
    ],
)
def test_append_bodies_json_loads_could_not_take_are_refused_in_one_line(
    body: bytes, match: str
) -> None:
    # json.loads raised RecursionError and a bare ValueError here: the
    # server answered 500. Now a 400 invalid_batch like every bad body.
    with pytest.raises(InvalidBatch, match=re.escape(match)) as raised:
        json_append(body)
    assert "\n" not in str(raised.value)


async def test_records_cut_from_frames_are_those_of_the_messages_from_every_position(
    aiohttp_client: MakeClient,
) -> None:
    # The read routes cut records from stored frames (records_of_frames); a
    # page from any position, with any limit, must be what the messages give.
    storage = MemoryStorage()
    client = await aiohttp_client(create_app(StreamHub(storage), Limits(max_read_bytes=700)))
    batches = [
        encode_batch([(b"f0", b"%050d" % i) for i in range(1)]),
        encode_batch([(b"\xff%d" % i, b"\x80 not text %d" % i) for i in range(5)]),
        encode_batch([(b"z", b"zzz" * 40)] * 3, compress=True),
        encode_batch([(b"k", "caf\u00e9 %d".encode() % i) for i in range(10)]).with_producer(
            PRODUCER, 0
        ),
        encode_batch([(b"", b"%050d" % i) for i in range(2)]),
    ]
    for batch in batches:
        response = await client.post(
            "/streams/pages", data=batch.frame(), headers={"Content-Type": BATCH_CONTENT_TYPE}
        )
        assert response.status == 200, await response.text()
    messages = list(Reader.open(storage, "pages").read())
    assert len(messages) == 21
    positions = [m.position for m in messages] + [messages[-1].next_position]
    for start, position in enumerate(positions):
        for limit in (1, 2, 7, 10_000):
            query = {"from": position, "limit": limit}
            response = await client.get("/streams/pages/messages", params=query)
            answer = json.loads(await response.read())
            got = answer["messages"]
            # A page may stop early (700 bytes of values at most), never past the limit.
            assert 1 <= len(got) <= limit or start == len(messages)
            expected = messages[start : start + len(got)]
            assert _ordered(got) == _ordered([message_record(m) for m in expected])
            assert answer["next"] == (expected[-1].next_position if expected else position)
            response = await client.get(
                "/streams/pages/messages", params=query, headers={"Accept": NDJSON}
            )
            lines = (await response.read()).splitlines()
            assert [json.loads(line) for line in lines] == got
            assert response.headers["X-Next"] == str(answer["next"])
    # Paged by next from the start, every message comes once.
    paged: list[object] = []
    position = 0
    for _ in range(len(messages) + 1):
        response = await client.get("/streams/pages/messages", params={"from": position})
        answer = json.loads(await response.read())
        if not answer["messages"]:
            break
        paged += answer["messages"]
        position = answer["next"]
    assert paged == [message_record(m) for m in messages]


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"messages": [{"value": "v"}], "sequence": ' + b"7" * 5000 + b"}",
        b'{"messages": [{"value": "\xff"}]}',
        b'{"messages": [{"value": NaN}]}',
    ],
    ids=["nested too deeply", "5,000 digits", "not UTF-8", "NaN"],
)
async def test_json_bodies_the_parser_refuses_are_a_400_and_append_nothing(
    aiohttp_client: MakeClient, body: bytes
) -> None:
    client = await aiohttp_client(create_app(StreamHub(MemoryStorage())))
    response = await client.post(
        "/streams/orders", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = json.loads(await response.read())
    assert error["error"] == "invalid_batch"
    assert "\n" not in error["detail"]
    assert (await client.get("/streams/orders")).status == 404  # nothing appended
