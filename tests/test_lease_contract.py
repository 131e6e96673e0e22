"""The lease contract (storage/leases.py), once per backend: memory, files, Azurite.

Azure leases last 15-60 s, so the Azure run keeps to 15 s leases, ends them
with ``break_`` or ``release`` and never waits for one to expire; expiry is
tested on memory and files, whose leases go down to ``MIN_FILE_DURATION``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from messagevault.errors import LeaseHeld, LeaseLost
from messagevault.storage import FileStorage, MemoryStorage
from messagevault.storage.file_leases import FileLeases
from messagevault.storage.leases import (
    MIN_FILE_DURATION,
    LeaseRecord,
    Leases,
    LeaseStorage,
    held_record,
)

LONG = 30.0  # a lease that outlives any test on memory and files


@dataclass
class Backend:
    kind: str
    storage: LeaseStorage
    leases: Leases
    duration: float  # what a test's lease lasts: long enough not to expire during it
    prefix: str  # unique per test, so that Azure tests sharing one Azurite never meet

    def name(self, what: str = "s") -> str:
        return f"streams/{self.prefix}{what}"

    def node(self, what: str) -> str:
        return f"nodes/{self.prefix}{what}"


def _memory(_: pytest.FixtureRequest, __: Path) -> tuple[LeaseStorage, float]:
    return MemoryStorage(), LONG


def _file(_: pytest.FixtureRequest, path: Path) -> tuple[LeaseStorage, float]:
    return FileStorage(path / "data"), LONG


def _azure(request: pytest.FixtureRequest, _: Path) -> tuple[LeaseStorage, float]:
    return request.getfixturevalue("azure_storage"), 15.0


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], tuple[LeaseStorage, float]]] = {
    "memory": _memory,
    "file": _file,
    "azure": _azure,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    storage, duration = BACKENDS[request.param](request, tmp_path)
    prefix = uuid.uuid4().hex[:8] + "-"
    yield Backend(request.param, storage, storage.leases(), duration, prefix)


@pytest.fixture(params=["memory", "file"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Backends whose leases may be short: for expiry."""
    storage, duration = BACKENDS[request.param](request, tmp_path)
    return Backend(request.param, storage, storage.leases(), duration, "")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_first_acquire_has_generation_1_and_storage_names_the_holder(backend: Backend) -> None:
    leases, name = backend.leases, backend.name()
    assert leases.inspect(name) is None
    before = time.time()
    held = leases.acquire(
        name, holder="n1", address="http://127.0.0.1:1", duration=backend.duration
    )
    assert (held.name, held.holder, held.address, held.generation) == (
        name,
        "n1",
        "http://127.0.0.1:1",
        1,
    )
    assert held.lease_id and held.duration == backend.duration
    assert 0 < held.expires_in() <= backend.duration
    record = leases.inspect(name)
    assert record is not None
    assert (record.name, record.holder, record.address, record.generation, record.held) == (
        name,
        "n1",
        "http://127.0.0.1:1",
        1,
        True,
    )
    assert record.expires_at is not None
    # Clocks: Azurite's and ours are one machine's; allow for a slow call.
    assert before + backend.duration - 2 <= record.expires_at <= time.time() + backend.duration + 2
    assert record.live()
    assert leases.list(backend.name("")) == [record]


def test_acquire_while_another_holds_raises_lease_held_naming_the_holder(
    backend: Backend,
) -> None:
    leases, name = backend.leases, backend.name()
    leases.acquire(name, holder="n1", address="http://127.0.0.1:1", duration=backend.duration)
    for holder in ("n2", "n1"):  # a restarted n1 does not know the lease id either
        with pytest.raises(LeaseHeld) as caught:
            leases.acquire(
                name, holder=holder, address="http://127.0.0.1:2", duration=backend.duration
            )
        record = held_record(caught.value)
        assert record is not None
        assert (record.holder, record.address, record.generation, record.held) == (
            "n1",
            "http://127.0.0.1:1",
            1,
            True,
        )
    assert leases.inspect(name) == record  # nothing changed


def test_release_lets_another_acquire_at_once_with_a_higher_generation(backend: Backend) -> None:
    leases, name = backend.leases, backend.name()
    first = leases.acquire(name, holder="n1", address="http://a", duration=backend.duration)
    leases.release(first)
    leases.release(first)  # idempotent
    record = leases.inspect(name)
    assert record == LeaseRecord(name, "n1", "http://a", 1, False, None)
    assert not record.live()
    second = leases.acquire(name, holder="n2", address="http://b", duration=backend.duration)
    assert second.generation == 2
    leases.release(first)  # not ours any more: a no-op
    assert leases.inspect(name) == LeaseRecord(
        name,
        "n2",
        "http://b",
        2,
        True,
        leases.inspect(name).expires_at,  # type: ignore[union-attr]
    )
    with pytest.raises(LeaseLost):
        leases.renew(first)
    leases.release(second)
    third = leases.acquire(name, holder="n2", address="http://b", duration=backend.duration)
    assert third.generation == 3  # the same holder again: a new acquisition all the same


