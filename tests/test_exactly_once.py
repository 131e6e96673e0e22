"""Exactly-once publishing through a faulty network and a server killed again and again.

The test issue 11 asks for. A real ``messagevault serve`` (a subprocess on a
data folder) sits behind ``tests.fault_proxy.FaultProxy``, which drops
answers after the server has committed, resets connections mid-request and
delays packets, at random from a seed. Producers publish numbered messages
through the proxy with the idempotent client:

* ``publish`` workers, each ``Client.publish`` one batch after another,
  waiting for each answer (one fresh producer id per call);
* ``Producer`` workers, each ``send`` one message at a time to two streams
  (one producer id, a batch sequence per stream).

Meanwhile the server is SIGKILLed at random moments (at least ``MIN_KILLS``
times) and started again on the same folder on a new port, the proxy
retargeted to it; a few kills come right after answers the proxy dropped,
so that the retries meet a server that knows of those batches only from
storage. At the end, read straight from storage with ``Reader``: every
message sent is stored exactly once, each worker's messages in the order it
sent them, at the position, sequence and id of its receipt.

All randomness comes from ``SEED`` (printed); everything is bounded in
count and time; every server is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from messagevault import FileStorage, Reader
from messagevault.client import Client
from messagevault.format import Message
from messagevault.producer import MessageFuture, Producer
from messagevault.server.auth import Users, save_users
from messagevault.writer import AppendResult, Receipt
from tests.azurite import free_port
from tests.fault_proxy import Fault, FaultPolicy, FaultProxy
from tests.service_process import stop_gracefully

SEED = 20261203
STREAMS = ("orders", "events")
PUBLISH_WORKERS = 4
PRODUCER_WORKERS = 2
MIN_KILLS = 20
KILLS = 24
# No kill starts after this many seconds; fewer than MIN_KILLS by then fails
# the test rather than passing with less coverage.
KILL_BUDGET = 45.0
UPTIME = (0.15, 0.5)  # seconds a server runs before its kill, uniform
DOWNTIME = (0.05, 0.25)  # seconds before the next one starts (longer than any proxy delay)
# Every few kills come right after the proxy dropped this many answers.
DROPS_BEFORE_KILL = 2
KILL_AFTER_DROPS_EVERY = 4
MAX_BATCHES = 2_000  # per publish worker; a bound, not reached
MAX_SENDS = 4_000  # per producer worker
SEND_PAUSE = 0.003  # seconds between a producer worker's messages
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
FINISH_TIMEOUT = 120.0  # for the workers' last publishes once the kills stop
USER, PASSWORD = "tester", "exactly-once-password"


@dataclass
class Ledger:
    """What each worker sent, in order, and the receipt it got for each message."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # key -> (stream, value, receipt); one list per worker, in sending order
    sent: dict[str, list[tuple[bytes, str, bytes, Receipt | None]]] = field(default_factory=dict)
    # publish's answers that were duplicates: (when answered, stream, result)
    duplicates: list[tuple[float, str, AppendResult]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True)
class Restart:
    started: float  # time.monotonic() just before the new server was started
    length: dict[str, int]  # each stream's committed length then


