"""The storage contract (``storage/base.py``), run against every backend."""

from __future__ import annotations

import os
import uuid
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
from messagevault.storage.azure import CONTAINER_PREFIX, AzureStorage
from messagevault.storage.base import Storage, StreamStore
from messagevault.storage.leases import HeldLease


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


# The index object, release and delete_stream (issue 14) -----------------------------------


def _index_pages(store: StreamStore, count: int, fill: int) -> bytes:
    """``count`` 512-byte pages of ``fill``: whole pages on every backend."""
    del store
    return bytes([fill]) * (512 * count)


def test_a_stream_has_no_index_until_one_is_written(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    reader = storage.open_stream("orders")
    for store in (writer, reader):
        assert store.index_size() == 0
        assert store.read_index(0, 100) == b""
    writer.close()
    reader.close()


def test_index_writes_are_read_back_by_any_handle(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    reader = storage.open_stream("orders")  # opened before the index exists
    first, second = _index_pages(writer, 2, 1), _index_pages(writer, 1, 2)
    writer.write_index(0, first)
    writer.write_index(len(first), memoryview(second))
    entries = first + second
    for store in (writer, reader):
        size = store.index_size()
        assert size >= len(entries)
        if store.page_size > 1:
            assert size % store.page_size == 0
        assert store.read_index(0, len(entries)) == entries
        assert store.read_index(100, 50) == entries[100:150]
        # Past the entries: zeros (page backends keep whole, grown pages) or nothing.
        assert store.read_index(len(entries), size - len(entries)) == bytes(size - len(entries))
        assert store.read_index(size - 4, 100) == store.read_index(size - 4, 4)
        assert store.read_index(size, 10) == b""
    writer.write_index(512, _index_pages(writer, 1, 3))  # rewrite in place
    assert reader.read_index(0, len(entries)) == first[:512] + bytes([3]) * 512 + second
    assert reader.read_checkpoint() == Checkpoint()  # the index is no commit
    assert writer.read(0, 10) in (b"", bytes(10))  # nor is it data
    writer.close()
    reader.close()
    again = storage.open_stream("orders")
    assert again.read_index(0, 1024) == first[:512] + bytes([3]) * 512
    again.close()


def test_truncate_index_cuts_and_a_missing_index_stays_missing(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    writer.truncate_index(0)
    writer.truncate_index(4096)
    assert writer.index_size() == 0
    writer.write_index(0, _index_pages(writer, 3, 7))
    writer.truncate_index(512)
    reader = storage.open_stream("orders")
    assert reader.index_size() == 512
    assert reader.read_index(0, 2048) == bytes([7]) * 512
    writer.truncate_index(4096)  # never grows it
    assert reader.index_size() == 512
    writer.truncate_index(0)
    assert reader.index_size() == 0
    assert reader.read_index(0, 10) == b""
    writer.write_index(1024, _index_pages(writer, 1, 9))  # rebuilt after a cut: zeros before
    assert reader.read_index(0, 1536) == bytes(1024) + bytes([9]) * 512
    writer.close()
    reader.close()


def test_bad_index_writes_are_refused_and_change_nothing(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    store.write_index(0, _index_pages(store, 1, 5))
    with pytest.raises(ValueError, match="exceeds"):
        store.write_index(0, bytes(store.max_write_size + 512))
    with pytest.raises(ValueError):
        store.write_index(-512, bytes(512))
    with pytest.raises(ValueError, match="negative"):
        store.read_index(-1, 10)
    with pytest.raises(ValueError):
        store.truncate_index(-512)
    if store.page_size > 1:
        with pytest.raises(ValueError, match="pages"):
            store.write_index(1, bytes(512))
        with pytest.raises(ValueError, match="pages"):
            store.write_index(0, bytes(513))
        with pytest.raises(ValueError, match="pages"):
            store.truncate_index(100)
    assert store.read_index(0, 512) == bytes([5]) * 512
    store.close()


def test_read_only_handles_cannot_change_the_index_or_release(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    writer.write_index(0, _index_pages(writer, 1, 4))
    reader = storage.open_stream("orders")
    with pytest.raises(PermissionError):
        reader.write_index(0, bytes(512))
    with pytest.raises(PermissionError):
        reader.truncate_index(0)
    with pytest.raises(PermissionError):
        reader.release(0)
    assert reader.read_index(0, 512) == bytes([4]) * 512
    writer.close()
    reader.close()


def test_closed_handle_refuses_the_index_and_release(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    store.close()
    for call in (
        store.index_size,
        lambda: store.read_index(0, 1),
        lambda: store.write_index(0, bytes(512)),
        lambda: store.truncate_index(0),
        lambda: store.release(0),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()


def _trimmed(store: StreamStore, data: bytes, first_position: int) -> Checkpoint:
    """Write ``data`` and commit it trimmed below ``first_position``; the checkpoint."""
    store.write(0, data)
    checkpoint = Checkpoint(
        commit=1, length=len(data), next_sequence=10, first_position=first_position
    )
    store.advance_checkpoint(checkpoint, expected=Checkpoint())
    assert store.read_checkpoint() == checkpoint
    return checkpoint


def _stored_bytes_below(storage: Storage, name: str, end: int) -> int:
    """Bytes of stream ``name``'s data in ``[0, end)`` its backend still stores."""
    if isinstance(storage, FileStorage):
        return os.stat(storage.root / name / "data").st_blocks * 512  # the whole file's
    if isinstance(storage, AzureStorage):
        blob = storage.service.get_blob_client(CONTAINER_PREFIX + name, "data")
        return sum(
            min((r.end or 0) + 1, end) - (r.start or 0)
            for r in blob.list_page_ranges(offset=0, length=end)
            if not r.cleared
        )
    reader = storage.open_stream(name)  # memory: what is not zero
    try:
        return sum(1 for byte in reader.read(0, end) if byte)
    finally:
        reader.close()


def test_release_frees_whole_pages_below_the_first_position(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    data = bytes(range(1, 256)) * 1028  # 262,140 bytes, not a zero among them
    data = _pages(store, data)
    first = 200_000 + 100  # neither a page nor a block boundary
    checkpoint = _trimmed(store, data, first)
    cleared = first // 512 * 512  # whole pages on Azure; file and memory zero all of it
    stored_before = _stored_bytes_below(storage, "orders", cleared)
    released = store.release(first)
    assert released > 0
    assert released <= cleared + 4096
    assert _stored_bytes_below(storage, "orders", cleared) < stored_before
    reader = storage.open_stream("orders")
    assert reader.read(0, cleared) == bytes(cleared)
    assert reader.read(first, len(data) - first) == data[first:]  # the rest untouched
    assert reader.read_checkpoint() == checkpoint
    # Idempotent: again, or less, frees nothing more and is no error.
    assert store.release(first) == 0
    assert store.release(first - 5000) == 0
    assert store.release(0) == 0
    assert reader.read(first, len(data) - first) == data[first:]
    reader.close()
    store.close()


def test_storage_is_released_on_each_backend(storage: Storage) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    data = b"\xa5" * (1024 * 1024)
    _trimmed(store, data, 768 * 1024)
    before = _stored_bytes_below(storage, "orders", 768 * 1024)
    store.release(768 * 1024)
    after = _stored_bytes_below(storage, "orders", 768 * 1024)
    if isinstance(storage, FileStorage):
        assert after <= before - 768 * 1024  # the file's blocks (or the test's disk can't punch)
    else:
        assert (before, after) == (768 * 1024, 0)
    store.close()


@pytest.mark.parametrize("below", [1, 513, 10_000, -1, True, 1.5, "512"])
def test_release_above_the_first_position_is_refused_and_changes_nothing(
    storage: Storage, below: object
) -> None:
    store = storage.open_stream("orders", write=True, create=True)
    data = _pages(store, b"\x01" * 2000)
    checkpoint = _trimmed(store, data, 512) if below != 1 else None
    if checkpoint is None:  # an untrimmed stream releases nothing at all
        store.write(0, data)
    with pytest.raises(ValueError, match="release"):
        store.release(below)  # type: ignore[arg-type]
    assert store.read(0, len(data)) == data
    store.close()


def test_delete_a_missing_stream_or_a_bad_name(storage: Storage) -> None:
    storage.open_stream("orders", create=True).close()
    with pytest.raises(StreamNotFound, match="nope"):
        storage.delete_stream("nope")
    for name in ("ab", "Orders", "a--b", "../orders", "_system", ".orders", "x" * 61):
        with pytest.raises(InvalidStreamName):
            storage.delete_stream(name)
    assert storage.list_streams() == ["orders"]


def test_delete_is_refused_while_a_writer_holds_the_stream(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    data = _pages(writer, b"keep me")
    writer.write(0, data)
    committed = Checkpoint(commit=1, length=7, next_sequence=1)
    writer.advance_checkpoint(committed, expected=Checkpoint())
    writer.write_index(0, bytes([1]) * 512)
    with pytest.raises(StreamLocked, match="orders"):
        storage.delete_stream("orders")  # the caller's own writer counts: close it first
    assert storage.list_streams() == ["orders"]
    writer.write(len(data), _pages(writer, b"more"))  # the writer carries on
    reader = storage.open_stream("orders")
    assert reader.read_checkpoint() == committed
    assert reader.read(0, 7) == b"keep me"
    assert reader.read_index(0, 512) == bytes([1]) * 512
    reader.close()
    writer.close()


def test_a_deleted_stream_is_gone_and_comes_back_empty(storage: Storage) -> None:
    writer = storage.open_stream("orders", write=True, create=True)
    data = _pages(writer, b"old frames")
    writer.write(0, data)
    writer.advance_checkpoint(
        Checkpoint(commit=1, length=10, next_sequence=1), expected=Checkpoint()
    )
    writer.write_index(0, bytes([1]) * 512)
    writer.write_side("producers", b"old table")
    writer.close()
    storage.open_stream("billing", create=True).close()
    storage.delete_stream("orders")
    assert storage.list_streams() == ["billing"]
    with pytest.raises(StreamNotFound):
        storage.open_stream("orders")
    with pytest.raises(StreamNotFound):
        storage.open_stream("orders", write=True)
    with pytest.raises(StreamNotFound):
        storage.delete_stream("orders")
    again = storage.open_stream("orders", write=True, create=True)
    assert again.read_checkpoint() == Checkpoint()
    assert again.index_size() == 0
    assert again.read_side("producers") is None
    assert again.read(0, 10) in (b"", bytes(10))
    again.close()
    assert storage.list_streams() == ["billing", "orders"]


def test_delete_with_takeover_deposes_a_writer_where_the_backend_can(storage: Storage) -> None:
    """A crashed writer's lease (Azure) never ends: ``takeover`` deletes the stream anyway."""
    writer = storage.open_stream("orders", write=True, create=True)
    if isinstance(storage, FileStorage):  # a live process's flock cannot be broken
        with pytest.raises(StreamLocked):
            storage.delete_stream("orders", takeover=True)
        writer.close()
        return
    storage.delete_stream("orders", takeover=True)
    assert storage.list_streams() == []
    with pytest.raises((StaleWriter, StreamNotFound)):
        writer.write(0, _pages(writer, b"late"))
    with pytest.raises((StaleWriter, StreamNotFound)):
        writer.write_index(0, bytes(512))
    writer.close()
    assert storage.list_streams() == []


def test_a_deposed_writer_cannot_touch_the_index_or_release(storage: Storage) -> None:
    """Fenced as ``write``: after another writer's lease, StaleWriter and no change."""
    leases = storage.leases()  # type: ignore[attr-defined]
    stream = f"fence-{uuid.uuid4().hex[:8]}"  # lease blobs outlive the Azure fixture's cleanup

    def take(holder: str) -> HeldLease:
        leases.break_(f"streams/{stream}")
        held: HeldLease = leases.acquire(
            f"streams/{stream}", holder=holder, address=f"http://127.0.0.1/{holder}", duration=15
        )
        return held

    a = storage.open_stream(stream, write=True, create=True, lease=take("a"))
    data = _pages(a, b"\x01" * 16384)
    a.write_index(0, bytes([1]) * 1024)
    b = storage.open_stream(stream, write=True, lease=take("b"))
    trimmed = Checkpoint(commit=1, length=len(data), next_sequence=1, first_position=12288)
    b.write(0, data)
    b.advance_checkpoint(trimmed, expected=Checkpoint())
    b.read_checkpoint()  # landed (Azure stores it in the background)
    with pytest.raises(StaleWriter):
        a.write_index(0, bytes([2]) * 512)
    with pytest.raises(StaleWriter):
        a.write_index(4096, bytes([2]) * 512)
    with pytest.raises(StaleWriter):
        a.truncate_index(0)
    with pytest.raises(StaleWriter):
        a.release(12288)
    reader = storage.open_stream(stream)
    assert reader.read_index(0, 1024) == bytes([1]) * 1024
    assert reader.read(0, len(data)) == data
    b.write_index(1024, bytes([3]) * 512)  # the new writer writes on
    assert reader.read_index(0, 1536) == bytes([1]) * 1024 + bytes([3]) * 512
    assert b.release(12288) > 0  # whole blocks, on every backend
    with pytest.raises(StaleWriter):
        a.release(12288)  # nothing left to free, and still refused
    reader.close()
    a.close()
    b.close()
