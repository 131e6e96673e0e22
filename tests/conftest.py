"""Shared fixtures. ``storage`` runs a test once per backend: the contract.

A new backend joins every contract and log test by adding one entry to
``BACKENDS`` (and, if it needs a server such as Azurite, a session fixture).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.base import Storage

BACKENDS: dict[str, Callable[[Path], Storage]] = {
    "memory": lambda _: MemoryStorage(),
    # Emulates Azure page blobs: 512-byte aligned writes, tail page rewritten.
    "memory-paged": lambda _: MemoryStorage(page_size=512),
    "file": lambda path: FileStorage(path / "data"),
}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    yield BACKENDS[request.param](tmp_path)


@pytest.fixture
def file_storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "data")
