"""Leases as small files in a data folder, for several server processes on one machine.

    <root>/_system/leases/streams/<stream>   who writes the stream
    <root>/_system/leases/nodes/<node-id>    a live node

Each file is one record, rewritten in place (``pwrite`` + ``ftruncate`` +
``fdatasync``; never renamed, so every process's ``flock`` stays on the same
inode) under an exclusive ``flock`` of the file itself::

    mvlease 00000000000000000007\\n                      the generation, fixed width
    {"holder": ..., "address": ..., "generation": 7,
     "lease_id": ..., "held": true, "expires_at": 1764790000.5}\\n

Expiry is by wall clock (``time.time()``): every process shares the machine's.

A power cut can tear the record. The generation is the one field that must
never go back (it fences deposed writers), so it leads the file in a fixed
29-byte header that a torn write of the short record leaves whole (it lies
in the first sector). A record whose body does not parse counts as free,
with the header's generation; one whose header does not parse either counts
as free with the file's modification time in nanoseconds as its generation:
above any count of acquisitions made before it, since each takes far longer
than a nanosecond.

Locks are taken without blocking and retried for at most ``LOCK_WAIT``
seconds, so that a process stopped (SIGSTOP) while it holds one cannot hang
the others; they then fail with ``StorageError``. Stream handles opened
under a lease check it through ``LeaseFence``, under a shared ``flock`` of
the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from messagevault.errors import LeaseLost, StaleWriter, StorageError
from messagevault.storage.leases import (
    MAX_DURATION,
    MIN_FILE_DURATION,
    HeldLease,
    LeaseRecord,
    StoredLease,
    take,
    validate_duration,
    validate_holder,
    validate_lease_name,
    validate_lease_prefix,
)

LEASES_FOLDER = "leases"  # under the data folder's _system folder
LOCK_WAIT = 2.0  # seconds a lease file's flock is retried before giving up
_HEADER = re.compile(rb"mvlease (\d{20})\n")
_HEADER_SIZE = 29
_READ_SIZE = 64 * 1024
_JSON = json.JSONDecoder()


def encode(stored: StoredLease) -> bytes:
    """A lease file's bytes: the fixed header with the generation, then the record."""
    body = {
        "holder": stored.holder,
        "address": stored.address,
        "generation": stored.generation,
        "lease_id": stored.lease_id,
        "held": stored.held,
        "expires_at": stored.expires_at,
    }
    return b"mvlease %020d\n" % stored.generation + json.dumps(body).encode() + b"\n"


_NEVER_TAKEN = StoredLease(None, None, 0, "", False, None)


def decode(raw: bytes, mtime_ns: int) -> StoredLease | None:
    """The record in a lease file's bytes; None if empty (never taken). Never raises."""
    if not raw:
        return None
    header = _HEADER.match(raw)
    if header is None:
        return StoredLease(None, None, mtime_ns, "", False, None)
    generation = int(header.group(1))
    try:
        # raw_decode: what follows the object is a longer record's tail that
        # a crash before the ftruncate left behind, not part of this one.
        body: Any = _JSON.raw_decode(raw[_HEADER_SIZE:].decode())[0]
        stored = StoredLease(
            holder=_text(body["holder"]),
            address=_text(body["address"]),
            generation=int(body["generation"]),
            lease_id=str(body["lease_id"]),
            held=bool(body["held"]),
            expires_at=None if body["expires_at"] is None else float(body["expires_at"]),
        )
    except (ValueError, TypeError, KeyError, IndexError):  # UnicodeDecodeError is a ValueError
        return StoredLease(None, None, generation, "", False, None)
    if stored.generation != generation:
        return StoredLease(None, None, max(generation, stored.generation), "", False, None)
    return stored


