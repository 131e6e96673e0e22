"""The HTTP API, in process (aiohttp test client on a loopback port), on real storage."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, MemoryStorage, Reader, Writer, encode_batch
from messagevault.server import Limits, StreamHub, create_app
from messagevault.server.app import REQUEST_OBSERVERS, Served
from messagevault.server.hub import READ_CHUNK_SIZE
from messagevault.storage.base import Storage
from messagevault.storage.memory import MemoryStreamStore
from tests.prometheus_text import sample

BATCH = "application/x-messagevault-batch"
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: MakeClient, storage: Storage) -> Client:
    return await aiohttp_client(create_app(StreamHub(storage), Limits(max_body=64 * 1024)))


@pytest.fixture
async def file_client(aiohttp_client: MakeClient, tmp_path: Path) -> Client:
    return await aiohttp_client(create_app(StreamHub(FileStorage(tmp_path))))


async def _post_json(client: Client, stream: str, messages: list[dict[str, Any]]) -> Any:
    response = await client.post(f"/streams/{stream}", json={"messages": messages})
    assert response.status == 200, await response.text()
    return await response.json()


async def _state(client: Client, stream: str) -> tuple[int, int, str]:
    info = await (await client.get(f"/streams/{stream}")).json()
    return info["length"], info["messages"], info["last_write"]


async def _error(response: Any, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"] == code
    assert body["detail"]


async def test_append_json_and_binary_then_read(client: Client) -> None:
    first = await _post_json(
        client,
        "orders",
        [
            {"key": "OrderPlaced", "value": '{"id": 1}'},
            {"key": "Blob", "value": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"},
        ],
    )
    assert first["stream"] == "orders"
    assert [m["sequence"] for m in first["messages"]] == [0, 1]
    frame = encode_batch([(b"Binary", b"from the client library")]).frame()
    response = await client.post("/streams/orders", data=frame, headers={"Content-Type": BATCH})
    second = await response.json()
    assert second["messages"][0]["sequence"] == 2
    assert second["messages"][0]["position"] == first["position"]

    response = await client.get("/streams/orders/messages", params={"from": 0})
    body = await response.json()
    assert [m["key"] for m in body["messages"]] == ["OrderPlaced", "Blob", "Binary"]
    assert body["messages"][1] | {} == body["messages"][1]
    assert body["messages"][1]["encoding"] == "base64"
    assert base64.b64decode(body["messages"][1]["value"]) == b"\x00\xff"
    assert body["next"] == second["position"]
    ids = [m["id"] for m in first["messages"] + second["messages"]]
    assert [m["id"] for m in body["messages"]] == ids

    response = await client.get(
        "/streams/orders/messages",
        params={"from": first["messages"][1]["position"], "limit": 1},
        headers={"Accept": "application/x-ndjson"},
    )
    lines = (await response.text()).splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["Blob"]
    assert response.headers["X-Next"] == str(first["position"])


async def test_streams_and_info(client: Client) -> None:
    await _post_json(client, "orders", [{"key": "k", "value": "v"}])
    await _post_json(client, "billing", [{"key": "k", "value": "v"}, {"value": "w"}])
    streams = (await (await client.get("/streams")).json())["streams"]
    assert {(s["stream"], s["messages"]) for s in streams} == {("orders", 1), ("billing", 2)}
    info = await (await client.get("/streams/billing")).json()
    assert info["messages"] == 2
    assert info["first_write"] and info["last_write"]
    assert info["read_access"]["kind"] in {"file", "memory", "azure-sas"}
    await _error(await client.get("/streams/missing"), 404, "stream_not_found")


async def test_long_poll_waits_for_the_next_commit(client: Client) -> None:
    end = (await _post_json(client, "orders", [{"value": "one"}]))["position"]

    async def later() -> None:
        await asyncio.sleep(0.3)
        await _post_json(client, "orders", [{"value": "two"}])

    task = asyncio.create_task(later())
    response = await client.get("/streams/orders/messages", params={"from": end, "wait": 10})
    body = await response.json()
    await task
    assert [m["value"] for m in body["messages"]] == ["two"]


async def test_a_commit_wakes_a_long_poll(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    """Woken by this server's commit, not by the periodic re-read of the checkpoint."""
    hub = StreamHub(FileStorage(tmp_path))
    hub.recheck_interval = 600  # longer than the poll: only a notification can end it early
    client = await aiohttp_client(create_app(hub))
    end = (await _post_json(client, "orders", [{"value": "one"}]))["position"]
    poll = asyncio.create_task(
        client.get("/streams/orders/messages", params={"from": end, "wait": 60})
    )
    for _ in range(500):  # until the poll is waiting (bounded: 5 s)
        if hub._tailing.get("orders"):
            break
        await asyncio.sleep(0.01)
    assert hub._tailing.get("orders") == 1
    await _post_json(client, "orders", [{"value": "two"}])
    response = await asyncio.wait_for(poll, 30)
    assert [m["value"] for m in (await response.json())["messages"]] == ["two"]
    assert hub._tailing["orders"] == 0