class Server:
    """``messagevault serve`` on ``folder``, started and SIGKILLed by PID, again and again."""

    def __init__(self, folder: Path, logs: Path) -> None:
        self.folder = folder
        self.logs = logs
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> int:
        assert self.process is None
        self.port = free_port()
        self.starts += 1
        log = self.logs / f"server-{self.starts}.log"
        command = [
            *(sys.executable, "-m", "messagevault.cli", "serve"),
            *("--port", str(self.port), "--storage", f"file:{self.folder}", "--fsync", "never"),
        ]
        # A SIGKILL loses no page cache, so fsync would only slow the rounds.
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return self.port
            except OSError:
                assert self.process.poll() is None, f"server exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.02)

    def kill(self) -> None:
        process, self.process = self.process, None
        assert process is not None
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        assert process.returncode == -signal.SIGKILL

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; by PID, only a process not yet reaped."""
        process, self.process = self.process, None
        if process is not None:
            stop_gracefully(process, timeout=STOP_TIMEOUT)

    def check_logs(self) -> None:
        """No server logged an error (a failed commit, a handler crash)."""
        for log in sorted(self.logs.glob("server-*.log")):
            for line in log.read_text().splitlines():
                if line.startswith("{"):
                    level = json.loads(line)["level"]
                    assert level not in ("error", "critical"), f"{log.name}: {line}"


def publish_worker(
    client: Client, worker: int, rng: random.Random, ledger: Ledger, stop: threading.Event
) -> None:
    """``Client.publish`` batches of 1-4 messages, one after the other, until ``stop``."""
    name = f"publish-{worker}"
    stream = STREAMS[worker % len(STREAMS)]
    order: list[tuple[bytes, str, bytes, Receipt | None]] = []
    with ledger.lock:
        ledger.sent[name] = order
    try:
        for counter in range(MAX_BATCHES):
            if stop.is_set():
                return
            pairs = [
                (f"{name}:{counter}:{index}".encode(), rng.randbytes(rng.randint(0, 200)))
                for index in range(rng.randint(1, 4))
            ]
            result = client.publish(stream, pairs)
            answered = time.monotonic()
            for (key, value), receipt in zip(pairs, result, strict=True):
                order.append((key, stream, value, receipt))
            if result.duplicate:
                with ledger.lock:
                    ledger.duplicates.append((answered, stream, result))
    except BaseException as exc:
        ledger.errors.append(exc)


def producer_worker(
    client: Client, worker: int, rng: random.Random, ledger: Ledger, stop: threading.Event
) -> None:
    """One ``Producer``: single messages to both streams, in turn, until ``stop``; then flush."""
    name = f"producer-{worker}"
    sent: list[tuple[bytes, str, bytes, MessageFuture]] = []
    try:
        with Producer(client, max_batch_messages=rng.randint(3, 20)) as producer:
            for number in range(MAX_SENDS):
                if stop.wait(SEND_PAUSE):
                    break
                stream = STREAMS[number % len(STREAMS)]
                key = f"{name}:{number}".encode()
                value = rng.randbytes(rng.randint(0, 200))
                sent.append((key, stream, value, producer.send(stream, value, key=key)))
            producer.flush(timeout=FINISH_TIMEOUT)
        order = [(key, stream, value, future.result(0)) for key, stream, value, future in sent]
    except BaseException as exc:
        ledger.errors.append(exc)
        return
    with ledger.lock:
        ledger.sent[name] = order


def check_stream(stream: str, messages: list[Message], ledger: Ledger) -> None:
    """Every message sent to ``stream`` is there once, in its worker's order, at its receipt."""
    assert [m.sequence for m in messages] == list(range(len(messages))), f"{stream}: sequences"
    counts = Counter(m.key for m in messages)
    twice = [key for key, count in counts.items() if count > 1]
    assert not twice, f"{stream}: stored more than once: {twice[:5]}"
    stored = {m.key: m for m in messages}
    expected = 0
    for worker, order in ledger.sent.items():
        mine = [(key, value, receipt) for key, where, value, receipt in order if where == stream]
        expected += len(mine)
        positions = []
        for key, value, receipt in mine:
            message = stored.get(key)
            assert message is not None, f"{stream}: {key!r} was acknowledged but is not stored"
            assert message.value == value, f"{stream}: {key!r} has another value"
            assert receipt is not None
            assert (message.position, message.sequence, message.id) == tuple(receipt), (
                f"{stream}: {key!r} is at {message.position}/#{message.sequence}, "
                f"its receipt says {receipt.position}/#{receipt.sequence}"
            )
            positions.append(message.position)
        assert positions == sorted(positions), f"{stream}: {worker}'s messages out of order"
    assert len(messages) == expected, f"{stream}: {len(messages) - expected} messages nobody sent"


@contextlib.contextmanager
def running(threads: list[threading.Thread], stop: threading.Event) -> Iterator[None]:
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        deadline = time.monotonic() + FINISH_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "a worker did not finish"


