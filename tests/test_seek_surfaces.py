"""Seeking where users read: the HTTP read route, the client library, the CLI.

``Reader.seek`` itself is tested against brute force in test_index.py;
here every surface that takes ``from_sequence`` / ``from_time`` / ``from=end``
(or ``--sequence`` / ``--since`` / ``--at``) must start exactly where a
brute-force scan of the stream says, on a stream of varied frames (one
message, several, fifty, and a value over 4 MiB stored in pieces), and
refuse every bad start with a clear error that changes nothing.

One stream is written once for the module and served by a real server on
a loopback port (an aiohttp app in a thread of its own, stopped by the
fixture); tests that append use streams of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from click.testing import CliRunner

from messagevault import FileStorage, Reader, Writer
from messagevault.cli import main
from messagevault.client import AsyncClient, Client
from messagevault.client.base import Answer, Seek, page_of, started_at
from messagevault.errors import InvalidInput, InvalidPosition, PositionTrimmed
from messagevault.format import Message
from messagevault.server import StreamHub, create_app
from messagevault.times import parse_duration, parse_time
from tests.served import ServedApp

STREAM = "varied"
EMPTY = "nothing-yet"
TRIMMED = "trimmed-half"  # four one-message frames, the first two trimmed away
BIG = 5 * 1024 * 1024 + 123  # over 4 MiB: stored as a HEAD frame and CONTINUATION pieces
BATCH = "application/x-messagevault-batch"
NDJSON = "application/x-ndjson"
EVENTS = "text/event-stream"
ROUTE = f"/streams/{STREAM}/messages"


class Served(NamedTuple):
    url: str
    root: Path
    messages: list[Message]  # the whole stream, by a plain read from 0
    length: int


def _write_varied(storage: FileStorage) -> None:
    """Frames of 1 to 50 messages, values of 0 to ~900 bytes, one value in pieces.

    A short pause between commits gives most frames a timestamp of their own,
    so that times between frames are worth seeking.
    """
    with Writer.open(storage, STREAM) as writer:
        for number, count in enumerate([1, 3, 50, 1, 7, 2, 20, 1, 4, 1]):
            writer.append(
                [(f"k{number}".encode(), b"v" * (index * 37 % 900)) for index in range(count)]
            )
            if number == 4:
                writer.append([(b"big", b"B" * BIG)])
            time.sleep(0.003)
    with Writer.open(storage, EMPTY):
        pass
    with Writer.open(storage, TRIMMED) as writer:
        for value in [b"a", b"b", b"c", b"d"]:
            writer.append([(b"", value)])
            time.sleep(0.003)
        writer.trim_below(sequence=2)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("seek-surfaces")
    storage = FileStorage(root)
    _write_varied(storage)
    with Reader.open(storage, STREAM) as reader:
        messages = list(reader.read(0))
        length = reader.checkpoint().length
    assert any(len(m.value) == BIG for m in messages)
    with ServedApp(create_app(StreamHub(FileStorage(root)))) as app:
        yield Served(app.url, root, messages, length)


# Brute force ---------------------------------------------------------------------------


def _at_sequence(served: Served, sequence: int) -> int:
    if sequence == len(served.messages):
        return served.length
    return served.messages[sequence].position


def _at_time(served: Served, milliseconds: int) -> int:
    """The position of the first message stamped at or after ``milliseconds``."""
    for message in served.messages:
        if message.timestamp >= milliseconds:
            return message.position
    return served.length


def _sequences(served: Served) -> list[int]:
    """First and last, inside the 50-message frame, the value in pieces and after it, the end."""
    big = next(m.sequence for m in served.messages if len(m.value) == BIG)
    count = len(served.messages)
    return sorted({0, 1, 3, 4, 30, 53, big - 1, big, big + 1, count - 2, count - 1, count})


def _times(served: Served) -> list[int]:
    """Before the first message, at and just after frame timestamps, after the last."""
    stamps = sorted({m.timestamp for m in served.messages})
    chosen = {stamps[0] - 1000, stamps[-1] + 1, stamps[-1] + 3_600_000}
    for stamp in stamps[:: max(1, len(stamps) // 5)]:
        chosen |= {stamp, stamp + 1}
    return sorted(chosen)


def _iso(milliseconds: int) -> str:
    """RFC 3339 at +01:00: the zone must be honoured, not dropped."""
    moment = datetime.fromtimestamp(milliseconds // 1000, UTC) + timedelta(hours=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{milliseconds % 1000:03d}+01:00"


def _starts(served: Served) -> list[tuple[dict[str, str], int]]:
    """(query, expected start) for every kind of start: sequences, times (both forms), end."""
    starts: list[tuple[dict[str, str], int]] = [({"from": "end"}, served.length)]
    starts += [
        ({"from_sequence": str(sequence)}, _at_sequence(served, sequence))
        for sequence in _sequences(served)
    ]
    for milliseconds in _times(served):
        expected = _at_time(served, milliseconds)
        starts.append(({"from_time": str(milliseconds)}, expected))
        starts.append(({"from_time": _iso(milliseconds)}, expected))
    return starts


# HTTP ----------------------------------------------------------------------------------


@pytest.fixture
async def http(served: Served) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(served.url) as session:
        yield session


async def _first_of_answer(
    http: aiohttp.ClientSession, kind: str, query: dict[str, str]
) -> tuple[int | None, int, int]:
    """(first message's position or None, X-Position, next) of a one-message read."""
    headers = {"Accept": {"json": "application/json", "ndjson": NDJSON, "binary": BATCH}[kind]}
    async with http.get(ROUTE, params={**query, "limit": "1"}, headers=headers) as response:
        assert response.status == 200, await response.text()
        started = int(response.headers["X-Position"])
        if kind == "json":
            body = await response.json()
            records, next_position = body["messages"], body["next"]
        elif kind == "ndjson":
            text = await response.text()
            records = [json.loads(line) for line in text.splitlines()]
            next_position = int(response.headers["X-Next"])
        else:
            answer = Answer(200, dict(response.headers), await response.read())
            page = page_of(answer, Seek(sequence=0))  # checked against X-Position
            # Whole frames: the rest of the first one comes too.
            records = [{"position": m.position} for m in page.messages][:1]
            next_position = page.next_position if records else int(response.headers["X-Next"])
    assert len(records) <= 1
    return (records[0]["position"] if records else None), started, next_position


@pytest.mark.parametrize("kind", ["json", "ndjson", "binary"])
async def test_each_answer_kind_starts_where_a_scan_says(
    served: Served, http: aiohttp.ClientSession, kind: str
) -> None:
    for query, expected in _starts(served):
        first, started, next_position = await _first_of_answer(http, kind, query)
        assert started == expected, query
        if expected == served.length:
            assert (first, next_position) == (None, served.length), query
        else:
            assert first == expected, query


async def test_a_time_without_encoding_keeps_its_offset(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """``+01:00`` typed into a URL arrives as `` 01:00``: still an offset, not dropped."""
    stamp = served.messages[10].timestamp
    raw = _iso(stamp)
    async with http.get(f"{ROUTE}?limit=0&from_time={raw}") as response:  # "+" unencoded
        assert response.status == 200, await response.text()
        assert (await response.json())["next"] == _at_time(served, stamp)


async def _first_events(
    http: aiohttp.ClientSession, query: dict[str, str], headers: dict[str, str], count: int
) -> list[dict[str, Any]]:
    """The first ``count`` events of a tail, as records; the tail is then hung up on."""
    async with (
        asyncio.timeout(30),
        http.get(ROUTE, params=query, headers={"Accept": EVENTS, **headers}) as response,
    ):
        assert response.status == 200, await response.text()
        return await _records_of_events(response, count)


async def _records_of_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    """The first ``count`` events' records; by hand: an event may be longer than a line buffer."""
    records: list[dict[str, Any]] = []
    buffer = b""
    while len(records) < count:
        chunk = await response.content.readany()
        assert chunk, "the tail ended"
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        records += [
            json.loads(line[len(b"data: ") :])
            for event in events
            for line in event.split(b"\n")
            if line.startswith(b"data: ")
        ]
    return records[:count]


async def test_server_sent_events_start_by_sequence_and_time(
    served: Served, http: aiohttp.ClientSession
) -> None:
    for sequence in [0, 4, 53]:
        (record,) = await _first_events(http, {"from_sequence": str(sequence)}, {}, 1)
        assert (record["sequence"], record["position"]) == (
            sequence,
            _at_sequence(served, sequence),
        )
    for milliseconds in _times(served)[:-2]:  # those before the last message
        (record,) = await _first_events(http, {"from_time": _iso(milliseconds)}, {}, 1)
        assert record["position"] == _at_time(served, milliseconds)


async def test_last_event_id_wins_over_the_start_on_a_reconnect(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """A reconnecting EventSource repeats its URL: the id it last saw says where it was."""
    resume = served.messages[40]
    for query in [{"from_sequence": "2"}, {"from_time": "0"}, {"from": "end"}]:
        headers = {"Last-Event-ID": str(resume.position)}
        (record,) = await _first_events(http, query, headers, 1)
        assert record["position"] == resume.position, query


async def test_a_tail_from_the_end_or_a_future_time_waits_for_the_next_message(
    served: Served, http: aiohttp.ClientSession
) -> None:
    stream = "tail-ahead"
    await _append(http, stream, "before")
    future = _iso(int(time.time() * 1000) + 3_600_000)
    for query in [{"from": "end"}, {"from_time": future}, {"from_sequence": "1"}]:
        tail = asyncio.ensure_future(_tail_one(http, stream, query))
        await asyncio.sleep(0.3)  # the tail has sought and waits (or the check below fails)
        assert not tail.done()
        receipt = await _append(http, stream, f"after {query}")
        record = await asyncio.wait_for(tail, 30)
        assert record["position"] == receipt["messages"][0]["position"]
        assert record["value"] == f"after {query}"
        stream = f"{stream}-x"  # a fresh stream, so that "the next message" is the only one
        await _append(http, stream, "before")


async def _tail_one(
    http: aiohttp.ClientSession, stream: str, query: dict[str, str]
) -> dict[str, Any]:
    async with http.get(
        f"/streams/{stream}/messages", params=query, headers={"Accept": EVENTS}
    ) as response:
        assert response.status == 200
        (record,) = await _records_of_events(response, 1)
        return record


async def _append(http: aiohttp.ClientSession, stream: str, value: str) -> dict[str, Any]:
    async with http.post(f"/streams/{stream}", json={"messages": [{"value": value}]}) as answer:
        assert answer.status == 200, await answer.text()
        body: dict[str, Any] = await answer.json()
        return body


async def test_a_long_poll_from_the_end_returns_the_next_commit(
    served: Served, http: aiohttp.ClientSession
) -> None:
    stream = "poll-end"
    await _append(http, stream, "old")
    poll = asyncio.ensure_future(
        http.get(f"/streams/{stream}/messages", params={"from": "end", "wait": "20"})
    )
    await asyncio.sleep(0.3)
    assert not poll.done()
    await _append(http, stream, "new")
    async with await asyncio.wait_for(poll, 30) as response:
        body = await response.json()
    assert [record["value"] for record in body["messages"]] == ["new"]


@pytest.mark.parametrize("kind", ["json", "ndjson", "binary"])
async def test_limit_zero_is_a_seek(served: Served, http: aiohttp.ClientSession, kind: str) -> None:
    accept = {"json": "application/json", "ndjson": NDJSON, "binary": BATCH}[kind]
    middle = served.messages[30]
    for query, expected in [
        ({"from_sequence": "30"}, middle.position),
        ({"from_time": str(middle.timestamp)}, _at_time(served, middle.timestamp)),
        ({"from": "end"}, served.length),
        ({"from": str(middle.position)}, middle.position),
        ({}, 0),
    ]:
        async with http.get(
            ROUTE, params={**query, "limit": "0"}, headers={"Accept": accept}
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
            assert response.headers["X-Position"] == str(expected)
            if kind == "json":
                assert json.loads(body) == {"stream": STREAM, "messages": [], "next": expected}
            else:
                assert (body, response.headers["X-Next"]) == (b"", str(expected))


async def test_an_empty_stream_seeks_to_zero(served: Served, http: aiohttp.ClientSession) -> None:
    for query in [{"from_sequence": "0"}, {"from_time": "0"}, {"from": "end"}]:
        async with http.get(f"/streams/{EMPTY}/messages", params={**query, "limit": "0"}) as r:
            assert (await r.json())["next"] == 0
    async with http.get(f"/streams/{EMPTY}/messages", params={"from_sequence": "1"}) as r:
        assert (r.status, (await r.json())["error"]) == (400, "invalid_position")


async def test_a_trimmed_stream_refuses_seeks_below_its_first_message(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """The error is the reader's (its HTTP status is the trim's, test_trim.py): passed on as is."""
    with Reader.open(FileStorage(served.root), TRIMMED) as reader:
        first = next(reader.read(0))  # position 0 reads from the first readable message
    assert first.sequence == 2
    route = f"/streams/{TRIMMED}/messages"
    async with http.get(route, params={"from_sequence": "1"}) as response:
        body = await response.json()
    assert (response.status // 100, body["error"]) == (4, "position_trimmed"), body
    assert str(first.position) in body["detail"]
    for query in [{"from_sequence": "2"}, {"from_time": "0"}]:  # a time before it: the first
        async with http.get(route, params={**query, "limit": "1"}) as response:
            records = (await response.json())["messages"]
        assert [record["position"] for record in records] == [first.position], query
    with Client(served.url) as client, pytest.raises(PositionTrimmed) as trimmed:
        client.seek(TRIMMED, sequence=0)
    assert trimmed.value.first_position == first.position
    result = CliRunner().invoke(
        main,
        ["read", "--storage", f"file:{served.root}", TRIMMED, "--sequence", "0"],
        env={"MESSAGEVAULT_CONFIG": str(served.root / "no-config.toml")},
    )
    assert result.exit_code == 1
    assert "trimmed" in result.stderr


def test_tail_of_a_trimmed_stream_shows_what_is_left(served: Served) -> None:
    """``tail -n 10`` of a stream with two readable messages shows those two, not an error."""
    command = ["tail", "--storage", f"file:{served.root}", TRIMMED, "-n", "10", "--format", "value"]
    with subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MESSAGEVAULT_CONFIG": str(served.root / "no-config.toml")},
    ) as tail:
        try:
            assert tail.stdout is not None
            printed = b""
            deadline = time.monotonic() + 30
            while printed.count(b"\n") < 2 and time.monotonic() < deadline:  # then it follows
                if select.select([tail.stdout], [], [], 0.5)[0]:
                    chunk = os.read(tail.stdout.fileno(), 4096)
                    if not chunk:
                        break  # it ended: an error
                    printed += chunk
            assert printed == b"c\nd\n", (printed, tail.poll())
        finally:
            tail.terminate()  # by its PID
            tail.wait(timeout=30)


def _bad_starts(served: Served) -> list[tuple[dict[str, str], str, str]]:
    count = len(served.messages)
    return [
        ({"from": "0", "from_sequence": "1"}, "invalid_input", "'from' and 'from_sequence'"),
        ({"from_sequence": "1", "from_time": "0"}, "invalid_input", "'from_time'"),
        ({"from": "end", "from_time": "0"}, "invalid_input", "'from' and 'from_time'"),
        ({"from": "1", "from_sequence": "1", "from_time": "1"}, "invalid_input", "one place"),
        ({"from_sequence": "x"}, "invalid_input", "'from_sequence' must be an integer"),
        ({"from_sequence": "1.5"}, "invalid_input", "'from_sequence' must be an integer"),
        ({"from_sequence": "-1"}, "invalid_input", "'from_sequence' must be within"),
        ({"from_sequence": str(count + 1)}, "invalid_position", f"no sequence {count + 1}"),
        ({"from_sequence": str(2**64)}, "invalid_input", "'from_sequence' must be within"),
        ({"from_time": "2026-12-01T14:00"}, "invalid_input", "add Z (UTC) or an offset"),
        ({"from_time": "2026-12-01"}, "invalid_input", "no time zone"),
        ({"from_time": "banana"}, "invalid_input", "ISO 8601 with a zone"),
        ({"from_time": ""}, "invalid_input", "'from_time'"),
        ({"from_time": "-1"}, "invalid_input", "from 0 to"),
        ({"from_time": str(10**16)}, "invalid_input", "the year 9999"),
        ({"from": "banana"}, "invalid_input", "or 'end'"),
        ({"from": "END"}, "invalid_input", "or 'end'"),
        ({"from": "-1"}, "invalid_input", "or 'end'"),
        ({"from": "3"}, "invalid_position", "not the position of a message"),
        ({"from": str(served.length + 1)}, "invalid_position", "beyond the end"),
        ({"from": "3", "limit": "0"}, "invalid_position", "not the position of a message"),
        ({"from_sequence": "1", "limit": "-1"}, "invalid_input", "'limit'"),
    ]


async def _state(http: aiohttp.ClientSession) -> tuple[Any, ...]:
    async with http.get(f"/streams/{STREAM}") as response:
        info = await response.json()
    return info["length"], info["messages"], info["last_write"]


@pytest.mark.parametrize("accept", ["application/json", NDJSON, BATCH, EVENTS])
async def test_bad_starts_are_400_naming_the_problem_and_change_nothing(
    served: Served, http: aiohttp.ClientSession, accept: str
) -> None:
    before = await _state(http)
    for query, code, words in _bad_starts(served):
        if accept == EVENTS and query.get("limit") == "0":
            continue  # refused for its limit alone (test_a_tail_needs_a_limit_of_one_or_more)
        async with http.get(ROUTE, params=query, headers={"Accept": accept}) as response:
            assert response.status == 400, (query, await response.text())
            body = await response.json()
        assert body["error"] == code, (query, body)
        assert words in body["detail"], (query, body)
        assert "\n" not in body["detail"]
    assert await _state(http) == before
    with Reader.open(FileStorage(served.root), STREAM) as reader:
        assert list(reader.read(0)) == served.messages


async def test_a_tail_needs_a_limit_of_one_or_more(http: aiohttp.ClientSession) -> None:
    async with http.get(ROUTE, params={"limit": "0"}, headers={"Accept": EVENTS}) as response:
        assert response.status == 400
        assert "limit=0" in (await response.json())["detail"]


async def test_a_missing_stream_is_404_whatever_the_start(http: aiohttp.ClientSession) -> None:
    for query in [{"from_sequence": "0"}, {"from_time": "0"}, {"from": "end"}]:
        async with http.get("/streams/no-such-stream/messages", params=query) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "stream_not_found"


async def test_the_openapi_document_describes_the_starts(http: aiohttp.ClientSession) -> None:
    async with http.get("/openapi.json") as response:
        document = await response.json()
    read = document["paths"]["/streams/{stream}/messages"]["get"]
    parameters = {parameter["name"]: parameter for parameter in read["parameters"]}
    assert {"from", "from_sequence", "from_time", "limit"} <= set(parameters)
    assert {"const": "end"} in parameters["from"]["schema"]["oneOf"]
    assert parameters["limit"]["schema"]["minimum"] == 0


# Client library -------------------------------------------------------------------------


def test_client_reads_and_seeks_by_sequence_and_time(served: Served) -> None:
    with Client(served.url) as client:
        for sequence in _sequences(served):
            expected = _at_sequence(served, sequence)
            assert client.seek(STREAM, sequence=sequence) == expected
            got = list(client.read(STREAM, from_sequence=sequence, limit=2))
            assert [m.position for m in got] == [m.position for m in served.messages[sequence:][:2]]
            records = list(client.read_records(STREAM, from_sequence=sequence, limit=2))
            assert [r["position"] for r in records] == [m.position for m in got]
        for milliseconds in _times(served):
            expected = _at_time(served, milliseconds)
            moment = datetime.fromtimestamp(milliseconds / 1000, UTC)
            assert client.seek(STREAM, time=moment) == expected
            assert client.seek(STREAM, time=milliseconds / 1000) == expected
            got = list(client.read(STREAM, from_time=moment, limit=1))
            assert [m.position for m in got] == ([expected] if expected < served.length else [])
        # A read by sequence goes on to the end, page after page, like a read by position.
        tail = list(client.read(STREAM, from_sequence=50))
        assert [m.sequence for m in tail] == [m.sequence for m in served.messages[50:]]


def test_client_follow_from_a_future_time_gets_the_next_message(served: Served) -> None:
    with Client(served.url) as client:
        client.publish("follow-ahead", [b"before"])
        stop = threading.Event()
        later = datetime.now(UTC) + timedelta(hours=1)
        seen: list[Message] = []

        def follow() -> None:
            for message in client.follow("follow-ahead", from_time=later, stop=stop):
                seen.append(message)
                stop.set()

        follower = threading.Thread(target=follow)
        follower.start()
        try:
            time.sleep(0.3)
            receipt = client.publish("follow-ahead", [b"after"])
            follower.join(timeout=30)
        finally:
            stop.set()
            follower.join(timeout=30)
        assert [(m.position, m.value) for m in seen] == [(receipt[0].position, b"after")]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda c: c.read(STREAM, 0, from_sequence=1), InvalidInput, "position and from_sequence"),
        (lambda c: c.read(STREAM, from_sequence=1, from_time=0), InvalidInput, "one place"),
        (lambda c: c.read(STREAM, from_sequence=-1), InvalidInput, "non-negative"),
        (lambda c: c.read(STREAM, from_sequence=True), InvalidInput, "non-negative"),
        (lambda c: c.read(STREAM, from_time=datetime(2026, 12, 1)), InvalidInput, "no time zone"),
        (lambda c: c.read(STREAM, from_time="2026-12-01T14:00Z"), InvalidInput, "from_time"),
        (lambda c: c.read(STREAM, from_sequence=10**6), InvalidPosition, "no sequence 1000000"),
        (lambda c: c.read_records(STREAM, from_sequence=10**6), InvalidPosition, "no sequence"),
        (lambda c: c.follow(STREAM, 5, from_time=0), InvalidInput, "position and from_time"),
        (lambda c: c.seek(STREAM), InvalidInput, "sequence= or time="),
        (lambda c: c.seek(STREAM, sequence=1, time=0), InvalidInput, "one place"),
        (lambda c: c.seek(STREAM, sequence=10**6), InvalidPosition, "no sequence 1000000"),
        (lambda c: c.seek(STREAM, time=float("nan")), InvalidInput, "Unix seconds"),
    ],
)
def test_client_bad_starts_raise_clearly(
    served: Served, call: Any, error: type, words: str
) -> None:
    with Client(served.url) as client, pytest.raises(error, match=words):
        call(client)


async def test_async_client_reads_follows_and_seeks(served: Served) -> None:
    async with AsyncClient(served.url) as client:
        for sequence in _sequences(served):
            assert await client.seek(STREAM, sequence=sequence) == _at_sequence(served, sequence)
            got = [m async for m in client.read(STREAM, from_sequence=sequence, limit=1)]
            assert [m.position for m in got] == [m.position for m in served.messages[sequence:][:1]]
        for milliseconds in _times(served):
            expected = _at_time(served, milliseconds)
            assert await client.seek(STREAM, time=milliseconds / 1000) == expected
            records = [
                r async for r in client.read_records(STREAM, from_time=milliseconds / 1000, limit=1)
            ]
            assert [r["position"] for r in records] == (
                [expected] if expected < served.length else []
            )
        await client.publish("follow-async", [b"before"])
        stop = asyncio.Event()

        async def first() -> Message:
            async for message in client.follow("follow-async", from_sequence=1, stop=stop):
                return message
            raise AssertionError("the follow ended")

        follower = asyncio.ensure_future(first())
        await asyncio.sleep(0.3)
        receipt = await client.publish("follow-async", [b"after"])
        message = await asyncio.wait_for(follower, 30)
        assert (message.position, message.value) == (receipt[0].position, b"after")
        with pytest.raises(InvalidInput, match="no time zone"):
            await client.seek(STREAM, time=datetime(2026, 12, 1))
        with pytest.raises(InvalidPosition, match="no sequence"):
            await client.seek(STREAM, sequence=10**6)
        with pytest.raises(InvalidInput, match="position and from_sequence"):
            [m async for m in client.read(STREAM, 0, from_sequence=1)]


def test_an_answer_without_its_start_is_refused() -> None:
    """A server older than seeking ignores from_sequence and reads from 0: never taken as asked."""
    with pytest.raises(InvalidInput, match="older than this client"):
        started_at(Answer(200, {"X-Next": "0", "X-Skip": "0"}, b""), Seek(sequence=7))
    assert started_at(Answer(200, {"X-Position": "96"}, b""), Seek(time_ms=5)) == 96
    assert started_at(Answer(200, {}, b""), 42) == 42


# CLI -----------------------------------------------------------------------------------


def _cli(served: Served, where: str, *args: str) -> tuple[int, str, str]:
    source = ["--url", served.url] if where == "server" else ["--storage", f"file:{served.root}"]
    result = CliRunner().invoke(
        main,
        ["read", *source, STREAM, "--format", "ndjson", *args],
        env={
            "MESSAGEVAULT_CONFIG": str(served.root / "no-config.toml"),
            "MESSAGEVAULT_URL": None,
            "MESSAGEVAULT_STORAGE": None,
            "MESSAGEVAULT_USER": None,
            "MESSAGEVAULT_PASSWORD": None,
            "MESSAGEVAULT_PROFILE": None,
        },
        prog_name="messagevault",
    )
    return result.exit_code, result.stdout, result.stderr


def _positions(out: str) -> list[int]:
    return [json.loads(line)["position"] for line in out.splitlines()]


@pytest.mark.parametrize("where", ["server", "storage"])
def test_cli_read_by_sequence_since_and_at(served: Served, where: str) -> None:
    for sequence in [0, 4, 53, len(served.messages) - 1, len(served.messages)]:
        code, out, err = _cli(served, where, "--sequence", str(sequence), "--limit", "2")
        assert code == 0, err
        assert _positions(out) == [m.position for m in served.messages[sequence:][:2]]
    for milliseconds in _times(served):
        code, out, err = _cli(served, where, "--at", _iso(milliseconds), "--limit", "1")
        assert code == 0, err
        expected = _at_time(served, milliseconds)
        assert _positions(out) == ([expected] if expected < served.length else [])
    code, out, err = _cli(served, where, "--since", "520w", "--limit", "1")  # ten years: all
    assert (code, _positions(out)) == (0, [0]), err
    code, out, err = _cli(served, where, "--since", "0s")  # from now: nothing yet
    assert (code, out) == (0, ""), err
    code, out, err = _cli(served, where, "--since", "1h", "--limit", "1")  # written just now
    assert (code, _positions(out)) == (0, [0]), err


@pytest.mark.parametrize("where", ["server", "storage"])
@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("--sequence", "1", "--since", "1m"), 2, "not --sequence and --since"),
        (("--from", "0", "--at", "2026-12-01T14:00Z"), 2, "not --from and --at"),
        (("--since", "1m", "--end"), 2, "not --since and --end"),
        (("--at", "2026-12-01T14:00"), 2, "no time zone: add Z (UTC) or an offset"),
        (("--at", "yesterday"), 2, "is not a time"),
        (("--since", "10"), 2, "is not a duration such as"),
        (("--since", "30m1h"), 2, "is not a duration such as"),
        (("--since", "-5m"), 2, "is not a duration such as"),
        (("--sequence", "-1"), 2, "'--sequence'"),
        (("--sequence", "100000"), 1, "no sequence 100000"),
    ],
)
def test_cli_bad_starts_are_one_line(
    served: Served, where: str, args: tuple[str, ...], code: int, words: str
) -> None:
    exit_code, out, err = _cli(served, where, *args)
    assert (exit_code, out) == (code, ""), err
    assert words in err
    assert "Traceback" not in err
    if code == 1:
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_durations_and_times_parse_as_documented() -> None:
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("2w3d4h5m6s") == timedelta(weeks=2, days=3, hours=4, minutes=5, seconds=6)
    assert parse_time("2026-12-01T14:00Z") == datetime(2026, 12, 1, 14, tzinfo=UTC)
    assert parse_time("1764597600000") == 1764597600.0
    later = parse_time("2026-12-01T14:00:00.250+01:00")
    assert isinstance(later, datetime)
    assert later == datetime(2026, 12, 1, 13, 0, 0, 250000, tzinfo=UTC)
    for bad in ["1h1h", "h", "1.5h", "1 h", "1y"]:
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
