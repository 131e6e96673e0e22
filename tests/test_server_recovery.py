"""After a power cut, the server shows every acknowledged message before anyone appends.

The checkpoint is flushed lazily (docs/FORMAT.md, "Commit protocol"), so a
cut can leave it behind acknowledged messages; a writer opening the stream
rolls it forward. A server that only reads a stream after restarting must
not hide those messages until the stream's next append: it rolls a stream
forward the first time it touches it (``StreamHub``, ``recovery.recover``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, Reader, Writer
from messagevault.server import StreamHub, create_app
from messagevault.storage.power_loss import PowerLossStorage

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def _cut_after_appends(storage: FileStorage, seed: int) -> int:
    """Append three messages, cut the power; the end of the last acknowledged one."""
    with PowerLossStorage(storage, seed=seed) as power:
        writer = Writer.open(power, "orders")
        end = [writer.append([(b"k", b"%d" % index)]).end for index in range(3)][-1]
        power.power_cut()
    return end


def _stored_length(storage: FileStorage) -> int:
    with Reader.open(storage, "orders") as reader:
        return reader.checkpoint().length


async def test_reads_after_a_cut_show_every_acknowledged_message(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    stale = 0
    for seed in range(8):
        storage = FileStorage(tmp_path / str(seed))
        end = _cut_after_appends(storage, seed)
        stale += _stored_length(storage) < end
        client = await aiohttp_client(create_app(StreamHub(storage)))
        body = await (await client.get("/streams/orders/messages")).json()
        assert [message["value"] for message in body["messages"]] == ["0", "1", "2"], seed
        info = await (await client.get("/streams/orders")).json()
        assert info["length"] == end, seed
        # Direct readers see it too from now on: the server committed the roll-forward.
        assert _stored_length(storage) == end, seed
        await client.close()
    assert stale, "no cut left the checkpoint behind: the test proves nothing"


async def test_a_long_poll_after_a_cut_sees_the_acknowledged_messages_at_once(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    for seed in range(8):
        storage = FileStorage(tmp_path / str(seed))
        end = _cut_after_appends(storage, seed)
        client = await aiohttp_client(create_app(StreamHub(storage)))
        # Waiting for data past the last acknowledged message's start: it is there.
        response = await client.get("/streams/orders/messages", params={"from": 0, "wait": 30})
        body = await response.json()
        assert len(body["messages"]) == 3 and body["next"] == end, seed
        await client.close()


async def test_reading_a_stream_that_does_not_exist_creates_nothing(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    storage = FileStorage(tmp_path)
    client = await aiohttp_client(create_app(StreamHub(storage)))
    assert (await client.get("/streams/missing/messages")).status == 404
    assert storage.list_streams() == []


async def test_a_stream_another_writer_holds_is_read_without_waiting_for_it(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, "orders") as writer:  # holds the writer lock meanwhile
        writer.append([(b"k", b"theirs")])
        client = await aiohttp_client(create_app(StreamHub(storage)))
        body = await (await client.get("/streams/orders/messages")).json()
        assert [message["value"] for message in body["messages"]] == ["theirs"]
        writer.append([(b"k", b"more")])
        body = await (await client.get("/streams/orders/messages")).json()
        assert [message["value"] for message in body["messages"]] == ["theirs", "more"]