def test_break_ends_the_holders_lease_and_fences_its_renewal(backend: Backend) -> None:
    leases, name = backend.leases, backend.name()
    leases.break_(name)  # never taken: a no-op
    assert leases.inspect(name) is None
    first = leases.acquire(name, holder="n1", address="http://a", duration=backend.duration)
    leases.break_(name)
    assert leases.inspect(name) == LeaseRecord(name, "n1", "http://a", 1, False, None)
    leases.break_(name)  # already ended: a no-op
    with pytest.raises(LeaseLost):
        leases.renew(first)  # broken, nobody took it since: still lost
    second = leases.acquire(name, holder="n2", address="http://b", duration=backend.duration)
    assert second.generation == 2
    with pytest.raises(LeaseLost):
        leases.renew(first)
    record = leases.inspect(name)
    assert record is not None and (record.holder, record.generation, record.held) == ("n2", 2, True)


def test_renew_keeps_the_generation_and_extends_the_expiry(backend: Backend) -> None:
    leases, name = backend.leases, backend.name()
    held = leases.acquire(name, holder="n1", address="http://a", duration=backend.duration)
    before = leases.inspect(name)
    assert before is not None and before.expires_at is not None
    time.sleep(1.1)  # Azure's clock counts whole seconds
    renewed = leases.renew(held)
    assert (renewed.lease_id, renewed.generation, renewed.holder) == (held.lease_id, 1, "n1")
    assert renewed.acquired_at > held.acquired_at
    after = leases.inspect(name)
    assert after is not None and after.expires_at is not None
    assert after.expires_at > before.expires_at
    assert (after.generation, after.holder, after.held) == (1, "n1", True)
    leases.renew(renewed)  # the old and the new object name the same acquisition
    leases.renew(held)
    leases.release(renewed)
    with pytest.raises(LeaseLost):
        leases.renew(held)  # released: no longer ours


def test_list_gives_leases_under_a_prefix_sorted_by_name(backend: Backend) -> None:
    leases = backend.leases
    for name in (backend.node("b"), backend.name("z"), backend.node("a"), backend.name("y")):
        leases.acquire(name, holder="n1", address="http://a", duration=backend.duration)
    leases.break_(backend.node("b"))
    nodes = leases.list(backend.node(""))
    assert [(r.name, r.held) for r in nodes] == [
        (backend.node("a"), True),
        (backend.node("b"), False),
    ]
    assert [r.name for r in leases.list(backend.name(""))] == [backend.name("y"), backend.name("z")]
    assert all(r.holder == "n1" and r.generation == 1 for r in nodes)
    names = [r.name for r in leases.list("")]
    assert names == sorted(names)
    assert leases.list(backend.node("nothing-here")) == []


@pytest.mark.parametrize(
    "bad_name", ["", "streams/", "streams", "other/x", "streams/_x", "streams/a/b", "nodes/.."]
)
def test_bad_names_are_refused_and_change_nothing(backend: Backend, bad_name: str) -> None:
    leases = backend.leases
    with pytest.raises(ValueError, match="lease name"):
        leases.acquire(bad_name, holder="n1", address="http://a", duration=backend.duration)
    with pytest.raises(ValueError, match="lease name"):
        leases.inspect(bad_name)
    with pytest.raises(ValueError, match="lease name"):
        leases.break_(bad_name)
    assert leases.list(backend.name("")) == []


@pytest.mark.parametrize("bad_duration", [0, -1, 61, 0.1, float("nan"), float("inf"), True, "15"])
def test_bad_durations_are_refused_and_change_nothing(
    backend: Backend, bad_duration: object
) -> None:
    leases, name = backend.leases, backend.name()
    with pytest.raises(ValueError, match="a lease lasts"):
        leases.acquire(name, holder="n1", address="http://a", duration=bad_duration)  # type: ignore[arg-type]
    assert leases.inspect(name) is None


@pytest.mark.parametrize(
    ("holder", "address"),
    [("", "http://a"), ("n 1", "http://a"), ("n1", ""), ("n1", "h\u00e9"), ("x" * 129, "a")],
)
def test_bad_holders_and_addresses_are_refused_and_change_nothing(
    backend: Backend, holder: str, address: str
) -> None:
    leases, name = backend.leases, backend.name()
    with pytest.raises(ValueError, match="printable ASCII"):
        leases.acquire(name, holder=holder, address=address, duration=backend.duration)
    assert leases.inspect(name) is None


def test_azure_refuses_durations_below_15_seconds(backend: Backend) -> None:
    if backend.kind != "azure":
        pytest.skip("files and memory accept shorter leases, for tests")
    with pytest.raises(ValueError, match="15-60"):
        backend.leases.acquire(backend.name(), holder="n1", address="http://a", duration=5)
    assert backend.leases.inspect(backend.name()) is None


