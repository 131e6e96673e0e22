"""Deleting a stream: admin-only, after the appends already accepted, with its policy and lease."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from messagevault import FileStorage, MemoryStorage, Reader, Writer, cli, encode_batch
from messagevault.cli import main
from messagevault.client import Client as MessageVaultClient
from messagevault.errors import CommitterClosed, StorageError, StreamNotFound
from messagevault.retention_policy import (
    RetentionPolicy,
    delete_policy,
    load_policy,
    save_policy,
)
from messagevault.server import StreamHub, create_app
from messagevault.server.auth import Authenticator
from messagevault.server.retention_task import RetentionSettings, RetentionTask
from messagevault.storage.base import Storage
from messagevault.writer import AppendResult
from tests.admin_users import (
    READER,
    ROOT,
    WRITER,
    cheap_passwords,  # noqa: F401 - an autouse fixture
    error_detail,
    publish,
    with_users,
)
from tests.azurite import Azurite
from tests.cluster_nodes import PASSWORD, USER, Node, clear_leases, cluster_of
from tests.cluster_nodes import _auth as cluster_auth
from tests.served import ServedApp

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def _storage(backend: str, tmp_path: Path) -> Storage:
    return MemoryStorage() if backend == "memory" else FileStorage(tmp_path)


async def _client(aiohttp_client: MakeClient, storage: Storage) -> Client:
    authenticator = Authenticator(storage, reload_interval=0)  # type: ignore[arg-type]
    return await aiohttp_client(create_app(StreamHub(storage), authenticator=authenticator))


@pytest.mark.parametrize("backend", ["memory", "file"])
async def test_an_admin_deletes_a_stream_and_it_starts_afresh(
    aiohttp_client: MakeClient, backend: str, tmp_path: Path
) -> None:
    storage = with_users(_storage(backend, tmp_path))
    client = await _client(aiohttp_client, storage)
    for n in range(3):
        await publish(client, "orders", [f"old {n}"])
    await publish(client, "billing", ["kept"])
    save_policy(storage, "orders", RetentionPolicy(max_bytes=10_000))  # type: ignore[arg-type]
    # A read first: the server keeps its reader for the next one.
    response = await client.get("/streams/orders/messages", headers=ROOT)
    assert len((await response.json())["messages"]) == 3

    response = await client.delete("/streams/orders", headers=ROOT)
    assert response.status == 204, await response.text()

    for path in ("/streams/orders", "/streams/orders/messages", "/streams/orders/retention"):
        await error_detail(await client.get(path, headers=ROOT), 404, "stream_not_found")
    listed = await (await client.get("/streams", headers=ROOT)).json()
    assert [s["stream"] for s in listed["streams"]] == ["billing"]
    assert storage.list_streams() == ["billing"]
    with pytest.raises(StreamNotFound):
        Reader.open(storage, "orders")
    assert load_policy(storage, "orders") is None  # type: ignore[arg-type]
    await error_detail(
        await client.delete("/streams/orders", headers=ROOT), 404, "stream_not_found"
    )

    # Published to again, it starts empty: sequence 0 at position 0.
    answer = await publish(client, "orders", ["new"])
    assert (answer["messages"][0]["sequence"], answer["messages"][0]["position"]) == (0, 0)
    response = await client.get("/streams/orders/messages", headers=ROOT)
    assert [m["value"] for m in (await response.json())["messages"]] == ["new"]
    info = await (await client.get("/streams/billing", headers=ROOT)).json()
    assert info["messages"] == 1


async def test_only_an_admin_deletes(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["a"])
    for headers in (WRITER, READER):
        detail = await error_detail(
            await client.delete("/streams/orders", headers=headers), 403, "forbidden"
        )
        assert "admin" in detail
    await error_detail(await client.delete("/streams/orders"), 401, "unauthenticated")
    await error_detail(
        await client.delete("/streams/No_Such", headers=ROOT), 400, "invalid_stream_name"
    )
    await error_detail(
        await client.delete("/streams/nothing", headers=ROOT), 404, "stream_not_found"
    )
    assert storage.list_streams() == ["orders"]
    info = await (await client.get("/streams/orders", headers=ROOT)).json()
    assert info["messages"] == 1


class _SlowDelete(MemoryStorage):
    """Memory storage whose ``delete_stream`` waits until told to go on (a slow backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.deleting = threading.Event()
        self.go_on = threading.Event()

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        self.deleting.set()
        assert self.go_on.wait(10)
        super().delete_stream(name, takeover=takeover)


async def test_an_append_during_a_delete_is_refused_clearly(aiohttp_client: MakeClient) -> None:
    storage = _SlowDelete()
    with_users(storage)
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["before"])
    deleting = asyncio.ensure_future(client.delete("/streams/orders", headers=ROOT))
    assert await asyncio.to_thread(storage.deleting.wait, 10)
    response = await client.post(
        "/streams/orders", json={"messages": [{"value": "during"}]}, headers=ROOT
    )
    detail = await error_detail(response, 503, "committer_closed")
    assert "being deleted" in detail
    assert response.headers["Retry-After"] == "1"
    storage.go_on.set()
    assert (await deleting).status == 204
    answer = await publish(client, "orders", ["after"])  # the retry: a fresh stream
    assert answer["messages"][0]["sequence"] == 0


