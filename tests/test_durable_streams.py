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
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, Reader
from messagevault.durable_meta import CLOSED_KEY, DurableMeta, meta_file, stream_name
from messagevault.format import FrameHeader
from messagevault.server import StreamHub, create_app
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
