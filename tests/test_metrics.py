"""``/metrics`` as an operator reads it: names, labels and their bounds, buckets, waiting reads."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from messagevault import MemoryStorage
from messagevault.server import StreamHub, create_app
from messagevault.server.metrics import OTHER_STREAMS, Metrics, StreamLabels
from messagevault.server.served import Served
from tests.prometheus_text import sample, samples

Client = aiohttp.ClientSession
ROOT = Path(__file__).resolve().parent.parent
READ_ROUTE = "/streams/{stream}/messages"


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[Client]:
    """Serve ``app`` on a loopback port as ``messagevault serve`` does; a client session for it.

    Not aiohttp's test server: it cancels a handler whose client leaves,
    which ``serve`` does not, and which would hide how waiting reads end.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        await runner.cleanup()


def _port(client: Client) -> int:
    assert client._base_url is not None and client._base_url.port is not None
    return client._base_url.port


async def _metrics(client: Client) -> str:
    async with client.get("/metrics") as response:
        assert response.status == 200
        return await response.text()


async def _append(client: Client, stream: str, *values: str) -> int:
    body = {"messages": [{"value": v} for v in values]}
    async with client.post(f"/streams/{stream}", json=body) as response:
        assert response.status == 200, await response.text()
        position: int = (await response.json())["position"]
        return position


def _bounds(text: str, name: str) -> list[float]:
    return sorted(
        {float(labels["le"]) for n, labels, _ in samples(text) if n == f"{name}_bucket"}
        - {float("inf")}
    )


async def test_latency_buckets_resolve_a_millisecond() -> None:
    """Acks take ~1-2 ms: buckets starting at 5 ms put them all in the first one."""
    async with _serving(create_app(StreamHub(MemoryStorage()))) as client:
        await _append(client, "orders", "v")
        text = await _until_committed(client, 1)
    for histogram in ("messagevault_request_seconds", "messagevault_commit_seconds"):
        bounds = _bounds(text, histogram)
        assert bounds[0] <= 0.0001, histogram
        assert len([b for b in bounds if b < 0.005]) >= 5, histogram
        assert bounds[-1] >= 60, histogram


async def test_long_polls_and_tails_are_timed_apart_from_reads() -> None:
    hub = StreamHub(MemoryStorage())
    hub.recheck_interval = 0.05  # the tail ends soon after its reader leaves
    async with _serving(create_app(hub)) as client:
        end = await _append(client, "orders", "one")
        await _read(client, {})
        await _read(client, {"wait": "5"})  # finds messages at once: a plain read
        polls = [
            asyncio.ensure_future(_read(client, {"from": str(end), "wait": "30"}, accept))
            for accept in ("application/json", "application/x-messagevault-batch")
        ]
        await _until(lambda: hub.waiting_reads().get("orders") == 2, "the long polls to wait")
        await _append(client, "orders", "two")
        await asyncio.gather(*polls)
        async with client.get(
            "/streams/orders/messages", headers={"Accept": "text/event-stream"}
        ) as tail:
            assert (await tail.content.readuntil(b"\n\n")).startswith(b"id: ")
        async with client.get(
            "/streams/absent/messages", headers={"Accept": "text/event-stream"}
        ) as missing:
            assert missing.status == 404  # not held: a plain request
        text = await _until_text(
            client, lambda t: sample(t, "messagevault_held_read_seconds_count", kind="tail") == 1
        )
    assert sample(text, "messagevault_request_seconds_count", route=READ_ROUTE) == 3
    assert sample(text, "messagevault_held_read_seconds_count", kind="long_poll") == 2
    # Every one of them is still a request answered.
    requests = "messagevault_requests_total"
    assert sample(text, requests, route=READ_ROUTE, status="200", code="ok") == 5


async def _read(client: Client, params: dict[str, str], accept: str = "application/json") -> None:
    headers = {"Accept": accept}
    async with client.get("/streams/orders/messages", params=params, headers=headers) as response:
        assert response.status == 200, await response.text()
        await response.read()


