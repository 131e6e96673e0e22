"""Where consumers keep their place: one small document per consumer name.

A document holds the position to resume from (``Message.next_position`` of
the last handled message) and, optionally, the application's own state
(any JSON value), written together in one atomic replace, so that the two
can never disagree after a crash::

    {"messagevault": "consumer-position", "version": 1, "consumer": "billing",
     "stream": "orders", "position": 4096, "saved_at": 1733240000.5, "state": {...}}

Every save is conditional (compare and swap): it names the version it
replaces (``replaces=``, the ``SavedPosition`` it loaded or last saved, or
``None`` for a first save), and raises ``StaleWriter`` if someone else saved
in between. Two consumers running under one name therefore fail loudly
instead of silently overwriting each other's position.

Backends: ``FilePositionStore`` (a folder; temporary file, fsync, rename,
fsync of the folder), ``AzurePositionStore`` (a blob per name, written with
an ETag condition), ``MemoryPositionStore`` (tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from messagevault.errors import (
    CorruptData,
    InvalidInput,
    StaleWriter,
    StorageError,
    UnsupportedVersion,
)

if TYPE_CHECKING:
    from messagevault.storage.azure_documents import AzureDocuments

DOCUMENT_KIND = "consumer-position"
DOCUMENT_VERSION = 1
MAX_CONSUMER_NAME_LENGTH = 100
DEFAULT_AZURE_CONTAINER = "messagevault-positions"

# Lowercase only: the name becomes a file name, and on a case-insensitive
# file system "Billing" and "billing" would be one file.
_CONSUMER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")

JsonValue = Any  # what json.loads returns; checked by json.dumps when saved


def validate_consumer_name(name: object) -> str:
    """Return ``name`` if it is a valid consumer name, else raise ``InvalidInput``.

    1-100 characters: lowercase letters, digits, ``.``, ``_`` and ``-``,
    starting with a letter or digit (it becomes a file or blob name).

    >>> validate_consumer_name("billing-v2")
    'billing-v2'
    """
    if not isinstance(name, str):
        raise InvalidInput(f"consumer name must be a string, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_CONSUMER_NAME_LENGTH or not _CONSUMER_NAME.fullmatch(name):
        raise InvalidInput(
            f"consumer name {name[:120]!r} is not valid: use 1-{MAX_CONSUMER_NAME_LENGTH} "
            "lowercase letters a-z, digits 0-9, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class SavedPosition:
    """A consumer's saved place in a stream, as loaded from or saved to a store.

    ``position`` is where to resume: the ``next_position`` of the last
    message handled. ``state`` is what the application saved with it.
    ``version`` identifies this very save (an ETag, a hash): pass the
    object back as ``replaces=`` to save over it.
    """

    consumer: str
    stream: str
    position: int
    state: JsonValue = None
    saved_at: float = 0.0  # Unix time, for people reading the document
    version: str = ""


def encode_document(saved: SavedPosition) -> bytes:
    """The JSON document for ``saved``; ``InvalidInput`` if its state is not JSON."""
    document = {
        "messagevault": DOCUMENT_KIND,
        "version": DOCUMENT_VERSION,
        "consumer": saved.consumer,
        "stream": saved.stream,
        "position": saved.position,
        "saved_at": saved.saved_at,
        "state": saved.state,
    }
    try:
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"the state of consumer {saved.consumer!r} cannot be saved as JSON: {exc}"
        ) from exc


def decode_document(data: bytes, consumer: str, where: str, version: str) -> SavedPosition:
    """Parse a stored document; ``CorruptData`` naming ``where`` if it is not ours or damaged."""

    def corrupt(reason: str) -> CorruptData:
        return CorruptData(f"{where} is not a usable consumer position: {reason}")

    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise corrupt(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("messagevault") != DOCUMENT_KIND:
        raise corrupt(f'no "messagevault": "{DOCUMENT_KIND}" marker (a foreign file?)')
    document_version = document.get("version")
    if not isinstance(document_version, int) or document_version < 1:
        raise corrupt(f"bad version {document_version!r}")
    if document_version > DOCUMENT_VERSION:
        raise UnsupportedVersion(
            f"{where} was written in position format version {document_version}; "
            f"this MessageVault reads up to {DOCUMENT_VERSION}"
        )
    position = document.get("position")
    if type(position) is not int or position < 0:
        raise corrupt(f"position {position!r} is not a non-negative integer")
    stream = document.get("stream")
    if not isinstance(stream, str):
        raise corrupt(f"stream {stream!r} is not a string")
    if document.get("consumer") != consumer:
        raise corrupt(f"it belongs to consumer {document.get('consumer')!r}, not {consumer!r}")
    saved_at = document.get("saved_at", 0.0)
    if type(saved_at) not in (int, float):
        raise corrupt(f"saved_at {saved_at!r} is not a number")
    return SavedPosition(consumer, stream, position, document.get("state"), saved_at, version)


class PositionStore:
    """Saved positions, one document per consumer name (base of every backend).

    >>> store = MemoryPositionStore()
    >>> first = store.save(SavedPosition("billing", "orders", 0), replaces=None)
    >>> second = store.save(SavedPosition("billing", "orders", 96), replaces=first)
    >>> store.load("billing").position
    96
    >>> store.save(SavedPosition("billing", "orders", 128), replaces=first)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    messagevault.errors.StaleWriter: ...

    A backend provides four primitives over raw documents, each named by
    consumer: ``_read`` (bytes and version, or ``None``), ``_replace``
    (atomic, conditional on the version), ``_remove``, ``_where``.
    """

    def load(self, consumer: str) -> SavedPosition | None:
        """The position last saved under ``consumer``, or ``None`` if there is none.

        ``CorruptData`` (naming the file or blob) if the document is damaged
        or is not a consumer position.
        """
        validate_consumer_name(consumer)
        found = self._read(consumer)
        if found is None:
            return None
        data, version = found
        return decode_document(data, consumer, self._where(consumer), version)

    def save(self, saved: SavedPosition, *, replaces: SavedPosition | None) -> SavedPosition:
        """Replace the document of ``saved.consumer`` in one atomic write; return it as stored.

        ``replaces`` is the ``SavedPosition`` this caller loaded or saved last
        (``None``: there must be no document yet). If the stored document is
        another one by now, raise ``StaleWriter`` and write nothing.
        ``saved.version`` and ``saved.saved_at`` are filled in here.
        """
        validate_consumer_name(saved.consumer)
        if not isinstance(saved.position, int) or saved.position < 0:
            raise InvalidInput(f"position must be a non-negative integer, not {saved.position!r}")
        if replaces is not None and replaces.consumer != saved.consumer:
            raise InvalidInput(
                f"a position of consumer {saved.consumer!r} cannot replace "
                f"one of consumer {replaces.consumer!r}"
            )
        stamped = SavedPosition(
            saved.consumer, saved.stream, saved.position, saved.state, time.time()
        )
        data = encode_document(stamped)
        expected = None if replaces is None else replaces.version
        version = self._replace(saved.consumer, data, expected)
        return SavedPosition(
            stamped.consumer,
            stamped.stream,
            stamped.position,
            stamped.state,
            stamped.saved_at,
            version,
        )

    def delete(self, consumer: str) -> None:
        """Forget ``consumer``'s position (it starts afresh). Unconditional; idempotent."""
        self._remove(validate_consumer_name(consumer))

    def describe(self) -> str:
        """A one-line, credential-free description for logs and errors."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections or handles. Idempotent."""

    def __enter__(self) -> PositionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _conflict(self, consumer: str, expected: str | None) -> StaleWriter:
        if expected is None:
            found = "exists although this consumer found none when it started"
        else:
            found = "was saved by someone else since this consumer loaded it"
        return StaleWriter(
            f"the position of consumer {consumer!r} at {self._where(consumer)} {found}: "
            "is another consumer running under the same name? Stop it, or use another name"
        )

    def _read(self, consumer: str) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def _replace(self, consumer: str, data: bytes, expected: str | None) -> str:
        raise NotImplementedError

    def _remove(self, consumer: str) -> None:
        raise NotImplementedError

    def _where(self, consumer: str) -> str:
        raise NotImplementedError


