"""Streams in Azure Storage page blobs, through the official SDK.

    container  mv-<stream>
      data        page blob: the frames (docs/FORMAT.md), grown in large steps
      checkpoint  block blob, empty; its metadata holds the checkpoint fields
      index       page blob: the sparse index (``index.py``), created by the first
                  ``write_index`` and grown by doubling; zeros past the entries
      <side>      block blobs such as ``producers``, replaced whole (``write_side``)
    container  messagevault-system   what the server keeps (users, leader lock)

A writer holds an infinite lease on the data and checkpoint blobs, and on the
index once it writes there, all under one lease id; every data write, resize,
clear and checkpoint update names it, and the checkpoint update is also
conditional on the checkpoint's ETag. A writer that lost its lease
(``takeover`` by another) or whose ETag is stale fails with ``StaleWriter``
and changes nothing. ``release`` clears whole pages (Azure stops billing
them); ``delete_stream`` takes the writer's leases as a writer would, then
deletes the container.

A commit is durable once its Put Page(s) returned (Azure Storage answers
only for what it has stored), so ``advance_checkpoint`` hands the checkpoint
update to a background thread and returns: the next commit's Put Page
overlaps it, and a sequential producer pays one round trip per append. The
thread writes updates in order, one at a time and at most one per
``checkpoint_interval``, only the newest of those waiting; each names data
already stored, so readers never read past durable data, they see it at most
an interval and a round trip later. After a crash the checkpoint may lag
acknowledged commits: the next writer rolls forward (``checkpoint_may_lag``).

Only this module and its siblings (``azure_lease``, ``azure_leases``, ``azure_documents``,
``azure_cors``) import the Azure SDK (tests/test_api.py keeps it so).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import (
    BlobClient,
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    LinearRetry,
    generate_container_sas,
)

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    AccessDenied,
    CorruptData,
    InvalidStreamName,
    LeaseHeld,
    LeaseLost,
    MessageVaultError,
    StaleWriter,
    StorageError,
    StreamLocked,
    StreamNotFound,
    UnsupportedVersion,
)
from messagevault.format import CHECKPOINT_V1, CHECKPOINT_VERSION
from messagevault.names import validate_stream_name
from messagevault.storage.azure_lease import BlobLease, error_code
from messagevault.storage.azure_leases import AzureLeases
from messagevault.storage.base import (
    ReadAccess,
    check_release,
    check_stream_lease,
    validate_side_name,
)
from messagevault.storage.leases import HeldLease

CONTAINER_PREFIX = "mv-"
SYSTEM_CONTAINER = "messagevault-system"  # cannot clash: stream containers start "mv-"
DATA_BLOB = "data"
CHECKPOINT_BLOB = "checkpoint"
INDEX_BLOB = "index"
INDEX_INITIAL_SIZE = 64 * 1024  # the index blob's first size, doubled as it grows
USERS_BLOB = "users.json"  # the server's users and claims (hashed passwords only)
LEADER_LOCK_BLOB = "leader-lock"  # empty; leased by the node that is leader
LEADER_INFO_BLOB = "leader.json"  # the leader's address, for other nodes to forward to
PAGE_SIZE = 512
MAX_WRITE_SIZE = 4 * 1024 * 1024  # Azure's Put Page limit (Azurite accepts more: we don't)
MAX_BLOB_SIZE = 8 * 1024**4  # Azure's page blob limit
INITIAL_SIZE = 4 * 1024 * 1024
MAX_GROWTH_STEP = 1024**3
DEFAULT_SAS_EXPIRY = timedelta(hours=1)
# At most one checkpoint update per this many seconds (and stream), the commits
# in between coalesced into the next. Azure bills each update as a write and
# serves a single blob up to ~500 requests/s; Azurite (one thread) makes the
# next commit's Put Page wait behind it. Direct readers lag by this (and a round
# trip) at most: half of Reader.follow's default poll interval.
DEFAULT_CHECKPOINT_INTERVAL = 0.05
MAX_CHECKPOINT_INTERVAL = 60.0
# A checkpoint update that failed is tried again after this, doubling up to
# the maximum, for as long as the handle is open: nothing else makes the
# commits it names visible to readers.
RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 1.0
# How long ``close`` waits for the checkpoint updates still in flight. One
# that does not land in time is no loss: the next writer rolls forward.
CLOSE_DRAIN_TIMEOUT = 10.0

log = logging.getLogger("messagevault.storage.azure")
T = TypeVar("T")

_LEASE_LOST_CODES = {
    "LeaseIdMismatchWithBlobOperation",
    "LeaseNotPresentWithBlobOperation",
    "LeaseIdMissing",
    "LeaseLost",
    "LeaseIdMismatchWithLeaseOperation",
}


def client_options() -> dict[str, Any]:
    """SDK options: short retries and timeouts, so one call fails within seconds.

    The writer rides out longer outages itself, bounded by its
    ``commit_timeout``, and checks between attempts whether a commit that
    seemed to fail had landed. The SDK's own default (retries 15 s and more
    apart, 20 s to connect, 60 s to read) would let a single call overrun
    that bound several times over.
    """
    return {
        # The SDK annotates these as int but sleeps for any float.
        "retry_policy": LinearRetry(
            backoff=0.5,  # type: ignore[arg-type]
            retry_total=2,
            random_jitter_range=0.25,  # type: ignore[arg-type]
        ),
        "connection_timeout": 5,
        "read_timeout": 20,
    }


@contextlib.contextmanager
def azure_errors(what: str) -> Iterator[None]:
    """Translate SDK errors into ours, most specific first, chained."""
    try:
        yield
    except MessageVaultError:
        raise
    except ResourceNotFoundError as exc:
        raise StreamNotFound(f"{what}: not found") from exc
    except HttpResponseError as exc:
        code = error_code(exc)
        if code == "ContainerBeingDeleted":
            # Azure takes a while (up to about a minute) to delete a container.
            raise StorageError(
                f"{what}: a stream of that name is still being deleted; try again shortly"
            ) from exc
        if exc.status_code == 403:
            raise AccessDenied(f"{what}: access denied ({code or exc.reason})") from exc
        if exc.status_code == 412 and code in _LEASE_LOST_CODES:
            raise StaleWriter(f"{what}: this writer lost its lease ({code})") from exc
        raise StorageError(f"{what}: {exc.status_code} {code or exc.reason}") from exc
    except AzureError as exc:
        raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc


class AzureStorage:
    """Streams in one Azure storage account (or Azurite).

    ``checkpoint_interval`` (seconds, 0-60): a writer updates a stream's
    checkpoint at most this often, the commits in between coalesced.
    """

    def __init__(
        self,
        service: BlobServiceClient,
        *,
        sas_expiry: timedelta = DEFAULT_SAS_EXPIRY,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        if (
            isinstance(checkpoint_interval, bool)
            or not isinstance(checkpoint_interval, int | float)
            or not 0 <= checkpoint_interval <= MAX_CHECKPOINT_INTERVAL
        ):
            raise ValueError(
                f"checkpoint_interval must be 0-{MAX_CHECKPOINT_INTERVAL:g} seconds, "
                f"not {checkpoint_interval!r}"
            )
        self.service = service
        self.sas_expiry = sas_expiry
        self.checkpoint_interval = float(checkpoint_interval)
        self._leases: AzureLeases | None = None
        self._system_made = False  # the system container and leader lock exist (system_container)

    @classmethod
    def from_connection_string(cls, connection_string: str, **kwargs: Any) -> AzureStorage:
        service = BlobServiceClient.from_connection_string(connection_string, **client_options())
        return cls(service, **kwargs)

    def open_stream(
        self,
        name: str,
        *,
        write: bool = False,
        create: bool = False,
        takeover: bool = False,
        lease: HeldLease | None = None,
    ) -> AzureStreamStore:
        validate_stream_name(name)
        check_stream_lease(name, lease, write=write)
        if lease is not None:
            # The lease's holder takes the stream over: breaking the deposed
            # holder's blob leases fences it by Azure's own lease checks.
            self.leases().check_current(lease)
            takeover = True
        container = self.service.get_container_client(CONTAINER_PREFIX + name)
        if create:
            _create_stream(container, name)
        store = AzureStreamStore(container, name, storage=self, write=write)
        try:
            store.open(takeover=takeover)
            if lease is not None:
                # Checked again now that the blobs are ours: a holder deposed while
                # it opened steps back rather than keep the stream from the new one.
                self.leases().check_current(lease)
        except BaseException:
            store.close()
            raise
        return store

    def list_streams(self) -> list[str]:
        names = []
        with azure_errors("cannot list streams"):
            for container in self.service.list_containers(name_starts_with=CONTAINER_PREFIX):
                name = container.name[len(CONTAINER_PREFIX) :]
                with contextlib.suppress(InvalidStreamName):
                    names.append(validate_stream_name(name))
        return sorted(names)

    def delete_stream(self, name: str, *, takeover: bool = False) -> None:
        """Take the stream's leases as a writer opening it would, then delete its container.

        Holding them keeps a writer from opening it meanwhile; a live writer's
        (or a crashed one's, whose lease never ends) is ``StreamLocked``
        unless ``takeover``. One Delete Container removes every blob.
        """
        validate_stream_name(name)
        container = self.service.get_container_client(CONTAINER_PREFIX + name)
        store = AzureStreamStore(container, name, storage=self, write=True)
        try:
            store.open(takeover=takeover)
            with azure_errors(f"cannot delete stream {name!r}"):
                container.delete_container()
            store.forget_leases()  # gone with their blobs
        finally:
            store.close()

    def system_container(self) -> ContainerClient:
        """The container for server state (users, leader lock), created on first use.

        Once made it is taken to stay: making sure on every use cost each
        system file read or write two more requests (two billed 409s on
        Azure). A write that finds it gone after all (deleted by hand) makes
        it again (``_system_write``); a read finds no file, as it should.
        """
        if not self._system_made:
            self._make_system_container()
        return self.service.get_container_client(SYSTEM_CONTAINER)

    def _make_system_container(self) -> None:
        container = self.service.get_container_client(SYSTEM_CONTAINER)
        with azure_errors("cannot create the system container"):
            with contextlib.suppress(ResourceExistsError):
                container.create_container()
            with contextlib.suppress(ResourceExistsError):
                container.get_blob_client(LEADER_LOCK_BLOB).upload_blob(b"", overwrite=False)
        self._system_made = True

    def _system_write(self, name: str, write: Callable[[BlobClient], T]) -> T:
        """``write`` on the system blob ``name``; the system container is made again if gone."""
        try:
            return write(self.system_container().get_blob_client(name))
        except ResourceNotFoundError as exc:
            if error_code(exc) != "ContainerNotFound":
                raise
            self._make_system_container()
            return write(self.system_container().get_blob_client(name))

    def leader_lease(self) -> BlobLease:
        """A lease on the leader lock, for a server node to compete for leadership."""
        self._make_system_container()  # rare: the lock must be there, whatever happened since
        return BlobLease(self.system_container().get_blob_client(LEADER_LOCK_BLOB))

    def describe(self) -> str:
        return f"azure storage account {self.service.account_name} at {self.service.url}"

    def hold_server_lock(self) -> contextlib.AbstractContextManager[None]:
        """Not enforced yet: a second server on the same account starts too.

        Holding a lease on a blob for a server's lifetime needs renewing it
        in the background; that comes with leader election (``leader_lease``),
        which makes several nodes on one account a feature.
        """
        return contextlib.nullcontext()

    def read_system_file(self, name: str) -> bytes | None:
        blob = self.system_container().get_blob_client(name)
        try:
            with azure_errors(f"cannot read {name}"):
                return bytes(blob.download_blob().readall())
        except StreamNotFound:
            return None

    def write_system_file(self, name: str, data: bytes) -> None:
        # A block blob upload replaces the whole blob atomically.
        with azure_errors(f"cannot write {name}"):
            self._system_write(name, lambda blob: blob.upload_blob(data, overwrite=True))

    def delete_system_file(self, name: str) -> None:
        try:
            with azure_errors(f"cannot delete {name}"):
                self.system_container().get_blob_client(name).delete_blob()
        except StreamNotFound:
            pass  # already gone

    def create_system_file(self, name: str, data: bytes) -> bool:
        # overwrite=False sends If-None-Match: *, which Azure checks atomically.
        with azure_errors(f"cannot create {name}"):
            try:
                self._system_write(name, lambda blob: blob.upload_blob(data, overwrite=False))
            except ResourceExistsError:
                return False
        return True

    def leases(self) -> AzureLeases:
        """Leases on blobs under ``leases/`` in the system container (see ``azure_leases``)."""
        if self._leases is None:
            self._leases = AzureLeases(self.system_container)
        return self._leases


def _create_stream(container: ContainerClient, name: str) -> None:
    """Create container, data blob, then checkpoint: a stream exists once its checkpoint does."""
    with azure_errors(f"cannot create stream {name!r}"):
        try:
            container.create_container()
        except ResourceExistsError as exc:
            if error_code(exc) == "ContainerBeingDeleted":  # a 409 too, but no stream
                raise
        with contextlib.suppress(ResourceExistsError):
            container.get_blob_client(DATA_BLOB).create_page_blob(
                INITIAL_SIZE, match_condition=MatchConditions.IfMissing
            )
        with contextlib.suppress(ResourceExistsError):
            container.get_blob_client(CHECKPOINT_BLOB).upload_blob(
                b"", metadata=_metadata(Checkpoint()), overwrite=False
            )


def _metadata(checkpoint: Checkpoint) -> dict[str, str]:
    metadata = {
        "formatversion": str(checkpoint.version),
        "commit": str(checkpoint.commit),
        "length": str(checkpoint.length),
        "nextsequence": str(checkpoint.next_sequence),
        "lastframeposition": str(checkpoint.last_frame_position),
        "lasttimestamp": str(checkpoint.last_timestamp),
    }
    if checkpoint.first_position:  # version 2: a trimmed stream
        metadata["firstposition"] = str(checkpoint.first_position)
    return metadata


def _checkpoint_from(metadata: dict[str, str], where: str) -> Checkpoint:
    try:
        version = int(metadata["formatversion"])
        if version not in (CHECKPOINT_V1, CHECKPOINT_VERSION):
            raise UnsupportedVersion(f"{where}: checkpoint format version {version}")
        first_position = int(metadata["firstposition"]) if version == CHECKPOINT_VERSION else 0
        length = int(metadata["length"])
        if not 0 <= first_position <= length:
            raise ValueError(f"first position {first_position} outside 0..{length}")
        return Checkpoint(
            int(metadata["commit"]),
            length,
            int(metadata["nextsequence"]),
            int(metadata["lastframeposition"]),
            int(metadata["lasttimestamp"]),
            first_position,
        )
    except (KeyError, ValueError) as exc:
        raise CorruptData(f"{where}: damaged checkpoint metadata {metadata!r}") from exc


class AzureStreamStore:
    """One stream's data page blob and checkpoint blob.

    A writable handle updates the checkpoint in the background (see the
    module's docstring): ``advance_checkpoint`` returns before the update
    lands, ``read_checkpoint`` first waits for the updates handed over
    (raising what they raised), and a lost lease or a moved checkpoint found
    by an update makes the next ``write`` or ``advance_checkpoint`` raise
    ``StaleWriter``.
    """

    remote = True  # reads are round trips: readers fetch ahead (reader._ReadAhead)
    # A crash may leave acknowledged commits past the stored checkpoint (their
    # update was still in flight), and so may a takeover: every commit whose
    # Put Page landed before the new lease may have been acknowledged.
    checkpoint_may_lag = True

    def __init__(
        self,
        container: ContainerClient,
        name: str,
        *,
        storage: AzureStorage | None,
        write: bool,
    ) -> None:
        self._container = container
        self._name = name
        self._storage = storage
        self._writable = write
        self._data: BlobClient = container.get_blob_client(DATA_BLOB)
        self._checkpoint_blob: BlobClient = container.get_blob_client(CHECKPOINT_BLOB)
        self._index: BlobClient = container.get_blob_client(INDEX_BLOB)
        self._leases: list[BlobLease] = []
        # The index blob's size as this writer last knew it, and its lease
        # (taken at the first write_index or truncate_index), if any.
        self._index_size: int | None = None
        self._index_lease: BlobLease | None = None
        self._known: tuple[Checkpoint, str] | None = None  # last checkpoint stored, with its ETag
        self._size = 0
        self._closed = False
        # The background checkpoint updates; all fields below under _updates.
        self._updates = threading.Condition()
        self._updater: threading.Thread | None = None
        self._intended: Checkpoint | None = None  # the newest checkpoint handed over
        self._queued: Checkpoint | None = None  # the newest not yet sent
        self._sending = False
        self._attempts = 0  # updates tried so far, landed or not
        self._failure: StorageError | None = None  # of the last try, if it failed
        self._hurry = False  # someone waits for the updates: no pause before the next
        self._interval = storage.checkpoint_interval if storage else DEFAULT_CHECKPOINT_INTERVAL
        self._stopping = False
        self._fatal: MessageVaultError | None = None  # this handle lost the stream
        self._sent: list[Checkpoint] = []  # updates sent since _known (updater thread only)

    def open(self, *, takeover: bool = False) -> None:
        self.read_checkpoint()  # StreamNotFound now rather than at first use
        if self._writable:
            self._take_leases(takeover)
            with azure_errors(f"cannot open stream {self._name!r}"):
                self._size = self._data.get_blob_properties().size
            # Read again under the lease: a deposed writer's last commit may
            # have landed between the first read and the takeover.
            self.read_checkpoint()

    def _take_leases(self, takeover: bool) -> None:
        # Same id on both blobs; the checkpoint is leased too, so that a
        # deposed writer's checkpoint update fails even before its ETag does.
        data_lease = BlobLease(self._data)
        leases = [data_lease, BlobLease(self._checkpoint_blob, data_lease.lease_id)]
        try:
            for lease in leases:
                if takeover:
                    lease.break_()
                lease.acquire()
                self._leases.append(lease)
        except LeaseHeld as exc:
            raise StreamLocked(
                f"stream {self._name!r} is already open for writing by another writer "
                "(its lease is held; open with takeover=True to depose it)"
            ) from exc
        if takeover:
            # The deposed writer's index writes fail from now on; this
            # handle leases the index when it first writes there.
            try:
                BlobLease(self._index).break_()
            except StorageError as exc:
                if not isinstance(exc.__cause__, ResourceNotFoundError):
                    raise  # (no index yet is no lease to break)

    def forget_leases(self) -> None:
        """Drop the leases without releasing them: their blobs are gone (``delete_stream``)."""
        self._leases.clear()
        self._index_lease = None

    def index_size(self) -> int:
        self._check_open()
        with azure_errors(f"cannot read the index of stream {self._name!r}"):
            try:
                return int(self._index.get_blob_properties().size)
            except ResourceNotFoundError:
                return 0

    def read_index(self, offset: int, size: int) -> bytes:
        try:
            return self._ranged_read(self._index, offset, size, "the index of stream")
        except StreamNotFound:  # no index (yet): as good as an empty one
            return b""

    def _check_page_write(self, offset: int, data: bytes | memoryview) -> bool:
        """Refuse what no page write may do (a reader's, a deposed writer's, bad pages).

        False: nothing to write.
        """
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if self._fatal is not None:
            raise self._fatal
        if offset < 0 or offset % PAGE_SIZE or len(data) % PAGE_SIZE:
            raise ValueError(f"writes must cover whole {PAGE_SIZE}-byte pages")
        if len(data) > MAX_WRITE_SIZE:
            raise ValueError(f"write of {len(data)} bytes exceeds {MAX_WRITE_SIZE}")
        return bool(data)

    def write_index(self, offset: int, data: bytes | memoryview) -> None:
        if not self._check_page_write(offset, data):
            return
        end = offset + len(data)
        if end > MAX_BLOB_SIZE:
            raise ValueError(f"index write past Azure's {MAX_BLOB_SIZE}-byte page blob limit")

        def put(lease_id: str) -> None:
            size = self._index_size or 0
            if end > size:
                grown = min(MAX_BLOB_SIZE, max(end, 2 * size, INDEX_INITIAL_SIZE))
                self._index.resize_blob(-(-grown // PAGE_SIZE) * PAGE_SIZE, lease=lease_id)
                self._index_size = -(-grown // PAGE_SIZE) * PAGE_SIZE
            self._index.upload_page(bytes(data), offset=offset, length=len(data), lease=lease_id)

        self._under_index_lease("write the index", put)

    def truncate_index(self, size: int) -> None:
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % PAGE_SIZE:
            raise ValueError(f"an index is cut to whole {PAGE_SIZE}-byte pages, not {size!r}")
        if self._fatal is not None:
            raise self._fatal
        if self._index_lease is None and self.index_size() == 0:
            return  # none (or empty): a missing index stays missing

        def cut(lease_id: str) -> None:
            if self._index_size is not None and self._index_size > size:
                self._index.resize_blob(size, lease=lease_id)
                self._index_size = size

        self._under_index_lease("cut the index", cut)

    def _under_index_lease(self, what: str, change: Callable[[str], None]) -> None:
        """Run ``change(lease_id)`` on the index blob under this writer's lease.

        The index is leased lazily, and a lease on it may be a deposed
        writer's (one that created the index after this handle took over):
        then, once this handle's data lease shows it is still the writer, it
        takes the index over and tries once more. A deposed handle finds its
        data lease gone and raises ``StaleWriter``.
        """
        for attempt in range(2):
            if self._index_lease is None:
                self._take_index_lease()
            lease = self._index_lease
            assert lease is not None
            try:
                with azure_errors(f"cannot {what} of stream {self._name!r}"):
                    change(lease.lease_id)
                return
            except StaleWriter:
                self._index_lease = None
                if attempt:
                    raise

    def _take_index_lease(self) -> None:
        """Create the index blob if missing, and lease it under this writer's id."""
        lease_id = self._lease_id
        assert lease_id is not None
        what = f"cannot lease the index of stream {self._name!r}"
        self._confirm_writer()
        with azure_errors(what):
            with contextlib.suppress(ResourceExistsError):
                self._index.create_page_blob(
                    INDEX_INITIAL_SIZE, match_condition=MatchConditions.IfMissing
                )
            self._index_size = int(self._index.get_blob_properties().size)
        lease = BlobLease(self._index, lease_id)
        try:
            lease.acquire()
        except LeaseHeld:
            lease.break_()  # a deposed writer's: this handle is the writer (confirmed above)
            lease.acquire()
        if lease not in self._leases:
            self._leases.append(lease)
        self._index_lease = lease

    def _confirm_writer(self) -> None:
        """``StaleWriter`` unless this handle still holds the data blob's lease."""
        try:
            self._leases[0].renew()  # an infinite lease: renewing only checks it is ours
        except LeaseLost as exc:
            raise StaleWriter(f"stream {self._name!r}: this writer lost its lease") from exc
        except StorageError as exc:
            if isinstance(exc.__cause__, ResourceNotFoundError):
                raise StreamNotFound(f"stream {self._name!r} was deleted") from exc
            raise

    def release(self, below: int) -> int:
        """Clear the whole pages below ``below``; the bytes that were stored there.

        Idempotent in its answer: only ranges still stored are counted (Get
        Page Ranges, bounded to the range), and none means no Clear Pages.
        """
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        if self._fatal is not None:
            raise self._fatal
        check_release(self._name, below, self.read_checkpoint())
        end = below // PAGE_SIZE * PAGE_SIZE
        if end == 0:
            return 0
        with azure_errors(f"cannot release stream {self._name!r}"):
            stored = sum(
                min(int(r.end or 0) + 1, end) - int(r.start or 0)
                for r in self._data.list_page_ranges(offset=0, length=end, lease=self._lease_id)
                if not r.cleared
            )
            if stored:
                self._data.clear_page(offset=0, length=end, lease=self._lease_id)
        if not stored:
            self._confirm_writer()  # fenced even when there is nothing left to clear
        return stored

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    @property
    def max_write_size(self) -> int:
        return MAX_WRITE_SIZE

    @property
    def _lease_id(self) -> str | None:
        return self._leases[0].lease_id if self._leases else None

    def read(self, offset: int, size: int) -> bytes:
        return self._ranged_read(self._data, offset, size, "stream")

    def _ranged_read(self, blob: BlobClient, offset: int, size: int, what: str) -> bytes:
        """Up to ``size`` bytes of page blob ``blob`` from ``offset``; fewer at its end."""
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        if size == 0:
            return b""
        with azure_errors(f"cannot read {what} {self._name!r}"):
            try:
                # The generated client's plain ranged GET: BlobClient.download_blob
                # would add a Get Page Ranges call per read, which grows slow as
                # a page blob fragments (one range per commit).
                chunks = blob._client.blob.download(range=f"bytes={offset}-{offset + size - 1}")
                return b"".join(chunks)
            except HttpResponseError as exc:
                if exc.status_code == 416:  # at or past the end (Azurite: 206, empty)
                    return b""
                raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self._check_page_write(offset, data):
            return
        end = offset + len(data)
        with azure_errors(f"cannot write stream {self._name!r}"):
            if end > self._size:
                self._grow(end)
            self._data.upload_page(
                bytes(data), offset=offset, length=len(data), lease=self._lease_id
            )

    def _grow(self, needed: int) -> None:
        """Resize in large steps: doubling, at most 1 GiB at a time, whole 4 MiB units."""
        if needed > MAX_BLOB_SIZE:
            raise StorageError(f"stream {self._name!r} would exceed Azure's 8 TiB page blob limit")
        step = min(max(self._size, INITIAL_SIZE), MAX_GROWTH_STEP)
        size = max(needed, self._size + step)
        size = min(-(-size // INITIAL_SIZE) * INITIAL_SIZE, MAX_BLOB_SIZE)
        self._data.resize_blob(size, lease=self._lease_id)
        self._size = size

    def read_checkpoint(self) -> Checkpoint:
        """The stored checkpoint; on a writable handle, once every update handed over landed."""
        self._check_open()
        if self._writable:
            self._drain(None)
        with azure_errors(f"cannot read the checkpoint of stream {self._name!r}"):
            properties = self._checkpoint_blob.get_blob_properties()
        checkpoint = _checkpoint_from(properties.metadata, f"stream {self._name!r}")
        with self._updates:
            self._known = (checkpoint, str(properties.etag))
            self._intended = checkpoint
        return checkpoint

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        """Hand ``new`` to the background updater; the data it names must be written already.

        ``expected`` must be the checkpoint this handle last handed over or
        read, else ``StaleWriter``. While an update fails (storage down),
        further commits are refused with ``StorageError`` until it lands (the
        updater retries it; ``read_checkpoint`` tries it at once); after a
        lost lease or a moved checkpoint, ``StaleWriter``.
        """
        self._check_open()
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        with self._updates:
            if self._fatal is not None:
                raise self._fatal
            intended = self._intended
        if intended != expected:
            current = self.read_checkpoint()
            if current != expected:
                raise self._stale(current, expected)
        with self._updates:
            if self._failure is not None:
                # Commits acknowledged past a checkpoint that cannot be stored
                # would pile up unseen by readers: let the writer ride it out.
                raise StorageError(
                    f"cannot commit stream {self._name!r}: the checkpoint update before "
                    f"this one is failing ({self._failure})"
                ) from self._failure
            self._intended = self._queued = new
            if self._updater is None:
                self._updater = threading.Thread(
                    target=self._run_updates, name=f"checkpoint-{self._name}", daemon=True
                )
                self._updater.start()
            self._updates.notify_all()

    def _drain(self, timeout: float | None) -> None:
        """Wait until every update handed over landed; raise what stopped one.

        The next update goes without its pause (``checkpoint_interval``); a
        failed one waiting for its retry is tried at once, and its outcome is
        this call's: one try, as a plain read would make.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._updates:
            self._hurry = True
            self._updates.notify_all()
            tries = self._attempts
            while True:
                if self._fatal is not None:
                    raise self._fatal
                if self._queued is None and not self._sending:
                    return
                if self._failure is not None and self._attempts > tries:
                    raise StorageError(
                        f"cannot update the checkpoint of stream {self._name!r}: {self._failure}"
                    ) from self._failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StorageError(
                        f"checkpoint update of stream {self._name!r} did not land "
                        f"within {timeout:g} s"
                    )
                self._updates.wait(remaining)

    def _run_updates(self) -> None:
        """The updater thread: the newest checkpoint handed over, one update at a time."""
        delay = RETRY_DELAY
        next_at = 0.0  # no update before this: the interval, or a failed one's retry delay
        while True:
            with self._updates:
                while not self._stopping and (
                    self._queued is None or (not self._hurry and time.monotonic() < next_at)
                ):
                    wait = None if self._queued is None else next_at - time.monotonic()
                    self._updates.wait(wait)
                if self._stopping:
                    return
                target, self._queued = self._queued, None
                self._sending, self._hurry = True, False
                known = self._known
            started = time.monotonic()
            assert target is not None and known is not None
            try:
                landed = self._put_checkpoint(target, known)
            except StorageError as exc:
                with self._updates:
                    self._failure = exc
                    self._queued = self._queued or target  # a newer one supersedes it
                    self._sending = False
                    self._attempts += 1
                    next_at = time.monotonic() + delay
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                    self._updates.notify_all()
                continue
            except Exception as exc:  # noqa: BLE001 - raised by the handle's next call
                # A lost lease, a deleted stream, a bug: this handle is done.
                fatal = (
                    exc
                    if isinstance(exc, MessageVaultError)
                    else StorageError(f"checkpoint update of stream {self._name!r} failed: {exc!r}")
                )
                with self._updates:
                    self._fatal = fatal
                    self._sending = False
                    self._attempts += 1
                    self._updates.notify_all()
                log.warning(
                    "checkpoint update of stream %r failed: %s",
                    self._name,
                    fatal,
                    extra={"stream": self._name},
                )
                return
            with self._updates:
                self._known = landed
                if landed[0] != target:  # an earlier try of ours landed: send the rest
                    self._queued = self._queued or target
                self._failure = None
                self._sending = False
                self._attempts += 1
                delay = RETRY_DELAY
                next_at = started + self._interval
                self._updates.notify_all()

    def _put_checkpoint(
        self, new: Checkpoint, known: tuple[Checkpoint, str]
    ) -> tuple[Checkpoint, str]:
        """Replace the stored checkpoint ``known`` by ``new``; what is stored now, with its ETag."""
        what = f"cannot commit stream {self._name!r}"
        self._sent.append(new)
        try:
            with azure_errors(what):
                result = self._checkpoint_blob.set_blob_metadata(
                    _metadata(new),
                    lease=self._lease_id,
                    etag=known[1],
                    match_condition=MatchConditions.IfNotModified,
                )
        except StorageError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, HttpResponseError) and cause.status_code == 412):
                raise
            # ETag mismatch. If a request of ours that seemed to fail had in
            # fact landed (the SDK's retry of it, an answer lost), the stored
            # checkpoint is one we sent; otherwise another writer moved it.
            with azure_errors(what):
                properties = self._checkpoint_blob.get_blob_properties()
            current = _checkpoint_from(properties.metadata, f"stream {self._name!r}")
            if current not in self._sent:
                raise self._stale(current, known[0]) from exc
            landed = (current, str(properties.etag))
        else:
            landed = (new, str(result["etag"]))
        self._sent.clear()
        return landed

    def _stale(self, current: Checkpoint, expected: Checkpoint) -> StaleWriter:
        return StaleWriter(
            f"stream {self._name!r} was committed by another writer "
            f"(checkpoint is at commit {current.commit}, this writer expected {expected.commit})"
        )

    def read_side(self, name: str) -> bytes | None:
        self._check_open()
        blob = self._container.get_blob_client(validate_side_name(name))
        with azure_errors(f"cannot read {name} of stream {self._name!r}"):
            try:
                return bytes(blob.download_blob().readall())
            except ResourceNotFoundError:
                return None

    def write_side(self, name: str, data: bytes) -> None:
        # One Put Blob replaces a block blob atomically (up to 5000 MiB). No
        # lease: a deposed writer's side object still describes a committed
        # prefix of the stream, which is all ``write_side`` promises.
        self._check_open()
        blob = self._container.get_blob_client(validate_side_name(name))
        if not self._writable:
            raise AccessDenied(f"stream {self._name!r} was opened read-only")
        with azure_errors(f"cannot write {name} of stream {self._name!r}"):
            blob.upload_blob(bytes(data), overwrite=True)

    def read_access(self) -> ReadAccess:
        """A read+list SAS URL for the stream's container, valid for ``sas_expiry``."""
        storage = self._storage
        if storage is None:  # opened from a SAS URL: hand on what we were given
            return ReadAccess("azure-sas", self._container.url, None)
        credential = storage.service.credential
        account_key = getattr(credential, "account_key", None)
        if account_key is None:
            raise AccessDenied("creating a SAS needs the account key (connection string)")
        now = datetime.now(UTC)
        expiry = now + storage.sas_expiry
        token = generate_container_sas(
            str(storage.service.account_name),
            self._container.container_name,
            account_key=account_key,
            permission=ContainerSasPermissions(read=True, list=True),
            start=now - timedelta(minutes=5),  # tolerate clock skew
            expiry=expiry,
        )
        return ReadAccess("azure-sas", f"{self._container.url}?{token}", expiry.timestamp())

    def close(self) -> None:
        """Wait (boundedly) for the checkpoint updates in flight, then release the leases."""
        if self._closed:
            return
        try:
            if self._updater is not None:
                self._drain(CLOSE_DRAIN_TIMEOUT)
        except MessageVaultError as exc:
            log.warning(
                "stream %r closed before its checkpoint caught up (the next writer rolls "
                "forward): %s",
                self._name,
                exc,
                extra={"stream": self._name},
            )
        finally:
            self._stop_updates()
            self._closed = True
            self._release_leases()

    def _stop_updates(self) -> None:
        with self._updates:
            self._stopping = True
            self._updates.notify_all()
        if self._updater is not None:
            # An update still in flight names this handle's lease: it lands
            # before the release below or is refused after it.
            self._updater.join(timeout=1.0)

    def _release_leases(self) -> None:
        for lease in reversed(self._leases):
            with contextlib.suppress(MessageVaultError):
                lease.release()
        self._leases.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"stream handle of {self._name!r} is closed")


def open_sas_stream(url: str) -> tuple[AzureStreamStore, str]:
    """A read-only store from a container SAS URL alone (no account key): (store, name)."""
    container = ContainerClient.from_container_url(url, **client_options())
    name = container.container_name.removeprefix(CONTAINER_PREFIX)
    validate_stream_name(name)
    store = AzureStreamStore(container, name, storage=None, write=False)
    store.open()
    return store, name
