"""A stream taken over by another writer: the server reopens it, and never answers 500.

Another writer can take a stream from the server (a takeover: memory and
Azure fence the old writer). The server learns of it at its next commit
(409 ``stale_writer``); from then on an append opens a fresh writer that
starts from what storage holds, or is refused with 409 ``stream_locked``
while the other writer still holds the stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import (
    AppendResult,
    FileStorage,
    MemoryStorage,
    StaleWriter,
    Writer,
    encode_batch,
)
from messagevault.committer import GroupCommitter
from messagevault.server import StreamHub, create_app
from messagevault.storage.base import Storage
from messagevault.storage.memory import MemoryStreamStore

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


async def _committed_messages(client: Any, stream: str, expected: float) -> float:
    """``messagevault_committed_messages_total`` of ``stream`` in /metrics, once ``expected``.

    The commit observers count a commit after its acknowledgements: a
    scrape may come first (bounded wait: 5 s).
    """
    sample = f'messagevault_committed_messages_total{{stream="{stream}"}} '
    value = -1.0
    for _ in range(100):
        text = await (await client.get("/metrics")).text()
        value = next(
            (float(line[len(sample) :]) for line in text.splitlines() if line.startswith(sample)),
            -1.0,
        )
        if value == expected:
            break
        await asyncio.sleep(0.05)
    return value


def _depose(storage: Storage, stream: str) -> list[str]:
    """Take ``stream`` from the server's writer (memory, Azure fence it); the values written."""
    with Writer.open(storage, stream, takeover=True) as other:
        other.append([(b"", b"theirs")])
    return ["theirs"]


