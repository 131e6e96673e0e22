"""Storage backends behind one small interface (``base.Storage``/``base.StreamStore``)."""

from __future__ import annotations

from pathlib import Path

from messagevault.storage.base import ReadAccess, Storage, StreamStore
from messagevault.storage.file import DEFAULT_CHECKPOINT_FLUSH_INTERVAL, FileStorage, FsyncPolicy
from messagevault.storage.memory import MemoryStorage

__all__ = [
    "FileStorage",
    "FsyncPolicy",
    "MemoryStorage",
    "ReadAccess",
    "Storage",
    "StreamStore",
    "open_read_access",
    "open_storage",
]


def open_storage(
    url: str,
    *,
    fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS,
    checkpoint_flush_interval: float = DEFAULT_CHECKPOINT_FLUSH_INTERVAL,
) -> Storage:
    """Open storage from a URL-like string.

    ``file:PATH`` (or a bare path) is a data folder; ``azure:CONNECTION_STRING``
    an Azure storage account (needs the ``azure`` extra); ``memory:`` is
    in-process storage (tests only).

    >>> open_storage("file:./data").describe()
    'file storage at data'
    """
    scheme, sep, rest = url.partition(":")
    if not sep or len(scheme) == 1:  # a bare path, or a Windows drive letter
        return FileStorage(url, fsync=fsync, checkpoint_flush_interval=checkpoint_flush_interval)
    if scheme == "file":
        return FileStorage(
            rest or ".", fsync=fsync, checkpoint_flush_interval=checkpoint_flush_interval
        )
    if scheme == "memory":
        return MemoryStorage()
    if scheme == "azure":
        from messagevault.storage.azure import AzureStorage  # the SDK only when asked for

        return AzureStorage.from_connection_string(rest)
    raise ValueError(
        f"unknown storage {scheme!r}: expected file:PATH, azure:CONNECTION_STRING or memory:"
    )


def open_read_access(access: ReadAccess) -> tuple[StreamStore, str]:
    """Open a stream read-only from a ``ReadAccess`` descriptor: (store, stream name).

    This is all a direct consumer needs: a SAS URL on Azure (no account key),
    a folder path for file storage.
    """
    if access.kind == "azure-sas":
        from messagevault.storage.azure import open_sas_stream

        return open_sas_stream(access.location)
    if access.kind == "file":
        folder = Path(access.location)
        return FileStorage(folder.parent).open_stream(folder.name), folder.name
    raise ValueError(f"cannot open {access.kind!r} read access from another process")
