"""In-process storage for unit tests.

With ``page_size=512`` it behaves like an Azure page blob: writes must be
whole, aligned pages of at most ``max_write_size`` bytes, the data object
grows in large zero-filled steps, and bytes past the committed length read
back as whatever was last written there (or zeros). That lets the writer's
page alignment and tail-page rewrite be tested without Azure.

The index object follows the same page rules as the data (and, paged, grows
by doubling from ``INDEX_INITIAL_SIZE``, as on Azure); ``release`` zeroes the
bytes it gives back, whole pages when paged. Nothing here is lost in a crash,
so every write and checkpoint counts as durable at once. ``lose_checkpoint``
puts back an older checkpoint, as the file backend's lazily flushed one can
be after a power cut, to test the writer's roll-forward.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from messagevault.checkpoint import Checkpoint
from messagevault.errors import AccessDenied, StaleWriter, StreamLocked, StreamNotFound
from messagevault.names import validate_stream_name
from messagevault.storage.base import (
    ReadAccess,
    check_release,
    check_stream_lease,
    validate_side_name,
)
from messagevault.storage.leases import HeldLease
from messagevault.storage.memory_leases import MemoryLeases

DEFAULT_MAX_WRITE_SIZE = 4 * 1024 * 1024
GROWTH_STEP = 1024 * 1024
INDEX_INITIAL_SIZE = 4096  # paged: the index object's first size, doubled as it grows


@dataclass
class _StreamState:
    data: bytearray = field(default_factory=bytearray)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    writer: object | None = None
    writes: int = 0  # storage writes so far, for tests that count commits
    sides: dict[str, bytes] = field(default_factory=dict)
    index: bytearray | None = None  # None: no index object yet
    released: int = 0  # data bytes [0, released) were zeroed by ``release``
    deleted: bool = False


class MemoryStorage:
    """Streams kept in this process's memory. Thread-safe."""

    def __init__(self, *, page_size: int = 1, max_write_size: int = DEFAULT_MAX_WRITE_SIZE) -> None:
        if page_size < 1 or max_write_size % page_size:
            raise ValueError("max_write_size must be a positive multiple of page_size")
        self.page_size = page_size
        self.max_write_size = max_write_size
        self._streams: dict[str, _StreamState] = {}
        self._system_files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._leases = MemoryLeases()

    def open_stream(
        self,
        name: str,
        *,
        write: bool = False,
        create: bool = False,
        takeover: bool = False,
        lease: HeldLease | None = None,
    ) -> MemoryStreamStore:
        validate_stream_name(name)
        check_stream_lease(name, lease, write=write)
        with self._lock:
            if lease is not None:
                _check_lease(self._leases, name, lease)
            state = self._streams.get(name)
            if state is None:
                if not create:
                    raise StreamNotFound(f"stream {name!r} does not exist in {self.describe()}")
                state = self._streams[name] = _StreamState()
            handle = MemoryStreamStore(self, name, state, write=write, lease=lease)
            if write:
                current = state.writer
                # A lease holder deposes the previous holder's handle, never a lease-less writer.
                may_depose = takeover or (
                    lease is not None and getattr(current, "lease", None) is not None
                )
                if current is not None and not may_depose:
                    raise StreamLocked(f"stream {name!r} is already open for writing")
                state.writer = handle
            return handle

    def list_streams(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        validate_stream_name(name)
        with self._lock:
            state = self._streams.get(name)
            if state is None:
                raise StreamNotFound(f"stream {name!r} does not exist in {self.describe()}")
            if state.writer is not None and not takeover:
                raise StreamLocked(
                    f"stream {name!r} is open for writing: close its writer before deleting it"
                )
            del self._streams[name]
            state.deleted = True  # handles still open get StreamNotFound
            state.writer = None

    def describe(self) -> str:
        return f"memory storage (page size {self.page_size})"

    def leases(self) -> MemoryLeases:
        """This storage's leases (in memory, like its streams)."""
        return self._leases

    def hold_server_lock(self) -> AbstractContextManager[None]:
        """Nothing to guard: no other process can reach this storage."""
        return nullcontext()

    def read_system_file(self, name: str) -> bytes | None:
        return self._system_files.get(name)

    def write_system_file(self, name: str, data: bytes) -> None:
        self._system_files[name] = bytes(data)

    def create_system_file(self, name: str, data: bytes) -> bool:
        with self._lock:
            if name in self._system_files:
                return False
            self._system_files[name] = bytes(data)
            return True

    def delete_system_file(self, name: str) -> None:
        self._system_files.pop(name, None)

    def lose_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        """Put ``checkpoint`` back as stream ``name``'s, as a power cut can leave it (tests).

        It must be one the stream had: the data it names is kept, and so is
        everything written after it.
        """
        with self._lock:
            self._streams[name].checkpoint = checkpoint

    def storage_writes(self, name: str) -> int:
        """How many ``write`` calls stream ``name`` has received (for tests)."""
        return self._streams[name].writes


def _check_lease(leases: MemoryLeases, stream: str, lease: HeldLease) -> None:
    stored = leases.superseded(lease)
    if stored is not None:
        raise StaleWriter(
            f"stream {stream!r} was taken over (lease generation {stored} > ours "
            f"{lease.generation})"
            if stored > lease.generation
            else f"stream {stream!r}: its lease (generation {lease.generation}) "
            "was released or broken"
        )


class MemoryStreamStore:
    def __init__(
        self,
        storage: MemoryStorage,
        name: str,
        state: _StreamState,
        *,
        write: bool,
        lease: HeldLease | None = None,
    ) -> None:
        self._storage = storage
        self._name = name
        self._state = state
        self._writable = write
        self._closed = False
        self.lease = lease  # the lease this handle writes under, if any

    @property
    def page_size(self) -> int:
        return self._storage.page_size

    @property
    def max_write_size(self) -> int:
        return self._storage.max_write_size

    def read(self, offset: int, size: int) -> bytes:
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        return bytes(self._state.data[offset : offset + size])

    def _check_write(self, offset: int, data: bytes | memoryview) -> None:
        """AccessDenied or ValueError unless ``write`` (or ``write_index``) may write this."""
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        page = self.page_size
        if offset < 0 or offset % page or len(data) % page:
            raise ValueError(f"writes must cover whole {page}-byte pages")
        if len(data) > self.max_write_size:
            raise ValueError(f"write of {len(data)} bytes exceeds {self.max_write_size}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_open()
        self._check_write(offset, data)
        page = self.page_size
        with self._storage._lock:
            self._check_still_writer()
            buf = self._state.data
            end = offset + len(data)
            if end > len(buf):
                if page > 1:  # page blobs grow in big steps; the new space reads as zeros
                    end = -(-end // GROWTH_STEP) * GROWTH_STEP
                buf.extend(bytes(end - len(buf)))
            buf[offset : offset + len(data)] = data
            self._state.writes += 1

    def read_checkpoint(self) -> Checkpoint:
        self._check_open()
        return self._state.checkpoint

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        with self._storage._lock:
            self._check_still_writer()
            if self._state.checkpoint != expected:
                raise StaleWriter(
                    f"stream {self._name!r} was committed by another writer "
                    f"(checkpoint is at commit {self._state.checkpoint.commit}, "
                    f"this writer expected {expected.commit})"
                )
            self._state.checkpoint = new

    def _check_still_writer(self) -> None:
        if self.lease is not None:
            _check_lease(self._storage._leases, self._name, self.lease)
        if self._state.writer is not self:
            raise StaleWriter(f"stream {self._name!r} was taken over by another writer")

    def read_side(self, name: str) -> bytes | None:
        self._check_open()
        validate_side_name(name)
        return self._state.sides.get(name)

    def write_side(self, name: str, data: bytes) -> None:
        self._check_open()
        validate_side_name(name)
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        with self._storage._lock:
            if self.lease is not None:  # a lease-less deposed writer's snapshot is harmless
                self._check_still_writer()
            self._state.sides[name] = bytes(data)

    def read_access(self) -> ReadAccess:
        return ReadAccess("memory", self._name)

    def index_size(self) -> int:
        self._check_open()
        index = self._state.index
        return 0 if index is None else len(index)

    def read_index(self, offset: int, size: int) -> bytes:
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        index = self._state.index
        return b"" if index is None else bytes(index[offset : offset + size])

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        self._check_open()
        self._check_write(offset, data)
        with self._storage._lock:
            self._check_still_writer()
            index = self._state.index
            if index is None:
                index = self._state.index = bytearray()
            end = offset + len(data)
            if end > len(index):
                if self.page_size > 1:  # as an Azure page blob: doubled, zeros past the entries
                    end = max(end, 2 * len(index), INDEX_INITIAL_SIZE)
                    end = -(-end // self.page_size) * self.page_size
                index.extend(bytes(end - len(index)))
            index[offset : offset + len(data)] = data

    def truncate_index(self, size: int) -> None:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if size < 0 or size % self.page_size:
            raise ValueError(
                f"an index is cut to whole {self.page_size}-byte pages, not {size} bytes"
            )
        with self._storage._lock:
            self._check_still_writer()
            index = self._state.index
            if index is not None and size < len(index):
                del index[size:]

    def release(self, below: int) -> int:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        with self._storage._lock:
            self._check_still_writer()
            check_release(self._name, below, self._state.checkpoint)
            # Whole pages only, as Azure clears them.
            end = min(below // self.page_size * self.page_size, len(self._state.data))
            freed = max(0, end - self._state.released)
            if freed:
                self._state.data[self._state.released : end] = bytes(freed)
                self._state.released = end
            return freed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writable:
            with self._storage._lock:
                if self._state.writer is self:
                    self._state.writer = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("stream handle is closed")
        if self._state.deleted:
            raise StreamNotFound(f"stream {self._name!r} was deleted")