async def test_a_read_whose_client_left_stops_counting_as_waiting() -> None:
    """A tail not only at its next keep-alive (15 s later), a long poll not only at its end."""
    hub = StreamHub(MemoryStorage())
    hub.recheck_interval = 0.05
    async with _serving(create_app(hub)) as client:
        end = await _append(client, "orders", "one")
        for what, query, accept in (
            ("a tail", f"from={end}", "text/event-stream"),
            ("a long poll", f"from={end}&wait=60", "application/json"),
        ):
            request = (
                f"GET /streams/orders/messages?{query} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAccept: {accept}\r\n\r\n"
            )
            with socket.create_connection(("127.0.0.1", _port(client)), timeout=30) as reader:
                reader.sendall(request.encode())
                await _until_text(client, lambda t: _waiting(t) == 1, f"{what} to wait")
            await _until_text(
                client,
                lambda t: _waiting(t) == 0,
                f"{what} whose client left to stop waiting",
                seconds=10,  # a tail's keep-alive would end it after 15
            )


def _waiting(text: str) -> float:
    return sample(text, "messagevault_waiting_reads", stream="orders")


def test_503s_are_told_apart_by_their_code_and_appends_from_infos() -> None:
    metrics = Metrics(StreamHub(MemoryStorage()))
    route = "/streams/{stream}"
    for code in ("overloaded", "storage_error", "overloaded"):
        metrics.observe(Served("POST", route, "orders", 503, code, 0.001))
    metrics.observe(Served("POST", route, "orders", 200, None, 0.001))
    metrics.observe(Served("GET", route, "orders", 200, None, 0.5))
    for method in ("BREW", "X" * 1000):  # any token is a method to aiohttp
        metrics.observe(Served(method, route, "orders", 405, "method_not_allowed", 0.001))
    text = generate_latest(metrics.registry).decode()
    requests = "messagevault_requests_total"
    appends = {"method": "POST", "route": route}
    assert sample(text, requests, **appends, status="503", code="overloaded") == 2
    assert sample(text, requests, **appends, status="503", code="storage_error") == 1
    assert sample(text, requests, **appends, status="200", code="ok") == 1
    # A slow stream info does not count as a slow append.
    assert sample(text, "messagevault_request_seconds_sum", **appends) < 0.1
    assert sample(text, "messagevault_request_seconds_count", method="GET", route=route) == 1
    assert {labels["method"] for name, labels, _ in samples(text) if name == requests} == {
        "POST",
        "GET",
        "other",
    }
    assert sample(text, requests, method="other") == 2


async def test_process_python_and_build_figures_in_every_app() -> None:
    """Each app has its own registry: two in one process must not collide."""
    for _ in range(2):
        async with _serving(create_app(StreamHub(MemoryStorage()))) as client:
            text = await _metrics(client)
        assert sample(text, "process_cpu_seconds_total") > 0
        assert sample(text, "process_resident_memory_bytes") > 0
        assert sample(text, "python_info") == 1
        assert "python_gc_collections_total{" in text
        build = [labels for name, labels, _ in samples(text) if name == "messagevault_build_info"]
        assert len(build) == 1
        assert build[0]["version"] == version("messagevault")
        assert re.fullmatch(r"3\.\d+\.\d+.*", build[0]["python"])


async def test_streams_beyond_the_bound_are_counted_together() -> None:
    async with _serving(create_app(StreamHub(MemoryStorage()), max_stream_series=2)) as client:
        for stream in ("alpha", "bravo", "charlie", "delta", "echo"):
            await _append(client, stream, "v", "w")
        text = await _until_committed(client, 10)
        async with client.get("/streams/echo") as response:
            length = (await response.json())["length"]
        polls = [
            asyncio.ensure_future(_read_from(client, stream, length))
            for stream in ("alpha", "delta", "echo")
        ]
        waiting = await _until_text(
            client,
            lambda t: sample(t, "messagevault_waiting_reads") == 3,
            "the long polls to wait",
        )
        for stream in ("alpha", "delta", "echo"):
            await _append(client, stream, "x")
        await asyncio.gather(*polls)
    assert {
        labels["stream"]: value
        for name, labels, value in samples(waiting)
        if name == "messagevault_waiting_reads"
    } == {"alpha": 1, OTHER_STREAMS: 2}
    for name in (
        "messagevault_committed_messages_total",
        "messagevault_committed_bytes_total",
        "messagevault_commit_seconds_count",
        "messagevault_commit_batches_count",
        "messagevault_commit_queue_bytes",
        "messagevault_stream_length_bytes",
    ):
        streams = {labels["stream"] for n, labels, _ in samples(text) if n == name}
        assert streams == {"alpha", "bravo", OTHER_STREAMS}, name
    committed = "messagevault_committed_messages_total"
    assert sample(text, committed, stream="alpha") == 2
    assert sample(text, committed, stream=OTHER_STREAMS) == 6
    assert sample(text, "messagevault_streams_open") == 5
    assert sample(text, "messagevault_stream_length_bytes", stream=OTHER_STREAMS) == 3 * length


