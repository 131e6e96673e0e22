"""Shared fixtures. ``storage`` runs a test once per backend: the contract.

A new backend joins every contract and log test by adding one entry to
``BACKENDS`` (and, if it needs a server such as Azurite, a session fixture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from azure.core.exceptions import ResourceNotFoundError

from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.azure import CONTAINER_PREFIX, SYSTEM_CONTAINER, AzureStorage
from messagevault.storage.base import Storage
from tests.azurite import Azurite
from tests.browser import open_browser
from tests.statsd_daemon import StatsDDaemon

if TYPE_CHECKING:
    from playwright.sync_api import Browser

BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Storage]] = {
    "memory": lambda _, __: MemoryStorage(),
    # Emulates Azure page blobs: 512-byte aligned writes, tail page rewritten.
    "memory-paged": lambda _, __: MemoryStorage(page_size=512),
    "file": lambda _, path: FileStorage(path / "data"),
    "azure": lambda request, _: request.getfixturevalue("azure_storage"),
}


@pytest.fixture(scope="session", autouse=True)
def hermetic_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test (nor a process it starts) reads or writes the user's own settings.

    The CLI and the client fall back on ~/.config/messagevault/config.toml and
    MESSAGEVAULT_* variables; a developer's own would change what tests reach,
    and ``serve --save-profile`` must never write there from a test.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MESSAGEVAULT_CONFIG", str(tmp_path_factory.mktemp("home") / "config.toml"))
        for name in ("URL", "USER", "PASSWORD", "PROFILE", "STORAGE", "STATSD", "STATSD_PREFIX"):
            patch.delenv(f"MESSAGEVAULT_{name}", raising=False)
        yield


@pytest.fixture(params=sorted(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    yield BACKENDS[request.param](request, tmp_path)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A real Azurite for the whole session, stopped by PID at the end."""
    server = Azurite()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def statsd_daemon() -> Iterator[StatsDDaemon]:
    """Etsy's StatsD daemon for the session (once a test asks), stopped by PID at the end.

    Call its ``reset()`` first: earlier tests' metrics are still in it.
    """
    daemon = StatsDDaemon()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium for one test; skips without one.

    One per test, not per session: while Playwright's sync API is open, its
    event loop counts as running in the thread, and every asyncio test the
    same worker ran meanwhile failed ("Cannot run the event loop while
    another loop is running"). A launch costs about a second.
    Browser tests are sync tests: Playwright's sync API will not run in an asyncio loop.
    """
    with open_browser() as chromium:
        yield chromium


@pytest.fixture
def azure_storage(azurite: Azurite) -> Iterator[AzureStorage]:
    """Azure storage on the session's Azurite; every stream is deleted afterwards.

    So are the system files a test left (users, retention policies), which
    would otherwise greet the next test; leases stay (``clear_leases``).
    """
    storage = AzureStorage.from_connection_string(azurite.connection_string)
    _clear_system_files(storage)  # also those of tests that ran servers on Azurite alone
    yield storage
    for container in storage.service.list_containers(name_starts_with=CONTAINER_PREFIX):
        storage.service.delete_container(container.name)
    _clear_system_files(storage)


def _clear_system_files(storage: AzureStorage) -> None:
    system = storage.service.get_container_client(SYSTEM_CONTAINER)
    with contextlib.suppress(ResourceNotFoundError):
        for blob in system.list_blobs():
            if not blob.name.startswith("leases/"):
                with contextlib.suppress(ResourceNotFoundError):
                    system.delete_blob(blob.name)


@pytest.fixture
def file_storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "data")
