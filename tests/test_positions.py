"""Position stores: one contract for memory, a folder and Azurite; then each backend's faults."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from messagevault.errors import CorruptData, InvalidInput, StaleWriter, UnsupportedVersion
from messagevault.positions import (
    AzurePositionStore,
    FilePositionStore,
    MemoryPositionStore,
    PositionStore,
    SavedPosition,
    encode_document,
    open_position_store,
    validate_consumer_name,
)
from tests.azurite import Azurite

CONTAINER = "test-positions"

STORES: dict[str, Callable[[pytest.FixtureRequest, Path], PositionStore]] = {
    "memory": lambda _, __: MemoryPositionStore(),
    "file": lambda _, path: FilePositionStore(path / "positions"),
    "azure": lambda request, _: request.getfixturevalue("azure_positions"),
}


@pytest.fixture
def azure_positions(azurite: Azurite) -> Iterator[AzurePositionStore]:
    store = AzurePositionStore.from_connection_string(azurite.connection_string, CONTAINER)
    yield store
    store.close()
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    if service.get_container_client(CONTAINER).exists():
        service.delete_container(CONTAINER)


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> PositionStore:
    return STORES[request.param](request, tmp_path)


def twin(store: PositionStore, request: pytest.FixtureRequest) -> PositionStore:
    """A second store on the same place, as another process would open it."""
    if isinstance(store, FilePositionStore):
        return FilePositionStore(store.folder)
    if isinstance(store, AzurePositionStore):
        azurite = request.getfixturevalue("azurite")
        return AzurePositionStore.from_connection_string(azurite.connection_string, CONTAINER)
    return store  # one process: the same object (the versions still conflict)


# -- the contract, on every backend --------------------------------------------------


def test_round_trip_with_state(store: PositionStore) -> None:
    assert store.load("billing") is None
    state = {"counts": {"a": 3, "é": 1}, "list": [1, 2.5, None, True]}
    first = store.save(SavedPosition("billing", "orders", 4096, state), replaces=None)
    assert first.version and first.saved_at > 0
    loaded = store.load("billing")
    assert loaded == first
    assert loaded is not None and loaded.state == state and loaded.position == 4096
    second = store.save(SavedPosition("billing", "orders", 8192, None), replaces=loaded)
    assert second.version != first.version
    assert store.load("billing") == second
    assert store.load("other") is None  # names are independent


def test_saves_are_compare_and_swap(store: PositionStore, request: pytest.FixtureRequest) -> None:
    """Two consumers under one name: the second to save fails loudly and changes nothing."""
    other = twin(store, request)
    mine = store.save(SavedPosition("billing", "orders", 100), replaces=None)
    theirs = other.load("billing")
    assert theirs == mine
    newer = other.save(SavedPosition("billing", "orders", 200), replaces=theirs)
    with pytest.raises(StaleWriter, match="another consumer running under the same name"):
        store.save(SavedPosition("billing", "orders", 150), replaces=mine)
    with pytest.raises(StaleWriter, match="exists although this consumer found none"):
        store.save(SavedPosition("billing", "orders", 150), replaces=None)
    assert store.load("billing") == newer


def test_delete_forgets(store: PositionStore) -> None:
    saved = store.save(SavedPosition("billing", "orders", 100), replaces=None)
    store.delete("billing")
    store.delete("billing")  # idempotent
    assert store.load("billing") is None
    with pytest.raises(StaleWriter):  # what it replaces is gone
        store.save(SavedPosition("billing", "orders", 200), replaces=saved)
    assert store.save(SavedPosition("billing", "orders", 0), replaces=None).position == 0


@pytest.mark.parametrize(
    "state",
    [{1, 2}, {"x": float("nan")}, b"bytes", object()],
    ids=["set", "nan", "bytes", "object"],
)
def test_state_that_is_not_json_is_refused(store: PositionStore, state: object) -> None:
    with pytest.raises(InvalidInput, match="cannot be saved as JSON"):
        store.save(SavedPosition("billing", "orders", 0, state), replaces=None)
    assert store.load("billing") is None


@pytest.mark.parametrize(
    "name", ["", "Billing", "-x", ".hidden", "a/b", "a b", "ü", "x" * 101, None, 7]
)
def test_bad_consumer_names(store: PositionStore, name: object) -> None:
    with pytest.raises(InvalidInput, match="consumer name"):
        store.load(name)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="consumer name"):
        store.save(SavedPosition(name, "orders", 0), replaces=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("position", [-1, 1.5, "7", None])
def test_bad_positions(store: PositionStore, position: object) -> None:
    with pytest.raises(InvalidInput, match="position must be a non-negative integer"):
        store.save(SavedPosition("billing", "orders", position), replaces=None)  # type: ignore[arg-type]
    assert store.load("billing") is None


def test_good_consumer_names() -> None:
    for name in ("a", "billing", "orders.v2", "x_y-z", "0", "a" * 100):
        assert validate_consumer_name(name) == name


def test_replacing_another_consumers_position_is_refused(store: PositionStore) -> None:
    theirs = store.save(SavedPosition("audit", "orders", 5), replaces=None)
    with pytest.raises(InvalidInput, match="cannot replace one of consumer 'audit'"):
        store.save(SavedPosition("billing", "orders", 5), replaces=theirs)


# -- damaged and foreign documents ---------------------------------------------------

DAMAGED = {
    "not-json": (b"\x00\xffgarbage", "not JSON"),
    "truncated": (encode_document(SavedPosition("billing", "orders", 9))[:-5], "not JSON"),
    "foreign": (b'{"offset": 12}', "marker"),
    "array": (b"[1, 2]", "marker"),
    "bad-position": (
        b'{"messagevault": "consumer-position", "version": 1, "consumer": "billing",'
        b' "stream": "orders", "position": -4}',
        "non-negative",
    ),
    "other-consumer": (encode_document(SavedPosition("audit", "orders", 9)), "belongs to"),
    "no-stream": (
        b'{"messagevault": "consumer-position", "version": 1, "consumer": "billing",'
        b' "position": 4}',
        "stream",
    ),
}


def _plant(store: PositionStore, request: pytest.FixtureRequest, data: bytes) -> str:
    """Put raw bytes where ``billing``'s document lives; return how errors name the place."""
    if isinstance(store, FilePositionStore):
        store.folder.mkdir(parents=True, exist_ok=True)
        (store.folder / "billing.json").write_bytes(data)
        return str(store.folder / "billing.json")
    if isinstance(store, AzurePositionStore):
        from azure.storage.blob import BlobServiceClient

        azurite = request.getfixturevalue("azurite")
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.get_container_client(CONTAINER)
        if not container.exists():
            container.create_container()
        container.upload_blob("billing.json", data, overwrite=True)
        return f"{CONTAINER}/billing.json"
    assert isinstance(store, MemoryPositionStore)
    store._documents["billing"] = (data, "planted")
    return "memory:billing"


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_documents_are_named(
    store: PositionStore, request: pytest.FixtureRequest, case: str
) -> None:
    data, reason = DAMAGED[case]
    where = _plant(store, request, data)
    with pytest.raises(CorruptData, match=reason) as caught:
        store.load("billing")
    assert where in str(caught.value)
    assert "\n" not in str(caught.value)


