"""Followers through a server cost storage per stream, not per follower (issue 17).

Long polls and Server-Sent-Events tails waiting at the end of a stream the
server does not write (another node writes it, or nobody has for a while)
share one storage read of its checkpoint per ``recheck_interval``. Counted
here as Azure requests (the SDK's own transport, on a real Azurite): forty
waiting readers cost what one does, and each still sees a commit made
elsewhere.
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
from messagevault.server import StreamHub, create_app
from messagevault.storage.azure import CONTAINER_PREFIX, AzureStorage
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


def _written_elsewhere(storage: AzureStorage, stream: str, values: list[bytes]) -> int:
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
