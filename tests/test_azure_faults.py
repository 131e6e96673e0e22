"""Transient storage faults on Azure: Azurite stopped and restarted under a live writer.

Each test runs its own Azurite, so stopping it disturbs nobody else. Azurite
is only ever stopped with SIGTERM (``Azurite.stop``): it then saves its state,
as a restarted storage endpoint keeps what it acknowledged. A SIGKILLed
Azurite would lose its last seconds of acknowledged writes, which Azure never
does, so a test built on that would be testing Azurite.

What must hold: while storage is down an append waits, or fails with a
``StorageError`` that says what happened; once storage is back appends succeed
on the same ``Writer``; every acknowledged batch is in the stream exactly
once, in order; a batch whose append failed is there at most once; nothing is
there that was never appended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from messagevault import Reader, StorageError, Writer, open_storage
from messagevault.storage.base import Storage
from tests.azurite import Azurite

STREAM = "faults"
MESSAGES_PER_BATCH = 3
KEY_PREFIX = b"batch-"
# Bounds on every wait, so a hang fails the test instead of stalling the run.
# One storage call gives up within seconds (storage.azure.client_options); the
# writer rides out longer outages itself, bounded by its commit_timeout.
JOIN_TIMEOUT = 90.0
PROGRESS_TIMEOUT = 60.0


def batch(number: int) -> list[tuple[bytes, bytes]]:
    """Batch ``number``: small (the point is faults, not volume) and unmistakable."""
    return [
        (b"%s%06d-%d" % (KEY_PREFIX, number, index), b"%d/%d:" % (number, index) + bytes(300))
        for index in range(MESSAGES_PER_BATCH)
    ]


def stored_batches(storage: Storage) -> list[int]:
    """Batch numbers in stream order, each checked whole and byte for byte."""
    with Reader.open(storage, STREAM) as reader:
        report = reader.verify()  # CRCs, columns, and the checkpoint's message count
        messages = list(reader.read())
    assert report.messages == len(messages)
    assert len(messages) % MESSAGES_PER_BATCH == 0, f"{len(messages)} messages: a batch is split"
    numbers = []
    for start in range(0, len(messages), MESSAGES_PER_BATCH):
        group = messages[start : start + MESSAGES_PER_BATCH]
        number = int(group[0].key[len(KEY_PREFIX) : len(KEY_PREFIX) + 6])
        assert [(m.key, m.value) for m in group] == batch(number), f"batch {number} differs"
        assert [m.sequence for m in group] == list(range(start, start + MESSAGES_PER_BATCH))
        numbers.append(number)
    return numbers


@pytest.fixture
def azurite_to_stop() -> Iterator[Azurite]:
    """An Azurite of this test's own, stopped by PID (and its data removed) at the end."""
    server = Azurite()
    try:
        server.start()
        yield server
    finally:
        server.close()


