"""The official Durable Streams TypeScript client and the MessageVault Python client, on one stream.

The TypeScript client (npm ``@durable-streams/client``, pinned in
package.json) runs under Node in tests/durable_streams/interop.mjs, against a
real ``messagevault serve`` with real Basic credentials (the client's
``headers`` option), never ``--allow-anonymous``. What it writes over the
protocol is read natively (``Client.read`` of the ``ds-`` stream
docs/DURABLE-STREAMS.md names) and straight from storage (``Reader``); what
the Python client publishes natively, the TypeScript client reads back over
the protocol, catching up and live (long-poll and SSE). Exactly once holds
across both: a producer's batch sent twice is stored once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from messagevault import Reader
from messagevault.client import Client
from messagevault.durable_meta import format_offset, producer_id_bytes, stream_name
from messagevault.format import encode_batch
from messagevault.storage import open_storage
from tests.prometheus_text import sample
from tests.serve_process import serve_process

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "tests" / "durable_streams" / "interop.mjs"
CLIENT_PACKAGE = ROOT / "node_modules" / "@durable-streams" / "client" / "package.json"
USER, PASSWORD = "interop", "interop-password"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
JSON_TYPE = "application/json"
# Upper bounds for "it happens at all": a Node start and a few requests take well under a second.
NODE_TIMEOUT = 60.0
EVENT_TIMEOUT = 30.0

ORDERS = [
    {"order": 1, "items": ["apple", "pear"], "total": 30.5},
    'héllo wörld ✓ 🚀 日本語 \u2028 "quoted" \\ back',
    [1, [2, 3], {"a": None}],
    None,
    True,
    -12.25,
    {"nested": {"deeper": [{}, []]}, "": "empty key"},
    {"note": "large", "text": "Ünïcödé " * 40_000},  # ~360 KB of JSON in one value
]


def _compact(value: Any) -> bytes:
    """A JSON value as docs/DURABLE-STREAMS.md says it is stored: compact, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class TsError(Exception):
    """The TypeScript client failed: its error's name, message and HTTP status."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__(f"{event['name']}: {event['message']}")
        self.name = str(event["name"])
        self.status: int | None = event.get("status")


def _node() -> str:
    node = shutil.which("node")
    if node is None or not CLIENT_PACKAGE.exists():
        raise RuntimeError("node or @durable-streams/client is missing: run `npm ci`")
    return node


def _events(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().split("\n") if line.strip()]


def ts(command: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one interop.mjs command; its events, the last being ``done`` (else ``TsError``)."""
    process = subprocess.run(
        [_node(), str(SCRIPT), command],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=NODE_TIMEOUT,
        check=False,
        cwd=ROOT,
    )
    events = _events(process.stdout)
    if events and events[-1]["event"] == "error":
        raise TsError(events[-1])
    assert process.returncode == 0 and events and events[-1]["event"] == "done", (
        process.returncode,
        events,
        process.stderr.decode()[-2000:],
    )
    return events


def items_of(events: list[dict[str, Any]]) -> list[Any]:
    return [item for event in events if event["event"] == "batch" for item in event["items"]]


@dataclass(frozen=True)
class Served:
    url: str
    storage: str  # the storage URL the server runs on

    def stream_url(self, path: str) -> str:
        return f"{self.url}{path}"

    def await_waiting_read(self, stream: str) -> None:
        """Return once a read of ``stream`` waits for a commit on the server (its metrics)."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=EVENT_TIMEOUT) as answer:
                text = answer.read().decode()
            if sample(text, "messagevault_waiting_reads", stream=stream) >= 1:
                return
            assert time.monotonic() < deadline, f"no read of {stream} waited for a commit"
            time.sleep(0.02)

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> int:
        headers = {"Authorization": AUTHORIZATION}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(
            self.url + path,
            data=body or None,
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=EVENT_TIMEOUT) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code


@contextlib.contextmanager
def served(tmp_path: Path, storage: str | None = None) -> Iterator[Served]:
    """A server with one user (admin claims) the TypeScript client authenticates as."""
    with serve_process(tmp_path / "data", USER, PASSWORD, storage=storage) as url:
        yield Served(url, storage or f"file:{tmp_path / 'data'}")


def python_client(server: Served) -> Client:
    return Client(server.url, user=USER, password=PASSWORD)


def stored(server: Served, stream: str) -> list[tuple[bytes, bytes]]:
    """The stream's messages straight from storage, without the server: (key, value)."""
    reader = Reader.open(open_storage(server.storage), stream)
    return [(m.key, m.value) for m in reader.read()]


