"""The Durable Streams routes (/v1/stream/...) mapped onto MessageVault streams, on file storage.

The official conformance suite (tests/test_durable_streams_conformance.py)
checks the protocol; these check the mapping: offsets are positions, JSON
values are messages, closure is a message in the final append's batch, the
same stream reads through the native API and straight from storage, and
bad input changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, Reader
from messagevault.durable_meta import CLOSED_KEY, DurableMeta, meta_file, stream_name
from messagevault.format import FrameHeader
from messagevault.server import StreamHub, create_app
from messagevault.server.app import HUB
from messagevault.server.durable_streams import DURABLE
from tests.serve_process import serve_process

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
PATH = "/v1/stream/orders/eu"
STREAM = stream_name(PATH)


async def _client(aiohttp_client: MakeClient, root: Path) -> Client:
    return await aiohttp_client(create_app(StreamHub(FileStorage(root))))


def _log(root: Path) -> list[tuple[bytes, bytes]]:
    """The stream's messages as stored: (key, value), read from storage directly."""
    return [(m.key, m.value) for m in Reader.open(FileStorage(root), STREAM).read()]


def _frame_headers(root: Path) -> list[FrameHeader]:
    reader = Reader.open(FileStorage(root), STREAM)
    length = reader.checkpoint().length
    headers, position = [], 0
    while position < length:
        headers.append(reader.header_at(position))
        position += headers[-1].frame_size
    return headers


async def _read(client: Client, offset: str = "-1") -> tuple[int, bytes, dict[str, str]]:
    response = await client.get(PATH, params={"offset": offset})
    return response.status, await response.read(), dict(response.headers)


