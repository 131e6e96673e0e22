"""Azure's pipelined commit: an append costs one Put Page; its checkpoint lands behind it.

On a real Azurite. ``tests.azure_observed`` counts the SDK's requests and
can hold checkpoint updates back, or make them fail, to widen the window
between an acknowledged append and its checkpoint; ``tests.fault_proxy``
drops answers and resets requests on the wire.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from messagevault import Reader, StaleWriter, StorageError, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.errors import AccessDenied
from messagevault.storage.azure import CHECKPOINT_BLOB, DATA_BLOB, AzureStorage
from messagevault.storage.azure_lease import BlobLease
from tests import azure_lagging_writer
from tests.azure_observed import (
    PUT_PAGE,
    READ_CHECKPOINT,
    SET_CHECKPOINT,
    ObservedTransport,
    observed_storage,
)
from tests.azurite import Azurite
from tests.fault_proxy import Fault, FaultPolicy, FaultProxy

ROOT = Path(__file__).parent.parent
WAIT = 20.0  # bound on every wait for something to land


@pytest.fixture
def observed(
    azurite: Azurite, azure_storage: AzureStorage
) -> Iterator[tuple[AzureStorage, ObservedTransport]]:
    """Storage on the session's Azurite through an ``ObservedTransport`` (released at the end)."""
    storage, transport = observed_storage(azurite.connection_string)
    try:
        yield storage, transport
    finally:
        transport.release()
        transport.recover()


def values(storage: AzureStorage, name: str = "orders") -> list[bytes]:
    with Reader.open(storage, name) as reader:
        return [m.value for m in reader.read()]


def stored_checkpoint(storage: AzureStorage, name: str = "orders") -> Checkpoint:
    store = storage.open_stream(name)
    try:
        return store.read_checkpoint()
    finally:
        store.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT:g} s waiting for {what}"
        time.sleep(0.01)


def test_an_append_is_acknowledged_before_its_checkpoint_lands(
    observed: tuple[AzureStorage, ObservedTransport], azure_storage: AzureStorage
) -> None:
    storage, transport = observed
    with Writer.open(storage, "orders") as writer:
        transport.hold()
        for number in range(3):
            writer.append([(b"k", b"v%d" % number)])
        # Acknowledged on one Put Page each; the first update is held, the
        # other two wait behind it.
        assert transport.count(PUT_PAGE) == 3
        wait_until(lambda: transport.held == 1, "the first checkpoint update")
        assert transport.count(SET_CHECKPOINT) == 1
        # A direct reader sees none of it yet: never past what the checkpoint names.
        assert stored_checkpoint(azure_storage) == Checkpoint()
        assert values(azure_storage) == []
        transport.release()
        wait_until(
            lambda: stored_checkpoint(azure_storage) == writer.checkpoint, "the newest checkpoint"
        )
        assert values(azure_storage) == [b"v0", b"v1", b"v2"]
        # The two waiting updates went as one: only the newest was written.
        assert transport.count(SET_CHECKPOINT) == 2


def test_a_sequential_producer_pays_one_round_trip_per_append(
    observed: tuple[AzureStorage, ObservedTransport],
) -> None:
    storage, transport = observed
    with Writer.open(storage, "orders") as writer:
        reads = transport.count(READ_CHECKPOINT)
        for number in range(20):
            before = transport.count(PUT_PAGE)
            writer.append([(b"k", b"v%d" % number)])
            assert transport.count(PUT_PAGE) == before + 1
        assert transport.count(READ_CHECKPOINT) == reads  # no read-back on the way
        assert transport.count(SET_CHECKPOINT) <= 20
        final = writer.checkpoint
    assert stored_checkpoint(storage) == final


def test_checkpoint_updates_come_at_most_one_per_interval(
    azurite: Azurite, azure_storage: AzureStorage
) -> None:
    storage, transport = observed_storage(azurite.connection_string, checkpoint_interval=30.0)
    with Writer.open(storage, "orders") as writer:
        for number in range(10):
            writer.append([(b"k", b"v%d" % number)])
        # The first went at once; the other nine wait out the interval as one.
        wait_until(lambda: stored_checkpoint(storage).commit == 1, "the first update")
        assert transport.count(SET_CHECKPOINT) == 1
        assert writer._store.read_checkpoint() == writer.checkpoint  # a read does not wait
        assert transport.count(SET_CHECKPOINT) == 2
    assert values(azure_storage) == [b"v%d" % n for n in range(10)]


@pytest.mark.parametrize("interval", [-0.1, 61, float("nan"), float("inf"), True, "0.1", None])
def test_bad_checkpoint_intervals_are_refused(azurite: Azurite, interval: object) -> None:
    with pytest.raises(ValueError, match="checkpoint_interval must be 0-60 seconds"):
        AzureStorage.from_connection_string(azurite.connection_string, checkpoint_interval=interval)