# TypeScript writes, Python reads -----------------------------------------------------------


def _typescript_writes_python_reads(server: Served) -> None:
    path = "/v1/stream/interop/orders"
    stream = stream_name(path)  # the mapping docs/DURABLE-STREAMS.md gives
    url = server.stream_url(path)
    plain, batched = ORDERS[:5], ORDERS[5:]
    created = ts(
        "append",
        {
            "url": url,
            "authorization": AUTHORIZATION,
            "create": True,
            "contentType": JSON_TYPE,
            "values": plain,
        },
    )
    assert created[0] == {"event": "stream", "contentType": JSON_TYPE}
    assert [r["status"] for r in created[-1]["requests"]] == [204] * len(plain)
    # The rest through the client's IdempotentProducer: one batch, one POST.
    produced = ts(
        "append",
        {
            "url": url,
            "authorization": AUTHORIZATION,
            "create": False,
            "values": batched,
            "producer": {"id": "orders-service", "epoch": 0},
        },
    )
    assert [(r["status"], r["seq"]) for r in produced[-1]["requests"]] == [(200, 0)]

    with python_client(server) as client:
        messages = list(client.read(stream))
    assert [m.key for m in messages] == [b""] * len(ORDERS)
    assert [m.value for m in messages] == [_compact(v) for v in ORDERS]
    assert [json.loads(m.value) for m in messages] == ORDERS
    # Offsets are positions: the client's tail (HEAD) is the native next position.
    assert produced[-1]["offset"] == format_offset(messages[-1].next_position)
    # One append, one commit: the producer's batch is one frame of three messages.
    assert len({m.timestamp for m in messages[5:]}) == 1
    assert stored(server, stream) == [(m.key, m.value) for m in messages]

    # And the TypeScript client reads it back from any native position.
    assert items_of(ts("read", {"url": url, "authorization": AUTHORIZATION, "offset": "-1"})) == (
        ORDERS
    )
    middle = format_offset(messages[3].position)
    tail = ts("read", {"url": url, "authorization": AUTHORIZATION, "offset": middle})
    assert items_of(tail) == ORDERS[3:]
    assert tail[-1]["offset"] == produced[-1]["offset"]


def test_typescript_appends_read_natively_and_from_storage(tmp_path: Path) -> None:
    with served(tmp_path) as server:
        _typescript_writes_python_reads(server)


