"""Storage backends behind one small interface (``base.Storage``/``base.StreamStore``)."""

from __future__ import annotations

from messagevault.storage.base import ReadAccess, Storage, StreamStore
from messagevault.storage.file import FileStorage, FsyncPolicy
from messagevault.storage.memory import MemoryStorage

__all__ = [
    "FileStorage",
    "FsyncPolicy",
    "MemoryStorage",
    "ReadAccess",
    "Storage",
    "StreamStore",
    "open_storage",
]


def open_storage(url: str, *, fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS) -> Storage:
    """Open storage from a URL-like string.

    ``file:PATH`` (or a bare path) is a data folder; ``memory:`` is in-process
    storage (tests only).

    >>> open_storage("file:./data").describe()
    'file storage at data'
    """
    scheme, sep, rest = url.partition(":")
    if not sep or len(scheme) == 1:  # a bare path, or a Windows drive letter
        return FileStorage(url, fsync=fsync)
    if scheme == "file":
        return FileStorage(rest or ".", fsync=fsync)
    if scheme == "memory":
        return MemoryStorage()
    raise ValueError(f"unknown storage {url!r}: expected file:PATH or memory:")