def test_close_waits_for_the_checkpoint_updates_in_flight(
    observed: tuple[AzureStorage, ObservedTransport], azure_storage: AzureStorage
) -> None:
    storage, transport = observed
    writer = Writer.open(storage, "orders")
    transport.hold()
    writer.append([(b"k", b"one")])
    writer.append([(b"k", b"two")])
    release = threading.Timer(0.3, transport.release)
    release.start()
    try:
        writer.close()
    finally:
        release.cancel()
    # No polling: close returned only once the newest checkpoint was stored.
    assert stored_checkpoint(azure_storage) == writer.checkpoint
    assert values(azure_storage) == [b"one", b"two"]


def test_direct_readers_follow_an_appending_writer(azure_storage: AzureStorage) -> None:
    """A SAS reader following the stream sees every acknowledged message, in order."""
    with Writer.open(azure_storage, "orders") as writer:
        reader = Reader.from_read_access(writer.read_access())
        stop = threading.Event()
        seen: list[bytes] = []
        checkpoints: list[Checkpoint] = []

        def follow() -> None:
            for message in reader.follow(poll_interval=0.005, stop=stop):
                seen.append(message.value)
                checkpoints.append(reader.checkpoint())

        thread = threading.Thread(target=follow)
        thread.start()
        try:
            acked: list[int] = []
            for number in range(30):
                acked.append(writer.append([(b"k", b"v%d" % number)]).end)
                # Whatever a reader sees is a checkpoint this writer reached.
                assert all(c.length in acked for c in list(checkpoints))
            wait_until(lambda: len(seen) == 30, "the follower to see every message")
        finally:
            stop.set()
            thread.join(timeout=WAIT)
            reader.close()
    assert seen == [b"v%d" % n for n in range(30)]


def run_lagging_writer(azurite: Azurite, count: int) -> None:
    """A writer process that appends ``count`` batches whose checkpoints never land; SIGKILLed."""
    lines: queue.Queue[str] = queue.Queue()
    command = [
        *(sys.executable, "-m", "tests.azure_lagging_writer"),
        *(azurite.connection_string, "orders", str(count)),
    ]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        pump = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or ()])
        pump.daemon = True
        pump.start()
        try:
            acked = []
            while True:
                line = lines.get(timeout=WAIT).strip()
                if line.startswith("HELD"):
                    assert line == "HELD 1", line  # the first update, the rest behind it
                    break
                acked.append(line)
            assert acked == [f"ACK {n}" for n in range(count)]
        finally:
            if child.poll() is None:  # never signal a reaped (maybe reused) pid
                os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=WAIT)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("successor", ["takeover", "plain open"])
def test_a_writer_killed_before_its_checkpoints_landed_is_rolled_forward(
    azurite: Azurite, azure_storage: AzureStorage, successor: str
) -> None:
    count = 5
    run_lagging_writer(azurite, count)
    # Every append was acknowledged, none of their checkpoints stored.
    assert stored_checkpoint(azure_storage) == Checkpoint()
    assert values(azure_storage) == []
    if successor == "takeover":
        writer = Writer.open(azure_storage, "orders", takeover=True)
    else:
        # The dead writer's infinite leases, broken as an operator would.
        container = azure_storage.service.get_container_client("mv-orders")
        for blob in (DATA_BLOB, CHECKPOINT_BLOB):
            BlobLease(container.get_blob_client(blob)).break_()
        writer = Writer.open(azure_storage, "orders")
    with writer:
        assert writer.checkpoint.next_sequence == count  # rolled forward over all of them
        writer.append([(b"k", b"after")])
    expected = [azure_lagging_writer.value(n) for n in range(count)] + [b"after"]
    assert values(azure_storage) == expected


def test_a_deposed_writers_waiting_updates_fail_and_it_appends_no_more(
    observed: tuple[AzureStorage, ObservedTransport], azure_storage: AzureStorage
) -> None:
    storage, transport = observed
    old = Writer.open(storage, "orders")
    old_store = old._store
    old.append([(b"k", b"old-1")])
    assert old_store.read_checkpoint() == old.checkpoint
    transport.hold()
    old.append([(b"k", b"old-2")])  # acknowledged; its checkpoint is held
    old.append([(b"k", b"old-3")])
    with Writer.open(azure_storage, "orders", takeover=True) as new:
        # old-2 and old-3 were acknowledged: the new writer adopts them.
        assert new.checkpoint.next_sequence == 3
        new.append([(b"k", b"new-1")])
        transport.release()  # the old writer's updates go out now, under its lost lease
        with pytest.raises(StaleWriter, match=r"another writer|lease"):
            old_store.read_checkpoint()
        with pytest.raises(StaleWriter):
            old.append([(b"k", b"old-4")])
        new.append([(b"k", b"new-2")])
    assert stored_checkpoint(azure_storage) == new.checkpoint
    old.close()
    assert values(azure_storage) == [b"old-1", b"old-2", b"old-3", b"new-1", b"new-2"]


