"""The storage side of trimming and deleting, backend by backend (the shared rules are
in ``test_storage_contract.py``): the index through direct readers, Azure's checkpoint
v2 metadata and index leases, the file backend's holes and deleted folders.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobLeaseClient

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    CorruptData,
    StaleWriter,
    StorageError,
    StreamLocked,
    StreamNotFound,
    UnsupportedVersion,
)
from messagevault.reader import Reader, RenewingStore
from messagevault.storage import FileStorage, MemoryStorage, open_read_access
from messagevault.storage import file as file_backend
from messagevault.storage.azure import (
    CONTAINER_PREFIX,
    INDEX_INITIAL_SIZE,
    AzureStorage,
    _create_stream,
    open_sas_stream,
)
from messagevault.storage.base import Storage
from messagevault.storage.file import DELETED_PREFIX
from messagevault.storage.file_holes import punch_hole
from messagevault.storage.power_loss import PowerLossStorage


@pytest.mark.parametrize("backend", ["file", "azure"])
def test_direct_readers_read_the_index(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What a consumer holds (a folder path, a container SAS) reaches the index too."""
    storage: Storage = (
        FileStorage(tmp_path / "data")
        if backend == "file"
        else request.getfixturevalue("azure_storage")
    )
    writer = storage.open_stream("orders", write=True, create=True)
    access = writer.read_access()
    direct = RenewingStore(access, lambda: access)
    plain, _ = open_read_access(access)
    assert direct.index_size() == 0  # none yet: and it may appear after a reader opened
    assert plain.read_index(0, 10) == b""
    writer.write_index(0, bytes([7]) * 1024)
    for store in (direct, plain):
        assert store.index_size() >= 1024
        assert store.read_index(0, 1024) == bytes([7]) * 1024
        with pytest.raises(PermissionError):
            store.write_index(0, bytes(512))
        with pytest.raises(PermissionError):
            store.truncate_index(0)
        with pytest.raises(PermissionError):
            store.release(0)
    assert Reader.from_read_access(access).checkpoint() == Checkpoint()
    direct.close()
    plain.close()
    writer.close()


# Azure ------------------------------------------------------------------------------------


def test_azure_checkpoint_v2_round_trips_and_a_damaged_first_position_is_corrupt(
    azure_storage: AzureStorage,
) -> None:
    writer = azure_storage.open_stream("orders", write=True, create=True)
    writer.write(0, bytes(4096))
    trimmed = Checkpoint(commit=1, length=4000, next_sequence=9, first_position=1536)
    writer.advance_checkpoint(trimmed, expected=Checkpoint())
    assert writer.read_checkpoint() == trimmed
    writer.close()
    blob = azure_storage.service.get_blob_client(CONTAINER_PREFIX + "orders", "checkpoint")
    stored = blob.get_blob_properties().metadata
    assert (stored["formatversion"], stored["firstposition"]) == ("2", "1536")
    reader, _ = open_sas_stream(azure_storage.open_stream("orders").read_access().location)
    assert reader.read_checkpoint() == trimmed  # what a direct consumer sees
    for damaged in ("x", "-512", "4001", ""):
        blob.set_blob_metadata({**stored, "firstposition": damaged})
        with pytest.raises(CorruptData, match="damaged checkpoint metadata"):
            reader.read_checkpoint()
    blob.set_blob_metadata({k: v for k, v in stored.items() if k != "firstposition"})
    with pytest.raises(CorruptData, match="damaged checkpoint metadata"):
        reader.read_checkpoint()
    blob.set_blob_metadata({**stored, "formatversion": "3"})
    with pytest.raises(UnsupportedVersion):
        reader.read_checkpoint()
    blob.set_blob_metadata(stored)
    assert reader.read_checkpoint() == trimmed
    untrimmed = {k: v for k, v in stored.items() if k != "firstposition"}
    blob.set_blob_metadata({**untrimmed, "formatversion": "1"})
    assert reader.read_checkpoint().first_position == 0  # v1: never trimmed
    reader.close()


