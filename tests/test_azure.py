"""Azure-only behaviour, on a real Azurite: fencing, SAS readers, leases, layout."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry
from click.testing import CliRunner

from messagevault import (
    AccessDenied,
    CorruptData,
    Message,
    Reader,
    StaleWriter,
    StorageError,
    StreamLocked,
    Writer,
)
from messagevault.cli import main
from messagevault.errors import LeaseHeld, LeaseLost
from messagevault.server import StreamHub, create_app
from messagevault.storage import ReadAccess, open_read_access
from messagevault.storage.azure import (
    CHECKPOINT_BLOB,
    CONTAINER_PREFIX,
    DATA_BLOB,
    INITIAL_SIZE,
    LEADER_LOCK_BLOB,
    SYSTEM_CONTAINER,
    AzureStorage,
    azure_errors,
)
from tests.azure_observed import observed_storage
from tests.azurite import Azurite


def _values(
    storage: AzureStorage, name: str = "orders", *, after: Writer | None = None
) -> list[bytes]:
    """What a direct reader sees; ``after``'s checkpoint updates landed first.

    The checkpoint update runs behind the append (pipelined), so a reader
    sees an acknowledged append a little later; reading the checkpoint
    through the writer's handle waits for it.
    """
    if after is not None:
        after._store.read_checkpoint()
    return [m.value for m in Reader.open(storage, name).read()]


def test_layout_container_blobs_and_checkpoint_metadata(azure_storage: AzureStorage) -> None:
    with Writer.open(azure_storage, "orders") as writer:
        result = writer.append([(b"k", b"v" * 1000)])
    container = azure_storage.service.get_container_client("mv-orders")
    data = container.get_blob_client(DATA_BLOB).get_blob_properties()
    assert data.blob_type == "PageBlob"
    assert data.size % 512 == 0
    assert data.size >= INITIAL_SIZE
    metadata = container.get_blob_client(CHECKPOINT_BLOB).get_blob_properties().metadata
    assert metadata["length"] == str(result.committed_length)
    assert metadata["nextsequence"] == "1"
    assert metadata["commit"] == "1"
    assert metadata["formatversion"] == "1"


def test_data_blob_grows_in_large_steps(azure_storage: AzureStorage) -> None:
    blob = azure_storage.service.get_container_client("mv-orders").get_blob_client(DATA_BLOB)
    sizes = set()
    with Writer.open(azure_storage, "orders") as writer:
        for n in range(12):
            writer.append([(b"k", bytes([n]) * 1_000_000)])
            sizes.add(blob.get_blob_properties().size)
    # 12 MB of frames, yet only a few resizes, each to a multiple of 4 MiB.
    assert len(sizes) <= 3
    assert all(size % INITIAL_SIZE == 0 for size in sizes)
    assert len(_values(azure_storage)) == 12


def test_takeover_fences_the_old_writer(azure_storage: AzureStorage) -> None:
    old = Writer.open(azure_storage, "orders")
    old.append([(b"k", b"old-1")])
    with pytest.raises(StreamLocked, match="takeover"):
        Writer.open(azure_storage, "orders")
    new = Writer.open(azure_storage, "orders", takeover=True)
    new.append([(b"k", b"new-1")])
    with pytest.raises(StaleWriter):
        old.append([(b"k", b"old-2")])
    with pytest.raises(StaleWriter):
        old.append([(b"k", b"old-3")])
    assert _values(azure_storage, after=new) == [b"old-1", b"new-1"]
    new.append([(b"k", b"new-2")])
    assert _values(azure_storage, after=new) == [b"old-1", b"new-1", b"new-2"]
    old.close()
    new.close()


def test_takeover_before_the_new_writer_commits(azure_storage: AzureStorage) -> None:
    """The deposed writer cannot commit even while the new one has written nothing."""
    old = Writer.open(azure_storage, "orders")
    old.append([(b"k", b"old-1")])
    new = Writer.open(azure_storage, "orders", takeover=True)
    with pytest.raises(StaleWriter):
        old.append([(b"k", b"old-2")])
    new.append([(b"k", b"new-1")])
    assert _values(azure_storage, after=new) == [b"old-1", b"new-1"]
    old.close()
    new.close()


def test_stale_checkpoint_etag_is_refused(azure_storage: AzureStorage) -> None:
    """Even holding the lease, a writer with an out-of-date view cannot commit.

    The checkpoint update runs behind the append (pipelined), so the append
    that meets the moved checkpoint is acknowledged (its data is stored); its
    update fails, and from then on the handle refuses everything.
    """
    store = azure_storage.open_stream("orders", write=True, create=True)
    writer = Writer(store, "orders")
    writer.append([(b"k", b"one")])
    assert store.read_checkpoint() == writer.checkpoint  # its update landed
    # Someone with the lease id moves the checkpoint behind the writer's back.
    blob = azure_storage.service.get_container_client("mv-orders").get_blob_client(CHECKPOINT_BLOB)
    metadata = blob.get_blob_properties().metadata
    blob.set_blob_metadata({**metadata, "commit": "7"}, lease=store._lease_id)
    writer.append([(b"k", b"two")])
    with pytest.raises(StaleWriter, match="another writer"):
        store.read_checkpoint()
    with pytest.raises(StaleWriter):
        writer.append([(b"k", b"three")])
    assert blob.get_blob_properties().metadata["commit"] == "7"  # nothing of ours after it
    writer.close()


def test_sas_reader_reads_and_follows_without_the_account_key(
    azure_storage: AzureStorage,
) -> None:
    with Writer.open(azure_storage, "orders") as writer:
        writer.append([(b"k", b"first"), (b"k", b"second")])
        access = writer.read_access()
        assert access.kind == "azure-sas"
        assert "sig=" in access.location
        assert "AccountKey" not in access.location
        assert access.expires_at is not None
        assert 0 < access.expires_at - time.time() <= 3600 + 5  # hours, not years

        reader = Reader.from_read_access(access)
        # A reader of storage sees a commit once the writer's background checkpoint
        # update lands (docs/OPERATIONS.md): a moment after the append returned.
        deadline = time.monotonic() + 20
        while not (read := [m.value for m in reader.read()]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert read == [b"first", b"second"]
        stop = threading.Event()
        seen: list[Message] = []
        thread = threading.Thread(
            target=lambda: seen.extend(reader.follow(poll_interval=0.02, stop=stop))
        )
        thread.start()
        writer.append([(b"k", b"third")])
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        thread.join(timeout=20)
    assert [m.value for m in seen] == [b"first", b"second", b"third"]


def test_sas_cannot_write(azure_storage: AzureStorage) -> None:
    with Writer.open(azure_storage, "orders") as writer:
        writer.append([(b"k", b"v")])
        access = writer.read_access()
    store, name = open_read_access(access)
    assert name == "orders"
    with pytest.raises(AccessDenied):
        store.write(0, bytes(512))
    # Straight through the SDK with the SAS URL: the service itself refuses.
    container = ContainerClient.from_container_url(access.location)
    with pytest.raises(AccessDenied), azure_errors("write through a SAS"):
        container.get_blob_client(DATA_BLOB).upload_page(bytes(512), offset=0, length=512)
    with pytest.raises(AccessDenied), azure_errors("metadata through a SAS"):
        container.get_blob_client(CHECKPOINT_BLOB).set_blob_metadata({"length": "0"})
    assert _values(azure_storage) == [b"v"]
    store.close()


def test_tampered_sas_is_refused(azure_storage: AzureStorage) -> None:
    with Writer.open(azure_storage, "orders") as writer:
        writer.append([(b"k", b"v")])
        access = writer.read_access()
    tampered = access.location.replace("sp=rl", "sp=rwl")
    with pytest.raises(AccessDenied):
        open_read_access(type(access)(access.kind, tampered, access.expires_at))
    url = access.location.replace("?", f"/{DATA_BLOB}?")
    request = urllib.request.Request(url, headers={"x-ms-range": "bytes=0-63"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read()[:4] == b"MVLB"  # plain HTTP readers work too


def test_damaged_checkpoint_metadata_is_reported(azure_storage: AzureStorage) -> None:
    with Writer.open(azure_storage, "orders") as writer:
        writer.append([(b"k", b"v")])
    blob = azure_storage.service.get_container_client("mv-orders").get_blob_client(CHECKPOINT_BLOB)
    blob.set_blob_metadata({"formatversion": "1", "length": "eleven"})
    with pytest.raises(CorruptData, match="checkpoint"):
        Reader.open(azure_storage, "orders")


def test_leases_between_two_holders(azure_storage: AzureStorage, azurite: Azurite) -> None:
    # Two nodes with their own clients, competing for the leader lock.
    other_node = AzureStorage.from_connection_string(azurite.connection_string)
    first, second = azure_storage.leader_lease(), other_node.leader_lease()
    assert first.lease_id != second.lease_id
    try:
        first.acquire(duration=15)
        first.acquire(duration=15)  # idempotent for the holder
        with pytest.raises(LeaseHeld):
            second.acquire(duration=15)
        first.renew()
        first.release()
        first.release()  # idempotent
        second.acquire(duration=15)
        with pytest.raises(LeaseLost):
            first.renew()
        first.break_()  # takeover by force
        with pytest.raises(LeaseLost):
            second.renew()
        first.acquire(duration=-1)
        first.release()
        with pytest.raises(ValueError, match="15-60"):
            first.acquire(duration=10)
    finally:
        for lease in (first, second):
            lease.release()
    names = {blob.name for blob in azure_storage.system_container().list_blobs()}
    assert LEADER_LOCK_BLOB in names
    azure_storage.service.delete_container(SYSTEM_CONTAINER)


def test_unreachable_storage_is_a_storage_error() -> None:
    # No retries here: the retry policy itself is exercised by test_azure_faults.py.
    service = BlobServiceClient.from_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=bm90LWEta2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;",
        retry_policy=ExponentialRetry(retry_total=0),
    )
    unreachable = AzureStorage(service)
    with pytest.raises(StorageError, match="cannot list streams"):
        unreachable.list_streams()
    with pytest.raises(StorageError):
        unreachable.open_stream("orders")


def test_expired_sas_is_refused_and_a_renewing_reader_carries_on(azurite: Azurite) -> None:
    storage = AzureStorage.from_connection_string(
        azurite.connection_string, sas_expiry=timedelta(seconds=2)
    )
    try:
        with Writer.open(storage, "short-lived") as writer:
            writer.append([(b"k", b"one")])
            access = writer.read_access()
            renewals: list[ReadAccess] = []

            def renew() -> ReadAccess:
                renewals.append(writer.read_access())
                return renewals[-1]

            plain = Reader.from_read_access(access)
            renewing = Reader.from_read_access(access, refresh=renew)
            assert [m.value for m in renewing.read()] == [b"one"]
            time.sleep(3)  # both SAS URLs have now expired
            writer.append([(b"k", b"two")])
            with pytest.raises(AccessDenied):
                plain.checkpoint()
            assert [m.value for m in renewing.read()] == [b"one", b"two"]
            assert renewals  # it did fetch a new SAS
            plain.close()
            renewing.close()
    finally:
        storage.service.delete_container("mv-short-lived")


@pytest.mark.parametrize("chunk_size", [3000, 64 * 1024])
def test_read_ahead_across_chunk_and_frame_boundaries(
    azure_storage: AzureStorage, chunk_size: int
) -> None:
    batches = [[(b"k%d" % n, bytes([n]) * (n * 997 % 9_000))] * (1 + n % 3) for n in range(30)]
    with Writer.open(azure_storage, "orders") as writer:
        for batch in batches:
            writer.append(batch)
        access = writer.read_access()
    expected = [pair for batch in batches for pair in batch]
    store, name = open_read_access(access)
    reader = Reader(store, name, chunk_size=chunk_size)
    messages = list(reader.read())
    assert [(m.key, m.value) for m in messages] == expected
    middle = messages[len(messages) // 2]
    assert [m.value for m in reader.read(middle.position)] == [
        value for _, value in expected[len(messages) // 2 :]
    ]
    assert reader.verify().messages == len(expected)
    reader.close()


def test_a_reader_renews_access_that_expired_before_it_was_opened(
    azure_storage: AzureStorage,
) -> None:
    """A consumer restarting with a saved SAS URL renews it first, instead of failing."""
    with Writer.open(azure_storage, "orders") as writer:
        writer.append([(b"k", b"v")])
        azure_storage.sas_expiry = timedelta(seconds=-60)
        expired = writer.read_access()
        azure_storage.sas_expiry = timedelta(hours=1)
        fresh = writer.read_access()
    renewals: list[ReadAccess] = []

    def refresh() -> ReadAccess:
        renewals.append(fresh)
        return fresh

    with Reader.from_read_access(expired, refresh=refresh) as reader:
        assert [m.value for m in reader.read()] == [b"v"]
    assert len(renewals) == 1


async def test_a_stream_being_created_is_left_out_of_the_list(
    azure_storage: AzureStorage, azurite: Azurite, aiohttp_client: Any
) -> None:
    # Azure creates a stream's container, then its data blob, then its
    # checkpoint: another node's stream in the middle of that is no stream yet.
    # GET /streams used to fail with 404 on it (seen as bench-cluster's stress
    # failing at start while other processes created their streams).
    with Writer.open(azure_storage, "whole-stream") as writer:
        writer.append([(b"", b"v")])
    azure_storage.service.create_container(CONTAINER_PREFIX + "half-made")
    client = await aiohttp_client(create_app(StreamHub(azure_storage)))
    answer = await client.get("/streams")
    assert answer.status == 200, await answer.text()
    assert [s["stream"] for s in (await answer.json())["streams"]] == ["whole-stream"]
    listed = CliRunner().invoke(
        main,
        ["streams", "--format", "ndjson"],
        env={"MESSAGEVAULT_STORAGE": f"azure:{azurite.connection_string}"},
    )
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["stream"] for line in listed.output.splitlines()] == ["whole-stream"]


def test_system_files_cost_one_request_each_once_the_container_is_made(azurite: Azurite) -> None:
    storage, transport = observed_storage(azurite.connection_string)
    try:
        storage.write_system_file("counted.json", b"{}")  # makes the container, and the lock
        before = sum(transport.sent.values())
        assert storage.read_system_file("counted.json") == b"{}"
        storage.write_system_file("counted.json", b'{"v": 2}')
        assert storage.create_system_file("counted-2.json", b"{}")
        assert not storage.create_system_file("counted-2.json", b"[]")
        assert storage.read_system_file("nothing-here.json") is None
        storage.delete_system_file("counted-2.json")
        # Each a single request: none of them makes sure of the container again.
        assert sum(transport.sent.values()) - before == 6
    finally:
        storage.service.delete_container(SYSTEM_CONTAINER)


def test_a_system_container_deleted_by_hand_is_made_again_on_write(azurite: Azurite) -> None:
    storage = AzureStorage.from_connection_string(azurite.connection_string)
    try:
        storage.write_system_file("users.json", b'{"v": 1}')
        storage.service.delete_container(SYSTEM_CONTAINER)
        assert storage.read_system_file("users.json") is None  # gone: no file, no error
        storage.write_system_file("users.json", b'{"v": 2}')
        assert storage.read_system_file("users.json") == b'{"v": 2}'
        storage.service.delete_container(SYSTEM_CONTAINER)
        assert storage.create_system_file("policy.json", b"{}")
        names = {blob.name for blob in storage.system_container().list_blobs()}
        assert names == {"policy.json", LEADER_LOCK_BLOB}  # the leader lock is back too
    finally:
        storage.service.delete_container(SYSTEM_CONTAINER)
