"""Trimming through the server (``POST /streams/{stream}/trim``), the client library and the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from messagevault import FileStorage, MemoryStorage, Reader, Writer
from messagevault.cli import main
from messagevault.client import Client
from messagevault.consumer import Consumer
from messagevault.errors import PositionTrimmed
from messagevault.positions import MemoryPositionStore
from messagevault.server import StreamHub, create_app
from messagevault.server.auth import Authenticator, Users, save_users
from tests.served import ServedApp

BATCH = "application/x-messagevault-batch"
HttpClient = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[HttpClient]]
STREAM = "orders"


def _seed(storage: MemoryStorage | FileStorage, batches: int = 10) -> list[Any]:
    """Batches of three messages: (frame position, [message positions], base sequence)."""
    with Writer.open(storage, STREAM) as writer:
        return [writer.append([(b"k", b"value %d" % n)] * 3) for n in range(batches)]


@pytest.fixture
def storage() -> MemoryStorage:  # type: ignore[override]
    return MemoryStorage()


@pytest.fixture
async def client(aiohttp_client: MakeClient, storage: MemoryStorage) -> HttpClient:
    return await aiohttp_client(create_app(StreamHub(storage)))


async def _trim(client: HttpClient, body: object, stream: str = STREAM) -> Any:
    return await client.post(f"/streams/{stream}/trim", json=body)


async def test_trim_by_position_sequence_and_time(
    client: HttpClient, storage: MemoryStorage
) -> None:
    results = _seed(storage)
    response = await _trim(client, {"before_position": results[2][1].position})
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "stream": STREAM,
        "first_position": results[2].frame_position,
        "first_sequence": 6,
        "released_bytes": results[2].frame_position,
        "trimmed": True,
    }
    response = await _trim(client, {"before_sequence": 13})  # batch 4 holds 12-14
    answer = await response.json()
    assert (answer["first_position"], answer["first_sequence"]) == (results[4].frame_position, 12)
    # Every batch shares one timestamp, in order: the first at or after batch 6's stays.
    when = datetime.fromtimestamp(results[6].timestamp / 1000, UTC).isoformat()
    answer = await (await _trim(client, {"before_time": when})).json()
    assert answer["first_position"] <= results[6].frame_position
    assert answer["first_sequence"] >= 12
    same = await (await _trim(client, {"before_time": results[6].timestamp})).json()
    assert same["first_position"] == answer["first_position"]
    assert same["trimmed"] is False  # never backwards: nothing more to do

    info = await (await client.get(f"/streams/{STREAM}")).json()
    assert info["first_position"] == answer["first_position"]
    assert info["first_sequence"] == answer["first_sequence"]
    first = Reader.open(storage, STREAM).header_at(answer["first_position"])
    assert datetime.fromisoformat(info["first_write"]).timestamp() * 1000 == first.timestamp
    assert info["messages"] == 30


async def test_reads_below_the_first_position_are_gone(
    client: HttpClient, storage: MemoryStorage
) -> None:
    results = _seed(storage)
    await _trim(client, {"before_position": results[3].frame_position})
    first = results[3].frame_position
    for below in (results[0][1].position, results[2].frame_position):
        for accept in ("application/json", BATCH):
            response = await client.get(
                f"/streams/{STREAM}/messages", params={"from": below}, headers={"Accept": accept}
            )
            assert response.status == 410, await response.text()
            body = await response.json()
            assert body["error"] == "position_trimmed"
            assert body["first_position"] == first
            assert f"position {first} (sequence 9)" in body["detail"]
    response = await client.get(f"/streams/{STREAM}/messages", params={"from_sequence": 2})
    assert response.status == 410
    assert (await response.json())["first_position"] == first
    page = await (await client.get(f"/streams/{STREAM}/messages")).json()  # from the start
    assert [m["sequence"] for m in page["messages"]][:2] == [9, 10]
    page = await (await client.get(f"/streams/{STREAM}/messages", params={"from": first})).json()
    assert page["messages"][0]["sequence"] == 9


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"before_position": 0, "before_sequence": 1},
        {"before_sequence": 1, "before_time": 0},
        {"before_position": -1},
        {"before_position": True},
        {"before_position": "100"},
        {"before_position": 1.5},
        {"before_sequence": None},
        {"before_time": "yesterday"},
        {"before_time": "2026-12-01T14:00"},  # no zone
        {"before_time": -5},
        {"before_time": [1]},
        {"after_position": 1},
        {"before_position": 1, "extra": True},
        [1],
        "before_position",
        {"before_sequence": 31},  # past the next sequence (30)
        {"before_position": 10**6},  # past the end
        {"before_position": 1},  # not a message position
    ],
)
async def test_bad_trims_change_nothing(
    client: HttpClient, storage: MemoryStorage, body: object
) -> None:
    _seed(storage)
    before = storage.open_stream(STREAM).read_checkpoint()
    response = await _trim(client, body)
    assert response.status == 400, await response.text()
    answer = await response.json()
    assert answer["error"] in {"invalid_input", "invalid_position"}
    assert "\n" not in answer["detail"]
    assert storage.open_stream(STREAM).read_checkpoint() == before


async def test_trim_refuses_other_bodies_and_unknown_streams(
    client: HttpClient, storage: MemoryStorage
) -> None:
    _seed(storage)
    before = storage.open_stream(STREAM).read_checkpoint()
    response = await client.post(f"/streams/{STREAM}/trim", data=b"{not json")
    assert response.status == 415
    response = await client.post(
        f"/streams/{STREAM}/trim", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    response = await _trim(client, {"before_position": 0}, stream="nowhere")
    assert response.status == 404
    assert "nowhere" not in storage.list_streams()  # not created by the attempt
    assert storage.open_stream(STREAM).read_checkpoint() == before


def _basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


async def test_only_an_admin_trims(aiohttp_client: MakeClient, storage: MemoryStorage) -> None:
    users = Users()
    for name, claims in {"root": ["admin"], "writer": ["orders:write"]}.items():
        users.set_password(name, f"{name}-secret")
        users.grant(name, claims)
    save_users(storage, users)
    results = _seed(storage)
    app = create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=0))
    client = await aiohttp_client(app)
    before = storage.open_stream(STREAM).read_checkpoint()
    target = {"before_position": results[5].frame_position}
    response = await client.post(
        f"/streams/{STREAM}/trim", json=target, headers=_basic("writer", "writer-secret")
    )
    assert response.status == 403
    response = await client.post(f"/streams/{STREAM}/trim", json=target)
    assert response.status == 401
    assert storage.open_stream(STREAM).read_checkpoint() == before
    response = await client.post(
        f"/streams/{STREAM}/trim", json=target, headers=_basic("root", "root-secret")
    )
    assert response.status == 200
    assert (await response.json())["first_sequence"] == 15


async def test_a_trim_waits_for_the_writer_of_a_stream_being_appended(
    client: HttpClient, storage: MemoryStorage
) -> None:
    for n in range(5):
        response = await client.post(
            f"/streams/{STREAM}", json={"messages": [{"value": f"v{n}"}] * 2}
        )
        assert response.status == 200
    info = await (await client.get(f"/streams/{STREAM}")).json()
    answer = await (await _trim(client, {"before_sequence": 6})).json()
    assert answer["first_sequence"] == 6
    response = await client.post(f"/streams/{STREAM}", json={"messages": [{"value": "after"}]})
    appended = await response.json()
    assert appended["messages"][0]["sequence"] == 10
    page = await (await client.get(f"/streams/{STREAM}/messages")).json()
    assert [m["sequence"] for m in page["messages"]] == [6, 7, 8, 9, 10]
    assert info["first_position"] == 0  # before the trim


def test_client_and_consumer_get_position_trimmed_with_the_first_position(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path)
    results = _seed(storage)
    with ServedApp(create_app(StreamHub(storage))) as served, Client(served.url) as client:
        trimmed = client.trim(STREAM, before_sequence=12)
        assert (trimmed.first_position, trimmed.first_sequence) == (results[4].frame_position, 12)
        assert client.trim(STREAM, before_position=0).trimmed is False
        with pytest.raises(PositionTrimmed) as info:
            list(client.read(STREAM, results[1].frame_position))
        assert info.value.first_position == results[4].frame_position
        assert info.value.status == 410
        assert next(m.sequence for m in client.read(STREAM)) == 12
        stream_info = client.info(STREAM)
        assert (stream_info.first_position, stream_info.first_sequence) == (
            trimmed.first_position,
            12,
        )

        positions = MemoryPositionStore()
        consumer = Consumer(client, STREAM, "billing", positions, start=results[1].frame_position)
        with pytest.raises(PositionTrimmed) as info:
            consumer.run(lambda message: None, follow=False)
        assert info.value.first_position == results[4].frame_position
        assert "billing" in str(info.value)


def _cli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path}",
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        **dict.fromkeys(["MESSAGEVAULT_URL", "MESSAGEVAULT_PROFILE", "MESSAGEVAULT_USER"]),
        "MESSAGEVAULT_PASSWORD": None,
        **env,
    }
    result = CliRunner().invoke(main, list(args), env=variables, prog_name="messagevault")
    return result.exit_code, result.stdout, result.stderr


def test_cli_trims_straight_on_storage_and_through_a_server(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    results = _seed(storage)
    code, out, err = _cli(tmp_path, "trim", STREAM, "--before-sequence", "4")
    assert code == 0, err
    assert json.loads(out) == {
        "stream": STREAM,
        "first_position": results[1].frame_position,
        "first_sequence": 3,
        "released_bytes": json.loads(out)["released_bytes"],
        "trimmed": True,
    }
    code, out, err = _cli(tmp_path, "info", STREAM)
    assert json.loads(out)["first_sequence"] == 3
    code, out, err = _cli(tmp_path, "read", STREAM, "--limit", "1")
    assert json.loads(out)["sequence"] == 3  # without --from: the first readable message
    code, out, err = _cli(tmp_path, "read", STREAM, "--from", str(results[0][1].position))
    assert code != 0
    assert "trimmed" in err and f"position {results[1].frame_position}" in err
    assert err.count("\n") == 1

    for bad in (
        [],
        ["--before-sequence", "1", "--older-than", "1d"],
        ["--before-time", "tomorrow"],
        ["--older-than", "7 parsecs"],
        ["--before-position", "-3"],
    ):
        code, out, err = _cli(tmp_path, "trim", STREAM, *bad)
        assert code == 2, (bad, out, err)
    code, out, err = _cli(tmp_path, "trim", "nowhere", "--before-position", "0")
    assert code == 1 and "nowhere" in err
    assert storage.open_stream(STREAM).read_checkpoint().first_position == results[1].frame_position

    code, out, err = _cli(tmp_path, "verify", STREAM)
    assert code == 0, err
    with ServedApp(create_app(StreamHub(storage))) as served:
        code, out, err = _cli(tmp_path, "verify", STREAM, "--url", served.url)
        assert code == 0, err
        assert "27 messages" in out + err
        code, out, err = _cli(tmp_path, "trim", STREAM, "--older-than", "0s", "--url", served.url)
        assert code == 0, err
        assert json.loads(out)["first_sequence"] == 30  # everything is older than now
        code, out, err = _cli(tmp_path, "read", STREAM, "--url", served.url)
        assert (code, out) == (0, "")


async def test_a_tail_from_the_start_of_a_trimmed_stream(
    client: HttpClient, storage: MemoryStorage
) -> None:
    results = _seed(storage)
    await _trim(client, {"before_position": results[8].frame_position})
    headers = {"Accept": "text/event-stream"}
    response = await client.get(f"/streams/{STREAM}/messages", headers=headers)
    assert response.status == 200
    event = await response.content.readuntil(b"\n\n")
    assert b'"sequence":24' in event  # batch 8's first message
    response.close()
    response = await client.get(
        f"/streams/{STREAM}/messages", params={"from": results[1].frame_position}, headers=headers
    )
    assert response.status == 410
    assert (await response.json())["first_position"] == results[8].frame_position

    # Everything trimmed: the tail waits at the first position (it did spin at 0, sending
    # keep-alives without end).
    await _trim(client, {"before_position": storage.open_stream(STREAM).read_checkpoint().length})
    response = await client.get(f"/streams/{STREAM}/messages", headers=headers)
    assert response.status == 200
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(response.content.read(1), 0.5)
    response.close()