async def test_shutting_down_ends_long_polls_and_tails(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    hub.recheck_interval = 600  # only stop_waiting can end the waits early
    client = await aiohttp_client(create_app(hub))
    end = (await _post_json(client, "orders", [{"value": "one"}]))["position"]
    poll = asyncio.create_task(
        client.get("/streams/orders/messages", params={"from": end, "wait": 60})
    )
    tail = await client.get(
        "/streams/orders/messages", params={"from": end}, headers={"Accept": "text/event-stream"}
    )
    for _ in range(500):  # until both wait (bounded: 5 s)
        if hub._tailing.get("orders") == 2:
            break
        await asyncio.sleep(0.01)
    assert hub._tailing.get("orders") == 2
    await hub.stop_waiting()
    answer = await asyncio.wait_for(poll, 30)
    assert (answer.status, (await answer.json())["messages"]) == (200, [])
    assert await asyncio.wait_for(tail.read(), 30) == b": keep-alive\n\n"  # then the end


async def test_long_poll_times_out_empty(client: Client) -> None:
    end = (await _post_json(client, "orders", [{"value": "one"}]))["position"]
    response = await client.get("/streams/orders/messages", params={"from": end, "wait": 1})
    body = await response.json()
    assert body["messages"] == []
    assert body["next"] == end


async def test_server_sent_events_follow_the_tail(file_client: Client) -> None:
    await _post_json(file_client, "orders", [{"value": "one"}])
    response = await file_client.get(
        "/streams/orders/messages", headers={"Accept": "text/event-stream"}
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    return

    await _post_json(file_client, "orders", [{"value": "two"}])
    await asyncio.wait_for(collect(), 20)
    response.close()
    assert [e["value"] for e in events] == ["one", "two"]


async def test_concurrent_posts_are_group_committed(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path, fsync="always"))
    client = await aiohttp_client(create_app(hub))
    answers = await asyncio.gather(
        *(_post_json(client, "orders", [{"key": f"p{n}", "value": f"v{n}"}]) for n in range(60))
    )
    committer = hub._committers["orders"]
    assert committer.stats.batches == 60
    assert committer.stats.commits < 60  # fewer storage commits than requests
    by_position = {m.position: m for m in Reader.open(FileStorage(tmp_path), "orders").read()}
    for n, answer in enumerate(answers):
        (receipt,) = answer["messages"]
        assert by_position[receipt["position"]].value == f"v{n}".encode()
        assert by_position[receipt["position"]].id.hex() == receipt["id"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"messages": []}', "application/json", 400, "invalid_batch"),
        (b"{not json", "application/json", 400, "invalid_batch"),
        (
            b'{"messages": [{"value": "%%%", "encoding": "base64"}]}',
            "application/json",
            400,
            "invalid_batch",
        ),
        (b'{"messages": [{"value": 5}]}', "application/json", 400, "invalid_batch"),
        (
            b'{"messages": [{"value": "x", "encoding": "rot13"}]}',
            "application/json",
            400,
            "invalid_batch",
        ),
        (
            b'{"messages": [{"key": "' + b"k" * 256 + b'", "value": "x"}]}',
            "application/json",
            400,
            "invalid_batch",
        ),
        (b"MVLB garbage", BATCH, 400, "corrupt_data"),
        (b"", BATCH, 400, "corrupt_data"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
    ],
)
async def test_bad_appends_change_nothing(
    client: Client, body: bytes, content_type: str, status: int, code: str
) -> None:
    await _post_json(client, "orders", [{"value": "kept"}])
    before = await _state(client, "orders")
    response = await client.post(
        "/streams/orders", data=body, headers={"Content-Type": content_type}
    )
    await _error(response, status, code)
    assert await _state(client, "orders") == before