def test_newer_document_version(store: PositionStore, request: pytest.FixtureRequest) -> None:
    document = json.loads(encode_document(SavedPosition("billing", "orders", 9)))
    document["version"] = 99
    _plant(store, request, json.dumps(document).encode())
    with pytest.raises(UnsupportedVersion, match="format version 99"):
        store.load("billing")


# -- the file backend ----------------------------------------------------------------


def test_file_document_is_plain_json(tmp_path: Path) -> None:
    store = FilePositionStore(tmp_path / "deep" / "positions")  # folders made on first save
    store.save(SavedPosition("billing", "orders", 42, {"n": 1}), replaces=None)
    document = json.loads((tmp_path / "deep" / "positions" / "billing.json").read_text())
    assert document["position"] == 42 and document["state"] == {"n": 1}
    assert document["stream"] == "orders" and document["consumer"] == "billing"


def test_file_crash_between_temp_write_and_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that dies after writing its temporary file leaves the old document in force."""
    store = FilePositionStore(tmp_path)
    saved = store.save(SavedPosition("billing", "orders", 100, {"n": 1}), replaces=None)

    def crash(self: Path, target: Path) -> Path:
        raise SystemExit("killed before the rename")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", crash)
        with pytest.raises(SystemExit):
            store.save(SavedPosition("billing", "orders", 200, {"n": 2}), replaces=saved)
    temp = tmp_path / ".billing.json.tmp"
    assert json.loads(temp.read_bytes())["position"] == 200  # the new document, never renamed
    after = FilePositionStore(tmp_path)  # a restarted process
    assert after.load("billing") == saved
    newer = after.save(SavedPosition("billing", "orders", 300), replaces=saved)
    assert after.load("billing") == newer


def test_file_leftover_temp_garbage_is_ignored(tmp_path: Path) -> None:
    store = FilePositionStore(tmp_path)
    saved = store.save(SavedPosition("billing", "orders", 100), replaces=None)
    (tmp_path / ".billing.json.tmp").write_bytes(b"\x00" * 10_000)  # a torn temporary write
    assert store.load("billing") == saved
    newer = store.save(SavedPosition("billing", "orders", 200), replaces=saved)
    assert store.load("billing") == newer
    assert sorted(p.name for p in tmp_path.iterdir()) == [".billing.lock", "billing.json"]


def test_file_store_on_an_unwritable_place(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = FilePositionStore(blocker / "positions")
    from messagevault.errors import StorageError

    with pytest.raises(StorageError, match="cannot write position file"):
        store.save(SavedPosition("billing", "orders", 0), replaces=None)


def test_file_document_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "billing.json").mkdir()
    from messagevault.errors import StorageError

    with pytest.raises(StorageError, match="cannot read position file"):
        FilePositionStore(tmp_path).load("billing")


# -- Azure ---------------------------------------------------------------------------


def test_azure_etag_conditions_on_azurite(azure_positions: AzurePositionStore) -> None:
    """The container is created on first save; If-None-Match/If-Match guard every save."""
    first = azure_positions.save(SavedPosition("billing", "orders", 1), replaces=None)
    assert first.version.startswith('"') or first.version  # an ETag
    second = azure_positions.save(SavedPosition("billing", "orders", 2), replaces=first)
    with pytest.raises(StaleWriter):
        azure_positions.save(SavedPosition("billing", "orders", 3), replaces=first)
    assert azure_positions.load("billing") == second
    assert "AccountKey" not in azure_positions.describe()
    assert CONTAINER in azure_positions.describe()


def test_azure_save_after_the_blob_was_deleted(azure_positions: AzurePositionStore) -> None:
    first = azure_positions.save(SavedPosition("billing", "orders", 1), replaces=None)
    azure_positions.delete("billing")
    with pytest.raises(StaleWriter):
        azure_positions.save(SavedPosition("billing", "orders", 2), replaces=first)


# -- opening by URL ------------------------------------------------------------------


def test_open_position_store(tmp_path: Path, azurite: Azurite) -> None:
    assert isinstance(open_position_store("memory:"), MemoryPositionStore)
    store = open_position_store(f"file:{tmp_path}")
    assert isinstance(store, FilePositionStore) and store.folder == tmp_path
    bare = open_position_store(str(tmp_path))
    assert isinstance(bare, FilePositionStore) and bare.folder == tmp_path
    azure = open_position_store(f"azure:{azurite.connection_string}")
    assert isinstance(azure, AzurePositionStore)
    assert "messagevault-positions" in azure.describe()
    azure.close()
    with pytest.raises(InvalidInput, match="unknown position store 's3'"):
        open_position_store("s3://bucket")
