"""Stream handles opened under a lease: a deposed lease holder cannot change the stream.

On memory and files every write, checkpoint advance and side write checks
the lease; on Azure the new holder's open breaks the old holder's blob
leases, and Azure refuses its writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from messagevault.checkpoint import Checkpoint
from messagevault.errors import StaleWriter, StorageError, StreamLocked
from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.base import Storage, StreamStore
from messagevault.storage.leases import HeldLease, Leases, LeaseStorage
from messagevault.writer import Writer


@dataclass
class Backend:
    kind: str
    storage: Storage
    leases: Leases
    duration: float
    stream: str  # unique per test: lease blobs outlive the Azure fixture's cleanup

    def take(self, holder: str) -> HeldLease:
        """Break whoever holds the stream's lease and take it, as a node failing over does."""
        self.leases.break_(f"streams/{self.stream}")
        return self.leases.acquire(
            f"streams/{self.stream}",
            holder=holder,
            address=f"http://127.0.0.1/{holder}",
            duration=self.duration,
        )


def _make(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    storage: Storage
    if kind == "memory":
        storage, duration = MemoryStorage(), 30.0
    elif kind == "memory-paged":
        storage, duration = MemoryStorage(page_size=512), 30.0
    elif kind == "file":
        storage, duration = FileStorage(tmp_path / "data"), 30.0
    else:
        storage, duration = request.getfixturevalue("azure_storage"), 15.0
    assert isinstance(storage, LeaseStorage)
    stream = f"fence-{uuid.uuid4().hex[:8]}"
    return Backend(kind, storage, storage.leases(), duration, stream)


@pytest.fixture(params=["azure", "file", "memory", "memory-paged"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make(request.param, request, tmp_path)


@pytest.fixture(params=["file", "memory"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make(request.param, request, tmp_path)


def pages(store: StreamStore, data: bytes) -> bytes:
    """``data`` padded to whole pages of ``store``."""
    return data + bytes(-len(data) % store.page_size)


def stored(storage: Storage, stream: str) -> tuple[Checkpoint, bytes, bytes | None]:
    """What a reader finds: the checkpoint, the committed bytes, the producer table."""
    reader = storage.open_stream(stream)
    try:
        checkpoint = reader.read_checkpoint()
        return checkpoint, reader.read(0, checkpoint.length), reader.read_side("producers")
    finally:
        reader.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_deposed_lease_holders_writes_fail_and_change_nothing(backend: Backend) -> None:
    storage, stream = backend.storage, backend.stream
    first = backend.take("a")
    a = storage.open_stream(stream, write=True, create=True, lease=first)
    a_bytes = pages(a, b"A" * 100)
    a.write(0, a_bytes)
    a_checkpoint = Checkpoint(commit=1, length=len(a_bytes))
    a.advance_checkpoint(a_checkpoint, expected=Checkpoint())
    a.write_side("producers", b"table of a")

    second = backend.take("b")
    assert second.generation == first.generation + 1
    b = storage.open_stream(stream, write=True, lease=second)
    wait_until(lambda: b.read_checkpoint() == a_checkpoint)
    b_bytes = pages(b, b"B" * 100)
    b.write(len(a_bytes), b_bytes)
    b_checkpoint = Checkpoint(commit=2, length=len(a_bytes) + len(b_bytes))
    b.advance_checkpoint(b_checkpoint, expected=a_checkpoint)
    b.write_side("producers", b"table of b")
    wait_until(lambda: stored(storage, stream)[0] == b_checkpoint)  # Azure's trails a little
    expected = (b_checkpoint, a_bytes + b_bytes, b"table of b")
    assert stored(storage, stream) == expected

    taken_over = "taken over|lost its lease"
    with pytest.raises(StaleWriter, match=taken_over):
        a.write(len(a_bytes), pages(a, b"X" * 100))
    with pytest.raises(StaleWriter, match=taken_over):
        a.write(0, pages(a, b"X" * 100))  # over committed bytes, too
    if backend.kind == "azure":
        # The update goes out in the background; Azure refuses it on the lease,
        # and the handle says so from then on.
        def refused() -> bool:
            try:
                a.advance_checkpoint(Checkpoint(commit=3, length=1024), expected=b_checkpoint)
            except StaleWriter:
                return True
            return False

        wait_until(refused)
        # Side objects on Azure are replaced without a lease (azure.py says why).
    else:
        # Even a deposed writer that knows the new checkpoint cannot move it.
        with pytest.raises(StaleWriter, match="generation 2 > ours 1"):
            a.advance_checkpoint(Checkpoint(commit=3, length=1024), expected=b_checkpoint)
        with pytest.raises(StaleWriter, match="taken over"):
            a.write_side("producers", b"stale table")
    a.close()
    b.close()
    assert stored(storage, stream) == expected


def test_a_deposed_lease_holders_writer_appends_nothing(backend: Backend) -> None:
    storage, stream = backend.storage, backend.stream
    first = backend.take("a")
    writer_a = Writer.open(storage, stream, lease=first)
    writer_a.append([("k", b"from a")])
    second = backend.take("b")
    with Writer.open(storage, stream, lease=second) as writer_b:
        assert writer_b.checkpoint == writer_a.checkpoint  # recovered A's commit
        writer_b.append([("k", b"from b")])
        committed = writer_b.checkpoint
    wait_until(lambda: stored(storage, stream)[0] == committed)
    before = stored(storage, stream)
    with pytest.raises(StaleWriter):
        writer_a.append([("k", b"from a, deposed")])
    writer_a.close()
    assert stored(storage, stream) == before
    assert before[1].count(b"from a") == 1 and before[1].count(b"from b") == 1


def test_a_lease_no_longer_current_cannot_open_the_stream(backend: Backend) -> None:
    storage, stream = backend.storage, backend.stream
    first = backend.take("a")
    storage.open_stream(stream, write=True, create=True, lease=first).close()
    backend.take("b")
    with pytest.raises(StaleWriter, match="generation 2 > ours 1"):
        storage.open_stream(stream, write=True, lease=first)
    backend.leases.break_(f"streams/{stream}")
    released = backend.take("c")
    backend.leases.release(released)
    with pytest.raises(StaleWriter, match=r"not held|released or broken"):
        storage.open_stream(stream, write=True, lease=released)


def test_a_lease_opens_only_its_own_stream_and_only_for_writing(local: Backend) -> None:
    storage, stream = local.storage, local.stream
    held = local.take("a")
    with pytest.raises(ValueError, match="is not stream 'other'"):
        storage.open_stream("other", write=True, create=True, lease=held)
    with pytest.raises(ValueError, match="only for writing"):
        storage.open_stream(stream, create=True, lease=held)
    assert "other" not in storage.list_streams() and stream not in storage.list_streams()


def test_a_writer_without_a_lease_and_one_with_exclude_each_other(local: Backend) -> None:
    storage, stream = local.storage, local.stream
    held = local.take("a")
    leased = Writer.open(storage, stream, lease=held)
    with pytest.raises(StreamLocked, match=r"under its lease|already open for writing"):
        Writer.open(storage, stream)
    leased.append([("k", b"v")])  # unharmed
    leased.close()
    plain = Writer.open(storage, stream)
    with pytest.raises(StreamLocked, match=r"without a lease|already open for writing"):
        Writer.open(storage, stream, lease=held)
    plain.close()
    with Writer.open(storage, stream, lease=held) as again:
        again.append([("k", b"w")])


def test_a_file_lease_file_gone_means_no_lease_to_write_under(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    held = storage.leases().acquire("streams/orders", holder="a", address="x", duration=30)
    storage.leases().path("streams/orders").unlink()
    with pytest.raises(StaleWriter, match="never taken"):
        storage.open_stream("orders", write=True, create=True, lease=held)


STOPPABLE_WRITER = """
import sys
from messagevault.errors import StaleWriter
from messagevault.storage import FileStorage
from messagevault.writer import Writer
storage = FileStorage(sys.argv[1])
lease = storage.leases().acquire("streams/orders", holder="a", address="http://a", duration=30)
writer = Writer.open(storage, "orders", lease=lease)
writer.append([("k", b"from a")])
print("appended", flush=True)
sys.stdin.readline()  # stopped and resumed meanwhile
try:
    writer.append([("k", b"from a, resumed")])
except StaleWriter as exc:
    print("stale:", exc, flush=True)
else:
    print("appended again", flush=True)
"""


def test_a_writer_stopped_past_a_takeover_cannot_change_the_stream_when_resumed(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path / "data")
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_WRITER, str(storage.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stdout.readline() == "appended\n"
        os.kill(process.pid, signal.SIGSTOP)
        storage.leases().break_("streams/orders")  # its lease has not expired: a node breaks it
        lease = storage.leases().acquire("streams/orders", holder="b", address="b", duration=30)
        with Writer.open(storage, "orders", lease=lease) as writer:
            writer.append([("k", b"from b")])
        before = stored(storage, "orders")
        os.kill(process.pid, signal.SIGCONT)
        process.stdin.write("go\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        assert answer.startswith(
            "stale: stream 'orders' was taken over (lease generation 2 > ours 1)"
        )
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate(timeout=10)
    assert stored(storage, "orders") == before
    assert before[1].count(b"from a") == 1 and before[1].count(b"from b") == 1


def test_a_lease_writer_stopped_mid_write_delays_a_takeover_boundedly(tmp_path: Path) -> None:
    """A process stopped while it holds the lease file's shared flock: acquire fails in bound."""
    storage = FileStorage(tmp_path / "data")
    leases = storage.leases()
    held = leases.acquire("streams/orders", holder="a", address="http://a", duration=30)
    storage.open_stream("orders", write=True, create=True, lease=held).close()
    leases.break_("streams/orders")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"  # as LeaseFence does around a write
            "print('in a write', flush=True)\n"
            "os.kill(os.getpid(), 19)\n"  # SIGSTOP
            "sys.stdin.readline()\n",
            str(leases.path("streams/orders")),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "in a write\n"
        with pytest.raises(StorageError, match="stayed locked"):  # after LOCK_WAIT, not hung
            leases.acquire("streams/orders", holder="b", address="http://b", duration=30)
        record = leases.inspect("streams/orders")  # readers share the flock: not held up
        assert record is not None and record.generation == 1 and not record.held
    finally:
        holder.kill()
        holder.communicate(timeout=10)
    taken = leases.acquire("streams/orders", holder="b", address="http://b", duration=30)
    assert taken.generation == 2