async def test_corrupted_and_truncated_binary_batches(client: Client) -> None:
    await _post_json(client, "orders", [{"value": "kept"}])
    before = await _state(client, "orders")
    frame = encode_batch([(b"k", b"value one"), (b"k", b"value two")]).frame()
    flipped = bytearray(frame)
    flipped[-3] ^= 0x10
    for bad in (bytes(flipped), frame[:-5], frame + b"extra"):
        response = await client.post("/streams/orders", data=bad, headers={"Content-Type": BATCH})
        await _error(response, 400, "corrupt_data")
    assert await _state(client, "orders") == before


async def test_body_over_the_limit_is_413(client: Client) -> None:
    response = await client.post(
        "/streams/orders", data=bytes(65 * 1024), headers={"Content-Type": BATCH}
    )
    assert response.status == 413
    assert (await response.json())["error"]
    await _error(await client.get("/streams/orders"), 404, "stream_not_found")


@pytest.mark.parametrize("stream", ["ab", "Orders", "a--b", "x" * 61])
async def test_bad_stream_names(client: Client, stream: str) -> None:
    response = await client.post(f"/streams/{stream}", json={"messages": [{"value": "v"}]})
    await _error(response, 400, "invalid_stream_name")
    assert (await (await client.get("/streams")).json())["streams"] == []


async def test_bad_read_positions_and_parameters(client: Client) -> None:
    answer = await _post_json(client, "orders", [{"value": "a"}, {"value": "b"}])
    end = answer["position"]
    for params, code in [
        ({"from": 3}, "invalid_position"),
        ({"from": end + 1}, "invalid_position"),
        ({"from": "x"}, "invalid_input"),
        ({"limit": -1}, "invalid_input"),
        ({"wait": 3601}, "invalid_input"),
    ]:
        response = await client.get("/streams/orders/messages", params=params)
        await _error(response, 400, code)


async def test_health_ready_metrics_openapi(client: Client) -> None:
    assert (await client.get("/health")).status == 200
    assert (await (await client.get("/ready")).json())["status"] == "ready"
    await _post_json(client, "orders", [{"value": "v"}])
    await _post_json(client, "orders", [{"value": "w"}])
    await _error(await client.post("/streams/orders", json={"messages": []}), 400, "invalid_batch")
    metrics = await _metrics_once_committed(client, 2)
    route = "/streams/{stream}"
    requests = "messagevault_requests_total"
    assert sample(metrics, requests, route=route, status="200", code="ok") == 2
    assert sample(metrics, requests, route=route, status="400", code="invalid_batch") == 1
    assert sample(metrics, "messagevault_request_seconds_count", route=route) == 3
    assert sample(metrics, requests, route="/health", status="200", code="ok") == 1
    document = await (await client.get("/openapi.json")).json()
    assert set(document["paths"]) >= {
        "/streams",
        "/streams/{stream}",
        "/streams/{stream}/messages",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    }