@dataclass
class Attempt:
    """One ``append`` call and how it ended."""

    number: int
    started: float  # time.monotonic()
    seconds: float
    error: BaseException | None = None
    base_sequence: int | None = None  # from the AppendResult, if acknowledged

    @property
    def acked(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        outcome = "ok" if self.error is None else f"{type(self.error).__name__}: {self.error}"
        return f"batch {self.number}: {self.seconds:.2f}s, {outcome}"


def attempt(writer: Writer, number: int) -> Attempt:
    started = time.monotonic()
    try:
        result = writer.append(batch(number))
    except Exception as exc:  # recorded, and judged by the test: it must be a StorageError
        return Attempt(number, started, time.monotonic() - started, error=exc)
    return Attempt(number, started, time.monotonic() - started, base_sequence=result.base_sequence)


def append_until(
    writer: Writer, attempts: list[Attempt], stop: threading.Event, limit: int, seconds: float
) -> None:
    """Append batches 0, 1, ... until ``stop``, ``limit`` batches or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    for number in range(limit):
        if stop.is_set() or time.monotonic() > deadline:
            return
        attempts.append(attempt(writer, number))  # list.append: safe to read from another thread


def wait_for(condition: Callable[[], bool], what: str, timeout: float = PROGRESS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.01)


def check_errors(attempts: list[Attempt]) -> None:
    """Failures must be ours and say what went wrong, never a raw SDK exception."""
    for failed in attempts:
        if failed.error is not None:
            assert isinstance(failed.error, StorageError), failed.describe()
            assert repr(STREAM) in str(failed.error), failed.describe()


def check_stream(storage: Storage, attempts: list[Attempt]) -> list[int]:
    """Every acknowledged batch exactly once, in order; no batch that was never tried."""
    stored = stored_batches(storage)
    assert stored == sorted(set(stored)), f"out of order or duplicated: {stored}"
    tried = {a.number for a in attempts}
    assert set(stored) <= tried, f"never appended: {sorted(set(stored) - tried)}"
    acked = {a.number for a in attempts if a.acked}
    assert acked <= set(stored), f"acknowledged but missing: {sorted(acked - set(stored))}"
    # The acknowledged sequence numbers are where the stream really holds them.
    for acknowledged in attempts:
        if acknowledged.acked:
            index = stored.index(acknowledged.number)
            assert acknowledged.base_sequence == index * MESSAGES_PER_BATCH, acknowledged
    return stored


@pytest.mark.slow
def test_restart_during_appends_loses_and_duplicates_nothing(azurite_to_stop: Azurite) -> None:
    server = azurite_to_stop
    storage = open_storage("azure:" + server.connection_string)
    attempts: list[Attempt] = []
    stop = threading.Event()
    before = after = 20  # acknowledged batches wanted on each side of the outage

    def acked_since(moment: float) -> int:
        return sum(1 for a in list(attempts) if a.acked and a.started >= moment)

    with (
        Writer.open(storage, STREAM, commit_timeout=20.0) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        loop = pool.submit(append_until, writer, attempts, stop, 5000, 120.0)
        try:
            wait_for(lambda: acked_since(0) >= before, f"{before} appends before the outage")
            server.stop()
            down_at = time.monotonic()
            in_progress = len(attempts)
            time.sleep(2.5)
            server.start()
            up_at = time.monotonic()
            wait_for(lambda: acked_since(up_at) >= after, f"{after} appends after the restart")
        finally:
            stop.set()
            loop.result(timeout=JOIN_TIMEOUT)  # re-raises whatever broke the loop itself

    stored = check_stream(storage, attempts)
    check_errors(attempts)
    # Storage is back: nothing begun after the restart may fail.
    late = [a for a in attempts if a.started >= up_at and not a.acked]
    assert not late, [a.describe() for a in late]

    hit = [a for a in attempts if a.started + a.seconds >= down_at and a.started < up_at]
    # The loop never idles, so some append spanned the outage and had to wait
    # (or fail): otherwise this test did not test what it claims to.
    assert any(a.seconds >= 2.0 or not a.acked for a in hit), [a.describe() for a in hit]
    failed = [a for a in attempts if not a.acked]
    print(
        f"outage of {up_at - down_at:.1f}s after {in_progress} appends: "
        f"{len(attempts)} appends, {len(failed)} failed, {len(stored)} batches stored; "
        f"appends caught by the outage: {[a.describe() for a in hit]}; "
        f"failed appends: {[a.describe() for a in failed]}; "
        f"failed but landed: {sorted({a.number for a in failed} & set(stored))}"
    )


COMMIT_TIMEOUT = 3.0
# A writer that honours commit_timeout gives up while storage is still down;
# the slack is for the last storage call in flight and a loaded machine.
GIVE_UP_SLACK = 2.0


@pytest.mark.slow
def test_outage_longer_than_commit_timeout_fails_the_append(azurite_to_stop: Azurite) -> None:
    server = azurite_to_stop
    storage = open_storage("azure:" + server.connection_string)
    with (
        Writer.open(storage, STREAM, commit_timeout=COMMIT_TIMEOUT) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        attempts = [attempt(writer, 0)]
        server.stop()
        # In another thread, so that this one can bring Azurite back meanwhile.
        pending = pool.submit(attempt, writer, 1)
        time.sleep(8.0)
        server.start()
        attempts.append(pending.result(timeout=JOIN_TIMEOUT))
        attempts.append(attempt(writer, 2))  # the same Writer carries on

    during = attempts[1]
    print(f"append while Azurite was down for 8 s: {during.describe()}")
    assert isinstance(during.error, StorageError), f"expected a StorageError: {during.describe()}"
    assert "not confirmed" in str(during.error), during.describe()
    assert during.seconds < COMMIT_TIMEOUT + GIVE_UP_SLACK, during.describe()
    assert attempts[2].acked, attempts[2].describe()
    check_errors(attempts)
    # Storage was down throughout the failed append: it cannot have landed.
    assert check_stream(storage, attempts) == [0, 2]


@pytest.mark.slow
def test_writer_carries_on_after_an_append_gave_up(azurite_to_stop: Azurite) -> None:
    # Azurite stays down until the append gives up (however long that takes,
    # see the test above), so that the path after a failed append is covered:
    # the same Writer resyncs with storage and appends again, without duplicates.
    server = azurite_to_stop
    storage = open_storage("azure:" + server.connection_string)
    with Writer.open(storage, STREAM, commit_timeout=COMMIT_TIMEOUT) as writer:
        attempts = [attempt(writer, 0)]
        server.stop()
        attempts.append(attempt(writer, 1))  # bounded by commit_timeout plus SDK retries
        server.start()
        attempts.append(attempt(writer, 2))
        attempts.append(attempt(writer, 3))

    gave_up = attempts[1]
    print(f"append while Azurite was down: {gave_up.describe()}")
    assert isinstance(gave_up.error, StorageError), gave_up.describe()
    assert "not confirmed" in str(gave_up.error), gave_up.describe()
    assert gave_up.seconds < JOIN_TIMEOUT, gave_up.describe()
    assert [a.acked for a in attempts] == [True, False, True, True], [
        a.describe() for a in attempts
    ]
    check_errors(attempts)
    assert check_stream(storage, attempts) == [0, 2, 3]
