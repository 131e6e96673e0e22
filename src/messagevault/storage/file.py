"""The embedded default: streams as files in a local data folder.

    <root>/<stream>/data          frames, laid end to end (see docs/FORMAT.md)
    <root>/<stream>/checkpoint    two 64-byte checkpoint slots
    <root>/<stream>/writer.lock   flock()ed by the single writer; holds its pid
                                  (shared by writers under a lease, which the lease fences)
    <root>/<stream>/index         the sparse index (``index.py``), written in place
    <root>/<stream>/<side>        side objects such as ``producers``, replaced whole
    <root>/.deleted-<stream>-<x>  a stream being deleted (moved aside, then removed)
    <root>/_system/server.lock    flock()ed by the server using the folder; holds its pid
    <root>/_system/leases/...     leases of server nodes sharing the folder (``file_leases``)

The checkpoint file has two slots, written alternately (commit number mod 2),
so a torn checkpoint write can only damage the slot being replaced: readers
take the valid slot with the higher commit number. A commit is therefore one
small in-place write, with no rename and no directory fsync.

With ``fsync=always`` a commit costs one device flush: the data's. The
checkpoint written after it is flushed lazily (at most every
``checkpoint_flush_interval`` seconds, by a commit, and on close): every
checkpoint names data already durable, so one lost in a power cut only lags,
and the writer opening the stream next rolls it forward over the whole
batches that follow it (``recovery.roll_forward``).

With ``fsync=always`` the data file is also kept ahead of the stream in
zeros, written and flushed (as PostgreSQL does with its WAL segments): a
commit then overwrites blocks that already exist, and its ``fdatasync``
writes the data and flushes the device, where a growing file would also
make the filesystem record the new size and blocks first (a journal commit
on ext4 or XFS, shared with every other file on the disk). Zeros never pass
for a frame, so neither readers (who stop at the checkpoint) nor rolling
forward read them as data.

The index is written in place by the writer, flushed only when it is cut
short and when the writer closes: it is rebuilt from the frames wherever a
crash left it behind. ``release`` punches a hole below a trimmed stream's
first readable position (``file_holes``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

from messagevault.checkpoint import CHECKPOINT_SIZE, Checkpoint
from messagevault.errors import (
    AccessDenied,
    CorruptData,
    InvalidStreamName,
    StaleWriter,
    StorageError,
    StreamLocked,
    StreamNotFound,
    WriterConflict,
)
from messagevault.names import validate_stream_name
from messagevault.storage.base import (
    ReadAccess,
    check_release,
    check_stream_lease,
    validate_side_name,
)
from messagevault.storage.file_holes import punch_hole
from messagevault.storage.file_leases import FileLeases, LeaseFence
from messagevault.storage.leases import HeldLease

DATA_FILE = "data"
CHECKPOINT_FILE = "checkpoint"
INDEX_FILE = "index"
LOCK_FILE = "writer.lock"
# A deleted stream's folder is renamed to this prefix first: no stream name
# starts with ".", so list_streams never shows it, and a crash leaves it to
# the next delete_stream or list_streams to remove.
DELETED_PREFIX = ".deleted-"
SYSTEM_FOLDER = "_system"  # cannot clash: stream names never start with "_"
SERVER_LOCK_FILE = "server.lock"  # in SYSTEM_FOLDER
MAX_WRITE_SIZE = 4 * 1024 * 1024
DEFAULT_CHECKPOINT_FLUSH_INTERVAL = 1.0  # seconds
# With fsync=always the data file runs ahead of the stream in flushed zeros,
# extended in steps of an eighth of the stream (so a small stream wastes
# little), at least PREALLOCATE_MIN_STEP and at most ``preallocate`` bytes.
DEFAULT_PREALLOCATE = 8 * 1024 * 1024
PREALLOCATE_MIN_STEP = 64 * 1024
_ZEROS = bytes(1024 * 1024)
_UNFENCED = contextlib.nullcontext()  # what a handle without a lease writes under

log = logging.getLogger("messagevault.storage.file")


class FsyncPolicy(StrEnum):
    """When the file backend forces data to disk.

    ``always``: every commit fsyncs the data before it writes the checkpoint
    and returns: an acknowledged batch survives power loss. The checkpoint
    is fsynced lazily (see the module's docstring): after a power cut it may
    lag the data, and the next writer rolls the stream forward.
    ``batch``: commits are synced together, at most ``sync_interval`` seconds
    apart; a process crash loses nothing, a power failure may lose the
    commits of the last interval. ``never``: left to the operating system.
    """

    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


class FileStorage:
    """Streams in a folder on local disk.

    ``preallocate``: with ``fsync=always``, the most bytes of zeros a
    writer extends a data file by at a time, ahead of the stream (see the
    module docstring; 0 turns it off, and the file grows with each commit).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS,
        sync_interval: float = 0.05,
        checkpoint_flush_interval: float = DEFAULT_CHECKPOINT_FLUSH_INTERVAL,
        preallocate: int = DEFAULT_PREALLOCATE,
    ) -> None:
        self.root = Path(root)
        try:
            self.fsync = FsyncPolicy(fsync)
        except ValueError:
            choices = ", ".join(p.value for p in FsyncPolicy)
            raise ValueError(f"unknown fsync policy {fsync!r}; choose one of {choices}") from None
        self.sync_interval = sync_interval
        if (
            isinstance(checkpoint_flush_interval, bool)
            or not isinstance(checkpoint_flush_interval, int | float)
            or not 0 <= checkpoint_flush_interval < float("inf")
        ):
            raise ValueError(
                "checkpoint_flush_interval must be a number of seconds, 0 or more, "
                f"not {checkpoint_flush_interval!r}"
            )
        # How long a checkpoint may stay unflushed with fsync=always: a bound on
        # what the next writer rolls forward after a power cut (0: every commit).
        self.checkpoint_flush_interval = float(checkpoint_flush_interval)
        if isinstance(preallocate, bool) or not isinstance(preallocate, int) or preallocate < 0:
            raise ValueError(
                f"preallocate must be a whole number of bytes, 0 or more, not {preallocate!r}"
            )
        # The most zeros the data file is extended by at a time with
        # fsync=always (0: never; the file then grows with each commit).
        self.preallocate = preallocate
        self._leases = FileLeases(self.root)

    def open_stream(
        self,
        name: str,
        *,
        write: bool = False,
        create: bool = False,
        takeover: bool = False,
        lease: HeldLease | None = None,
    ) -> FileStreamStore:
        # ``takeover`` cannot apply here: a live process's flock cannot be
        # broken, and a dead one's is already gone. A lease can (``LeaseFence``).
        del takeover
        validate_stream_name(name)
        check_stream_lease(name, lease, write=write)
        folder = self.root / name
        if not (folder / CHECKPOINT_FILE).exists():
            if not create:
                raise StreamNotFound(f"stream {name!r} does not exist in {self.describe()}")
            _create_stream_folder(self.root, name)
        return FileStreamStore(self, name, folder, write=write, lease=lease)

    def list_streams(self) -> list[str]:
        if not self.root.is_dir():
            return []
        self._remove_deleted()
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if (entry / CHECKPOINT_FILE).is_file() and _is_valid_name(entry.name)
        )

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        """Under the writer lock, rename the folder aside, fsync the root, then remove it.

        The rename is the deletion: atomic, and durable once the root is
        flushed. ``takeover`` cannot apply (see ``open_stream``).
        """
        del takeover
        validate_stream_name(name)
        self._remove_deleted()
        folder = self.root / name
        if not (folder / CHECKPOINT_FILE).exists():
            raise StreamNotFound(f"stream {name!r} does not exist in {self.describe()}")
        try:
            lock_fd = _take_writer_lock(folder / LOCK_FILE, name)
        except FileNotFoundError:
            raise StreamNotFound(f"stream {name!r} does not exist in {self.describe()}") from None
        except OSError as exc:
            raise StorageError(f"cannot delete stream {name!r}: {exc}") from exc
        aside = self.root / f"{DELETED_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            if not _lock_is_current(lock_fd, folder / LOCK_FILE):
                raise StreamNotFound(f"stream {name!r} was deleted meanwhile")
            folder.rename(aside)
            _fsync_path(self.root)
        except OSError as exc:
            raise StorageError(f"cannot delete stream {name!r}: {exc}") from exc
        finally:
            os.close(lock_fd)
        self._remove_deleted()

    def _remove_deleted(self) -> None:
        """Remove the folders of deleted streams (one a crash interrupted, too)."""
        try:
            leftovers = [e for e in self.root.iterdir() if e.name.startswith(DELETED_PREFIX)]
        except OSError:
            return  # no root yet, or not ours to tidy (read-only)
        for leftover in leftovers:
            # Another process may be removing it at the same time: whatever is
            # left once both are done is tried again next time.
            shutil.rmtree(leftover, ignore_errors=True)

    def describe(self) -> str:
        return f"file storage at {self.root}"

    def leases(self) -> FileLeases:
        """Leases as files under ``_system/leases`` (see ``file_leases``)."""
        return self._leases

    @contextlib.contextmanager
    def hold_server_lock(self) -> Iterator[None]:
        """flock ``_system/server.lock`` while the context lasts: one server per folder."""
        folder = self.root / SYSTEM_FOLDER
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = _exclusive_lock(folder / SERVER_LOCK_FILE)
        except _LockHeld as held:
            raise WriterConflict(
                f"another messagevault server (pid {held.holder}) already serves the data "
                f"folder {self.root.resolve()}; stop that server first, or serve another folder"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot lock {folder / SERVER_LOCK_FILE}: {exc}") from exc
        try:
            yield
        finally:
            os.close(fd)  # releases the flock

    def read_system_file(self, name: str) -> bytes | None:
        try:
            return (self.root / SYSTEM_FOLDER / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {name}: {exc}") from exc

    def write_system_file(self, name: str, data: bytes) -> None:
        """Write a temp file, fsync, rename over the old one, fsync the folder."""
        folder = self.root / SYSTEM_FOLDER
        temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_file_durably(temp, data)
            temp.replace(folder / name)
            _fsync_path(folder)
        except OSError as exc:
            raise StorageError(f"cannot write {name}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def delete_system_file(self, name: str) -> None:
        """Remove the file, then fsync the folder so that the removal survives a crash."""
        folder = self.root / SYSTEM_FOLDER
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {name}: {exc}") from exc
        try:
            _fsync_path(folder)
        except OSError as exc:
            raise StorageError(f"cannot delete {name}: {exc}") from exc

    def create_system_file(self, name: str, data: bytes) -> bool:
        """Write a temp file, fsync, link it to the name (fails if it exists), fsync the folder.

        A link, not a rename: a rename would replace a file another process
        created meanwhile. Readers see no file or the whole of it.
        """
        folder = self.root / SYSTEM_FOLDER
        temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_file_durably(temp, data)
            try:
                os.link(temp, folder / name)
            except FileExistsError:
                return False
            _fsync_path(folder)
            return True
        except OSError as exc:
            raise StorageError(f"cannot create {name}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)


def _is_valid_name(name: str) -> bool:
    try:
        validate_stream_name(name)
    except InvalidStreamName:
        return False
    return True


def _create_stream_folder(root: Path, name: str) -> None:
    """Create a stream folder atomically: build it aside, fsync, rename into place."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        temp = root / f".new-{name}-{secrets.token_hex(4)}"
        temp.mkdir()
        try:
            (temp / DATA_FILE).touch()
            checkpoint = Checkpoint().encode() + bytes(CHECKPOINT_SIZE)
            _write_file_durably(temp / CHECKPOINT_FILE, checkpoint)
            _fsync_path(temp)
            try:
                temp.rename(root / name)
            except OSError as exc:
                # ENOTEMPTY/EEXIST: a concurrent creator won; theirs is as good as ours.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            if temp.exists():
                for child in temp.iterdir():
                    child.unlink()
                temp.rmdir()
        _fsync_path(root)
    except OSError as exc:
        raise StorageError(f"cannot create stream {name!r} under {root}: {exc}") from exc


def _write_file_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # a write may be short (a signal, a large side object)
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStreamStore:
    """One stream's files. A writable handle holds ``writer.lock`` until closed.

    A handle opened under a lease holds ``writer.lock`` shared instead, which
    keeps writers without a lease off the stream (and it off theirs) but not
    the lease's next holder: a stopped process's lifetime flock would block
    failover. The lease fences it instead: each change to the stream runs
    under ``LeaseFence`` (a shared flock of the lease file and a check that
    the lease is still this handle's), so a deposed handle changes nothing.
    """

    # The durable checkpoint may lag durable frames (it is flushed lazily):
    # a writer rolls forward on open, even when asked to take over.
    checkpoint_may_lag = True

    def __init__(
        self,
        storage: FileStorage,
        name: str,
        folder: Path,
        *,
        write: bool,
        lease: HeldLease | None = None,
    ) -> None:
        self._storage = storage
        self._name = name
        self._folder = folder
        self._writable = write
        self._lock_fd: int | None = None
        self._fence: LeaseFence | None = None
        self._last_sync = time.monotonic()
        # Never: a handle's first checkpoint is flushed at once. That is the
        # one a writer writes after rolling the stream forward, so the next
        # open starts from it.
        self._checkpoint_flushed_at = -float("inf")
        self._checkpoint_unflushed = False
        self._leftovers_cut = False
        self._preallocating = (
            write and storage.fsync is FsyncPolicy.ALWAYS and storage.preallocate > 0
        )
        # What this handle wrote and committed: past both, the file holds
        # only the zeros it added, which a clean close trims.
        self._written_end = 0
        self._committed_length: int | None = None
        self._closed = False
        # Opened at first use: the index may appear after a reader opened.
        self._index_fd: int | None = None
        self._index_unflushed = False
        flags = os.O_RDWR if write else os.O_RDONLY
        try:
            if write and lease is not None:
                self._fence = storage.leases().fence(lease)
                self._fence.check()
                self._lock_fd = _share_writer_lock(folder / LOCK_FILE, name)
            elif write:
                self._lock_fd = _take_writer_lock(folder / LOCK_FILE, name)
            if self._lock_fd is not None and not _lock_is_current(
                self._lock_fd, folder / LOCK_FILE
            ):
                # Locked a deleted stream's lock file: its successor's is another.
                raise StreamNotFound(f"stream {name!r} was deleted")
            self._data_fd = os.open(folder / DATA_FILE, flags)
            self._checkpoint_fd = os.open(folder / CHECKPOINT_FILE, flags)
        except FileNotFoundError:
            self.close()
            missing = f"stream {name!r} does not exist in {storage.describe()}"
            raise StreamNotFound(missing) from None
        except BaseException:
            self.close()
            raise

    @property
    def page_size(self) -> int:
        return 1

    @property
    def max_write_size(self) -> int:
        return MAX_WRITE_SIZE

    def read(self, offset: int, size: int) -> bytes:
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        try:
            return _pread_fully(self._data_fd, size, offset)
        except OSError as exc:
            raise StorageError(f"cannot read stream {self._name!r}: {exc}") from exc

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_write(offset, data)
        view = memoryview(data)
        with self._fence or _UNFENCED:
            self._written_end = max(self._written_end, offset + len(view))
            try:
                while view:
                    written = os.pwrite(self._data_fd, view, offset)
                    view = view[written:]
                    offset += written
            except OSError as exc:
                raise StorageError(f"cannot write stream {self._name!r}: {exc}") from exc

    def read_checkpoint(self) -> Checkpoint:
        self._check_open()
        try:
            raw = os.pread(self._checkpoint_fd, 2 * CHECKPOINT_SIZE, 0)
        except OSError as exc:
            raise StorageError(f"cannot read checkpoint of {self._name!r}: {exc}") from exc
        best: Checkpoint | None = None
        for start in (0, CHECKPOINT_SIZE):
            try:
                slot = Checkpoint.decode(raw[start : start + CHECKPOINT_SIZE])
            except CorruptData:
                continue  # a torn write of the slot being replaced; the other one holds
            if best is None or slot.commit > best.commit:
                best = slot
        if best is None:
            raise CorruptData(f"both checkpoint slots of stream {self._name!r} are damaged")
        return best

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        current = self.read_checkpoint()
        if current != expected:
            raise StaleWriter(
                f"stream {self._name!r} was committed by another writer "
                f"(checkpoint is at commit {current.commit}, "
                f"this writer expected {expected.commit})"
            )
        if new.commit % 2 == current.commit % 2:
            raise ValueError("a new checkpoint must advance the commit number by one")
        storage = self._storage
        policy = storage.fsync
        now = time.monotonic()
        if policy is FsyncPolicy.ALWAYS:
            sync_data = True
            # Lazily: every checkpoint names durable data, so a stale one only lags.
            sync_checkpoint = now - self._checkpoint_flushed_at >= storage.checkpoint_flush_interval
        else:
            sync_data = sync_checkpoint = (
                policy is FsyncPolicy.BATCH and now - self._last_sync >= storage.sync_interval
            )
        fence = self._fence or _UNFENCED
        try:
            if not self._leftovers_cut:
                with fence:
                    self._cut_leftovers(new.length)
            if self._preallocating:
                # Flushed with the data, just below.
                self._keep_zeros_ahead(new.length, new.length - current.length)
            if sync_data:
                os.fdatasync(self._data_fd)  # data must be durable before the checkpoint names it
            with fence:  # the flush above may wait outside it; the replacement may not
                os.pwrite(self._checkpoint_fd, new.encode(), (new.commit % 2) * CHECKPOINT_SIZE)
            self._checkpoint_unflushed = policy is FsyncPolicy.ALWAYS
            if sync_checkpoint:
                os.fdatasync(self._checkpoint_fd)
                self._checkpoint_unflushed = False
                self._checkpoint_flushed_at = self._last_sync = time.monotonic()
        except OSError as exc:
            raise StorageError(f"cannot commit stream {self._name!r}: {exc}") from exc
        self._committed_length = new.length

    def _cut_leftovers(self, length: int) -> None:
        """Cut the data file at ``length``, before a handle's first checkpoint names it.

        What lies beyond is what no commit finished: a crash's torn or
        unflushed writes, or an uncommitted write longer than the commit
        after it. A power cut can keep the later sectors of such a write and
        lose the first, leaving a whole batch (a later one of a group commit)
        where a new batch may end; cut off, it can never be rolled forward.
        With preallocation the file is longer than the stream anyway: it is
        cut all the same, and extended again in fresh zeros.
        """
        if os.fstat(self._data_fd).st_size > length:
            os.ftruncate(self._data_fd, length)
        self._leftovers_cut = True

    def _keep_zeros_ahead(self, length: int, grown: int) -> None:
        """Extend the data file in zeros once fewer than half a step lie past ``length``.

        Only ever past the end of the file: nothing written is overwritten.
        The commit's data flush makes them durable, size and blocks with
        them, so the commits that follow overwrite blocks the filesystem
        need not record again. Not after a commit of ``grown`` bytes, half a
        step or more: commits that large (large values) outrun the zeros,
        which would only double what they write.
        """
        size = os.fstat(self._data_fd).st_size
        step = min(self._storage.preallocate, max(PREALLOCATE_MIN_STEP, length // 8))
        if size - length >= step // 2 or grown >= step // 2:
            return
        end = -(-(length + step) // 4096) * 4096  # whole filesystem blocks
        zeros = memoryview(_ZEROS)
        try:
            # Fenced: past a deposed lease holder's end may lie its successor's frames.
            with self._fence or _UNFENCED:
                while size < end:
                    size += os.pwrite(self._data_fd, zeros[: end - size], size)
        except OSError as exc:
            # No room for zeros need not mean no room for the next commit:
            # without them it only costs that commit's flush a little more.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise

    def _check_open(self) -> None:
        # A closed descriptor number may already belong to another file.
        if self._closed:
            raise ValueError(f"stream handle of {self._name!r} is closed")

    def read_side(self, name: str) -> bytes | None:
        self._check_open()
        path = self._folder / validate_side_name(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {name} of stream {self._name!r}: {exc}") from exc

    def write_side(self, name: str, data: bytes) -> None:
        """Write a temp file, fsync, rename over the old one, fsync the folder.

        The rename is what makes it atomic; the folder fsync makes the new
        name survive power loss (whatever the fsync policy: side objects are
        written rarely, and a lost one only costs a longer rebuild).
        """
        self._check_open()
        validate_side_name(name)
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        # A leading dot keeps the temp file clear of every valid side name.
        temp = self._folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            _write_file_durably(temp, data)
            with self._fence or _UNFENCED:
                temp.replace(self._folder / name)
            _fsync_path(self._folder)
        except OSError as exc:
            raise StorageError(f"cannot write {name} of stream {self._name!r}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def read_access(self) -> ReadAccess:
        return ReadAccess("file", str(self._folder.resolve()))

    def _index(self, *, create: bool) -> int | None:
        """The index file's descriptor, opened (or, writing, created) now if need be."""
        if self._index_fd is None:
            flags = os.O_RDWR if self._writable else os.O_RDONLY
            if create:
                flags |= os.O_CREAT
            try:
                self._index_fd = os.open(self._folder / INDEX_FILE, flags, 0o644)
            except FileNotFoundError:
                return None
        return self._index_fd

    def index_size(self) -> int:
        self._check_open()
        try:
            fd = self._index(create=False)
            return 0 if fd is None else os.fstat(fd).st_size
        except OSError as exc:
            raise StorageError(f"cannot read the index of {self._name!r}: {exc}") from exc

    def read_index(self, offset: int, size: int) -> bytes:
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        try:
            fd = self._index(create=False)
            return b"" if fd is None else _pread_fully(fd, size, offset)
        except OSError as exc:
            raise StorageError(f"cannot read the index of {self._name!r}: {exc}") from exc

    def _check_write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if offset < 0:
            raise ValueError("offset must not be negative")
        if len(data) > MAX_WRITE_SIZE:
            raise ValueError(f"write of {len(data)} bytes exceeds {MAX_WRITE_SIZE}")

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        """pwrite, not flushed (see the module docstring), fenced as ``write``."""
        self._check_write(offset, data)
        view = memoryview(data)
        with self._fence or _UNFENCED:
            try:
                fd = self._index(create=True)
                if fd is None:  # O_CREAT failed for want of the folder
                    raise StreamNotFound(f"stream {self._name!r} no longer exists")
                self._index_unflushed = True
                while view:
                    written = os.pwrite(fd, view, offset)
                    view = view[written:]
                    offset += written
            except OSError as exc:
                raise StorageError(f"cannot write the index of {self._name!r}: {exc}") from exc

    def truncate_index(self, size: int) -> None:
        """ftruncate and flush: entries cut off must not come back after a crash."""
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"an index is cut to a size of 0 bytes or more, not {size!r}")
        with self._fence or _UNFENCED:
            try:
                fd = self._index(create=False)
                if fd is None or os.fstat(fd).st_size <= size:
                    return
                os.ftruncate(fd, size)
                os.fdatasync(fd)
                self._index_unflushed = False
            except OSError as exc:
                raise StorageError(f"cannot cut the index of {self._name!r}: {exc}") from exc

    def release(self, below: int) -> int:
        """Punch a hole over data ``[0, below)``; the bytes of the blocks freed (0 if none).

        Not flushed: a hole lost in a crash only comes back as bytes below
        the first readable position, which no reader reads.
        """
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        check_release(self._name, below, self.read_checkpoint())
        if below == 0:
            return 0
        with self._fence or _UNFENCED:
            try:
                # The checkpoint hiding these bytes must outlive a power cut
                # before they go (it is flushed lazily): a hole under a
                # checkpoint that lost its first position would be damage, and
                # would stop a roll forward from a lagging one.
                os.fdatasync(self._checkpoint_fd)
                self._checkpoint_unflushed = False
                before = os.fstat(self._data_fd).st_blocks
                if not punch_hole(self._data_fd, 0, below):
                    _cannot_punch_holes(self._storage.root)
                    return 0
                after = os.fstat(self._data_fd).st_blocks
            except OSError as exc:
                raise StorageError(f"cannot release stream {self._name!r}: {exc}") from exc
        return max(0, before - after) * 512  # st_blocks counts 512-byte units

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writable and self._storage.fsync is FsyncPolicy.BATCH:
            with contextlib.suppress(OSError, AttributeError):
                os.fdatasync(self._data_fd)
                os.fdatasync(self._checkpoint_fd)
        elif self._writable and self._checkpoint_unflushed:
            with contextlib.suppress(OSError, AttributeError):
                os.fdatasync(self._checkpoint_fd)  # the data it names is durable already
        if self._index_fd is not None and self._index_unflushed:
            with contextlib.suppress(OSError):
                os.fdatasync(self._index_fd)
        committed = self._committed_length
        if self._preallocating and committed is not None and self._written_end <= committed:
            # Only this handle's zeros lie past what it committed: a closed
            # stream's file is as long as the stream (a lost trim leaves zeros).
            # Not a deposed lease holder's: past its commits lie the new holder's.
            with (
                contextlib.suppress(OSError, AttributeError, StaleWriter, StorageError),
                self._fence or _UNFENCED,
            ):
                os.ftruncate(self._data_fd, committed)
        for attr in ("_data_fd", "_checkpoint_fd", "_index_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        if self._fence is not None:
            self._fence.close()


_punch_warned: set[Path] = set()


def _cannot_punch_holes(root: Path) -> None:
    """Log, once per data folder, that releasing frees nothing there."""
    if root not in _punch_warned:
        _punch_warned.add(root)
        log.warning(
            "the filesystem of %s cannot punch holes: trimmed streams keep their disk "
            "space (readers still stop at the first readable position)",
            root,
        )


def _pread_fully(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes from ``offset``, fewer only at the end of the file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    # A short read of a regular file means end of file, except on the rare
    # signal interruption: finish the read to be sure.
    chunks = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _lock_is_current(fd: int, path: Path) -> bool:
    """Whether the lock file ``fd`` holds is still ``path`` (not a deleted stream's)."""
    try:
        held, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _take_writer_lock(path: Path, name: str) -> int:
    """flock() the stream's lock file, or raise ``StreamLocked`` naming the holder.

    When the holder is a server using this data folder, say so: the writer
    to use is that server (most often, someone ran a script or the CLI on
    ``./data`` beside ``make serve``).
    """
    try:
        return _exclusive_lock(path)
    except _LockHeld as held:
        server = _server_holding(path.parent.parent / SYSTEM_FOLDER / SERVER_LOCK_FILE)
        if server is not None:
            raise StreamLocked(
                f"stream {name!r} is written by the messagevault server (pid {server}) that "
                f"serves this data folder: publish through that server (the client library, "
                f"or `messagevault publish --url http://HOST:PORT`)"
            ) from None
        if _held_shared(path):
            raise StreamLocked(
                f"stream {name!r} is written by a messagevault server node under its lease: "
                "publish through the nodes (the client library, or `messagevault publish --url`)"
            ) from None
        raise StreamLocked(
            f"stream {name!r} is already open for writing by another writer (pid {held.holder})"
        ) from None


def _share_writer_lock(path: Path, name: str) -> int:
    """flock() the stream's lock file shared, as writers under a lease do; the descriptor.

    ``StreamLocked`` while a writer without a lease holds it (exclusively).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StreamLocked(
            f"stream {name!r} is open for writing by a writer without a lease (pid {holder}); "
            "stop it before serving the stream from a node"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StorageError(f"cannot lock {path}: {exc}") from exc
    return fd


def _held_shared(path: Path) -> bool:
    """Whether ``path``'s flock is held shared now (by writers under a lease), probed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _server_holding(server_lock: Path) -> str | None:
    """The pid of a server holding ``server_lock`` now, or None (probed without taking it)."""
    try:
        fd = os.open(server_lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock, if it was granted
    return None


class _LockHeld(Exception):
    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder  # the pid the holder wrote in the file, or "unknown"


def _exclusive_lock(path: Path) -> int:
    """flock() ``path`` and write our pid in it; the descriptor holds the lock until closed.

    flock locks belong to the open file description, so a second open in the
    same process conflicts too, and the kernel drops the lock when the holder
    dies, however it dies: no stale lock files to clean up after a crash.
    Raises ``_LockHeld`` naming the holder's pid.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise _LockHeld(holder) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
