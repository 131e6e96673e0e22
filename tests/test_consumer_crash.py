"""Consumers killed with SIGKILL at random moments while a producer writes.

A child process (``consumer_process.py``) consumes the stream and logs every
message it handles, one unbuffered write each; the test kills it at a random
moment, checks the position it left in its file store, and starts the next
one. After the last kill a final child catches up to the end. Then:

* every message was handled at least once, in order: each run starts
  exactly at the position it loaded, handles consecutive messages, and
  leaves no gap (a run may repeat what the last one handled after its last
  save, nothing else);
* the saved position never ran ahead of what was handled: at every restart,
  and checked from outside after every kill, it is 0 or the
  ``next_position`` of a message already in the log.

The same runs against storage directly (the producer is a ``Writer`` in this
process) and through a ``messagevault serve`` subprocess (the producer
publishes with a ``Client``; the children follow with a ``Client``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from messagevault import FileStorage, Message, Reader, Writer
from messagevault.positions import FilePositionStore
from tests import consumer_process
from tests.serve_process import serve_process

CHILD = Path(__file__).with_name("consumer_process.py")
STREAM = "crash-consume"
KILLS = 22
SEED = 20261203
MAX_KILL_DELAY = 0.3  # seconds after the child is READY
READY_TIMEOUT = 30.0
MAX_MESSAGES = 40_000  # the producer's bound
USER, PASSWORD = "app", "secret"


@dataclass
class Run:
    """One child's lines of the log: where it started, what it handled."""

    start: int  # the position it loaded, -1 if none was saved
    handled: list[tuple[int, int, int]] = field(default_factory=list)  # sequence, pos, next


def parse_log(path: Path) -> list[Run]:
    runs: list[Run] = []
    for line in path.read_bytes().split(b"\n"):
        fields = line.split()
        if not fields:
            continue  # the last, empty piece (or a torn line: it was never handled)
        if fields[0] == b"START":
            runs.append(Run(int(fields[1])))
        elif len(fields) == 3:
            sequence, position, next_position = map(int, fields)
            runs[-1].handled.append((sequence, position, next_position))
    return runs


@dataclass
class Verdict:
    handled_boundaries: set[int]  # 0 and every next_position handled so far
    furthest: int  # the highest next_position handled
    next_sequence: int  # messages 0..next_sequence-1 were all handled
    replayed: int  # messages handled more than once


def check_runs(runs: list[Run]) -> Verdict:
    boundaries = {0}
    furthest = 0
    next_sequence = 0
    replayed = 0
    saved_once = False
    for number, run in enumerate(runs):
        if run.start == -1:
            # Nothing saved: only possible if no earlier run handled anything,
            # because a consumer saves its start before handling.
            assert not saved_once, f"run {number} found no saved position after saves"
            resume = 0
        else:
            assert run.start in boundaries, (
                f"run {number} resumed at {run.start}, which is not the end of a handled message"
            )
            assert run.start <= furthest
            resume = run.start
        saved_once = saved_once or run.start != -1 or bool(run.handled)
        if not run.handled:
            continue
        sequence, position, _ = run.handled[0]
        assert position == resume, f"run {number} began at {position}, not at {resume}"
        assert sequence <= next_sequence, f"run {number} skipped messages {next_sequence}-"
        replayed += max(0, next_sequence - sequence)
        expected_sequence, expected_position = sequence, position
        for sequence, position, next_position in run.handled:
            assert (sequence, position) == (expected_sequence, expected_position), (
                f"run {number}: message {sequence} at {position} out of order"
            )
            boundaries.add(next_position)
            furthest = max(furthest, next_position)
            expected_sequence, expected_position = sequence + 1, next_position
        next_sequence = max(next_sequence, expected_sequence)
    return Verdict(boundaries, furthest, next_sequence, replayed)


class Producer:
    """Appends batches of 1-20 messages every few milliseconds, in a thread, until stopped."""

    def __init__(self, publish: Callable[[list[tuple[bytes, bytes]]], object], seed: int) -> None:
        self._publish = publish
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.count < MAX_MESSAGES:
                size = self._random.randint(1, 20)
                self._publish(
                    [(b"k%d" % (i % 7), b"v%d" % i) for i in range(self.count, self.count + size)]
                )
                self.count += size
                self._stop.wait(0.005)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


