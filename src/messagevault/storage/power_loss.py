"""Simulated power cuts: a storage wrapper that loses what was never flushed.

A SIGKILL loses nothing the kernel already holds; a power cut loses every
write the device was not told to flush, or part of it, in any order. This
module wraps file or memory storage, watches which writes of each stream
(data and checkpoint) are not durable yet, and on ``power_cut()`` decides
each one's fate at random (seeded): dropped, torn at a 512-byte boundary
(the part before it or the part after it lands), or kept; the checkpoint
becomes any version it had since its last flush (possibly a stale one).
What survives is left in the backend, so the stream is then reopened as
after a real outage. ``arm(n)`` makes the n-th storage event from now raise
``PowerCut`` inside the call, so a cut can land in the middle of a commit.

A write is durable once the backend's flush covering it happened:

- file storage: an ``fsync``/``fdatasync`` of the data or checkpoint file
  (the wrapper recognises them by inode, while it is open, by wrapping
  ``os.fsync``, ``os.fdatasync`` and ``os.ftruncate``: a data file cut short
  and not flushed since may grow back; it adds no hook to the backend);
- memory storage, which has no device: the data written before a commit is
  durable once ``advance_checkpoint`` returns; the checkpoint too, unless
  ``lazy_checkpoint=True``, which models a checkpoint whose flush is left
  for later: then only a clean ``close`` of the writing handle flushes it.

Side objects and system files are replaced atomically and durably by both
backends, so they are not touched. Whatever a stream holds when the wrapper
first opens it is taken as durable.

>>> from messagevault.storage import MemoryStorage
>>> from messagevault.writer import Writer
>>> power = PowerLossStorage(MemoryStorage(), seed=1)
>>> writer = Writer.open(power, "orders")
>>> _ = writer.append([(b"k", b"acknowledged")])
>>> power.arm(1)  # the power goes at the next storage call
>>> try:
...     writer.append([(b"k", b"in flight")])
... except PowerCut:
...     pass
>>> report = power.power_cut()
>>> from messagevault.reader import Reader
>>> [m.value for m in Reader.open(power, "orders").read()][0]
b'acknowledged'
>>> power.close()
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from messagevault.checkpoint import Checkpoint
from messagevault.storage.base import ReadAccess
from messagevault.storage.file import CHECKPOINT_FILE, DATA_FILE, FileStorage, FileStreamStore
from messagevault.storage.leases import HeldLease
from messagevault.storage.memory import MemoryStorage, MemoryStreamStore

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

SECTOR = 512  # the unit a device writes whole: a torn write breaks between sectors


class PowerCut(BaseException):
    """The simulated power went out inside a storage call.

    A ``BaseException``, like ``KeyboardInterrupt``: code under test must not
    catch it and carry on, as it could not carry on after a real outage.
    """


@dataclass(frozen=True, slots=True)
class CutReport:
    """What one ``power_cut`` did, summed over the streams it touched."""

    dropped: int = 0
    torn: int = 0
    kept: int = 0
    stale_checkpoints: int = 0  # streams whose checkpoint went back to an earlier version


@dataclass(slots=True)
class _PendingWrite:
    offset: int
    data: bytes
    before: bytes  # what the bytes were, zero-padded to len(data): what a drop restores
    truncate: bool = False  # the file was cut at ``offset`` (``before``: what it lost)


@dataclass(slots=True)
class _Volatile:
    """One stream's writes since its last flushes."""

    pending: list[_PendingWrite] = field(default_factory=list)
    # Every version the checkpoint had since its last flush, the durable one
    # first: a device may have written back any of them.
    checkpoints: list[object] = field(default_factory=list)
    durable_size: int | None = None  # of the data file (file storage), as of its last flush


class _FileObjects:
    """Raw access to a file-storage stream's two files, bypassing the writer lock."""

    def __init__(self, storage: FileStorage) -> None:
        self._root = storage.root

    def identities(self, name: str) -> dict[tuple[int, int], str]:
        folder = self._root / name
        found = {}
        for kind, file in (("data", DATA_FILE), ("checkpoint", CHECKPOINT_FILE)):
            status = os.stat(folder / file)
            found[(status.st_dev, status.st_ino)] = kind
        return found

    def checkpoint_image(self, name: str) -> object:
        return (self._root / name / CHECKPOINT_FILE).read_bytes()

    def data_size(self, name: str) -> int | None:
        return os.stat(self._root / name / DATA_FILE).st_size

    def restore(
        self,
        name: str,
        writes: list[tuple[int, bytes | None]],
        checkpoint: object,
        size: int | None,
    ) -> None:
        fd = os.open(self._root / name / DATA_FILE, os.O_WRONLY)
        try:
            for offset, data in writes:
                if data is None:
                    os.ftruncate(fd, offset)
                else:
                    os.pwrite(fd, data, offset)
            if size is not None:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        assert isinstance(checkpoint, bytes)
        (self._root / name / CHECKPOINT_FILE).write_bytes(checkpoint)