async def _append(client: Client, stream: str, value: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/streams/{stream}", json={"messages": [{"value": value}]})
    return response.status, await response.json()


async def _values(client: Client, stream: str) -> list[str]:
    body = await (await client.get(f"/streams/{stream}/messages")).json()
    return [message["value"] for message in body["messages"]]


async def test_a_deposed_stream_is_reopened_by_the_next_append(
    aiohttp_client: MakeClient,
    storage: Storage,
) -> None:
    if isinstance(storage, FileStorage):
        # A live writer cannot be deposed on file storage (its flock keeps any
        # other writer out). Simulated by a checkpoint that refuses to move,
        # the refused batch would lie whole past the checkpoint, and the next
        # writer rolls forward over it, as it must after a power cut took the
        # checkpoint's lazy flush: no state a real depose can leave.
        pytest.skip("file storage cannot depose a live writer (flock)")
    hub = StreamHub(storage)
    client = await aiohttp_client(create_app(hub))
    assert (await _append(client, "orders", "mine"))[0] == 200
    theirs = _depose(storage, "orders")
    status, body = await _append(client, "orders", "refused")  # the server learns it here
    assert (status, body["error"]) == (409, "stale_writer")
    for value in ("again", "and again"):  # not 500 committer_closed, ever again
        status, body = await _append(client, "orders", value)
        assert status == 200, body
    assert await _values(client, "orders") == ["mine", *theirs, "again", "and again"]

    # Reads and long polls of the reopened stream follow its new writer.
    end = body["position"]
    poll = asyncio.create_task(
        client.get("/streams/orders/messages", params={"from": end, "wait": 30})
    )
    for _ in range(500):  # until the long poll waits (bounded: 5 s)
        if hub.waiting_reads().get("orders"):
            break
        await asyncio.sleep(0.01)
    assert (await _append(client, "orders", "woken"))[0] == 200
    answer = await (await asyncio.wait_for(poll, 30)).json()
    assert [message["value"] for message in answer["messages"]] == ["woken"]
    info = await (await client.get("/streams/orders")).json()
    assert info["messages"] == 4 + len(theirs)
    # The stream's commit counters carry on across the reopen (no reset).
    assert await _committed_messages(client, "orders", 4) == 4


async def test_while_the_other_writer_holds_the_stream_appends_are_409_stream_locked(
    aiohttp_client: MakeClient,
) -> None:
    storage = MemoryStorage()
    hub = StreamHub(storage)
    client = await aiohttp_client(create_app(hub))
    assert (await _append(client, "orders", "mine"))[0] == 200
    with Writer.open(storage, "orders", takeover=True) as other:
        other.append([(b"", b"theirs")])
        status, body = await _append(client, "orders", "refused")
        assert (status, body["error"]) == (409, "stale_writer")
        for _ in range(2):
            status, body = await _append(client, "orders", "still refused")
            assert (status, body["error"]) == (409, "stream_locked")
    status, body = await _append(client, "orders", "after")  # the other let go
    assert status == 200, body
    assert await _values(client, "orders") == ["mine", "theirs", "after"]
    # Counters survive reopens that failed on the way (no reset to the last one's).
    assert await _committed_messages(client, "orders", 2) == 2


class _GatedStorage(MemoryStorage):
    """Memory storage whose next commit, once armed, waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def open_stream(
        self, name: str, *, write: bool = False, create: bool = False, takeover: bool = False
    ) -> MemoryStreamStore:
        store = super().open_stream(name, write=write, create=create, takeover=takeover)
        advance = store.advance_checkpoint

        def gated(*args: Any, **kwargs: Any) -> None:
            if self.armed:
                self.armed = False
                self.entered.set()
                assert self.release.wait(30)
            advance(*args, **kwargs)

        store.advance_checkpoint = gated  # type: ignore[method-assign]
        return store


async def test_appends_queued_behind_the_deposed_commit_are_503_and_retriable(
    aiohttp_client: MakeClient,
) -> None:
    storage = _GatedStorage()
    hub = StreamHub(storage)
    client = await aiohttp_client(create_app(hub))
    assert (await _append(client, "orders", "mine"))[0] == 200
    storage.armed = True
    in_commit = asyncio.create_task(_append(client, "orders", "in the commit"))
    assert await asyncio.to_thread(storage.entered.wait, 30)
    queued = asyncio.create_task(_append(client, "orders", "queued behind"))
    committer = hub.committers()["orders"]
    for _ in range(500):  # until it waits in the committer's queue (bounded: 5 s)
        if committer.queued_bytes:
            break
        await asyncio.sleep(0.01)
    assert committer.queued_bytes
    with Writer.open(storage, "orders", takeover=True) as other:
        other.append([(b"", b"theirs")])
    storage.release.set()
    status, body = await in_commit
    assert (status, body["error"]) == (409, "stale_writer")
    status, body = await queued  # never tried: nothing of it was written
    assert (status, body["error"]) == (503, "committer_closed")
    assert (await _append(client, "orders", "retried"))[0] == 200
    assert await _values(client, "orders") == ["mine", "theirs", "retried"]


async def test_an_append_after_the_hub_closed_is_503(aiohttp_client: MakeClient) -> None:
    hub = StreamHub(MemoryStorage())
    client = await aiohttp_client(create_app(hub))
    assert (await _append(client, "orders", "mine"))[0] == 200
    await hub.close()
    response = await client.post("/streams/orders", json={"messages": [{"value": "too late"}]})
    assert (response.status, (await response.json())["error"]) == (503, "committer_closed")
    assert response.headers["Retry-After"] == "1"  # retriable: clients back off and retry


def test_the_committer_refuses_appends_before_a_deposed_append_hears_why() -> None:
    """Else an append sent right after the 409 could join the dead committer's queue."""
    storage = MemoryStorage()
    committer = GroupCommitter(Writer.open(storage, "orders"))
    committer.append([(b"", b"mine")])
    accepting_when_told: list[bool] = []
    future: Future[AppendResult] = Future()
    future.add_done_callback(lambda _: accepting_when_told.append(committer.accepting))
    with Writer.open(storage, "orders", takeover=True):
        committer.submit(encode_batch([(b"", b"refused")]), future)
        with pytest.raises(StaleWriter):
            future.result(timeout=30)
    committer.close()
    assert accepting_when_told == [False]