async def _read_from(client: Client, stream: str, position: int) -> None:
    params = {"from": str(position), "wait": "30"}
    async with client.get(f"/streams/{stream}/messages", params=params) as response:
        assert response.status == 200, await response.text()
        await response.read()


def test_stream_labels_keep_the_first_streams_for_good() -> None:
    labels = StreamLabels(2)
    named = [labels(s) for s in ("one", "two", "three", "one", "two")]
    assert named == ["one", "two", OTHER_STREAMS, "one", "two"]
    assert StreamLabels(0)("one") == OTHER_STREAMS
    with pytest.raises(ValueError, match="0 or more, not -1"):
        StreamLabels(-1)


async def test_every_metric_follows_the_conventions_and_is_documented() -> None:
    """Counters end in _total, every family says what it is, OPERATIONS.md lists it."""
    async with _serving(create_app(StreamHub(MemoryStorage()))) as client:
        await _append(client, "orders", "v")
        text = await _until_committed(client, 1)
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    ours = [f for f in text_string_to_metric_families(text) if f.name.startswith("messagevault_")]
    assert len(ours) >= 12
    for family in ours:
        assert len(family.documentation) > 20, family.name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{family.name}_total"}
        shown = {"counter": "{}_total", "info": "{}_info"}.get(family.type, "{}")
        name = shown.format(family.name)
        assert f"`{name}" in operations, f"{name} is not in docs/OPERATIONS.md"
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", family.name), family.name
    assert "messagevault_appended_messages" not in text  # said what committed_messages says


async def _until_committed(client: Client, messages: int) -> str:
    """/metrics once the commit observers saw ``messages``: they run after the acknowledgements."""
    return await _until_text(
        client,
        lambda t: sample(t, "messagevault_committed_messages_total") == messages,
        f"{messages} messages committed",
    )


async def _until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited {seconds} s for {what}")


async def _until_text(
    client: Client,
    condition: Callable[[str], bool],
    what: str = "the metrics",
    seconds: float = 30,
) -> str:
    for _ in range(int(seconds / 0.02)):
        text = await _metrics(client)
        if condition(text):
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"waited {seconds} s for {what}")


async def test_requests_in_flight_count_work_in_progress_not_waiting_reads() -> None:
    hub = StreamHub(MemoryStorage())
    app = create_app(hub)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="done")

    app.router.add_get("/slow", slow)
    gauge = "messagevault_requests_in_flight"
    async with _serving(app) as client:
        end = await _append(client, "orders", "one")
        poll = asyncio.ensure_future(_read(client, {"from": str(end), "wait": "30"}))
        await _until(lambda: hub.waiting_reads().get("orders") == 1, "the long poll to wait")
        busy = asyncio.ensure_future(client.get("/slow"))
        await asyncio.wait_for(entered.wait(), 30)
        text = await _metrics(client)
        assert sample(text, gauge, route="/slow") == 1
        assert sample(text, gauge, route="/metrics") == 1  # the scrape itself
        assert sample(text, gauge, route=READ_ROUTE) == 0  # held: a waiting read
        assert sample(text, gauge, route="/streams/{stream}") == 0  # answered
        release.set()
        async with await busy as answer:
            assert answer.status == 200
        await _append(client, "orders", "two")
        await poll
        text = await _metrics(client)
    assert sample(text, gauge, route="/slow") == 0
    assert sample(text, gauge, route=READ_ROUTE) == 0