def committed_lengths(folder: Path) -> dict[str, int]:
    storage = FileStorage(folder)
    lengths = {}
    for stream in set(storage.list_streams()) & set(STREAMS):
        with Reader.open(storage, stream) as reader:
            lengths[stream] = reader.checkpoint().length
    return lengths


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_message_is_stored_exactly_once_through_faults_and_sigkills(
    tmp_path: Path,
) -> None:
    print(f"exactly-once test seed: {SEED}")
    folder = tmp_path / "data"
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(FileStorage(folder), users)  # the server then makes no admin of its own
    schedule = random.Random(SEED)
    policy = FaultPolicy(SEED, drop_answer=0.08, reset_request=0.08, delay=0.1, max_delay=0.02)
    server = Server(folder, tmp_path)
    ledger = Ledger()
    stop = threading.Event()
    restarts: list[Restart] = []
    kills = 0
    try:
        port = server.start()
        with (
            FaultProxy(port, policy) as proxy,
            Client(proxy.url, user=USER, password=PASSWORD, timeout=5) as client,
        ):
            threads = [
                threading.Thread(
                    target=publish_worker,
                    args=(client, n, random.Random(f"{SEED}-publish-{n}"), ledger, stop),
                )
                for n in range(PUBLISH_WORKERS)
            ] + [
                threading.Thread(
                    target=producer_worker,
                    args=(client, n, random.Random(f"{SEED}-producer-{n}"), ledger, stop),
                )
                for n in range(PRODUCER_WORKERS)
            ]
            with running(threads, stop):
                started = time.monotonic()
                for kill in range(KILLS):
                    if time.monotonic() - started > KILL_BUDGET or ledger.errors:
                        break
                    time.sleep(schedule.uniform(*UPTIME))
                    if kill % KILL_AFTER_DROPS_EVERY == 0:
                        # Answers lost right before the kill: their retries meet
                        # a server that knows these batches only from storage.
                        dropped = proxy.stats.count(Fault.DROP_ANSWER)
                        proxy.force(*[Fault.DROP_ANSWER] * DROPS_BEFORE_KILL)
                        deadline = time.monotonic() + 5
                        while proxy.stats.count(Fault.DROP_ANSWER) < dropped + DROPS_BEFORE_KILL:
                            assert time.monotonic() < deadline, "no requests came to drop"
                            time.sleep(0.001)
                    server.kill()
                    kills += 1
                    time.sleep(schedule.uniform(*DOWNTIME))
                    restarts.append(Restart(time.monotonic(), committed_lengths(folder)))
                    proxy.retarget(server.start())
            stats = proxy.stats
        server.stop()
        server.check_logs()
    finally:
        stop.set()
        server.stop()
    assert not ledger.errors, f"seed {SEED}: a worker failed: {ledger.errors[0]!r}"
    assert kills >= MIN_KILLS, f"seed {SEED}: only {kills} kills within {KILL_BUDGET} s"
    assert set(ledger.sent) == {f"publish-{n}" for n in range(PUBLISH_WORKERS)} | {
        f"producer-{n}" for n in range(PRODUCER_WORKERS)
    }
    storage = FileStorage(folder)
    for stream in STREAMS:
        with Reader.open(storage, stream) as reader:
            reader.verify()
            check_stream(stream, list(reader.read()), ledger)

    # The faults did happen, and retries were answered from the producer
    # table, also by servers that rebuilt it from storage.
    for fault in (Fault.DROP_ANSWER, Fault.RESET_REQUEST, Fault.DELAY):
        assert stats.count(fault) > 0, f"seed {SEED}: no {fault.value}"
    # A duplicate answered after a restart, of a batch committed before it:
    # the restarted server knew the batch only from storage.
    across = [
        result
        for answered, stream, result in ledger.duplicates
        if any(
            restart.started < answered and result.frame_position < restart.length.get(stream, 0)
            for restart in restarts
        )
    ]
    assert ledger.duplicates, f"seed {SEED}: no duplicate was answered"
    assert across, f"seed {SEED}: no duplicate was answered by a restarted server"
    messages = sum(len(order) for order in ledger.sent.values())
    print(
        f"seed {SEED}: {kills} kills, {messages} messages, {len(ledger.duplicates)} duplicate "
        f"answers to publish ({len(across)} after a restart), faults "
        + ", ".join(f"{fault.value} {stats.count(fault)}" for fault in Fault)
        + f", {stats.upstream_failures} connections to a dead server"
    )