def start_child(
    source: list[str], positions: Path, log: Path, options: list[str]
) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), *source, STREAM, str(positions), str(log), *options],
        stdout=subprocess.PIPE,
        env={**os.environ, "MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD},
    )
    assert child.stdout is not None
    ready = child.stdout.readline()  # the child prints READY once it has loaded its position
    assert ready == b"READY\n", f"child did not start: {ready!r}, exit code {child.poll()}"
    return child


def child_options(rng: random.Random) -> list[str]:
    options = ["--save-every", str(rng.choice([1, 2, 7, 50])), "--save-interval", "0.05"]
    if rng.random() < 0.4:
        options.append("--batches")
    if rng.random() < 0.5:
        options += ["--pause", "0.0005"]  # more kills between a handler and its save
    return options


def crash_loop(source: list[str], tmp_path: Path) -> int:
    """KILLS children, each killed at a random moment; the log is checked after every kill."""
    rng = random.Random(SEED)
    positions = tmp_path / "positions"
    log = tmp_path / "handled.log"
    store = FilePositionStore(positions)
    kills = 0
    for _ in range(KILLS):
        child = start_child(source, positions, log, child_options(rng))
        try:
            time.sleep(rng.uniform(0, MAX_KILL_DELAY))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            assert child.stdout is not None
            child.stdout.close()
        kills += 1
        verdict = check_runs(parse_log(log))
        saved = store.load(consumer_process.CONSUMER)
        # From outside, after the kill: the position left behind names a handled message.
        if saved is not None:
            assert saved.position in verdict.handled_boundaries
            assert saved.position <= verdict.furthest
    return kills


def catch_up_and_check(source: list[str], tmp_path: Path, messages: list[Message]) -> Verdict:
    """One last child handles the rest (the producer has stopped); then the whole log is checked."""
    positions = tmp_path / "positions"
    log = tmp_path / "handled.log"
    last = subprocess.run(
        [sys.executable, str(CHILD), *source, STREAM, str(positions), str(log), "--until-end"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD},
        check=False,
    )
    assert last.returncode == 0, last.stderr.decode()
    runs = parse_log(log)
    verdict = check_runs(runs)
    assert verdict.next_sequence == len(messages), "not every message was handled"
    for run in runs:  # what the children logged is what the stream holds
        for sequence, position, next_position in run.handled:
            message = messages[sequence]
            assert (message.position, message.next_position) == (position, next_position)
    saved = FilePositionStore(positions).load(consumer_process.CONSUMER)
    assert saved is not None and saved.position == messages[-1].next_position
    print(
        f"consumer crash loop: {len(runs) - 1} kills, {len(messages)} messages, "
        f"{verdict.replayed} handled again after a restart"
    )
    return verdict


def _stored(root: Path) -> list[Message]:
    with Reader.open(FileStorage(root), STREAM) as reader:
        return list(reader.read())


@pytest.mark.slow
def test_consumer_killed_at_random_reading_storage(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    source = [f"file:{tmp_path / 'data'}"]
    with Writer.open(storage, STREAM) as writer, Producer(writer.append, SEED):
        kills = crash_loop(source, tmp_path)
    assert kills >= 20
    verdict = catch_up_and_check(source, tmp_path, _stored(tmp_path / "data"))
    assert verdict.replayed > 0  # some kills did land between handling and saving


@pytest.mark.slow
def test_consumer_killed_at_random_through_the_server(server: str, tmp_path: Path) -> None:
    from messagevault.client import Client

    source = ["server", "--url", server]
    with Client(server, user=USER, password=PASSWORD) as client:
        client.publish(STREAM, [(b"first", b"0")])
        with Producer(lambda pairs: client.publish(STREAM, pairs), SEED + 1):
            kills = crash_loop(source, tmp_path)
    assert kills >= 20
    verdict = catch_up_and_check(source, tmp_path, _stored(tmp_path / "data"))
    assert verdict.replayed > 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        yield url
