"""Followers through a server cost storage per stream, not per follower (issue 17).

Long polls and Server-Sent-Events tails waiting at the end of a stream the
server does not write (another node writes it, or nobody has for a while)
share one storage read of its checkpoint per ``recheck_interval``, and the
readers a commit wakes share one read of what it wrote. Counted here as
Azure requests (the SDK's own transport, on a real Azurite): forty waiting
readers cost what one does, and each still sees a commit made elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import Writer
from messagevault.errors import InvalidPosition
from messagevault.server import StreamHub, create_app
from messagevault.storage.azure import CONTAINER_PREFIX, AzureStorage
from messagevault.storage.base import Storage
from messagevault.storage.memory import MemoryStorage
from tests.azure_observed import READ_CHECKPOINT, ObservedTransport, observed_storage
from tests.azurite import Azurite

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
RECHECK = 0.2  # seconds: short, so that a few seconds of waiting make many rechecks
WAIT = 2  # seconds each long poll waits


@pytest.fixture
def observed(azurite: Azurite) -> Any:
    storage, transport = observed_storage(azurite.connection_string)
    yield storage, transport
    for container in storage.service.list_containers(name_starts_with=CONTAINER_PREFIX):
        storage.service.delete_container(container.name)


@contextlib.asynccontextmanager
async def _server(
    aiohttp_client: MakeClient, storage: AzureStorage, recheck: float = RECHECK
) -> AsyncIterator[tuple[Client, StreamHub]]:
    hub = StreamHub(storage)
    hub.recheck_interval = recheck
    client = await aiohttp_client(create_app(hub))
    yield client, hub


def _written_elsewhere(storage: Storage, stream: str, values: list[bytes]) -> int:
    """Append as another node would: a writer of its own, closed after. The new length."""
    writer = Writer.open(storage, stream)
    try:
        for value in values:
            writer.append([(b"k", value)])
        return writer.checkpoint.length
    finally:
        writer.close()


async def _long_polls(client: Client, stream: str, position: int, count: int) -> list[Any]:
    async def one() -> Any:
        answer = await client.get(
            f"/streams/{stream}/messages", params={"from": position, "wait": WAIT}
        )
        assert answer.status == 200
        return await answer.json()

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _checkpoint_reads_while_waiting(
    client: Client, transport: ObservedTransport, stream: str, position: int, count: int
) -> int:
    before = transport.count(READ_CHECKPOINT)
    answers = await _long_polls(client, stream, position, count)
    assert all(answer["messages"] == [] for answer in answers)
    return transport.count(READ_CHECKPOINT) - before


async def test_forty_idle_long_polls_cost_storage_what_one_does(
    aiohttp_client: MakeClient, observed: Any
) -> None:
    storage, transport = observed
    length = _written_elsewhere(storage, "idle-tail", [b"one", b"two"])
    async with _server(aiohttp_client, storage) as (client, _):
        one = await _checkpoint_reads_while_waiting(client, transport, "idle-tail", length, 1)
        forty = await _checkpoint_reads_while_waiting(client, transport, "idle-tail", length, 40)
    # Without sharing, forty waiters read the checkpoint forty times as often.
    assert one >= WAIT / RECHECK / 2, one  # the single waiter did recheck
    assert forty <= one * 1.5 + 2, (one, forty)


async def test_every_waiting_reader_sees_a_commit_made_elsewhere(
    aiohttp_client: MakeClient, observed: Any
) -> None:
    storage, _ = observed
    length = _written_elsewhere(storage, "elsewhere", [b"before"])
    async with _server(aiohttp_client, storage) as (client, _):
        waiting = asyncio.ensure_future(_long_polls(client, "elsewhere", length, 30))
        await asyncio.sleep(RECHECK * 2)  # they are waiting, sharing reads
        await asyncio.to_thread(_written_elsewhere, storage, "elsewhere", [b"after"])
        answers = await waiting
    assert [[m["value"] for m in answer["messages"]] for answer in answers] == [["after"]] * 30


@pytest.mark.parametrize("accept", ["application/json", "application/x-messagevault-batch"])
async def test_readers_woken_by_a_commit_share_one_read_of_it(
    aiohttp_client: MakeClient, observed: Any, azurite: Azurite, accept: str
) -> None:
    storage, transport = observed
    elsewhere, _ = observed_storage(azurite.connection_string)  # its requests are not counted
    length = _written_elsewhere(elsewhere, "woken", [b"before"])
    async with _server(aiohttp_client, storage) as (client, _):

        async def one() -> bytes:
            answer = await client.get(
                "/streams/woken/messages",
                params={"from": length, "wait": WAIT},
                headers={"Accept": accept},
            )
            assert answer.status == 200
            return await answer.read()

        waiting = asyncio.gather(*(one() for _ in range(30)))
        await asyncio.sleep(RECHECK * 2)  # they are waiting, sharing the tail's reads
        before = sum(transport.sent.values())
        new_length = await asyncio.to_thread(_written_elsewhere, elsewhere, "woken", [b"after"])
        answers = await waiting
        sent = sum(transport.sent.values()) - before
    assert new_length > length
    assert len(set(answers)) == 1 and b"after" in answers[0], answers[0]
    # The watch's rechecks while the other node writes, then one read of the
    # new frames for all thirty; each reading for itself costs 30 reads or more.
    assert sent <= 12, sent


async def _idle_reads_with_tails(
    client: Client, transport: ObservedTransport, stream: str, position: int, count: int
) -> int:
    """Checkpoint reads over WAIT seconds while ``count`` SSE tails wait (once they are open)."""
    tails = await asyncio.gather(
        *(
            client.get(
                f"/streams/{stream}/messages",
                params={"from": position},
                headers={"Accept": "text/event-stream"},
            )
            for _ in range(count)
        )
    )
    try:
        before = transport.count(READ_CHECKPOINT)
        await asyncio.sleep(WAIT)
        return transport.count(READ_CHECKPOINT) - before
    finally:
        for tail in tails:
            tail.close()


async def test_idle_sse_tails_share_one_read(aiohttp_client: MakeClient, observed: Any) -> None:
    storage, transport = observed
    length = _written_elsewhere(storage, "tails", [b"x"])
    async with _server(aiohttp_client, storage) as (client, _):
        one = await _idle_reads_with_tails(client, transport, "tails", length, 1)
        forty = await _idle_reads_with_tails(client, transport, "tails", length, 40)
    assert one >= WAIT / RECHECK / 2, one
    assert forty <= one * 1.5 + 2, (one, forty)


async def test_a_read_at_the_watched_tail_needs_no_storage_request(
    aiohttp_client: MakeClient, observed: Any
) -> None:
    """Readers polling without wait at the end share the read too."""
    storage, transport = observed
    length = _written_elsewhere(storage, "pollers", [b"a", b"b"])
    # A long recheck interval: the twenty reads all fall within the first one's.
    async with _server(aiohttp_client, storage, recheck=30) as (client, _):
        first = await client.get("/streams/pollers/messages", params={"from": length})
        assert (await first.json())["messages"] == []
        before = sum(transport.sent.values())
        for accept in ("application/json", "application/x-messagevault-batch") * 10:
            answer = await client.get(
                "/streams/pollers/messages", params={"from": length}, headers={"Accept": accept}
            )
            assert answer.status == 200
            assert answer.headers.get("X-Next", str(length)) == str(length)
        # All within one recheck interval of the first: no request at all.
        assert sum(transport.sent.values()) - before == 0
        # A position below the tail is read from storage, as always.
        earlier = await client.get("/streams/pollers/messages", params={"from": 0})
        assert [m["value"] for m in (await earlier.json())["messages"]] == ["a", "b"]


async def test_a_failed_shared_read_fails_every_reader_and_is_not_kept() -> None:
    storage = MemoryStorage()
    hub = StreamHub(storage)
    hub.recheck_interval = 0.05  # the shared tail read keeps its answer no longer
    _written_elsewhere(storage, "later", [b"first"])
    # Where the stream will have its third message: beyond its end for now.
    third = _written_elsewhere(storage, "scratch", [b"first", b"second"])
    try:
        failures = await asyncio.gather(
            *(hub.read_frames("later", third, 1 << 20) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(failure, InvalidPosition) for failure in failures), failures
        _written_elsewhere(storage, "later", [b"second", b"third"])
        await asyncio.sleep(0.1)
        frames = await asyncio.gather(*(hub.read_frames("later", third, 1 << 20) for _ in range(5)))
        assert len({frame.data for frame in frames}) == 1 and b"third" in frames[0].data
        # Each caller gets its own list of messages to keep or change.
        first, second = await asyncio.gather(*(hub.read("later", 0, 10, 1 << 20) for _ in range(2)))
        assert first == second and first is not second
    finally:
        await hub.close()