def test_azure_index_blob_grows_by_doubling_in_whole_pages(azure_storage: AzureStorage) -> None:
    writer = azure_storage.open_stream("orders", write=True, create=True)
    writer.write_index(0, bytes([1]) * 512)
    assert writer.index_size() == INDEX_INITIAL_SIZE
    writer.write_index(INDEX_INITIAL_SIZE, bytes([2]) * 512)
    assert writer.index_size() == 2 * INDEX_INITIAL_SIZE
    assert writer.read_index(512, 512) == bytes(512)  # zeros between entries
    writer.truncate_index(1024)
    assert writer.index_size() == 1024
    writer.close()


def test_azure_writer_takes_the_index_back_from_a_deposed_writers_lease(
    azure_storage: AzureStorage,
) -> None:
    """A deposed writer that leased the index after the takeover cannot keep it."""
    deposed = azure_storage.open_stream("orders", write=True, create=True)
    writer = azure_storage.open_stream("orders", write=True, takeover=True)
    # No index existed at the takeover: the deposed writer's first index write
    # finds its data lease gone and changes nothing.
    with pytest.raises(StaleWriter):
        deposed.write_index(0, bytes([1]) * 512)
    assert writer.index_size() == 0
    # One that slipped in between (leased the index under its own id):
    index = azure_storage.service.get_blob_client(CONTAINER_PREFIX + "orders", "index")
    index.create_page_blob(INDEX_INITIAL_SIZE)
    BlobLeaseClient(index, lease_id=str(uuid.uuid4())).acquire(lease_duration=-1)
    writer.write_index(0, bytes([2]) * 512)  # still the writer: takes it over
    assert writer.read_index(0, 512) == bytes([2]) * 512
    with pytest.raises(StaleWriter):
        deposed.write_index(0, bytes([1]) * 512)
    writer.close()
    deposed.close()


def test_azure_delete_of_a_crashed_writers_stream_needs_takeover(
    azure_storage: AzureStorage,
) -> None:
    crashed = azure_storage.open_stream("orders", write=True, create=True)
    crashed.write_index(0, bytes(512))
    reader = azure_storage.open_stream("orders")
    # Never closed: its infinite leases stay, as after a crash.
    with pytest.raises(StreamLocked, match="takeover"):
        azure_storage.delete_stream("orders")
    assert azure_storage.list_streams() == ["orders"]
    azure_storage.delete_stream("orders", takeover=True)
    assert azure_storage.list_streams() == []
    with pytest.raises(StreamNotFound):
        reader.read_checkpoint()  # a handle open before the delete
    with pytest.raises(StreamNotFound):
        reader.read(0, 10)
    assert reader.read_index(0, 10) == b""  # no index: a seek would scan, and find no stream
    reader.close()
    crashed.close()
    fresh = azure_storage.open_stream("orders", write=True, create=True)
    assert fresh.read_checkpoint() == Checkpoint()
    assert fresh.index_size() == 0
    fresh.close()


class _ContainerBeingDeleted:
    """A container client whose container Azure is still deleting (Azurite never is)."""

    container_name = CONTAINER_PREFIX + "orders"

    def create_container(self, **_: Any) -> None:
        error = ResourceExistsError(message="The specified container is being deleted.")
        error.error_code = "ContainerBeingDeleted"  # type: ignore[attr-defined]
        error.status_code = 409
        raise error

    def get_blob_client(self, name: str) -> Any:
        raise AssertionError(f"no blob ({name}) of a container being deleted is touched")


def test_azure_recreating_a_stream_still_being_deleted_is_a_retriable_error() -> None:
    with pytest.raises(StorageError, match="still being deleted; try again") as raised:
        _create_stream(_ContainerBeingDeleted(), "orders")  # type: ignore[arg-type]
    assert raised.value.retriable
    assert "Traceback" not in str(raised.value)


# File -------------------------------------------------------------------------------------