def test_an_expired_lease_is_renewed_if_nobody_took_it_and_lost_once_taken(local: Backend) -> None:
    leases = local.leases
    held = leases.acquire("streams/s", holder="n1", address="http://a", duration=MIN_FILE_DURATION)
    wait_until(lambda: not leases.inspect("streams/s").live())  # type: ignore[union-attr]
    renewed = leases.renew(held)  # nobody took it: still ours
    assert renewed.generation == 1
    assert leases.inspect("streams/s").live()  # type: ignore[union-attr]
    with pytest.raises(LeaseHeld):
        leases.acquire("streams/s", holder="n2", address="http://b", duration=LONG)
    wait_until(lambda: not leases.inspect("streams/s").live())  # type: ignore[union-attr]
    taken = leases.acquire("streams/s", holder="n2", address="http://b", duration=LONG)
    assert taken.generation == 2
    with pytest.raises(LeaseLost):
        leases.renew(held)


def test_threads_racing_to_acquire_one_lease_one_wins(backend: Backend) -> None:
    leases, name = backend.leases, backend.name()
    start = threading.Barrier(6)
    won: list[int] = []
    refused: list[int] = []

    def race(number: int) -> None:
        start.wait(timeout=10)
        try:
            leases.acquire(name, holder=f"n{number}", address="http://a", duration=backend.duration)
        except LeaseHeld:
            refused.append(number)
        else:
            won.append(number)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(won) == 1 and len(refused) == 5
    record = leases.inspect(name)
    assert record is not None and record.holder == f"n{won[0]}" and record.generation == 1


RACER = """
import sys, time
from pathlib import Path
from messagevault.errors import LeaseHeld
from messagevault.storage.file_leases import FileLeases
go = Path(sys.argv[2])
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
try:
    FileLeases(sys.argv[1]).acquire("streams/s", holder=sys.argv[3], address="x", duration=30)
except LeaseHeld:
    print("refused")
else:
    print("won")
"""


def test_processes_racing_to_acquire_a_file_lease_one_wins(tmp_path: Path) -> None:
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), str(go), f"p{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    time.sleep(0.5)  # let them start and wait at the line
    go.touch()
    results = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert sorted(results) == ["refused", "refused", "refused", "won"]
    record = FileLeases(tmp_path).inspect("streams/s")
    assert record is not None and record.generation == 1
    assert record.holder == f"p{results.index('won')}"


def test_a_torn_lease_file_counts_as_free_and_the_generation_still_rises(tmp_path: Path) -> None:
    leases = FileLeases(tmp_path)
    for _ in range(3):
        leases.release(leases.acquire("streams/s", holder="n1", address="http://a", duration=LONG))
    path = leases.path("streams/s")
    intact = path.read_bytes()
    assert intact.startswith(b"mvlease 00000000000000000003\n")

    # A shorter record over a longer one, killed before the ftruncate: still read.
    path.write_bytes(intact + b"garbage")
    assert leases.inspect("streams/s") == LeaseRecord("streams/s", "n1", "http://a", 3, False, None)

    path.write_bytes(intact[:45])  # the body cut short: the header's generation holds
    assert leases.inspect("streams/s") == LeaseRecord("streams/s", None, None, 3, False, None)
    assert leases.acquire("streams/s", holder="n2", address="b", duration=LONG).generation == 4

    path.write_bytes(b"\0" * 40)  # nothing readable at all: the file's time stands in
    mtime_ns = os.stat(path).st_mtime_ns
    record = leases.inspect("streams/s")
    assert record == LeaseRecord("streams/s", None, None, mtime_ns, False, None)
    taken = leases.acquire("streams/s", holder="n3", address="c", duration=LONG)
    assert taken.generation == mtime_ns + 1 > 4
    assert leases.inspect("streams/s").generation == taken.generation  # type: ignore[union-attr]


def test_a_lease_file_stays_one_inode_and_an_empty_one_was_never_taken(tmp_path: Path) -> None:
    leases = FileLeases(tmp_path)
    held = leases.acquire("nodes/n1", holder="n1", address="http://a", duration=LONG)
    inode = os.stat(leases.path("nodes/n1")).st_ino
    leases.release(leases.renew(held))
    leases.acquire("nodes/n1", holder="a-much-longer-holder-name", address="b", duration=LONG)
    leases.break_("nodes/n1")
    assert os.stat(leases.path("nodes/n1")).st_ino == inode  # rewritten in place, never renamed
    leases.path("nodes/n2").write_bytes(b"")  # a crash right after creating it
    assert leases.inspect("nodes/n2") is None
    assert leases.acquire("nodes/n2", holder="n2", address="b", duration=LONG).generation == 1


@pytest.fixture(params=["memory", "file", "azure"])
def system_files_storage(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    storage, _ = BACKENDS[request.param](request, tmp_path)
    return storage


def test_create_system_file_creates_only_if_missing(system_files_storage: object) -> None:
    storage = system_files_storage
    name = f"token-{uuid.uuid4().hex[:8]}"
    assert storage.create_system_file(name, b"first") is True  # type: ignore[attr-defined]
    assert storage.create_system_file(name, b"second") is False  # type: ignore[attr-defined]
    assert storage.read_system_file(name) == b"first"  # type: ignore[attr-defined]
