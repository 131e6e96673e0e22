"""One server per storage: ``hold_server_lock`` on each backend (processes: test_serve.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from messagevault import FileStorage, MemoryStorage, StorageError, WriterConflict
from messagevault.storage.base import ServerLock


def test_a_file_storage_is_held_by_one_server_at_a_time(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    assert isinstance(storage, ServerLock)
    with storage.hold_server_lock():
        # flock belongs to the open file, so even this process cannot take it twice.
        with (
            pytest.raises(WriterConflict) as held,
            FileStorage(tmp_path / "data").hold_server_lock(),
        ):
            pass
        assert f"(pid {os.getpid()})" in str(held.value)
        assert str((tmp_path / "data").resolve()) in str(held.value)
        assert storage.list_streams() == []  # the lock file is no stream
    with FileStorage(tmp_path / "data").hold_server_lock():  # let go on leaving
        pass


def test_memory_storage_needs_no_server_lock() -> None:
    storage = MemoryStorage()
    assert isinstance(storage, ServerLock)
    with storage.hold_server_lock(), storage.hold_server_lock():
        pass


def test_a_server_lock_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(b"a file where the folder should be")
    with (
        pytest.raises(StorageError, match="cannot lock"),
        FileStorage(tmp_path / "data").hold_server_lock(),
    ):
        pass
