"""The storage contract (``storage/base.py``), run against every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    InvalidStreamName,
    StaleWriter,
    StorageError,
    StreamLocked,
    StreamNotFound,
)
from messagevault.reader import RenewingStore
from messagevault.storage import FileStorage
from messagevault.storage.base import Storage, StreamStore


def _pages(store: StreamStore, data: bytes) -> bytes:
    """Pad ``data`` to whole pages, as a page-blob writer must."""
    return data + bytes(-len(data) % store.page_size)


def test_missing_stream_is_not_found(storage: Storage) -> None:
    with pytest.raises(StreamNotFound, match="nope"):
        storage.open_stream("nope")
    assert storage.list_streams() == []


@pytest.mark.parametrize("name", ["ab", "Orders", "a--b", "-ab", "ab-", "a_b", "x" * 61, "ünï"])
def test_invalid_names_are_rejected_before_touching_storage(storage: Storage, name: str) -> None:
    with pytest.raises(InvalidStreamName):
        storage.open_stream(name, write=True, create=True)
    assert storage.list_streams() == []


def test_create_is_idempotent_and_listed(storage: Storage) -> None:
    for _ in range(2):
        storage.open_stream("orders", create=True).close()
    storage.open_stream("billing-2", create=True).close()
    assert storage.list_streams() == ["billing-2", "orders"]


def test_new_stream_has_empty_checkpoint(storage: Storage) -> None:
    store = storage.open_stream("orders", create=True)
    assert store.read_checkpoint() == Checkpoint()
    store.read(0, 100)  # nothing committed yet; whatever comes back, no error
    store.close()


def test_write_then_read_any_range(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    data = _pages(store, bytes(range(256)) * 20)
    store.write(0, data)
    assert store.read(0, len(data)) == data
    assert store.read(100, 50) == data[100:150]
    assert store.read(len(data) - 10, 10) == data[-10:]
    store.close()


def test_read_is_short_only_at_the_end(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    data = _pages(store, b"x" * 1000)
    store.write(0, data)
    tail = store.read(len(data) - 4, 100)
    # Page blobs are allocated in big steps and read back zeros past the data.
    assert tail[:4] == data[-4:]
    assert tail[4:] == bytes(len(tail) - 4)
    store.close()


def test_checkpoint_advances_and_other_handles_see_it(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    reader = storage.open_stream("orders")
    data = _pages(writer, b"frame bytes")
    writer.write(0, data)
    new = Checkpoint(commit=1, length=11, next_sequence=1, last_frame_position=0, last_timestamp=5)
    writer.advance_checkpoint(new, expected=Checkpoint())
    assert writer.read_checkpoint() == new
    assert reader.read_checkpoint() == new
    assert reader.read(0, 11) == b"frame bytes"
    newer = Checkpoint(commit=2, length=20, next_sequence=2, last_frame_position=11)
    writer.advance_checkpoint(newer, expected=new)
    # Azure stores the checkpoint in the background; the writer's read waits for it.
    assert writer.read_checkpoint() == newer
    assert reader.read_checkpoint() == newer
    writer.close()
    reader.close()


def test_conditional_checkpoint_refuses_a_stale_expectation(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    first = Checkpoint(commit=1, length=10, next_sequence=1)
    store.advance_checkpoint(first, expected=Checkpoint())
    with pytest.raises(StaleWriter):
        store.advance_checkpoint(Checkpoint(commit=2, length=99), expected=Checkpoint())
    assert store.read_checkpoint() == first
    store.close()


def test_single_writer_lock(storage: Storage) -> None:
    first = storage.open_stream("orders", write=True, create=True)
    with pytest.raises(StreamLocked, match="orders"):
        storage.open_stream("orders", write=True)
    reader = storage.open_stream("orders")  # readers are never locked out
    reader.close()
    first.close()
    first.close()  # idempotent
    second = storage.open_stream("orders", write=True)
    second.close()


def test_read_only_handle_cannot_write(storage: Storage) -> None:
    storage.open_stream("orders", create=True).close()
    store = storage.open_stream("orders")
    with pytest.raises(PermissionError):
        store.write(0, _pages(store, b"x"))
    with pytest.raises(PermissionError):
        store.advance_checkpoint(Checkpoint(commit=1, length=1), expected=Checkpoint())
    assert store.read_checkpoint() == Checkpoint()
    store.close()


def test_write_limits(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    with pytest.raises(ValueError, match="exceeds"):
        store.write(0, bytes(store.max_write_size + store.page_size))
    if store.page_size > 1:
        with pytest.raises(ValueError, match="pages"):
            store.write(1, bytes(store.page_size))
        with pytest.raises(ValueError, match="pages"):
            store.write(0, bytes(store.page_size + 1))
    store.write(0, bytes(store.max_write_size))  # exactly the limit is fine
    store.close()


def test_read_access_descriptor(storage: Storage) -> None:
    store = storage.open_stream("orders", create=True)
    access = store.read_access()
    assert access.kind in {"file", "memory", "azure-sas"}
    assert access.location
    store.close()


def test_describe_names_the_backend(storage: Storage) -> None:
    assert storage.describe()


def test_closed_handle_refuses_io(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.read(0, 1)
    with pytest.raises(ValueError, match="closed"):
        store.read_checkpoint()
    with pytest.raises(ValueError, match="closed"):
        store.write(0, bytes(store.page_size))


def test_system_files(storage: Storage) -> None:
    files = storage  # every backend keeps small system files beside the streams
    assert files.read_system_file("users.json") is None  # type: ignore[attr-defined]
    files.write_system_file("users.json", b'{"v": 1}')  # type: ignore[attr-defined]
    files.write_system_file("users.json", b'{"v": 2}')  # type: ignore[attr-defined]
    assert files.read_system_file("users.json") == b'{"v": 2}'  # type: ignore[attr-defined]
    assert storage.list_streams() == []  # not mistaken for a stream


def test_side_objects_are_replaced_whole_and_read_by_any_handle(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    reader = storage.open_stream("orders")
    assert writer.read_side("producers") is None
    assert reader.read_side("producers") is None
    big = bytes(range(256)) * 5000  # over a megabyte: more than one block or write
    writer.write_side("producers", big)
    assert reader.read_side("producers") == big
    writer.write_side("producers", b"v2")  # shorter: nothing of the old left behind
    writer.write_side("summary", b"")
    assert reader.read_side("producers") == b"v2"
    assert reader.read_side("summary") == b""
    assert reader.read_checkpoint() == Checkpoint()  # side objects are not commits
    writer.close()
    reader.close()
    again = storage.open_stream("orders")
    assert again.read_side("producers") == b"v2"
    again.close()
    assert storage.list_streams() == ["orders"]  # not mistaken for a stream


def test_side_objects_belong_to_their_stream(storage: Storage) -> None:
    orders = storage.open_stream("orders", write=True, create=True)
    billing = storage.open_stream("billing", write=True, create=True)
    orders.write_side("producers", b"orders")
    assert billing.read_side("producers") is None
    orders.close()
    billing.close()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "data",
        "checkpoint",
        "index",
        "writer.lock",
        ".producers",
        "../x",
        "a/b",
        "Producers",
        "a--b",
        "-ab",
        "ab-",
        "1ab",
        "a_b",
        "x" * 33,
        "ünï",
    ],
)
def test_bad_side_names_are_refused_and_change_nothing(storage: Storage, name: str) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    store.write(0, _pages(store, b"frame"))
    with pytest.raises(ValueError, match="side object name"):
        store.write_side(name, b"junk")
    with pytest.raises(ValueError, match="side object name"):
        store.read_side(name)
    assert store.read(0, 5) == b"frame"
    assert store.read_checkpoint() == Checkpoint()
    store.close()
    assert storage.list_streams() == ["orders"]


def test_read_only_handle_cannot_write_side_objects(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    writer.write_side("producers", b"old")
    reader = storage.open_stream("orders")
    with pytest.raises(PermissionError):
        reader.write_side("producers", b"new")
    assert reader.read_side("producers") == b"old"
    writer.close()
    reader.close()


def test_closed_handle_refuses_side_objects(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.read_side("producers")
    with pytest.raises(ValueError, match="closed"):
        store.write_side("producers", b"x")


@pytest.mark.parametrize("backend", ["file", "azure"])
def test_direct_readers_read_side_objects(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What a consumer holds (a folder path, a container SAS) reaches side objects too."""
    storage: Storage = (
        FileStorage(tmp_path / "data")
        if backend == "file"
        else request.getfixturevalue("azure_storage")
    )
    writer = storage.open_stream("orders", write=True, create=True)
    writer.write_side("producers", b"snapshot")
    access = writer.read_access()
    direct = RenewingStore(access, lambda: access)
    assert direct.read_side("producers") == b"snapshot"
    assert direct.read_side("summary") is None
    with pytest.raises(PermissionError):
        direct.write_side("producers", b"new")
    direct.close()
    writer.close()


def test_file_side_object_write_that_fails_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed replace (standing in for a crash before the rename) keeps the old bytes."""
    storage = FileStorage(tmp_path / "data")
    store = storage.open_stream("orders", write=True, create=True)
    store.write_side("producers", b"old")

    def no_rename(self: Path, target: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", no_rename)
    with pytest.raises(StorageError, match="cannot write producers of stream 'orders'"):
        store.write_side("producers", b"new")
    monkeypatch.undo()
    assert store.read_side("producers") == b"old"
    folder = tmp_path / "data" / "orders"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint",
        "data",
        "producers",
        "writer.lock",
    ]  # no temp file left behind
    store.close()