def test_file_delete_leaves_nothing_and_a_crashed_delete_is_finished(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    writer = storage.open_stream("orders", write=True, create=True)
    writer.write_index(0, b"entries")
    writer.close()
    storage.open_stream("billing", create=True).close()
    storage.delete_stream("orders")
    assert sorted(p.name for p in storage.root.iterdir()) == ["billing"]
    # A crash after the rename aside leaves the folder: never listed, then removed.
    leftover = storage.root / f"{DELETED_PREFIX}orders-0badf00d"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"old frames")
    (leftover / "checkpoint").write_bytes(Checkpoint().encode() * 2)
    assert storage.list_streams() == ["billing"]
    assert not leftover.exists()
    leftover.mkdir()
    storage.delete_stream("billing")
    assert list(storage.root.iterdir()) == []


def test_file_delete_is_refused_while_a_server_node_writes_under_a_lease(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    lease = storage.leases().acquire(
        "streams/orders", holder="n1", address="http://127.0.0.1:1", duration=30
    )
    writer = storage.open_stream("orders", write=True, create=True, lease=lease)
    with pytest.raises(StreamLocked, match="lease"):
        storage.delete_stream("orders")
    writer.close()
    storage.delete_stream("orders")
    assert storage.list_streams() == []


def test_file_reader_opened_after_delete_finds_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    storage.open_stream("orders", create=True).close()
    access = storage.open_stream("orders").read_access()
    storage.delete_stream("orders")
    with pytest.raises(StreamNotFound):
        open_read_access(access)


def test_file_release_where_holes_cannot_be_punched_frees_nothing_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(file_backend, "punch_hole", lambda fd, offset, length: False)
    storage = FileStorage(tmp_path / "data")
    store = storage.open_stream("orders", write=True, create=True)
    store.write(0, b"\x01" * 65536)
    trimmed = Checkpoint(commit=1, length=65536, first_position=32768)
    store.advance_checkpoint(trimmed, expected=Checkpoint())
    with caplog.at_level(logging.WARNING, logger="messagevault.storage.file"):
        assert store.release(32768) == 0
        assert store.release(32768) == 0
    assert [r.getMessage() for r in caplog.records].count(
        f"the filesystem of {storage.root} cannot punch holes: trimmed streams keep their "
        "disk space (readers still stop at the first readable position)"
    ) == 1
    assert store.read(0, 65536) == b"\x01" * 65536  # nothing changed; the trim still holds
    assert store.read_checkpoint() == trimmed
    store.close()


def test_punch_hole_zeroes_the_range_and_keeps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x01" * 20000)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            punch_hole(fd, -1, 10)
        with pytest.raises(ValueError):
            punch_hole(fd, 0, -10)
        assert punch_hole(fd, 0, 0)
        if punch_hole(fd, 100, 9000):
            assert os.pread(fd, 20000, 0) == b"\x01" * 100 + bytes(9000) + b"\x01" * 10900
        assert os.fstat(fd).st_size == 20000
    finally:
        os.close(fd)
    read_only = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="fallocate"):
            punch_hole(read_only, 0, 4096)
    finally:
        os.close(read_only)


# The fault-injecting wrapper passes it all through --------------------------------------


@pytest.mark.parametrize("inner", ["file", "memory"])
def test_power_loss_storage_passes_the_index_release_and_delete_through(
    inner: str, tmp_path: Path
) -> None:
    base = FileStorage(tmp_path / "data") if inner == "file" else MemoryStorage()
    with PowerLossStorage(base, seed=1) as power:
        store = power.open_stream("orders", write=True, create=True)
        store.write(0, b"\x02" * 8192)
        store.advance_checkpoint(
            Checkpoint(commit=1, length=8192, first_position=4096), expected=Checkpoint()
        )
        store.write_index(0, bytes([3]) * 512)
        assert (store.index_size(), store.read_index(0, 512)) == (512, bytes([3]) * 512)
        store.truncate_index(0)
        assert store.index_size() == 0
        assert store.release(4096) >= 0
        assert store.read(0, 4096) == bytes(4096)
        with pytest.raises(StreamLocked):
            power.delete_stream("orders")
        store.close()
        power.delete_stream("orders")
        assert power.list_streams() == []
        again = power.open_stream("orders", write=True, create=True)  # a new stream, watched
        assert again.read_checkpoint() == Checkpoint()
        again.close()
