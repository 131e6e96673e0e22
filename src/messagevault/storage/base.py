"""The storage seam: what the log needs from a place that keeps bytes.

Everything above this module (writer, reader, server, CLI) reaches storage
only through these two protocols; each backend (``file``, ``memory``, later
``azure``) implements them and passes ``tests/test_storage_contract.py``.

A stream in storage is one *data object* (a file, a page blob) plus one small
*checkpoint* (``format.Checkpoint``). The commit protocol built on top is:
write frames past the committed length, then ``advance_checkpoint``. Beside
them a writer may keep *side objects* (``write_side``): small named blobs
derived from the data, such as the producer table snapshot, which can always
be rebuilt from the frames and so are replaced without any commit protocol.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from messagevault.checkpoint import Checkpoint
from messagevault.storage.leases import HeldLease


@dataclass(frozen=True, slots=True)
class ReadAccess:
    """How a consumer can read a stream without going through the server.

    ``kind`` is ``"file"`` (``location`` is the stream folder), ``"memory"``
    (only in this process) or ``"azure-sas"`` (``location`` is a read-only
    SAS URL that stops working at ``expires_at``, a Unix time).
    """

    kind: str
    location: str
    expires_at: float | None = None


class StreamStore(Protocol):
    """One stream's data object and checkpoint, opened for reading or writing.

    Offsets are stream byte offsets. Handles are not thread-safe; open one per
    thread. A handle opened for writing is the only writer of its stream
    until ``close``.
    """

    @property
    def page_size(self) -> int:
        """Writes must start at a multiple of this and cover whole pages (1: any byte)."""
        ...

    @property
    def max_write_size(self) -> int:
        """The largest ``write`` this backend accepts in one call (4 MiB on Azure)."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes from ``offset``.

        Fewer bytes only where the data object ends. Bytes past the committed
        length may be anything (garbage from a crashed write, padding, zeros):
        callers bound reads by the checkpoint, never by what comes back.
        """
        ...

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; the object grows as needed.

        Only allowed on a handle opened for writing. ``offset`` and
        ``len(data)`` must respect ``page_size`` and ``max_write_size``
        (``ValueError`` otherwise). Not durable, and not visible to readers as
        committed, until ``advance_checkpoint`` returns.
        """
        ...

    def read_checkpoint(self) -> Checkpoint:
        """The last checkpoint committed by any writer (fresh from storage)."""
        ...

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        """Commit: make all written data durable, then replace the checkpoint.

        Atomic and conditional: if the stored checkpoint is no longer
        ``expected`` (another writer committed), raise ``StaleWriter`` and
        change nothing. When this returns, ``new`` is what every reader sees
        (on Azure a little later: the update runs in the background, and
        ``read_checkpoint`` on the writing handle waits for it), and the
        data it names survives a crash as far as the backend's durability
        setting promises. The checkpoint itself may become
        durable later (file storage flushes it lazily, and a handle's first
        one at once): after a crash it may lag, and the next writer rolls
        the stream forward over the whole batches it misses
        (``recovery.roll_forward``).
        """
        ...

    def read_side(self, name: str) -> bytes | None:
        """The side object ``name`` (see ``validate_side_name``), or ``None`` if there is none.

        Works on read-only handles too. Returns the bytes of one complete
        ``write_side``: never a mix of two.
        """
        ...

    def write_side(self, name: str, data: bytes) -> None:
        """Replace the side object ``name`` with ``data`` atomically.

        Only on a handle opened for writing (``AccessDenied`` otherwise); a
        bad name raises ``ValueError``. A crash leaves the old bytes or the
        new. Side objects are not covered by the checkpoint: a deposed writer
        may still replace one, so their contents must say what part of the
        stream they describe and stay true of it (the stream's committed
        bytes never change).
        """
        ...

    def read_access(self) -> ReadAccess:
        """A descriptor a direct consumer can use to read this stream."""
        ...

    # The stream's sparse index (``index.py``, docs/FORMAT.md "Index"): a third
    # object beside data and checkpoint, written by the writer behind its
    # commits and read by every reader that seeks. It is derived from the
    # frames and checked against them on every use, so it has no commit
    # protocol: a lost, torn or stale index costs a scan, never a wrong answer.

    def index_size(self) -> int:
        """Bytes in the index object; 0 when there is none.

        On a page backend the object is whole pages: bytes past the last
        entry written read as zeros.
        """
        ...

    def read_index(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the index object from ``offset``.

        Fewer only where the object ends; ``b""`` when there is none. Works
        on read-only handles too (a SAS URL reads it).
        """
        ...

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` into the index object at ``offset``, creating or growing it.

        Only on a handle opened for writing (``AccessDenied`` otherwise), with
        the ``page_size`` and ``max_write_size`` rules of ``write``, and fenced
        as ``write`` is (a deposed writer gets ``StaleWriter``). Durable
        eventually, not at once: an index lagging after a crash is rebuilt
        from the frames.
        """
        ...

    def truncate_index(self, size: int) -> None:
        """Cut the index object to ``size`` bytes (0 drops every entry; the writer rebuilds it).

        Writers only, fenced as ``write_index``; ``size`` a multiple of
        ``page_size``. A missing index stays missing.
        """
        ...

    def release(self, below: int) -> int:
        """Give back the storage that holds data bytes ``[0, below)``; the bytes released.

        For trimming: ``below`` must not exceed the committed checkpoint's
        ``first_position`` (``ValueError`` otherwise, and nothing changes), so
        only bytes no reader may read any more are freed. File storage punches
        a hole (``fallocate(PUNCH_HOLE)``, whole filesystem blocks), Azure
        clears whole 512-byte pages (which then stop being billed), memory
        zeroes them. Reads there then return zeros. Idempotent: releasing
        again, or less, frees nothing more and is no error. Where the
        filesystem cannot punch holes, 0 (the trim still holds: readers stop
        at ``first_position``). Writers only, fenced as ``write``.
        """
        ...

    def close(self) -> None:
        """Release the handle and, for a writer, the single-writer lock. Idempotent."""
        ...


MAX_SIDE_NAME_LENGTH = 32
# Names of a stream's own objects on some backend; a side object must not replace them.
RESERVED_SIDE_NAMES = frozenset({"data", "checkpoint", "index"})
_SIDE_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def validate_side_name(name: str) -> str:
    """Return ``name`` if it may name a side object, else raise ``ValueError``.

    Lowercase letters, digits and single inner hyphens, starting with a
    letter, at most 32 characters, and none of the stream's own objects: a
    file name and a blob name on every backend, and never a temp or lock file.

    >>> validate_side_name("producers")
    'producers'
    """
    if (
        not isinstance(name, str)
        or len(name) > MAX_SIDE_NAME_LENGTH
        or not _SIDE_NAME.fullmatch(name)
    ):
        raise ValueError(
            f"side object name {str(name)[:40]!r} must be 1-{MAX_SIDE_NAME_LENGTH} lowercase "
            "letters, digits and single inner hyphens, starting with a letter"
        )
    if name in RESERVED_SIDE_NAMES:
        raise ValueError(f"side object name {name!r} is reserved for the stream's own {name}")
    return name


def check_release(name: str, below: int, committed: Checkpoint) -> None:
    """ValueError unless ``release(below)`` may free stream ``name``'s bytes below ``below``.

    Only bytes no reader may read any more: below the committed checkpoint's
    ``first_position`` (the trim is committed first, then released).
    """
    if isinstance(below, bool) or not isinstance(below, int) or below < 0:
        raise ValueError(f"release needs a byte position, 0 or more, not {below!r}")
    if below > committed.first_position:
        raise ValueError(
            f"cannot release stream {name!r} below {below}: its committed first readable "
            f"position is {committed.first_position} (commit the trim first)"
        )


def check_stream_lease(name: str, lease: HeldLease | None, *, write: bool) -> None:
    """ValueError unless ``lease`` is None or stream ``name``'s lease, opened for writing."""
    if lease is None:
        return
    if not write:
        raise ValueError("a stream is opened under a lease only for writing (write=True)")
    if lease.name != f"streams/{name}":
        raise ValueError(f"lease {lease.name} is not stream {name!r}'s (streams/{name})")


class SystemFiles(Protocol):
    """Small named files the server keeps beside the streams (users, leader info).

    File storage keeps them under ``<root>/_system/`` (no stream name starts
    with ``_``), Azure in the ``messagevault-system`` container.
    """

    def read_system_file(self, name: str) -> bytes | None:
        """The file's bytes, or ``None`` if it does not exist."""
        ...

    def write_system_file(self, name: str, data: bytes) -> None:
        """Replace the file atomically: readers see the old bytes or the new, never a mix."""
        ...

    def create_system_file(self, name: str, data: bytes) -> bool:
        """Create the file with ``data`` unless it exists: True if created, False if it existed.

        Exclusive: of several callers racing (other nodes too), one creates
        it and the rest find its bytes. For secrets made once, such as the
        node-to-node token.
        """
        ...

    def delete_system_file(self, name: str) -> None:
        """Remove the file; nothing happens if there is none (a stream's policy, say)."""
        ...


@runtime_checkable
class ServerLock(Protocol):
    """Storage that keeps a second server off it: one server per storage, for now.

    Two servers on one storage would each become the writer of whichever
    streams it was asked about first, and refuse the rest (``StreamLocked``).
    """

    def hold_server_lock(self) -> AbstractContextManager[None]:
        """Hold the server lock while the context lasts.

        Raises ``WriterConflict``, naming the holder and what to do, when
        another server holds it. A holder that dies lets go of it (file: the
        kernel drops the lock), so no stale lock outlives a crash.
        """
        ...


class Storage(Protocol):
    """A set of named streams: a data folder, an Azure storage account, memory."""

    def open_stream(
        self,
        name: str,
        *,
        write: bool = False,
        create: bool = False,
        takeover: bool = False,
        lease: HeldLease | None = None,
    ) -> StreamStore:
        """Open stream ``name``.

        ``create=True`` creates it (empty, checkpoint at length 0) if missing,
        and is a no-op if it exists; otherwise a missing stream raises
        ``StreamNotFound``. ``write=True`` takes the single-writer lock at once
        and raises ``StreamLocked`` if another writer holds it, unless
        ``takeover=True``: then a backend that can fence (memory, Azure
        leases) deposes the holder, whose next write or commit fails with
        ``StaleWriter``. The file backend cannot depose a live process; its
        lock is released by the kernel when the holder dies.

        ``lease`` (with ``write=True``): the stream's lease
        (``streams/<name>``, see ``storage.leases``), which this process
        holds. The handle writes only while that lease is still held at its
        generation: it deposes a previous lease holder's handle as a
        takeover does, and once another holder acquires the lease every
        ``write``, ``advance_checkpoint`` and ``write_side`` raises
        ``StaleWriter`` and changes nothing (files and memory check the lease
        on each; Azure breaks the deposed writer's blob leases at open). A
        lease no longer current at open raises ``StaleWriter``; a writer
        holding the stream without a lease, ``StreamLocked``.
        """
        ...

    def list_streams(self) -> list[str]:
        """Names of all streams, sorted."""
        ...

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        """Delete stream ``name``: its data, checkpoint, index and side objects.

        ``StreamNotFound`` if there is none; ``StreamLocked`` (nothing
        deleted) while a writer holds it, the caller's own included: close
        it first. ``takeover=True`` deletes it all the same where a backend
        can depose a writer (memory; Azure, where a crashed writer's lease
        never ends by itself), as ``open_stream(takeover=True)`` would; the
        file backend cannot depose a live process, and a dead one's lock is
        gone already. A deposed writer's next change fails. Readers opening
        the stream afterwards get ``StreamNotFound``; handles open already
        get errors (memory, Azure) or, on file storage, may read on what
        their open files still hold. A stream of that name created
        afterwards starts empty. Not atomic across a crash on every backend,
        but a crash leaves either the whole stream or one that
        ``list_streams`` no longer shows and deleting again finishes.
        """
        ...

    def describe(self) -> str:
        """A one-line, credential-free description for logs and errors."""
        ...