def _text(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("not a string")
    return value


class FileLeases:
    """Leases under ``<root>/_system/leases``. Thread- and process-safe (flock per call)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.folder = Path(root) / "_system" / LEASES_FOLDER

    def path(self, name: str) -> Path:
        """The file of lease ``name`` (validated)."""
        return self.folder / validate_lease_name(name)

    def acquire(self, name: str, *, holder: str, address: str, duration: float) -> HeldLease:
        path = self.path(name)
        duration = validate_duration(duration, MIN_FILE_DURATION, MAX_DURATION)
        validate_holder(holder, address)
        with self._locked(path, create=True) as (fd, stored):
            taken = take(name, stored, holder, address, duration)
            _store(fd, taken, path)
        return HeldLease(
            name, taken.lease_id, holder, address, taken.generation, duration, time.monotonic()
        )

    def renew(self, lease: HeldLease) -> HeldLease:
        path = self.path(lease.name)
        with self._locked(path) as (fd, stored):
            if stored is None or not stored.holds(lease):
                raise LeaseLost(f"lease {lease.name} (generation {lease.generation}) is lost")
            renewed_at = time.monotonic()
            _store(fd, dataclasses.replace(stored, expires_at=time.time() + lease.duration), path)
        return dataclasses.replace(lease, acquired_at=renewed_at)

    def release(self, lease: HeldLease) -> None:
        path = self.path(lease.name)
        with self._locked(path) as (fd, stored):
            if stored is not None and stored.holds(lease):
                _store(fd, dataclasses.replace(stored, held=False, expires_at=None), path)

    def break_(self, name: str) -> None:
        path = self.path(name)
        with self._locked(path) as (fd, stored):
            if stored is not None and stored.held:
                _store(fd, dataclasses.replace(stored, held=False, expires_at=None), path)

    def inspect(self, name: str) -> LeaseRecord | None:
        path = self.path(name)
        with self._locked(path, shared=True) as (_, stored):
            return None if stored is None else stored.record(name)

    def list(self, prefix: str) -> list[LeaseRecord]:
        validate_lease_prefix(prefix)
        records = []
        for kind in ("streams", "nodes"):
            try:
                entries = sorted(os.listdir(self.folder / kind))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot list leases in {self.folder / kind}: {exc}") from exc
            for entry in entries:
                name = f"{kind}/{entry}"
                if not name.startswith(prefix):
                    continue
                try:
                    record = self.inspect(name)
                except ValueError:
                    continue  # not a lease file (someone else's litter)
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda record: record.name)

    def fence(self, lease: HeldLease) -> LeaseFence:
        """A fence for writes under ``lease`` (see ``LeaseFence``); close it when done."""
        return LeaseFence(self.path(lease.name), lease)

    @contextlib.contextmanager
    def _locked(
        self, path: Path, *, create: bool = False, shared: bool = False
    ) -> Iterator[tuple[int, StoredLease | None]]:
        """The lease file open and flocked, with its record (None: no file, or never taken)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                yield -1, None
                return
            fd = _create(path)
        except OSError as exc:
            raise StorageError(f"cannot open lease file {path}: {exc}") from exc
        try:
            lock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, path)
            yield fd, read(fd, path)
        finally:
            os.close(fd)  # drops the flock


def _create(path: Path) -> int:
    """Create (or open, if another process just did) a lease file, its folders made durable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the name must outlive a power cut with the record in it
            finally:
                os.close(folder)
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as exc:
        raise StorageError(f"cannot create lease file {path}: {exc}") from exc


def lock(fd: int, kind: int, path: Path) -> None:
    """flock ``fd`` (``LOCK_SH``/``LOCK_EX``), retrying for at most ``LOCK_WAIT`` seconds."""
    deadline = time.monotonic() + LOCK_WAIT
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot lock lease file {path}: {exc}") from exc
        if time.monotonic() >= deadline:
            raise StorageError(
                f"lease file {path} stayed locked by another process for {LOCK_WAIT:g} s "
                "(one stopped in the middle of a write?); try again"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def read(fd: int, path: Path) -> StoredLease | None:
    try:
        raw = os.pread(fd, _READ_SIZE, 0)
        return decode(raw, os.fstat(fd).st_mtime_ns if raw else 0)
    except OSError as exc:
        raise StorageError(f"cannot read lease file {path}: {exc}") from exc


def _store(fd: int, stored: StoredLease, path: Path) -> None:
    data = encode(stored)
    try:
        written = os.pwrite(fd, data, 0)
        if written != len(data):
            raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
        os.fdatasync(fd)
    except OSError as exc:
        raise StorageError(f"cannot write lease file {path}: {exc}") from exc


class LeaseFence:
    """Makes a stream handle's writes conditional on its lease, one write at a time.

    ``with fence:`` takes a shared ``flock`` of the lease file and checks that
    the lease is still held under the handle's lease id and generation
    (``StaleWriter`` if not); the write inside the block then runs before
    any acquisition can change the file, since acquiring takes the flock
    exclusively. Holds the lease file open until ``close``.
    """

    def __init__(self, path: Path, lease: HeldLease) -> None:
        self._path = path
        self._lease = lease
        self._last_good = b""
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StaleWriter(
                f"lease {lease.name} was never taken: no lease to write under"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot open lease file {path}: {exc}") from exc

    def __enter__(self) -> None:
        lock(self._fd, fcntl.LOCK_SH, self._path)
        try:
            self._check()
        except BaseException:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            raise

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def check(self) -> None:
        """Raise ``StaleWriter`` unless the lease is still ours (under the shared flock)."""
        with self:
            pass

    def _check(self) -> None:
        try:
            raw = os.pread(self._fd, _READ_SIZE, 0)
        except OSError as exc:
            raise StorageError(f"cannot read lease file {self._path}: {exc}") from exc
        if raw == self._last_good:
            return  # unchanged since it last said ours (renewals change it)
        lease = self._lease
        stored = decode(raw, os.fstat(self._fd).st_mtime_ns) or _NEVER_TAKEN
        if not stored.holds(lease) or stored.generation != lease.generation:
            stream = lease.name.partition("/")[2]
            raise StaleWriter(
                f"stream {stream!r} was taken over (lease generation {stored.generation} "
                f"> ours {lease.generation})"
                if stored.generation > lease.generation
                else f"stream {stream!r}: its lease (generation {lease.generation}) "
                "was released or broken"
            )
        self._last_good = raw

    def close(self) -> None:
        """Close the lease file. Idempotent (a closed number may be reused by another file)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