def test_typescript_appends_read_natively_and_from_storage_on_azurite(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("azure_storage")  # deletes the test's streams afterwards
    with served(tmp_path, f"azure:{azurite.connection_string}") as server:
        _typescript_writes_python_reads(server)


def test_typescript_client_without_credentials_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = "/v1/stream/interop/anonymous"
    with served(tmp_path) as server:
        request = {"url": server.stream_url(path), "create": True, "contentType": JSON_TYPE}
        with pytest.raises(TsError) as refused:
            ts("append", {**request, "values": [1]})
        assert refused.value.status == 401
        assert server.request("HEAD", path) == 404
        with pytest.raises(TsError) as wrong:
            ts("append", {**request, "values": [1], "authorization": "Basic " + "x" * 12})
        assert wrong.value.status == 401
        assert server.request("HEAD", path) == 404


# Python writes, TypeScript reads -----------------------------------------------------------


class Follower:
    """interop.mjs ``follow`` as a running process: its events as they come; stopped by PID."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [_node(), str(SCRIPT), "follow"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode())
        self.process.stdin.close()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                self.events.put(json.loads(line))
        self.events.put(None)

    def next(self) -> dict[str, Any]:
        event = self.events.get(timeout=EVENT_TIMEOUT)
        if event is None:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"the follower ended early: {stderr[-2000:]}")
        if event["event"] == "error":
            raise TsError(event)
        return event

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=EVENT_TIMEOUT)
        self._thread.join(timeout=EVENT_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def following(request: dict[str, Any]) -> Iterator[Follower]:
    follower = Follower(request)
    try:
        yield follower
    finally:
        follower.close()


@pytest.mark.parametrize("live", ["long-poll", "sse"])
def test_native_publishes_read_by_typescript_catching_up_and_live(
    tmp_path: Path, live: str
) -> None:
    path = "/v1/stream/interop/native"
    stream = stream_name(path)
    with served(tmp_path) as server, python_client(server) as client:
        assert server.request("PUT", path, content_type=JSON_TYPE) == 201
        url = server.stream_url(path)
        # Natively, each message a compact JSON value with an empty key, as the
        # protocol's own appends are stored (docs/DURABLE-STREAMS.md).
        first = client.publish(stream, [_compact(v) for v in ORDERS[:4]])
        second = client.publish(stream, [_compact(v) for v in ORDERS[4:]])
        length = client.info(stream).length
        assert second[-1].position < length

        read = {"url": url, "authorization": AUTHORIZATION}
        caught_up = ts("read", {**read, "offset": "-1"})
        assert items_of(caught_up) == ORDERS
        assert caught_up[-1]["offset"] == format_offset(length)
        # A native receipt's position is an offset the protocol accepts.
        from_receipt = ts("read", {**read, "offset": format_offset(first[2].position)})
        assert items_of(from_receipt) == ORDERS[2:]

        live_values = [{"live": 1}, "zwei ✓", [3]]
        with following({**read, "offset": format_offset(length), "live": live, "count": 3}) as f:
            # The follower is at the tail before anything new is published.
            ready = f.next()
            while not ready["upToDate"]:
                ready = f.next()
            assert ready["items"] == [] and ready["offset"] == format_offset(length)
            # Each publish lands while the client's live read waits at the tail, so
            # it is the live path (the long poll's or SSE's wait) that delivers it.
            received: list[Any] = []
            for values in (live_values[:1], live_values[1:]):
                server.await_waiting_read(stream)
                client.publish(stream, [_compact(v) for v in values])
                expected = len(received) + len(values)
                while len(received) < expected:
                    event = f.next()
                    received.extend(event.get("items", []))
            event = f.next()
        assert received == live_values
        assert event["event"] == "done"
        assert event["offset"] == format_offset(client.info(stream).length)


def test_a_non_json_value_published_natively_is_taken_and_breaks_typescript_reads(
    tmp_path: Path,
) -> None:
    """docs/DURABLE-STREAMS.md: native writes to a ``ds-`` stream bypass the protocol's checks.

    The native API does not know the stream's content type, so it takes a
    value that is no JSON; the protocol then serves it inside its JSON array,
    and the TypeScript client refuses the answer (rather than misreading it).
    """
    path = "/v1/stream/interop/bypass"
    stream = stream_name(path)
    with served(tmp_path) as server, python_client(server) as client:
        assert server.request("PUT", path, b"[1]", content_type=JSON_TYPE) == 201
        client.publish(stream, [b"not json"])
        assert stored(server, stream) == [(b"", b"1"), (b"", b"not json")]
        with pytest.raises(TsError) as refused:
            ts("read", {"url": server.stream_url(path), "authorization": AUTHORIZATION})
        assert "JSON" in str(refused.value)


# Exactly once across both ------------------------------------------------------------------


def _producer_frames(server: Served, stream: str) -> list[tuple[bytes, int, int]]:
    """Each stored frame's (producer id, producer sequence, message count)."""
    reader = Reader.open(open_storage(server.storage), stream)
    frames, position, length = [], 0, reader.checkpoint().length
    while position < length:
        header = reader.header_at(position)
        frames.append((header.producer, header.producer_seq, header.message_count))
        position = header.end
    return frames


def test_typescript_producer_batches_sent_twice_are_stored_once(tmp_path: Path) -> None:
    path = "/v1/stream/interop/exactly-once"
    stream = stream_name(path)
    values = [{"n": n, "text": f"événement {n}"} for n in range(6)]
    with served(tmp_path) as server, python_client(server) as client:
        url = server.stream_url(path)
        # Each value its own batch (maxBatchBytes 1), each batch POSTed twice:
        # the first answer is dropped, as if lost, and the client sees the retry's.
        # One batch in flight, so that no batch overtakes another (a 409 gap the
        # client would resolve by waiting) and each batch's answers are known.
        producer = {
            "id": "billing",
            "epoch": 0,
            "maxBatchBytes": 1,
            "maxInFlight": 1,
            "repeatRequests": True,
        }
        request = {"url": url, "authorization": AUTHORIZATION, "values": values}
        first = ts(
            "append", {**request, "create": True, "contentType": JSON_TYPE, "producer": producer}
        )
        sent = first[-1]["requests"]
        assert sorted((r["seq"], r["answered"], r["status"]) for r in sent) == [
            (seq, answered, 204 if answered else 200)
            for seq in range(len(values))
            for answered in (False, True)
        ]
        assert [json.loads(m.value) for m in client.read(stream)] == values
        mv_producer = producer_id_bytes(path, "billing", 0)
        assert _producer_frames(server, stream) == [(mv_producer, s, 1) for s in range(6)]

        # The whole job run again by a restarted process with the same producer id
        # and epoch, its batches pipelined: every batch is a duplicate, nothing
        # is stored twice.
        once = {**producer, "maxInFlight": 5, "repeatRequests": False}
        rerun = ts("append", {**request, "create": False, "producer": once})
        assert [r["status"] for r in rerun[-1]["requests"]] == [204] * len(values)
        assert [json.loads(m.value) for m in client.read(stream)] == values

        # A new epoch is a new session: its batches are new data, stored (once).
        new_epoch = {**producer, "epoch": 1}
        again = ts(
            "append", {**request, "create": False, "values": values[:2], "producer": new_epoch}
        )
        assert sorted(r["status"] for r in again[-1]["requests"]) == [200, 200, 204, 204]
        assert [json.loads(m.value) for m in client.read(stream)] == values + values[:2]
        assert stored(server, stream) == [(b"", _compact(v)) for v in values + values[:2]]


def test_a_native_idempotent_batch_sent_twice_reads_once_in_typescript(tmp_path: Path) -> None:
    path = "/v1/stream/interop/native-once"
    stream = stream_name(path)
    with served(tmp_path) as server, python_client(server) as client:
        assert server.request("PUT", path, content_type=JSON_TYPE) == 201
        batch = encode_batch([(b"", _compact(v)) for v in ORDERS[:3]]).with_producer(
            b"\x01" * 16, 0
        )
        first = client.publish_batch(stream, batch)
        again = client.publish_batch(stream, batch)
        assert not first.duplicate and again.duplicate
        assert [r.position for r in again] == [r.position for r in first]
        read = ts("read", {"url": server.stream_url(path), "authorization": AUTHORIZATION})
        assert items_of(read) == ORDERS[:3]


# What the TypeScript client can send that the server mishandles ------------------------------


def test_a_lone_surrogate_from_javascript_is_stored_or_refused_cleanly(tmp_path: Path) -> None:
    path = "/v1/stream/interop/surrogate"
    with served(tmp_path) as server, python_client(server) as client:
        request = {"url": server.stream_url(path), "authorization": AUTHORIZATION}
        ts("append", {**request, "create": True, "contentType": JSON_TYPE, "values": ["ok"]})
        # json.dumps writes "\ud800" as an escape; Node parses it to a lone surrogate
        # and the client's JSON.stringify escapes it again on the way out.
        try:
            ts("append", {**request, "create": False, "values": ["a\ud800b"]})
        except TsError as exc:
            assert exc.status == 400, exc
            assert [m.value for m in client.read(stream_name(path))] == [b'"ok"']
        else:
            assert items_of(ts("read", request)) == ["ok", "a\ud800b"]


def test_a_number_beyond_a_double_does_not_break_the_stream(tmp_path: Path) -> None:
    path = "/v1/stream/interop/infinity"
    with served(tmp_path) as server:
        request = {"url": server.stream_url(path), "authorization": AUTHORIZATION}
        ts("append", {**request, "create": True, "contentType": JSON_TYPE, "values": [1]})
        # The client's append takes JSON text as given (it wraps it in an array).
        with contextlib.suppress(TsError):
            ts("append", {**request, "create": False, "raw": True, "values": ["1e400"]})
        # Refused (as NaN is), or kept as a number: either way the stream still reads.
        assert items_of(ts("read", request))[:1] == [1]