async def test_appends_in_flight_are_committed_or_refused_never_lost() -> None:
    """Racing a delete, every append is acknowledged or refused (CommitterClosed), nothing else.

    Those acknowledged are in the old stream (deleted with it: that is what
    deleting means) or in the new one, at the sequence their receipt says;
    the new stream holds exactly those acknowledged after the delete.
    """
    storage = MemoryStorage()
    hub = StreamHub(storage, commit_on_loop=False)
    try:
        await hub.append("orders", encode_batch([(b"", b"first")]))

        async def append(n: int) -> AppendResult:
            await asyncio.sleep(0.0005 * (n % 20))
            return await hub.append("orders", encode_batch([(b"", b"%d" % n)]))

        async def delete() -> None:
            await asyncio.sleep(0.004)
            await hub.delete_stream("orders")

        outcomes = await asyncio.gather(
            *(append(n) for n in range(200)), delete(), return_exceptions=True
        )
        *appends, deleted = outcomes
        assert deleted is None
        for outcome in appends:
            assert isinstance(outcome, AppendResult | CommitterClosed), outcome
        acknowledged = {
            int(n): outcome
            for n, outcome in enumerate(appends)
            if isinstance(outcome, AppendResult)
        }
        try:
            with Reader.open(storage, "orders") as reader:
                after = {int(m.value): m for m in reader.read()}
        except StreamNotFound:
            after = {}
        assert set(after) <= set(acknowledged)  # nothing unacknowledged appears
        for n, message in after.items():
            assert message.sequence == acknowledged[n][0].sequence
            assert message.position == acknowledged[n][0].position
        before = sorted(acknowledged[n][0].sequence for n in set(acknowledged) - set(after))
        # The old stream's were its messages 1, 2, ... (0 was "first"), no gaps.
        assert before == list(range(1, len(before) + 1))
        assert sorted(m.sequence for m in after.values()) == list(range(len(after)))
    finally:
        await hub.close()


async def test_the_hub_deletes_a_stream_it_writes_and_readers_find_it_gone(
    storage: Storage,
) -> None:
    hub = StreamHub(storage)
    try:
        await hub.append("orders", encode_batch([(b"", b"a")] * 3))
        messages, _ = await hub.read("orders", 0, 10, 1 << 20)
        assert len(messages) == 3
        await hub.delete_stream("orders")
        with pytest.raises(StreamNotFound):
            await hub.read("orders", 0, 10, 1 << 20)
        with pytest.raises(StreamNotFound):
            await hub.checkpoint("orders")
        with pytest.raises(StreamNotFound):
            await hub.delete_stream("orders")
        assert "orders" not in storage.list_streams()
        # Appended to again, it starts empty (on Azure, a container of that
        # name being deleted may refuse a moment: a retriable storage_error).
        for _ in range(100):
            try:
                result = await hub.append("orders", encode_batch([(b"", b"new")]))
                break
            except StorageError:
                await asyncio.sleep(0.1)
        assert (result[0].sequence, result[0].position) == (0, 0)
        messages, _ = await hub.read("orders", 0, 10, 1 << 20)
        assert [m.value for m in messages] == [b"new"]
    finally:
        await hub.close()


async def test_retention_trims_on_every_backend(storage: Storage) -> None:
    hub = StreamHub(storage)
    task = RetentionTask(hub, RetentionSettings())
    try:
        for n in range(40):
            await hub.append("orders", encode_batch([(b"", b"%d" % n + b"x" * 1000)]))
        save_policy(storage, "orders", RetentionPolicy(max_bytes=5000))  # type: ignore[arg-type]
        (applied,) = await task.run_once()
        checkpoint = await hub.checkpoint("orders")
        assert checkpoint.first_position == applied.first_position > 0
        assert 0 < checkpoint.length - checkpoint.first_position <= 5000
        messages, _ = await hub.read("orders", checkpoint.first_position, 100, 1 << 20)
        assert messages[0].sequence == applied.first_sequence
        assert messages[-1].value.startswith(b"39x")
        assert await task.run_once() == []
    finally:
        await hub.close()