def test_a_landed_update_whose_answer_was_lost_is_not_a_conflict(
    azurite: Azurite, azure_storage: AzureStorage
) -> None:
    """The SDK retries it and meets its own ETag change (412): read back, it is ours."""
    with FaultProxy(azurite.port) as proxy:
        url = azurite.connection_string.replace(f":{azurite.port}/", f":{proxy.port}/")
        storage, transport = observed_storage(url)
        with Writer.open(storage, "orders") as writer:
            transport.hold()
            writer.append([(b"k", b"one")])
            wait_until(lambda: transport.held == 1, "the checkpoint update")
            proxy.force(Fault.DROP_ANSWER)  # the next exchange: that update (nothing else runs)
            sent, reads = transport.count(SET_CHECKPOINT), transport.count(READ_CHECKPOINT)
            transport.release()
            assert writer._store.read_checkpoint() == writer.checkpoint
            assert proxy.stats.count(Fault.DROP_ANSWER) == 1
            assert transport.count(SET_CHECKPOINT) == sent + 1  # the SDK's retry
            assert transport.count(READ_CHECKPOINT) >= reads + 2  # the read-back, then ours
            writer.append([(b"k", b"two")])
    assert values(azure_storage) == [b"one", b"two"]
    assert stored_checkpoint(azure_storage).next_sequence == 2


def test_appends_ride_out_faults_on_the_wire(azurite: Azurite, azure_storage: AzureStorage) -> None:
    # Faults from the first append on (opening is not retried: it fails, saying why).
    policy = FaultPolicy(1207, drop_answer=0.1, reset_request=0.1, delay=0.1)
    with FaultProxy(azurite.port) as proxy:
        url = azurite.connection_string.replace(f":{azurite.port}/", f":{proxy.port}/")
        storage, _ = observed_storage(url)
        with Writer.open(storage, "orders") as writer:
            proxy.force(*(policy.decide() for _ in range(100)))
            for number in range(40):
                writer.append([(b"k", b"v%d" % number)])
            final = writer.checkpoint
        assert proxy.stats.count(Fault.DROP_ANSWER) and proxy.stats.count(Fault.RESET_REQUEST)
    assert stored_checkpoint(azure_storage) == final
    assert values(azure_storage) == [b"v%d" % n for n in range(40)]


def test_a_failing_checkpoint_update_holds_commits_back_until_it_lands(
    observed: tuple[AzureStorage, ObservedTransport], azure_storage: AzureStorage
) -> None:
    storage, transport = observed
    with Writer.open(storage, "orders", commit_timeout=30.0) as writer:
        store = writer._store
        transport.failing()
        writer.append([(b"k", b"one")])  # acknowledged: its Put Page landed
        with pytest.raises(StorageError, match="checkpoint"):
            store.read_checkpoint()  # one more try, which fails too
        # While the update fails, the next commit is refused and the writer
        # rides that out as it rides out any storage fault (commit_timeout).
        threading.Timer(1.0, transport.recover).start()
        sent = transport.count(SET_CHECKPOINT)
        writer.append([(b"k", b"two")])
        assert transport.count(SET_CHECKPOINT) > sent
        assert store.read_checkpoint() == writer.checkpoint
    assert values(azure_storage) == [b"one", b"two"]


def test_bad_checkpoint_advances_are_refused_and_change_nothing(
    azure_storage: AzureStorage,
) -> None:
    store = azure_storage.open_stream("orders", write=True, create=True)
    first = Checkpoint(commit=1, length=512, next_sequence=1)
    store.write(0, bytes(512))
    store.advance_checkpoint(first, expected=Checkpoint())
    # Not the checkpoint this handle handed over last, nor the stored one.
    with pytest.raises(StaleWriter, match="expected 0"):
        store.advance_checkpoint(Checkpoint(commit=2, length=1024), expected=Checkpoint())
    with pytest.raises(StaleWriter, match="expected 5"):
        store.advance_checkpoint(Checkpoint(commit=6), expected=Checkpoint(commit=5))
    assert store.read_checkpoint() == first
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.advance_checkpoint(Checkpoint(commit=2, length=1024), expected=first)
    with pytest.raises(ValueError, match="closed"):
        store.read_checkpoint()
    assert stored_checkpoint(azure_storage) == first
    reader = azure_storage.open_stream("orders")
    with pytest.raises(AccessDenied):
        reader.advance_checkpoint(Checkpoint(commit=2, length=1024), expected=first)
    reader.close()
    assert stored_checkpoint(azure_storage) == first