class _MemoryObjects:
    """Access to a memory-storage stream through a handle that takes the writer lock over."""

    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage

    def identities(self, name: str) -> dict[tuple[int, int], str]:
        del name
        return {}  # nothing to flush: commits stand for flushes

    def checkpoint_image(self, name: str) -> object:
        store = self._storage.open_stream(name)
        try:
            return store.read_checkpoint()
        finally:
            store.close()

    def data_size(self, name: str) -> int | None:
        del name
        return None  # memory never shrinks: what was never written reads as zeros

    def restore(
        self,
        name: str,
        writes: list[tuple[int, bytes | None]],
        checkpoint: object,
        size: int | None,
    ) -> None:
        del size
        assert isinstance(checkpoint, Checkpoint)
        store = self._storage.open_stream(name, write=True, takeover=True)
        try:
            for offset, data in writes:
                assert data is not None  # memory is never cut short
                store.write(offset, data)
            # Memory storage takes any checkpoint, even an older one: that is the stale one.
            store.advance_checkpoint(checkpoint, expected=store.read_checkpoint())
        finally:
            store.close()


class PowerLossStorage:
    """File or memory storage whose power can be cut (see the module docstring).

    ``seed`` makes every choice repeatable: the cut points given to ``arm``
    are the caller's, every fate is drawn from ``random.Random(seed)``.
    ``holes=True`` lets half the torn writes lose any of their sectors, not
    only those before or after one boundary (page cache written back out of
    order).
    Use it as a context manager, or ``close()`` it: that stops watching
    flushes. It does not close the streams opened through it.
    """

    def __init__(
        self,
        inner: FileStorage | MemoryStorage,
        *,
        seed: int,
        lazy_checkpoint: bool = False,
        holes: bool = False,
    ) -> None:
        if isinstance(inner, FileStorage):
            self._objects: _FileObjects | _MemoryObjects = _FileObjects(inner)
        elif isinstance(inner, MemoryStorage):
            self._objects = _MemoryObjects(inner)
        else:
            raise TypeError(f"cannot cut the power of {type(inner).__name__}: file or memory only")
        self.inner = inner
        self.seed = seed
        self.lazy_checkpoint = lazy_checkpoint
        self.holes = holes
        self._random = random.Random(seed)  # noqa: S311 - repeatable faults, not secrets
        self._lock = threading.RLock()
        self._streams: dict[str, _Volatile] = {}
        self._handles: list[PowerLossStreamStore] = []
        self._inodes: dict[tuple[int, int], tuple[str, str]] = {}
        self._countdown: int | None = None
        self._out = False  # the power is off: a cut fired and power_cut() has not run yet
        self._closing = 0  # handles being closed now
        self._closed = False
        self.cuts = 0
        _watch_flushes(self)

    # -- the Storage protocol ------------------------------------------------

    def open_stream(
        self,
        name: str,
        *,
        write: bool = False,
        create: bool = False,
        takeover: bool = False,
        lease: HeldLease | None = None,
    ) -> PowerLossStreamStore:
        self._check_power()
        inner = self.inner.open_stream(
            name, write=write, create=create, takeover=takeover, lease=lease
        )
        with self._lock:
            if name not in self._streams:
                self._streams[name] = _Volatile(
                    checkpoints=[self._objects.checkpoint_image(name)],
                    durable_size=self._objects.data_size(name),
                )
                for identity, kind in self._objects.identities(name).items():
                    self._inodes[identity] = (name, kind)
            handle = PowerLossStreamStore(self, name, inner, write=write)
            self._handles.append(handle)
        return handle

    def list_streams(self) -> list[str]:
        return self.inner.list_streams()

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        self._check_power()
        self.inner.delete_stream(name, takeover=takeover)
        with self._lock:
            # A stream of that name created later is a new one, durable as found.
            self._streams.pop(name, None)
            for identity, (stream, _) in list(self._inodes.items()):
                if stream == name:
                    del self._inodes[identity]

    def describe(self) -> str:
        return f"{self.inner.describe()}, with simulated power cuts (seed {self.seed})"

    # -- cutting the power ---------------------------------------------------

    def arm(self, events: int) -> None:
        """Cut the power at the ``events``-th storage event from now (1: the next).

        An event is the start or the end of a ``write`` or an
        ``advance_checkpoint``, or of a flush (file storage). The call in
        which it falls raises ``PowerCut``; then call ``power_cut()``.
        """
        if events < 1:
            raise ValueError(f"events must be at least 1, not {events}")
        with self._lock:
            self._countdown = events

    def disarm(self) -> None:
        with self._lock:
            self._countdown = None

    @property
    def power_is_out(self) -> bool:
        """An armed cut fired and ``power_cut()`` has not restored power yet."""
        return self._out

    def power_cut(self) -> CutReport:
        """Cut the power now (or finish a cut that fired) and bring it back.

        Every handle opened before is dead afterwards (its calls raise
        ``PowerCut``); the streams hold what survived, and are reopened as
        usual.
        """
        with self._lock:
            self._out = True
            self._countdown = None
            handles, self._handles = self._handles, []
        for handle in handles:
            handle._close_inner()  # a real outage frees every lock too
        with self._lock:
            report = CutReport()
            for name, volatile in self._streams.items():
                report = _add(report, self._settle(name, volatile))
            self._out = False
            self.cuts += 1
        return report

    def _settle(self, name: str, volatile: _Volatile) -> CutReport:
        """Decide the fate of each undurable write of ``name`` and leave the result in storage."""
        if not volatile.pending and len(volatile.checkpoints) == 1:
            return CutReport()
        counts = {"dropped": 0, "torn": 0, "kept": 0}
        # Back to the durable bytes (undo in reverse), then the survivors in order.
        writes: list[tuple[int, bytes | None]] = [
            (w.offset, w.before) for w in reversed(volatile.pending)
        ]
        undone = len(writes)
        for write in volatile.pending:
            fate, parts = self._fate(write)
            counts[fate] += 1
            writes.extend(parts)
        index = self._random.randrange(len(volatile.checkpoints))
        checkpoint = volatile.checkpoints[index]
        size = None
        cut_short = any(write.truncate for write in volatile.pending)
        if volatile.durable_size is not None and not cut_short and self._random.randrange(2):
            # The file's size as of its last flush, or as far as a surviving write
            # reached; otherwise what the dropped writes added reads as zeros.
            landed = (offset + len(data) for offset, data in writes[undone:] if data is not None)
            size = max([volatile.durable_size, *landed])
        self._objects.restore(name, writes, checkpoint, size)
        volatile.pending.clear()
        volatile.durable_size = self._objects.data_size(name)
        stale = int(index < len(volatile.checkpoints) - 1)
        volatile.checkpoints[:] = [checkpoint]
        return CutReport(counts["dropped"], counts["torn"], counts["kept"], stale)

    def _fate(self, write: _PendingWrite) -> tuple[str, list[tuple[int, bytes | None]]]:
        """Dropped, torn or kept, and what of ``write`` landed (None: cut short there)."""
        choose = self._random.randrange
        if write.truncate:  # a change of size lands whole, or not at all
            return ("kept", [(write.offset, None)]) if choose(2) else ("dropped", [])
        fate = choose(3)
        end = write.offset + len(write.data)
        boundaries = range((write.offset // SECTOR + 1) * SECTOR, end, SECTOR)
        if fate == 1 and boundaries and self.holes and choose(2):
            # Written back out of order: any of its sectors may have landed.
            edges = [write.offset, *boundaries, end]
            parts: list[tuple[int, bytes | None]] = [
                (start, write.data[start - write.offset : stop - write.offset])
                for start, stop in itertools.pairwise(edges)
                if choose(2)
            ]
            return "torn", parts
        if fate == 1 and boundaries:
            cut = self._random.choice(boundaries) - write.offset
            if choose(2):
                return "torn", [(write.offset, write.data[:cut])]
            return "torn", [(write.offset + cut, write.data[cut:])]
        if fate == 2 or (fate == 1 and choose(2)):
            return "kept", [(write.offset, write.data)]
        return "dropped", []

    # -- what the stream handles and the flush watcher report -----------------

    def _check_power(self) -> None:
        if self._out:
            raise PowerCut("the power is out: call power_cut() to bring it back")

    def _event(self) -> None:
        """One storage event: the power goes if this is the armed one.

        Inside a handle's ``close`` the cut is only noted, and raised once the
        backend let go of the handle (an outage frees it too).
        """
        with self._lock:
            if self._out and self._closing:
                return
            self._check_power()
            if self._countdown is None:
                return
            self._countdown -= 1
            if self._countdown > 0:
                return
            self._countdown = None
            self._out = True
            if self._closing:
                return
        raise PowerCut("simulated power cut")

    def _wrote(self, name: str, offset: int, data: bytes, before: bytes) -> None:
        with self._lock:
            if not self._out:
                self._streams[name].pending.append(_PendingWrite(offset, data, before))

    def _truncating(self, identity: tuple[int, int], fd: int, length: int) -> None:
        """The file backend is about to cut a file short (file storage): note what it loses."""
        with self._lock:
            found = self._inodes.get(identity)
            if found is None or found[1] != "data" or self._out:
                return
            size = os.fstat(fd).st_size
            if size > length:
                lost = os.pread(fd, size - length, length)
                write = _PendingWrite(length, b"", lost, truncate=True)
                self._streams[found[0]].pending.append(write)

    def _checkpoint_written(self, name: str, *, flushed: bool) -> None:
        """Note the checkpoint's version now; ``flushed``: it is the durable one.

        Noted even while the power is out: a cut inside a commit comes after
        the checkpoint write it may have let through, never before one.
        """
        with self._lock:
            volatile = self._streams[name]
            image = self._objects.checkpoint_image(name)
            if flushed and not self._out:
                volatile.checkpoints[:] = [image]
            elif image != volatile.checkpoints[-1]:
                volatile.checkpoints.append(image)

    def _committed(self, name: str) -> None:
        """A commit returned: on memory storage, that is the flush of what came before."""
        if isinstance(self._objects, _MemoryObjects):
            with self._lock:
                if not self._out:
                    self._streams[name].pending.clear()
            self._checkpoint_written(name, flushed=not self.lazy_checkpoint)
        else:
            self._checkpoint_written(name, flushed=False)

    def _flushed(self, identity: tuple[int, int], when: str) -> None:
        """A flush of one of our files starts or ends (file storage)."""
        with self._lock:
            found = self._inodes.get(identity)
            if found is None or self._out:
                return
            if when == "end":  # it returned: durable, whatever comes next
                name, kind = found
                if kind == "data":
                    volatile = self._streams[name]
                    volatile.pending.clear()
                    volatile.durable_size = self._objects.data_size(name)
                else:
                    self._checkpoint_written(name, flushed=True)
        self._event()

    def close(self) -> None:
        """Stop watching flushes. Idempotent."""
        if not self._closed:
            self._closed = True
            _unwatch_flushes(self)

    def __enter__(self) -> PowerLossStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _add(a: CutReport, b: CutReport) -> CutReport:
    return CutReport(
        a.dropped + b.dropped,
        a.torn + b.torn,
        a.kept + b.kept,
        a.stale_checkpoints + b.stale_checkpoints,
    )


class PowerLossStreamStore:
    """A stream handle that reports its writes and commits to its ``PowerLossStorage``."""

    def __init__(
        self,
        power: PowerLossStorage,
        name: str,
        inner: FileStreamStore | MemoryStreamStore,
        *,
        write: bool,
    ) -> None:
        self._power = power
        self._name = name
        self._inner = inner
        self._writable = write
        self._dead = False

    @property
    def page_size(self) -> int:
        return self._inner.page_size

    @property
    def max_write_size(self) -> int:
        return self._inner.max_write_size

    def _alive(self) -> FileStreamStore | MemoryStreamStore:
        if self._dead:
            raise PowerCut(f"stream {self._name!r} was opened before a power cut")
        self._power._check_power()
        return self._inner

    def read(self, offset: int, size: int) -> bytes:
        return self._alive().read(offset, size)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        inner = self._alive()
        if not self._writable:
            inner.write(offset, data)  # refused by the backend, with its own error
            return
        data = bytes(data)
        before = inner.read(offset, len(data))
        before += bytes(len(data) - len(before))
        self._power._event()
        inner.write(offset, data)
        self._power._wrote(self._name, offset, data, before)
        self._power._event()

    def read_checkpoint(self) -> Checkpoint:
        return self._alive().read_checkpoint()

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        inner = self._alive()
        if self._writable:
            self._power._event()
        try:
            inner.advance_checkpoint(new, expected=expected)
        finally:
            if self._writable:
                self._power._checkpoint_written(self._name, flushed=False)
        self._power._committed(self._name)
        self._power._event()

    def read_side(self, name: str) -> bytes | None:
        return self._alive().read_side(name)

    def write_side(self, name: str, data: bytes) -> None:
        self._alive().write_side(name, data)

    # The index and releases pass straight through, no storage events: the
    # index is rebuilt from the frames, and released bytes lie below the
    # first readable position (both are durable eventually, by contract).

    def index_size(self) -> int:
        return self._alive().index_size()

    def read_index(self, offset: int, size: int) -> bytes:
        return self._alive().read_index(offset, size)

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        self._alive().write_index(offset, data)

    def truncate_index(self, size: int) -> None:
        self._alive().truncate_index(size)

    def release(self, below: int) -> int:
        return self._alive().release(below)

    def read_access(self) -> ReadAccess:
        return self._inner.read_access()

    def close(self) -> None:
        """Close the handle; a writing handle on memory storage flushes its checkpoint."""
        if self._dead:
            return  # the outage closed it
        self._dead = True
        if self._power.power_is_out:
            return  # power_cut() closes it without letting anything become durable
        if self._writable and isinstance(self._inner, MemoryStreamStore):
            self._power._checkpoint_written(self._name, flushed=True)
        power = self._power
        with power._lock:
            power._closing += 1
        try:
            self._inner.close()  # on file storage, maybe a flush: an event
        finally:
            with power._lock:
                power._closing -= 1
        power._check_power()  # the power went during the close

    def _close_inner(self) -> None:
        self._dead = True
        self._inner.close()


# -- watching the file backend's flushes ----------------------------------------

_watchers: list[PowerLossStorage] = []
_watch_lock = threading.Lock()
_real_fsync = os.fsync
_real_fdatasync = os.fdatasync
_real_ftruncate = os.ftruncate


def _identity(fd: FileDescriptorLike) -> tuple[int, int] | None:
    try:
        status = os.fstat(fd if isinstance(fd, int) else fd.fileno())
    except OSError:
        return None
    return status.st_dev, status.st_ino


@contextmanager
def _flush_of(fd: FileDescriptorLike) -> Iterator[None]:
    """Tell the watchers a flush of ``fd`` starts and, once it returned, that it ended."""
    watchers = list(_watchers)
    identity = _identity(fd) if watchers else None
    if identity is not None:
        for watcher in watchers:
            watcher._flushed(identity, "start")
    yield
    if identity is not None:
        for watcher in watchers:
            watcher._flushed(identity, "end")


def _watched(
    real: Callable[[FileDescriptorLike], None],
) -> Callable[[FileDescriptorLike], None]:
    def flush(fd: FileDescriptorLike) -> None:
        with _flush_of(fd):
            real(fd)

    flush.__name__ = real.__name__
    return flush


def _watched_ftruncate(fd: int, length: int) -> None:
    """``os.ftruncate``, telling the watchers first: a cut short file may grow back."""
    identity = _identity(fd) if _watchers else None
    if identity is not None:
        for watcher in _watchers:
            watcher._truncating(identity, fd, length)
    _real_ftruncate(fd, length)


def _watch_flushes(power: PowerLossStorage) -> None:
    if not isinstance(power.inner, FileStorage):
        return
    with _watch_lock:
        if not _watchers:
            # setattr: the backend looks them up in ``os`` at each call.
            setattr(os, "fsync", _watched(_real_fsync))  # noqa: B010
            setattr(os, "fdatasync", _watched(_real_fdatasync))  # noqa: B010
            setattr(os, "ftruncate", _watched_ftruncate)  # noqa: B010
        _watchers.append(power)


def _unwatch_flushes(power: PowerLossStorage) -> None:
    with _watch_lock:
        if power in _watchers:
            _watchers.remove(power)
            if not _watchers:
                setattr(os, "fsync", _real_fsync)  # noqa: B010
                setattr(os, "fdatasync", _real_fdatasync)  # noqa: B010
                setattr(os, "ftruncate", _real_ftruncate)  # noqa: B010