# The CLI -----------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, stdin: str | None = None, **env: str) -> tuple[int, str]:
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path}",
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        "MESSAGEVAULT_URL": None,
        "MESSAGEVAULT_PROFILE": None,
        "MESSAGEVAULT_USER": None,
        "MESSAGEVAULT_PASSWORD": None,
        **env,
    }
    result = CliRunner().invoke(main, list(args), input=stdin, env=variables)
    return result.exit_code, result.stderr


def _one_line(err: str) -> str:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    return err


def _a_stream(tmp_path: Path, stream: str = "orders") -> None:
    with Writer.open(FileStorage(tmp_path), stream) as writer:
        writer.append([(b"", b"a"), (b"", b"b")])


def test_cli_delete_asks_for_the_streams_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a_stream(tmp_path)
    code, err = _cli(tmp_path, "delete", "orders")  # no terminal to ask on
    assert code == 2
    assert "--yes" in _one_line(err)
    assert FileStorage(tmp_path).list_streams() == ["orders"]

    monkeypatch.setattr(cli, "_stdin_is_terminal", lambda: True)
    code, err = _cli(tmp_path, "delete", "orders", stdin="order\n")
    assert code == 1
    assert "you typed 'order', not 'orders': nothing deleted" in err
    assert "holds 2 messages" in err
    assert FileStorage(tmp_path).list_streams() == ["orders"]
    code, err = _cli(tmp_path, "delete", "orders", stdin="\n")
    assert code == 1
    assert FileStorage(tmp_path).list_streams() == ["orders"]

    code, err = _cli(tmp_path, "delete", "orders", stdin="orders\n")
    assert code == 0, err
    assert "deleted stream orders" in err
    assert FileStorage(tmp_path).list_streams() == []


def test_cli_delete_with_yes_and_its_bad_inputs(tmp_path: Path) -> None:
    _a_stream(tmp_path)
    save_policy(FileStorage(tmp_path), "orders", RetentionPolicy(max_age=60))
    code, err = _cli(tmp_path, "delete", "nothing", "--yes")
    assert code == 1
    assert "nothing" in _one_line(err)
    code, err = _cli(tmp_path, "delete", "Bad_Name", "--yes")
    assert code == 1
    assert "stream name" in _one_line(err)
    assert FileStorage(tmp_path).list_streams() == ["orders"]
    code, err = _cli(tmp_path, "delete", "orders", "--yes")
    assert code == 0, err
    assert FileStorage(tmp_path).list_streams() == []
    assert load_policy(FileStorage(tmp_path), "orders") is None


def test_cli_delete_refuses_storage_a_server_serves(tmp_path: Path) -> None:
    _a_stream(tmp_path)
    storage = FileStorage(tmp_path)
    with storage.hold_server_lock():  # a single server on the folder
        code, err = _cli(tmp_path, "delete", "orders", "--yes")
    assert code == 1
    assert "already serves the data folder" in _one_line(err)
    node = storage.leases().acquire(
        "nodes/n1", holder="n1", address="http://127.0.0.1:9", duration=30
    )
    try:
        code, err = _cli(tmp_path, "delete", "orders", "--yes")
        assert code == 1
        assert "served by server nodes (n1): delete it through them" in _one_line(err)
    finally:
        storage.leases().release(node)
    assert storage.list_streams() == ["orders"]


def test_cli_delete_through_a_server(tmp_path: Path) -> None:
    storage = with_users(FileStorage(tmp_path / "served"))
    _a_stream(tmp_path / "served")
    authenticator = Authenticator(storage, reload_interval=0)
    with ServedApp(create_app(StreamHub(storage), authenticator=authenticator)) as server:
        writer = {"MESSAGEVAULT_USER": "writer", "MESSAGEVAULT_PASSWORD": "writer-secret"}
        code, err = _cli(tmp_path, "delete", "orders", "--yes", "--url", server.url, **writer)
        assert code == 1
        assert "users grant writer admin" in _one_line(err)
        assert storage.list_streams() == ["orders"]
        root = {"MESSAGEVAULT_USER": "root", "MESSAGEVAULT_PASSWORD": "root-secret"}
        code, err = _cli(tmp_path, "delete", "orders", "--yes", "--url", server.url, **root)
        assert code == 0, err
        assert storage.list_streams() == []
        code, err = _cli(tmp_path, "delete", "orders", "--yes", "--url", server.url, **root)
        assert code == 1
        assert "not" in _one_line(err)