async def test_offsets_are_message_positions_readable_from_any_of_them(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    created = await client.put(PATH, data=b"one", headers={"Content-Type": "text/plain"})
    assert created.status == 201
    first = created.headers["Stream-Next-Offset"]
    offsets = [first]
    for value in (b"two", b"three"):
        appended = await client.post(PATH, data=value, headers={"Content-Type": "text/plain"})
        assert appended.status == 204
        offsets.append(appended.headers["Stream-Next-Offset"])
    assert all(len(o) == 16 and o.isdigit() for o in offsets)
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    # Each offset is the position after a message, as the native API numbers them.
    native = await client.get(f"/streams/{STREAM}/messages")
    records = (await native.json())["messages"]
    assert [int(o) for o in offsets] == [r["next_position"] for r in records]
    assert [(await _read(client, o))[:2] for o in offsets[:2]] == [
        (200, b"twothree"),
        (200, b"three"),
    ]
    status, body, headers = await _read(client)
    assert (status, body) == (200, b"onetwothree")
    assert headers["Stream-Next-Offset"] == offsets[-1]
    assert headers["Stream-Up-To-Date"] == "true"
    status, body, headers = await _read(client, offsets[-1])
    assert (status, body, headers["Stream-Up-To-Date"]) == (200, b"", "true")


@pytest.mark.parametrize(
    "offset",
    ["abc", "12", "0000000000000001", "00000000000000001", "9999999999999999", "-2", ""],
)
async def test_an_offset_that_is_no_message_position_is_refused(
    aiohttp_client: MakeClient, tmp_path: Path, offset: str
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"one", headers={"Content-Type": "text/plain"})
    response = await client.get(PATH, params={"offset": offset})
    assert response.status == 400
    assert "\n" not in (await response.text()).strip()
    assert _log(tmp_path) == [(b"", b"one")]


async def test_json_arrays_are_flattened_into_one_message_per_value(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    json_type = {"Content-Type": "application/json"}
    assert (await client.put(PATH, data=b"[1, 2]", headers=json_type)).status == 201
    assert (await client.post(PATH, data=b'[[3], {"a": 4}]', headers=json_type)).status == 204
    assert (await client.post(PATH, data=b'"five"', headers=json_type)).status == 204
    assert _log(tmp_path) == [
        (b"", b"1"),
        (b"", b"2"),
        (b"", b"[3]"),
        (b"", b'{"a":4}'),
        (b"", b'"five"'),
    ]
    status, body, headers = await _read(client)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == [1, 2, [3], {"a": 4}, "five"]
    # A batch is one commit: the two values of the second append share a frame.
    frames = {m.sequence: m for m in Reader.open(FileStorage(tmp_path), STREAM).read()}
    assert frames[2].timestamp == frames[3].timestamp


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"[]", 400), (b"{not json", 400), (b"NaN", 400), (b"\xff", 400)],
)
async def test_bad_json_appends_nothing(
    aiohttp_client: MakeClient, tmp_path: Path, body: bytes, status: int
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    json_type = {"Content-Type": "application/json"}
    await client.put(PATH, data=b"[1]", headers=json_type)
    response = await client.post(PATH, data=body, headers=json_type)
    assert response.status == status
    assert _log(tmp_path) == [(b"", b"1")]


async def test_an_empty_json_array_creates_an_empty_stream(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    response = await client.put(PATH, data=b"[]", headers={"Content-Type": "application/json"})
    assert response.status == 201
    assert (await _read(client))[:2] == (200, b"[]")
    assert _log(tmp_path) == []


async def test_closing_is_a_message_in_the_final_appends_batch_and_survives_a_restart(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"a", headers={"Content-Type": "text/plain"})
    closed = await client.post(
        PATH, data=b"last", headers={"Content-Type": "text/plain", "Stream-Closed": "true"}
    )
    assert closed.status == 204 and closed.headers["Stream-Closed"] == "true"
    final = closed.headers["Stream-Next-Offset"]
    # The final value and the closing message: one batch, so one commit.
    messages = list(Reader.open(FileStorage(tmp_path), STREAM).read())
    assert [(m.key, m.value) for m in messages] == [(b"", b"a"), (b"", b"last"), (CLOSED_KEY, b"")]
    assert messages[1].timestamp == messages[2].timestamp
    assert int(final) == messages[2].position  # the final offset is the closing message's
    refused = await client.post(PATH, data=b"more", headers={"Content-Type": "text/plain"})
    assert refused.status == 409 and refused.headers["Stream-Closed"] == "true"
    assert refused.headers["Stream-Next-Offset"] == final
    await client.close()

    # Restarted, and with the metadata not told of the closure (a crash
    # between the closing commit and the metadata's update): the log wins.
    storage = FileStorage(tmp_path)
    meta = DurableMeta.from_json(storage.read_system_file(meta_file(STREAM)) or b"")
    meta.closed, meta.closed_at = False, None
    storage.write_system_file(meta_file(STREAM), meta.to_json())
    client = await _client(aiohttp_client, tmp_path)
    head = await client.head(PATH)
    assert head.status == 200
    assert head.headers["Stream-Closed"] == "true"
    assert head.headers["Stream-Next-Offset"] == final
    status, body, headers = await _read(client)
    assert (status, body, headers["Stream-Closed"]) == (200, b"alast", "true")
    assert headers["Stream-Next-Offset"] == final
    refused = await client.post(PATH, data=b"more", headers={"Content-Type": "text/plain"})
    assert refused.status == 409
    assert _log(tmp_path)[-1] == (CLOSED_KEY, b"")
    assert len(_log(tmp_path)) == 3


async def test_the_stream_reads_through_the_native_api_and_from_storage(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    payload = bytes(range(256))
    await client.put(PATH, data=payload, headers={"Content-Type": "application/octet-stream"})
    native = await client.get(f"/streams/{STREAM}/messages")
    assert native.status == 200
    (record,) = (await native.json())["messages"]
    assert base64.b64decode(record["value"]) == payload or record["value"] == payload.decode(
        "latin-1"
    )
    assert _log(tmp_path) == [(b"", payload)]
    info = await client.get(f"/streams/{STREAM}")
    assert (await info.json())["messages"] == 1


async def test_an_expired_stream_is_gone_and_deleted_from_storage(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    created = await client.put(
        PATH, data=b"x", headers={"Content-Type": "text/plain", "Stream-Expires-At": soon}
    )
    assert created.status == 201
    assert (await client.head(PATH)).headers["Stream-Expires-At"] == soon
    async with asyncio.timeout(30):  # an upper bound: the expiry itself is a second away
        while (await client.get(PATH, params={"offset": "-1"})).status != 404:
            await asyncio.sleep(0.1)
    storage = FileStorage(tmp_path)
    assert storage.read_system_file(meta_file(STREAM)) is None
    assert STREAM not in storage.list_streams()
    # The path can be created afresh, empty.
    again = await client.put(PATH, headers={"Content-Type": "text/plain"})
    assert again.status == 201
    assert (await _read(client))[1] == b""


@pytest.mark.parametrize(
    "headers",
    [
        {"Stream-TTL": "60", "Stream-Expires-At": "2099-01-01T00:00:00Z"},
        {"Stream-TTL": "060"},
        {"Stream-TTL": "1.5"},
        {"Stream-TTL": "-1"},
        {"Stream-Expires-At": "tomorrow"},
    ],
)
async def test_bad_creation_headers_create_nothing(
    aiohttp_client: MakeClient, tmp_path: Path, headers: dict[str, str]
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    response = await client.put(PATH, data=b"x", headers={"Content-Type": "text/plain", **headers})
    assert response.status == 400
    assert (await client.head(PATH)).status == 404
    assert FileStorage(tmp_path).read_system_file(meta_file(STREAM)) is None


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/json"}, b"1", 409),  # not the stream's type
        ({}, b"x", 400),  # no Content-Type
        ({"Content-Type": "text/plain"}, b"", 400),  # no body, no close
        ({"Content-Type": "text/plain", "Producer-Id": "p"}, b"x", 400),
        (
            {"Content-Type": "text/plain", "Producer-Id": "p", "Producer-Epoch": "1e3"}
            | {"Producer-Seq": "0"},
            b"x",
            400,
        ),
        (
            {"Content-Type": "text/plain", "Producer-Id": "", "Producer-Epoch": "0"}
            | {"Producer-Seq": "0"},
            b"x",
            400,
        ),
        ({"Content-Type": "text/plain", "Stream-Seq": "a"}, b"x", 409),  # not above "b"
    ],
)
async def test_bad_appends_change_nothing(
    aiohttp_client: MakeClient,
    tmp_path: Path,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, headers={"Content-Type": "text/plain"})
    first = await client.post(
        PATH, data=b"kept", headers={"Content-Type": "text/plain", "Stream-Seq": "b"}
    )
    assert first.status == 204
    # Only the headers given: aiohttp would add a Content-Type of its own.
    response = await client.post(
        PATH, data=body, headers=headers, skip_auto_headers=["Content-Type"]
    )
    assert response.status == status, await response.text()
    assert _log(tmp_path) == [(b"", b"kept")]
    missing = await client.post("/v1/stream/nowhere", data=b"x", headers={"Content-Type": "a/b"})
    assert missing.status == 404


async def test_idempotent_producers_map_onto_messagevault_producer_batches(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, headers={"Content-Type": "text/plain"})

    async def send(value: bytes, epoch: int, seq: int) -> web.StreamResponse:
        return await client.post(  # type: ignore[no-any-return]
            PATH,
            data=value,
            headers={
                "Content-Type": "text/plain",
                "Producer-Id": "billing",
                "Producer-Epoch": str(epoch),
                "Producer-Seq": str(seq),
            },
        )

    assert (await send(b"a", 0, 0)).status == 200
    assert (await send(b"b", 0, 1)).status == 200
    duplicate = await send(b"b", 0, 1)
    assert (duplicate.status, duplicate.headers["Producer-Seq"]) == (204, "1")
    gap = await send(b"d", 0, 3)
    assert gap.status == 409
    assert (gap.headers["Producer-Expected-Seq"], gap.headers["Producer-Received-Seq"]) == (
        "2",
        "3",
    )
    assert (await send(b"c", 1, 0)).status == 200  # a new epoch
    stale = await send(b"z", 0, 2)
    assert (stale.status, stale.headers["Producer-Epoch"]) == (403, "1")
    assert _log(tmp_path) == [(b"", b"a"), (b"", b"b"), (b"", b"c")]
    headers = _frame_headers(tmp_path)
    producers = [header.producer for header in headers]
    assert producers[0] == producers[1] != producers[2]  # one MessageVault id per epoch
    assert [header.producer_seq for header in headers] == [0, 1, 0]


def _request(url: str, method: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"" if method == "PUT" else None, method=method)
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_anonymous_access_only_with_serve_allow_anonymous(tmp_path: Path) -> None:
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}
    plain = {"Content-Type": "text/plain"}
    with serve_process(tmp_path / "closed", "admin", "admin-password") as url:
        assert _request(f"{url}/v1/stream/a", "PUT", plain) == 401
    with serve_process(
        tmp_path / "open", "admin", "admin-password", arguments=["--allow-anonymous", "all:read"]
    ) as url:
        assert _request(f"{url}/v1/stream/a", "PUT", plain) == 403  # read only
        assert _request(f"{url}/v1/stream/a", "HEAD", {}) == 404  # allowed to look
        assert _request(f"{url}/v1/stream/a", "HEAD", wrong) == 401
    with serve_process(
        tmp_path / "write", "admin", "admin-password", arguments=["--allow-anonymous", "all:write"]
    ) as url:
        assert _request(f"{url}/v1/stream/a", "PUT", plain) == 201
        assert _request(f"{url}/v1/stream/a", "PUT", {**plain, **wrong}) == 401


# Forks ------------------------------------------------------------------------------------
# A fork is its own ds- stream holding a byte-for-byte copy of the source's
# frames below the fork offset (docs/DURABLE-STREAMS.md, "Forks").

FORK = "/v1/stream/orders/eu-fork"
FORK_STREAM = stream_name(FORK)
TEXT = {"Content-Type": "text/plain"}
JSON_TYPE = {"Content-Type": "application/json"}


def _messages(root: Path, stream: str) -> list[tuple[int, int, int, bytes, bytes, bytes]]:
    """Everything a message keeps: position, sequence, timestamp, id, key, value."""
    return [
        (m.position, m.sequence, m.timestamp, m.id, m.key, m.value)
        for m in Reader.open(FileStorage(root), stream).read()
    ]


def _fork_headers(offset: str | None = None, sub: str | None = None) -> dict[str, str]:
    headers = {"Stream-Forked-From": PATH}
    if offset is not None:
        headers["Stream-Fork-Offset"] = offset
    if sub is not None:
        headers["Stream-Fork-Sub-Offset"] = sub
    return headers


async def _put(client: Client, path: str, **kwargs: object) -> ClientResponse:
    # aiohttp would send Content-Type: application/octet-stream; a fork PUT may send none.
    return await client.put(path, skip_auto_headers=("Content-Type",), **kwargs)  # type: ignore[arg-type]


def _meta(root: Path, stream: str) -> DurableMeta | None:
    raw = FileStorage(root).read_system_file(meta_file(stream))
    return None if raw is None else DurableMeta.from_json(raw)


async def test_a_forks_inherited_messages_keep_the_sources_offsets_sequences_and_ids(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"[1, 2]", headers=JSON_TYPE)
    producer = {"Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "0", **JSON_TYPE}
    assert (await client.post(PATH, data=b"[3, 4, 5]", headers=producer)).status == 200
    middle = (await client.post(PATH, data=b"6", headers=JSON_TYPE)).headers["Stream-Next-Offset"]
    await client.post(PATH, data=b"[7, 8]", headers=JSON_TYPE)
    created = await _put(client, FORK, headers=_fork_headers(middle))
    assert created.status == 201
    assert created.headers["Stream-Next-Offset"] == middle
    source = _messages(tmp_path, STREAM)
    inherited = [m for m in source if m[0] < int(middle)]
    assert [m[5] for m in inherited] == [b"1", b"2", b"3", b"4", b"5", b"6"]
    assert _messages(tmp_path, FORK_STREAM) == inherited
    # The fork's own appends start at the fork offset; the source's later ones are not in it.
    appended = await client.post(FORK, data=b'"own"', headers=JSON_TYPE)
    assert [m[0] for m in _messages(tmp_path, FORK_STREAM)][-1] == int(middle)
    status, body, _ = await _read(client, middle)
    assert (status, json.loads(body)) == (200, [7, 8])
    fork_read = await client.get(FORK, params={"offset": middle})
    assert await fork_read.json() == ["own"]
    assert fork_read.headers["Stream-Next-Offset"] == appended.headers["Stream-Next-Offset"]
    # Producer state is not inherited: the same (id, epoch, seq) is a fresh batch on the fork.
    assert (await client.post(FORK, data=b"9", headers=producer)).status == 200
    assert (await client.post(FORK, data=b"9", headers=producer)).status == 204
    fork_values = [m[5] for m in _messages(tmp_path, FORK_STREAM)]
    assert fork_values == [b"1", b"2", b"3", b"4", b"5", b"6", b'"own"', b"9"]


async def test_a_fork_reads_through_the_native_api_and_from_storage(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"inherited", headers=TEXT)
    assert (await _put(client, FORK, headers=_fork_headers())).status == 201
    await client.post(FORK, data=b" own", headers=TEXT)
    await client.post(PATH, data=b" source only", headers=TEXT)
    native = await client.get(f"/streams/{FORK_STREAM}/messages")
    assert native.status == 200
    records = (await native.json())["messages"]
    assert [r["position"] for r in records] == [m[0] for m in _messages(tmp_path, FORK_STREAM)]
    assert [m[5] for m in _messages(tmp_path, FORK_STREAM)] == [b"inherited", b" own"]
    status_body = await client.get(FORK, params={"offset": "-1"})
    assert await status_body.read() == b"inherited own"


async def test_a_fork_offset_inside_an_append_keeps_the_positions_before_it(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"[1, 2, 3]", headers=JSON_TYPE)
    source = _messages(tmp_path, STREAM)
    inside = f"{source[2][0]:016d}"  # message 3's position: inside the append's frame
    assert (await _put(client, FORK, headers=_fork_headers(inside))).status == 201
    assert _messages(tmp_path, FORK_STREAM) == source[:2]
    # The cut frame is shorter, so the fork's own messages begin past the
    # fork offset; a reader holding the fork offset reads them from there.
    await client.post(FORK, data=b"4", headers=JSON_TYPE)
    from_offset = await client.get(FORK, params={"offset": inside})
    assert (from_offset.status, await from_offset.json()) == (200, [4])
    assert await (await client.get(FORK, params={"offset": "-1"})).json() == [1, 2, 4]


async def test_sub_offsets_take_the_first_messages_or_bytes_past_the_fork_offset(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    first = (await client.put(PATH, data=b"[1]", headers=JSON_TYPE)).headers["Stream-Next-Offset"]
    # A producer's batch: its frame has the longer v2 header, which the cut copy keeps.
    producer = {"Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "0", **JSON_TYPE}
    await client.post(PATH, data=b"[2, 3, 4]", headers=producer)
    created = await _put(client, FORK, headers=_fork_headers(first, "2"))
    assert created.status == 201
    source = _messages(tmp_path, STREAM)
    assert _messages(tmp_path, FORK_STREAM) == source[:3]  # 1, 2, 3: all at their positions
    assert int(created.headers["Stream-Next-Offset"]) > source[2][0]
    # A sub-offset names a message of the fork: reading from the fork offset gives it.
    from_anchor = await client.get(FORK, params={"offset": first})
    assert await from_anchor.json() == [2, 3]

    binary = "/v1/stream/bytes"
    await client.put(binary, data=b"hello", headers=TEXT)
    await client.post(binary, data=b"world", headers=TEXT)
    bytes_fork = "/v1/stream/bytes-fork"
    at_world = f"{_messages(tmp_path, stream_name(binary))[1][0]:016d}"
    forked = await _put(
        client,
        bytes_fork,
        headers={
            "Stream-Forked-From": binary,
            "Stream-Fork-Offset": at_world,
            "Stream-Fork-Sub-Offset": "3",
        },
    )
    assert forked.status == 201
    inherited = _messages(tmp_path, stream_name(bytes_fork))
    assert [m[5] for m in inherited] == [b"hello", b"wor"]
    assert [m[:4] for m in inherited] == [m[:4] for m in _messages(tmp_path, stream_name(binary))]


async def test_a_fork_of_a_closed_stream_leaves_the_closing_message_out(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"a", headers=TEXT)
    await client.post(PATH, data=b"b", headers={**TEXT, "Stream-Closed": "true"})
    created = await _put(client, FORK, headers=_fork_headers())
    assert created.status == 201 and "Stream-Closed" not in created.headers
    source = _messages(tmp_path, STREAM)
    assert source[-1][4] == CLOSED_KEY
    assert _messages(tmp_path, FORK_STREAM) == source[:2]
    assert (await client.post(FORK, data=b"c", headers=TEXT)).status == 204
    assert await (await client.get(FORK, params={"offset": "-1"})).read() == b"abc"
    await client.close()
    # A restarted server does not take the fork for closed either.
    client = await _client(aiohttp_client, tmp_path)
    head = await client.head(FORK)
    assert head.status == 200 and "Stream-Closed" not in head.headers


async def test_deleting_a_source_with_forks_soft_deletes_it_until_its_last_fork_goes(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    middle = "/v1/stream/orders/eu-fork-of-fork"
    await client.put(PATH, data=b"A", headers=TEXT)
    assert (await _put(client, FORK, headers=_fork_headers())).status == 201
    await client.post(FORK, data=b"B", headers=TEXT)
    assert (await _put(client, middle, headers={"Stream-Forked-From": FORK})).status == 201
    assert (await client.delete(PATH)).status == 204
    storage = FileStorage(tmp_path)
    # Its data goes at once (the forks hold copies); its tombstone stays.
    assert STREAM not in storage.list_streams()
    assert (_meta(tmp_path, STREAM) or DurableMeta("", "", 0)).soft_deleted
    for method in ("GET", "HEAD", "POST", "DELETE"):
        response = await client.request(method, PATH, data=b"x", headers=TEXT)
        assert response.status == 410, method
    assert (await client.put(PATH, headers=TEXT)).status == 409
    assert (await _put(client, "/v1/stream/x", headers=_fork_headers())).status == 409
    assert await (await client.get(middle, params={"offset": "-1"})).read() == b"AB"
    # The middle of the chain: soft-deleted too (its fork lives); the source still waits.
    assert (await client.delete(FORK)).status == 204
    assert (await client.head(FORK)).status == 410
    assert _meta(tmp_path, STREAM) is not None
    # The last fork goes: the whole chain's tombstones go with it.
    assert (await client.delete(middle)).status == 204
    for path in (PATH, FORK, middle):
        assert _meta(tmp_path, stream_name(path)) is None, path
        assert (await client.head(path)).status == 404
    assert not [s for s in storage.list_streams() if s.startswith("ds-")]
    assert (await client.put(PATH, headers=TEXT)).status == 201


async def test_a_source_whose_forks_are_deleted_lives_on(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"alive", headers=TEXT)
    await _put(client, FORK, headers=_fork_headers())
    assert (_meta(tmp_path, STREAM) or DurableMeta("", "", 0)).forks == [FORK]
    assert (await client.delete(FORK)).status == 204
    assert (_meta(tmp_path, STREAM) or DurableMeta("", "", 0)).forks == []
    assert (await client.delete(PATH)).status == 204
    assert _meta(tmp_path, STREAM) is None  # no fork left: a plain delete


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (_fork_headers("0000000000000000", "-1"), 400),
        (_fork_headers("0000000000000000", "05"), 400),
        (_fork_headers("0000000000000000", "1.5"), 400),
        (_fork_headers("0000000000000000", "6"), 400),  # past the 5 bytes of "hello"
        (_fork_headers(None, "1"), 400),  # at the tail: no data past it
        (_fork_headers("12"), 400),
        (_fork_headers("9999999999999999_9999999999999999"), 400),
        (_fork_headers("0000000000000099"), 400),  # beyond the tail
        (_fork_headers("0000000000000001"), 400),  # no message position
        ({"Stream-Fork-Offset": "0000000000000000"}, 400),  # no Stream-Forked-From
        ({"Stream-Fork-Sub-Offset": "0"}, 400),
        ({"Stream-Forked-From": "/v1/stream/nowhere"}, 404),
        ({**_fork_headers(), "Content-Type": "application/json"}, 409),
        ({**_fork_headers(), "Stream-TTL": "1", "Stream-Expires-At": "2099-01-01T00:00:00Z"}, 400),
    ],
)
async def test_bad_fork_headers_change_nothing(
    aiohttp_client: MakeClient, tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"hello", headers=TEXT)
    before = _meta(tmp_path, STREAM)
    response = await _put(client, FORK, headers=headers)
    assert response.status == status
    assert "\n" not in (await response.text()).strip()
    assert _meta(tmp_path, FORK_STREAM) is None
    assert FORK_STREAM not in FileStorage(tmp_path).list_streams()
    assert _meta(tmp_path, STREAM) == before
    assert _log(tmp_path) == [(b"", b"hello")]
    assert (await client.head(FORK)).status == 404


async def test_a_fork_gets_its_sources_expiry_unless_it_asks_for_its_own(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, data=b"x", headers={**TEXT, "Stream-TTL": "3600"})
    await _put(client, FORK, headers=_fork_headers())
    assert (await client.head(FORK)).headers["Stream-TTL"] == "3600"
    own = await _put(client, "/v1/stream/own", headers={**_fork_headers(), "Stream-TTL": "60"})
    assert own.status == 201
    assert (await client.head("/v1/stream/own")).headers["Stream-TTL"] == "60"
    # Idempotent: the same fork again is 200; another fork offset or sub-offset is 409.
    assert (await _put(client, FORK, headers=_fork_headers())).status == 200
    assert (await _put(client, FORK, headers=_fork_headers("0000000000000000"))).status == 409
    assert (await _put(client, FORK, headers=TEXT)).status == 409  # a plain stream is not this fork


async def test_a_producers_sequence_lost_with_a_deferred_save_is_taken_from_the_log(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    """Sequences within an epoch are saved in the metadata only now and then.

    A crash before that save: the next writer takes each producer's last
    sequence from the log (its producer table), so the producer's next batch
    is appended and its retries are duplicates, not gaps.
    """
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, headers={"Content-Type": "text/plain"})

    async def send(client: Client, value: bytes, seq: int) -> ClientResponse:
        return await client.post(
            PATH,
            data=value,
            headers={
                "Content-Type": "text/plain",
                "Producer-Id": "ledger",
                "Producer-Epoch": "0",
                "Producer-Seq": str(seq),
            },
        )

    for seq in range(5):
        assert (await send(client, f"v{seq}".encode(), seq)).status == 200
    saved = _meta(tmp_path, STREAM)
    assert saved is not None and saved.producers["ledger"].last_seq < 4  # deferred
    # The crash: the deferred save never happens, the writer goes away.
    durable = client.app[DURABLE]
    for _, task in durable._saving.values():
        task.cancel()
    durable._saving.clear()
    await client.app[HUB].close()
    restarted = await _client(aiohttp_client, tmp_path)
    assert (await send(restarted, b"v5", 5)).status == 200
    retried = await send(restarted, b"v3", 3)
    assert (retried.status, retried.headers["Producer-Seq"]) == (204, "5")
    gap = await send(restarted, b"v7", 7)
    assert (gap.status, gap.headers["Producer-Expected-Seq"]) == (409, "6")
    assert _log(tmp_path) == [(b"", f"v{seq}".encode()) for seq in range(6)]


async def test_a_deferred_save_lands_and_a_stopping_server_saves_at_once(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, headers={"Content-Type": "text/plain"})
    producer = {"Content-Type": "text/plain", "Producer-Id": "p", "Producer-Epoch": "0"}
    for seq in range(3):
        answer = await client.post(PATH, data=b"x", headers={**producer, "Producer-Seq": str(seq)})
        assert answer.status == 200
    deadline = asyncio.get_running_loop().time() + 10
    while (meta := _meta(tmp_path, STREAM)) is None or meta.producers["p"].last_seq != 2:
        assert asyncio.get_running_loop().time() < deadline, "the deferred save never landed"
        await asyncio.sleep(0.05)
    answer = await client.post(PATH, data=b"y", headers={**producer, "Producer-Seq": "3"})
    assert answer.status == 200
    await client.app[DURABLE].flush()  # what the server does as it stops
    meta = _meta(tmp_path, STREAM)
    assert meta is not None and meta.producers["p"].last_seq == 3


async def test_concurrent_producers_and_a_close_keep_every_rule(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    """Producers' appends run beside each other; a close waits for them and stops the rest.

    Every acknowledged batch is in the log once, before the closing message,
    each producer's in its order; every batch refused for the close is not.
    """
    client = await _client(aiohttp_client, tmp_path)
    await client.put(PATH, headers={"Content-Type": "text/plain"})
    acknowledged: dict[str, list[bytes]] = {}

    async def producer(name: str) -> None:
        acknowledged[name] = []
        for seq in range(15):
            value = f"{name}-{seq}".encode()
            answer = await client.post(
                PATH,
                data=value,
                headers={
                    "Content-Type": "text/plain",
                    "Producer-Id": name,
                    "Producer-Epoch": "0",
                    "Producer-Seq": str(seq),
                },
            )
            if answer.status == 409 and answer.headers.get("Stream-Closed") == "true":
                return
            assert answer.status == 200, (name, seq, answer.status)
            acknowledged[name].append(value)
            if sum(map(len, acknowledged.values())) >= 30:
                halfway.set()

    halfway = asyncio.Event()

    async def closer() -> None:
        await halfway.wait()  # appends are under way: close in their midst
        answer = await client.post(PATH, headers={"Stream-Closed": "true"})
        assert answer.status == 204

    await asyncio.gather(*(producer(f"p{i}") for i in range(8)), closer())
    log = _log(tmp_path)
    assert log[-1] == (CLOSED_KEY, b"")
    stored = [value for key, value in log[:-1]]
    assert all(key == b"" for key, _ in log[:-1])
    for name, values in acknowledged.items():
        mine = [value for value in stored if value.startswith(f"{name}-".encode())]
        assert mine == values, name  # each acknowledged once, in order, nothing else
    assert len(stored) == sum(len(values) for values in acknowledged.values())
    assert 30 <= len(stored) < 8 * 15  # the close came in the middle