class MemoryPositionStore(PositionStore):
    """Positions in this process's memory: for tests. Thread-safe."""

    def __init__(self) -> None:
        self._documents: dict[str, tuple[bytes, str]] = {}
        self._versions = itertools.count(1)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "positions in memory"

    def _read(self, consumer: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._documents.get(consumer)

    def _replace(self, consumer: str, data: bytes, expected: str | None) -> str:
        with self._lock:
            current = self._documents.get(consumer)
            if (current[1] if current else None) != expected:
                raise self._conflict(consumer, expected)
            version = str(next(self._versions))
            self._documents[consumer] = (data, version)
            return version

    def _remove(self, consumer: str) -> None:
        with self._lock:
            self._documents.pop(consumer, None)

    def _where(self, consumer: str) -> str:
        return f"memory:{consumer}"


class FilePositionStore(PositionStore):
    """Positions as ``<folder>/<consumer>.json``, replaced atomically.

    A save writes ``.<consumer>.json.tmp``, fsyncs it, renames it over the
    document and fsyncs the folder: after a crash the document is the old
    one or the new one, never a mix, and a leftover temporary file is
    simply overwritten by the next save. The compare-and-swap runs under an
    ``flock`` of ``.<consumer>.lock``, which serialises savers of one name
    across processes (the kernel drops it if a saver dies).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def describe(self) -> str:
        return f"positions in folder {self.folder}"

    def _path(self, consumer: str) -> Path:
        return self.folder / f"{consumer}.json"

    def _where(self, consumer: str) -> str:
        return f"position file {self._path(consumer)}"

    def _read(self, consumer: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(consumer).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._where(consumer)}: {exc}") from exc
        return data, _digest(data)

    def _replace(self, consumer: str, data: bytes, expected: str | None) -> str:
        path = self._path(consumer)
        temp = self.folder / f".{consumer}.json.tmp"
        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                _fsync_folder(self.folder.parent)  # the new folder survives a power loss too
            with self._locked(consumer):
                current = self._read(consumer)
                if (current[1] if current else None) != expected:
                    raise self._conflict(consumer, expected)
                _write_durably(temp, data)
                temp.replace(path)
                _fsync_folder(self.folder)
        except OSError as exc:
            raise StorageError(f"cannot write {self._where(consumer)}: {exc}") from exc
        return _digest(data)

    @contextlib.contextmanager
    def _locked(self, consumer: str) -> Iterator[None]:
        fd = os.open(self.folder / f".{consumer}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _remove(self, consumer: str) -> None:
        try:
            self._path(consumer).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self._where(consumer)}: {exc}") from exc


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AzurePositionStore(PositionStore):
    """Positions as blobs ``<consumer>.json`` in one container (needs the ``azure`` extra).

    Saves are conditional on the blob's ETag (``If-Match``; ``If-None-Match: *``
    for a first save), so a second consumer under the same name gets
    ``StaleWriter`` instead of overwriting the first one's position.
    The container is created on first save.
    """

    def __init__(self, documents: AzureDocuments) -> None:
        self._documents = documents

    @classmethod
    def from_connection_string(
        cls, connection_string: str, container: str = DEFAULT_AZURE_CONTAINER
    ) -> AzurePositionStore:
        from messagevault.storage.azure_documents import AzureDocuments  # the SDK only if used

        return cls(AzureDocuments.from_connection_string(connection_string, container))

    def describe(self) -> str:
        return f"positions in {self._documents.describe()}"

    def _where(self, consumer: str) -> str:
        return f"position blob {self._documents.location(f'{consumer}.json')}"

    def _read(self, consumer: str) -> tuple[bytes, str] | None:
        return self._documents.read(f"{consumer}.json")

    def _replace(self, consumer: str, data: bytes, expected: str | None) -> str:
        version = self._documents.replace(f"{consumer}.json", data, etag=expected)
        if version is None:
            raise self._conflict(consumer, expected)
        return version

    def _remove(self, consumer: str) -> None:
        self._documents.remove(f"{consumer}.json")

    def close(self) -> None:
        self._documents.close()


def open_position_store(url: str) -> PositionStore:
    """A position store from a URL-like string, as ``open_storage`` takes storage.

    ``file:PATH`` (or a bare path) is a folder; ``azure:CONNECTION_STRING``
    the ``messagevault-positions`` container of an Azure storage account;
    ``memory:`` is in-process (tests).

    >>> open_position_store("file:./positions").describe()
    'positions in folder positions'
    """
    scheme, sep, rest = url.partition(":")
    if not sep or len(scheme) == 1:  # a bare path, or a Windows drive letter
        return FilePositionStore(url)
    if scheme == "file":
        return FilePositionStore(rest or ".")
    if scheme == "memory":
        return MemoryPositionStore()
    if scheme == "azure":
        return AzurePositionStore.from_connection_string(rest)
    raise InvalidInput(
        f"unknown position store {scheme!r}: expected file:PATH, azure:CONNECTION_STRING or memory:"
    )