async def test_binary_read_relays_stored_frames(client: Client) -> None:
    from messagevault.format import iter_messages, read_header

    first = await _post_json(client, "orders", [{"value": "a"}, {"value": "b"}])
    await _post_json(client, "orders", [{"value": "c"}])
    response = await client.get(
        "/streams/orders/messages",
        params={"from": first["messages"][1]["position"]},
        headers={"Accept": BATCH},
    )
    assert response.headers["Content-Type"] == BATCH
    data = await response.read()
    skip = int(response.headers["X-Skip"])
    values, offset = [], 0
    while offset < len(data):
        header = read_header(data, offset, None)
        values += [m.value for m in iter_messages(data, offset, header)]
        offset += header.frame_size
    assert skip == 1
    assert values[skip:] == [b"b", b"c"]
    end = int(response.headers["X-Next"])
    empty = await client.get(
        "/streams/orders/messages", params={"from": end, "wait": 1}, headers={"Accept": BATCH}
    )
    assert await empty.read() == b""
    assert empty.headers["X-Next"] == str(end)


async def test_binary_read_honours_limit_in_whole_frames(client: Client) -> None:
    from messagevault.format import read_header

    answers = [
        await _post_json(client, "orders", [{"value": f"{n}{m}"} for m in "ab"]) for n in range(4)
    ]
    second = answers[0]["messages"][1]["position"]

    async def frames(**params: int) -> tuple[int, int, int]:
        response = await client.get(
            "/streams/orders/messages", params=params, headers={"Accept": BATCH}
        )
        data = await response.read()
        count, offset = 0, 0
        while offset < len(data):
            header = read_header(data, offset, None)
            count += 1
            offset += header.frame_size
        return count, int(response.headers["X-Skip"]), int(response.headers["X-Next"])

    end = answers[-1]["position"]
    assert await frames() == (4, 0, end)  # no limit: the bulk path, every frame that fits
    assert await frames(limit=1) == (1, 0, answers[0]["position"])
    assert await frames(limit=3) == (2, 0, answers[1]["position"])
    # From inside the first frame: it holds one wanted message, so two need the next frame.
    assert await frames(**{"from": second, "limit": 1}) == (1, 1, answers[0]["position"])
    assert await frames(**{"from": second, "limit": 2}) == (2, 1, answers[1]["position"])


class CountingStorage(MemoryStorage):
    """Memory storage that counts opens, checkpoint reads and bytes read; optionally remote."""

    def __init__(self, *, remote: bool = False) -> None:
        super().__init__()
        self.remote = remote
        self.opens = self.checkpoint_reads = self.bytes_read = 0

    def open_stream(
        self, name: str, *, write: bool = False, create: bool = False, takeover: bool = False
    ) -> MemoryStreamStore:
        store = super().open_stream(name, write=write, create=create, takeover=takeover)
        if write:
            return store
        self.opens += 1
        inner_read, inner_checkpoint = store.read, store.read_checkpoint

        def read(offset: int, size: int) -> bytes:
            data = inner_read(offset, size)
            self.bytes_read += len(data)
            return data

        def read_checkpoint() -> Any:
            self.checkpoint_reads += 1
            return inner_checkpoint()

        store.read = read  # type: ignore[method-assign]
        store.read_checkpoint = read_checkpoint  # type: ignore[method-assign]
        store.remote = remote = self.remote  # type: ignore[attr-defined]
        del remote
        return store