# Several nodes -----------------------------------------------------------------------------


def _ask(node: Node, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    headers = {**cluster_auth(), "Content-Type": "application/json"}
    request = urllib.request.Request(f"{node.url}{path}", data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


TRIM_LINE = "trimmed stream by its retention policy"


@pytest.mark.parametrize("backend", ["file", "azure"])
def test_several_nodes_the_writer_applies_retention_and_any_node_deletes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage: Storage
    if backend == "azure":
        azurite: Azurite = request.getfixturevalue("azurite")
        storage = request.getfixturevalue("azure_storage")
        location = f"azure:{azurite.connection_string}"
        clear_leases(storage)
    else:
        storage, location = FileStorage(tmp_path), f"file:{tmp_path}"
    try:
        _writer_applies_retention_and_any_node_deletes(storage, location, tmp_path)
    finally:
        if backend == "azure":
            clear_leases(storage)
            delete_policy(storage, STREAM)  # type: ignore[arg-type]


STREAM = "retained"  # not a name other tests use: Azure's system files outlive a test


def _writer_applies_retention_and_any_node_deletes(
    storage: Storage, location: str, tmp_path: Path
) -> None:
    nodes = cluster_of(2, tmp_path, storage=location, arguments=["--retention-interval", "0.2"])
    with (
        nodes as cluster,
        MessageVaultClient(",".join(cluster.urls), user=USER, password=PASSWORD) as client,
    ):
        client.publish(STREAM, [("", "first")])
        writer = cluster.writer_of(STREAM)
        assert writer is not None
        other = next(node for node in cluster.nodes if node is not writer)
        # The policy is set through the node that does not write the stream...
        assert _ask(other, "PUT", f"/streams/{STREAM}/retention", {"max_bytes": 2000}) == 200
        for n in range(30):
            client.publish(STREAM, [("", f"message {n} " + "x" * 100)])
        # ...and the writer applies it, within a few passes.
        checkpoint = storage.open_stream(STREAM).read_checkpoint()
        deadline = time.monotonic() + 30
        while checkpoint.length - checkpoint.first_position > 2000 and time.monotonic() < deadline:
            time.sleep(0.1)
            checkpoint = storage.open_stream(STREAM).read_checkpoint()
        assert 0 < checkpoint.length - checkpoint.first_position <= 2000
        while TRIM_LINE not in writer.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # the log is written behind the trim
        assert TRIM_LINE in writer.log.read_text()
        assert TRIM_LINE not in other.log.read_text()

        # A delete through the node that does not write the stream.
        assert _ask(other, "DELETE", f"/streams/{STREAM}") == 204
        for node in cluster.nodes:
            assert _ask(node, "GET", f"/streams/{STREAM}") == 404
        assert STREAM not in storage.list_streams()
        assert load_policy(storage, STREAM) is None  # type: ignore[arg-type]
        for _ in range(100):  # Azure: a container being deleted refuses a moment
            try:
                (receipt,) = client.publish(STREAM, [("", "again")])
                break
            except StorageError:
                time.sleep(0.1)
        assert (receipt.sequence, receipt.position) == (0, 0)
        assert _ask(writer, "DELETE", "/streams/nothing") == 404
        assert _ask(other, "DELETE", f"/streams/{STREAM}") == 204


async def test_waiting_reads_of_a_deleted_stream_end(aiohttp_client: MakeClient) -> None:
    """A long poll answers 404 and a Server-Sent-Events tail ends with an error event."""
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["a"])
    tail = await client.get(
        "/streams/orders/messages", headers={**ROOT, "Accept": "text/event-stream"}
    )
    assert (await tail.content.readline()).startswith(b"id: ")
    info = await (await client.get("/streams/orders", headers=ROOT)).json()
    end = info["length"]
    poll = asyncio.ensure_future(
        client.get("/streams/orders/messages", params={"from": end, "wait": 30}, headers=ROOT)
    )
    await asyncio.sleep(0.2)  # both wait for the next commit now
    assert (await client.delete("/streams/orders", headers=ROOT)).status == 204
    await error_detail(await asyncio.wait_for(poll, 10), 404, "stream_not_found")
    rest = await asyncio.wait_for(tail.content.read(), 10)  # the tail ends
    event = rest.split(b"event: error\ndata: ")[1]
    assert json.loads(event)["error"] == "stream_not_found"