async def test_reads_reuse_readers_and_trust_the_writers_checkpoint(
    aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("messagevault.server.hub.WRITER_TRUST", 3600.0)  # however slow the CI
    storage = CountingStorage()
    client = await aiohttp_client(create_app(StreamHub(storage)))
    await _post_json(client, "orders", [{"value": "v"}])
    for _ in range(20):
        for accept in ("application/json", BATCH):
            response = await client.get("/streams/orders/messages", headers={"Accept": accept})
            assert response.status == 200
    assert storage.opens == 1  # one reader, reused by all 40 reads
    assert storage.checkpoint_reads == 0  # this server writes the stream: it knows the length
    await _post_json(client, "orders", [{"value": "w"}])
    read = await (await client.get("/streams/orders/messages")).json()
    assert [m["value"] for m in read["messages"]] == ["v", "w"]


async def test_reads_of_a_stream_written_elsewhere_see_each_new_commit(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(StreamHub(FileStorage(tmp_path))))
    with Writer.open(FileStorage(tmp_path), "orders") as writer:  # another process, say
        for n in range(3):
            writer.append([(b"k", b"v%d" % n)])
            read = await (await client.get("/streams/orders/messages")).json()
            assert len(read["messages"]) == n + 1


async def test_a_short_read_of_remote_storage_fetches_little(aiohttp_client: MakeClient) -> None:
    """A page of a few messages must not download whole read-ahead chunks."""
    storage = CountingStorage(remote=True)
    with Writer.open(storage, "orders") as writer:
        for _ in range(40):
            writer.append([(b"k", bytes(100_000))] * 10)  # 40 MB
    client = await aiohttp_client(create_app(StreamHub(storage)))
    for accept in ("application/json", BATCH):
        before = storage.bytes_read
        response = await client.get(
            "/streams/orders/messages", params={"limit": 1}, headers={"Accept": accept}
        )
        assert response.status == 200
        assert storage.bytes_read - before <= 2 * READ_CHUNK_SIZE


async def test_a_deposed_writers_server_reads_what_storage_holds(
    aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its writer has not confirmed a commit lately, the server asks storage."""
    monkeypatch.setattr("messagevault.server.hub.WRITER_TRUST", 0.0)
    storage = MemoryStorage()
    client = await aiohttp_client(create_app(StreamHub(storage)))
    await _post_json(client, "orders", [{"value": "mine"}])
    with Writer.open(storage, "orders", takeover=True) as usurper:  # e.g. another node
        usurper.append([(b"k", b"theirs")])
    read = await (await client.get("/streams/orders/messages")).json()
    assert [m["value"] for m in read["messages"]] == ["mine", "theirs"]
    info = await (await client.get("/streams/orders")).json()
    assert info["messages"] == 2


def test_idle_readers_are_bounded_and_closed(tmp_path: Path) -> None:
    from messagevault.server.hub import _IdleReaders

    storage = FileStorage(tmp_path)
    for n in range(3):
        with Writer.open(storage, f"stream-{n}") as writer:
            writer.append([(b"k", b"v")])
    idle = _IdleReaders(limit=4)
    readers = [(f"stream-{n % 3}", Reader.open(storage, f"stream-{n % 3}")) for n in range(6)]
    for stream, reader in readers:
        idle.give(stream, reader)

    def is_open(reader: Reader) -> bool:
        try:
            reader.checkpoint()
        except ValueError:  # "stream handle ... is closed"
            return False
        return True

    # Over the limit, the least recently used stream loses its oldest reader:
    # stream-2 (last given before stream-0 and stream-1 came back), then stream-0.
    assert [is_open(r) for _, r in readers] == [False, True, False, True, True, True]
    taken = idle.take("stream-2")
    assert taken is readers[5][1]
    assert idle.take("stream-0") is readers[3][1]
    assert idle.take("stream-0") is None
    idle.close()
    assert not is_open(readers[1][1])
    assert not is_open(readers[4][1])
    idle.give("stream-2", taken)  # a read that finished after the hub closed
    assert not is_open(taken)


async def test_appends_waiting_for_room_keep_their_turn(aiohttp_client: MakeClient) -> None:
    """Room that appears is taken by the append that waited, not by one arriving later."""
    storage = GatedStorage(hold=30)
    hub = StreamHub(storage, max_queued_bytes=1)
    client = await aiohttp_client(create_app(hub))
    first, queued = await _fill_queue(client, hub, storage)
    committer = hub._committers["orders"]
    queued_size = committer.queued_bytes
    waited = asyncio.ensure_future(_post_json(client, "orders", [{"value": "waited"}]))
    for _ in range(500):
        if hub._awaiting_room == 1:
            break
        await asyncio.sleep(0.01)
    assert hub._awaiting_room == 1
    committer.max_queued_bytes = 10**9  # room now, before any commit wakes the waiter
    late = asyncio.ensure_future(_post_json(client, "orders", [{"value": "late"}]))
    for _ in range(500):  # until "late" has reached the hub: waiting, or (wrongly) queued
        if hub._awaiting_room == 2 or committer.queued_bytes > queued_size:
            break
        await asyncio.sleep(0.01)
    storage.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, queued, waited, late), 30)
    sequences = [a["messages"][0]["sequence"] for a in answers]
    assert sequences == [0, 1, 2, 3]


def test_minimal_answer_text_is_the_json_of_its_first_and_last_receipts() -> None:
    from messagevault import AppendResult
    from messagevault.wire import appended_minimal, iso_time

    for result in (
        AppendResult(0, 100, 0, 3, 1_700_000_000_123, 100),
        AppendResult(2**49 - 100, 400, 2**32 - 3, 7, 1_800_000_000_001, 2**49 + 300),
        AppendResult(77, 68, 5, 1, 0, 145),
    ):
        first, last = result[0], result[-1]
        assert json.loads(appended_minimal("orders-2024", result)) == {
            "stream": "orders-2024",
            "position": result.committed_length,
            "count": result.message_count,
            "timestamp": iso_time(result.timestamp),
            "first": {"position": first.position, "sequence": first.sequence, "id": first.id.hex()},
            "last": {"position": last.position, "sequence": last.sequence, "id": last.id.hex()},
        }


def test_append_answer_text_equals_the_plain_json_of_its_receipts() -> None:
    from messagevault import AppendResult
    from messagevault.server.app import appended_json

    for result in (
        AppendResult(0, 100, 0, 3, 1_700_000_000_123, 100),
        AppendResult(2**40 + 5, 4000, 2**33, 500, 2**47 + 9, 2**40 + 4005),
        AppendResult(2**49 - 100, 400, 2**32 - 3, 7, 2**49 + 1, 2**49 + 300),  # masked id fields
        AppendResult(77, 68, 5, 1, 0, 145),
    ):
        expected = {
            "stream": "orders",
            "position": result.committed_length,
            "messages": [
                {"position": r.position, "sequence": r.sequence, "id": r.id.hex()} for r in result
            ],
        }
        assert json.loads(appended_json("orders", result)) == expected


def _expand(minimal: dict[str, Any]) -> list[dict[str, Any]]:
    """Every receipt of a batch from its minimal answer, by the rule docs/HTTP.md gives."""
    first = minimal["first"]
    stamp = first["id"][:12]
    receipts = []
    for i in range(minimal["count"]):
        position = first["position"] + (64 + 4 * i if i else 0)
        sequence = first["sequence"] + i
        ident = f"{stamp}{position & (2**48 - 1):012x}{sequence & (2**32 - 1):08x}"
        receipts.append({"position": position, "sequence": sequence, "id": ident})
    return receipts


@pytest.mark.parametrize(
    "prefer", ["return=minimal", "respond-async, RETURN=minimal", "wait=5,return=minimal"]
)
async def test_prefer_minimal_answers_with_first_and_last_receipts(
    client: Client, prefer: str
) -> None:
    await _post_json(client, "orders", [{"value": "before"}])
    frame = encode_batch([(b"k%d" % i, b"v" * i) for i in range(25)]).frame()
    response = await client.post(
        "/streams/orders", data=frame, headers={"Content-Type": BATCH, "Prefer": prefer}
    )
    assert response.status == 200, await response.text()
    assert response.headers["Preference-Applied"] == "return=minimal"
    minimal = await response.json()
    assert minimal["count"] == 25
    assert minimal["stream"] == "orders"
    receipts = _expand(minimal)
    assert receipts[0] == minimal["first"]
    assert receipts[-1] == minimal["last"]
    read = await (await client.get("/streams/orders/messages", params={"from": 0})).json()
    assert [
        {k: m[k] for k in ("position", "sequence", "id")} for m in read["messages"][1:]
    ] == receipts
    assert read["messages"][-1]["timestamp"] == minimal["timestamp"]
    assert minimal["position"] == read["next"]


@pytest.mark.parametrize("prefer", [None, "return=representation", "return=minimalist", "bogus"])
async def test_without_prefer_minimal_every_receipt_comes(
    client: Client, prefer: str | None
) -> None:
    headers = {"Prefer": prefer} if prefer else {}
    response = await client.post(
        "/streams/orders", json={"messages": [{"value": "a"}, {"value": "b"}]}, headers=headers
    )
    assert response.status == 200
    assert "Preference-Applied" not in response.headers
    assert len((await response.json())["messages"]) == 2


async def _fill_queue(
    client: Client, hub: StreamHub, storage: GatedStorage
) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
    """Stall the first commit in its write, then queue one more append: no room left.

    Returns the two appends, which finish once ``storage.gate`` opens.
    """
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(_post_json(client, "orders", [{"value": "first"}]))
    assert await loop.run_in_executor(None, storage.writes_waiting.acquire, True, 30)
    queued = asyncio.ensure_future(_post_json(client, "orders", [{"value": "queued"}]))
    for _ in range(500):  # bounded: 5 s
        committer = hub._committers.get("orders")
        if committer is not None and not committer.has_room:
            return first, queued
        await asyncio.sleep(0.01)
    raise AssertionError("the commit queue never filled")


class GatedStorage(MemoryStorage):
    """Memory storage whose writes wait for ``gate`` (``hold`` seconds at most): a stalled store."""

    def __init__(self, hold: float) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.hold = hold
        self.writes_waiting = threading.Semaphore(0)
        self.writes_done = 0

    def open_stream(
        self, name: str, *, write: bool = False, create: bool = False, takeover: bool = False
    ) -> MemoryStreamStore:
        store = super().open_stream(name, write=write, create=create, takeover=takeover)
        inner_write = store.write

        def gated_write(offset: int, data: bytes | memoryview) -> None:
            self.writes_waiting.release()
            self.gate.wait(self.hold)
            inner_write(offset, data)
            self.writes_done += 1

        store.write = gated_write  # type: ignore[method-assign]
        return store


async def test_back_pressure_waits_off_the_event_loop(aiohttp_client: MakeClient) -> None:
    """A full commit queue makes appends wait, but the server keeps answering everything else.

    The waiting appends hold no thread either: with a single I/O thread, a
    read (which needs it) is still answered while they wait.
    """
    storage = GatedStorage(hold=10)
    hub = StreamHub(storage, max_queued_bytes=1, io_threads=1)
    client = await aiohttp_client(create_app(hub))
    first, queued = await _fill_queue(client, hub, storage)
    # The first commit is stuck in its write and the queue is full: these find no room.
    waiting = [
        asyncio.ensure_future(_post_json(client, "orders", [{"value": f"waiting {n}"}]))
        for n in range(3)
    ]
    for _ in range(500):  # until all three wait (bounded: 5 s)
        if hub._awaiting_room == 3:
            break
        await asyncio.sleep(0.01)
    health = await asyncio.wait_for(client.get("/health"), 15)
    assert health.status == 200
    assert hub._awaiting_room == 3
    read = await asyncio.wait_for(client.get("/streams/orders/messages"), 15)
    assert (await read.json())["messages"] == []  # nothing committed yet
    assert storage.writes_done == 0, "the server answered only once the storage moved"
    assert not any(task.done() for task in (first, queued, *waiting))
    storage.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, queued, *waiting), 30)
    assert [a["messages"][0]["sequence"] for a in answers[:2]] == [0, 1]
    read = await (await client.get("/streams/orders/messages")).json()
    assert sorted(m["value"] for m in read["messages"]) == sorted(
        ["first", "queued", "waiting 0", "waiting 1", "waiting 2"]
    )


async def _metrics_once_committed(client: Client, messages: int) -> str:
    """/metrics once commit observers saw ``messages`` (they run after the acknowledgements)."""
    for _ in range(500):  # bounded: 5 s
        text = await (await client.get("/metrics")).text()
        if sample(text, "messagevault_committed_messages_total") == messages:
            return text
        await asyncio.sleep(0.01)
    raise AssertionError(f"the metrics never counted {messages} messages committed")


async def test_metrics_show_group_commit_per_stream(client: Client) -> None:
    await asyncio.gather(
        *(_post_json(client, "orders", [{"value": "v" * n}] * 3) for n in range(1, 21))
    )
    await _post_json(client, "billing", [{"value": "x"}])
    text = await _metrics_once_committed(client, 61)
    info = await (await client.get("/streams/orders")).json()

    def orders(name: str) -> float:
        return sample(text, f"messagevault_{name}", stream="orders")

    assert orders("commit_batches_sum") == 20
    assert orders("committed_messages_total") == 60
    assert orders("committed_bytes_total") == info["length"]
    assert orders("stream_length_bytes") == info["length"]
    assert 1 <= orders("commit_seconds_count") == orders("commit_batches_count") <= 20
    assert orders("commit_seconds_sum") > 0
    assert orders("commit_queue_bytes") == 0
    assert sample(text, "messagevault_committed_messages_total", stream="billing") == 1
    assert sample(text, "messagevault_streams_open") == 2


async def test_an_append_that_waits_too_long_for_room_is_refused_with_503(
    aiohttp_client: MakeClient,
) -> None:
    storage = GatedStorage(hold=30)
    hub = StreamHub(storage, max_queued_bytes=1, max_queue_wait=0.3)
    client = await aiohttp_client(create_app(hub))
    first, queued = await _fill_queue(client, hub, storage)
    refused = await client.post("/streams/orders", json={"messages": [{"value": "refused"}]})
    await _error(refused, 503, "overloaded")
    assert refused.headers["Retry-After"] == "1"
    metrics = await (await client.get("/metrics")).text()
    counted = sample(metrics, "messagevault_requests_total", status="503", code="overloaded")
    assert counted == 1  # told apart from storage_error, the other 503 of an append
    storage.gate.set()
    await asyncio.wait_for(asyncio.gather(first, queued), 30)
    read = await (await client.get("/streams/orders/messages")).json()
    assert [m["value"] for m in read["messages"]] == ["first", "queued"]


async def test_request_observers_hear_every_answer_with_its_error_code(
    aiohttp_client: MakeClient, storage: Storage
) -> None:
    app = create_app(StreamHub(storage))
    heard: list[Served] = []
    app[REQUEST_OBSERVERS].append(heard.append)
    client = await aiohttp_client(app)
    await client.post("/streams/orders", json={"messages": [{"key": "k", "value": "v"}]})
    await client.post("/streams/orders", data=b"x", headers={"Content-Type": "text/plain"})
    await client.get("/streams/missing")
    await client.get("/streams/orders/messages", params={"from": "3"})
    assert [(s.method, s.route, s.stream, s.status, s.error) for s in heard] == [
        ("POST", "/streams/{stream}", "orders", 200, None),
        ("POST", "/streams/{stream}", "orders", 415, "unsupported_media_type"),
        ("GET", "/streams/{stream}", "missing", 404, "stream_not_found"),
        ("GET", "/streams/{stream}/messages", "orders", 400, "invalid_position"),
    ]
    assert all(s.seconds >= 0 for s in heard)


async def test_a_failing_request_observer_changes_no_answer(
    aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(StreamHub(MemoryStorage()))
    heard: list[Served] = []

    def broken(served: Served) -> None:
        raise RuntimeError("observer bug")

    app[REQUEST_OBSERVERS][:0] = [broken]  # before the metrics
    app[REQUEST_OBSERVERS].append(heard.append)
    client = await aiohttp_client(app)
    answer = await client.post("/streams/orders", json={"messages": [{"value": "v"}]})
    assert answer.status == 200
    assert answer.headers["X-Request-Id"] == heard[0].request_id
    assert [(s.status, s.messages, s.kind) for s in heard] == [(200, 1, "")]
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "messagevault_requests_total", route="/streams/{stream}") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["request observer failed"] * 2  # the append, and the scrape
