"""Crash safety of the server: SIGKILL ``messagevault serve`` while clients append.

Several client tasks append small batches with unique, deterministic contents
to two streams of a server subprocess; the test kills the server with SIGKILL
at a random moment, restarts it on the same storage folder, and after every
kill reads the streams straight from storage and checks that

* every acknowledged batch is there exactly once, whole, at the positions,
  sequences and ids its answer named, and in each task's sending order;
* a batch whose request failed (the kill cut it off) is there at most once,
  whole or not at all: the server may have committed it without answering;
* nothing is there that no client sent, and every frame passes its CRCs;
* the restarted server acknowledged new appends (the stream stays writable).

File storage with ``--fsync always``: a SIGKILL loses no page cache, so this
exercises the server's answers and the writer's recovery after a torn
process, not the disk.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from messagevault import FileStorage, Message, Reader, encode_batch
from messagevault.server.app import BATCH_CONTENT_TYPE
from messagevault.server.auth import Users, save_users
from tests.azurite import free_port

SEED = 20240612
STREAMS = ("orders", "events")
TASKS = 8
MIN_KILLS = 20
ROUNDS = 24
# Stop starting rounds after this many seconds; the test fails if that leaves
# fewer than MIN_KILLS kills, rather than passing with less coverage.
TIME_BUDGET = 75.0
KILL_DELAY = (0.1, 0.6)  # seconds of appending before the kill, uniform
MAX_REQUESTS_PER_ROUND = 5_000  # per task; a bound, never reached in 0.6 s
STARTUP_TIMEOUT = 30.0
REAP_TIMEOUT = 30.0
# A request the kill cuts off fails at once (reset or refused); only a hung
# server runs into this.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
USER, PASSWORD = "tester", "crash-test-password"
# A plain header: aiohttp 3.14 deprecates BasicAuth, and warnings are errors here.
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@dataclass(frozen=True)
class Sent:
    """One append request: task ``task``'s ``counter``-th batch."""

    stream: str
    task: int
    counter: int
    pairs: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Ack:
    """The server's answer to a ``Sent``: where each message landed."""

    sent: Sent
    committed_length: int
    receipts: tuple[tuple[int, int, str], ...]  # (position, sequence, id hex) per message


@dataclass
class Ledger:
    """Everything the clients sent and everything the server acknowledged."""

    sent: dict[bytes, tuple[Sent, int]] = field(default_factory=dict)  # key -> (batch, index)
    acks: list[Ack] = field(default_factory=list)
    unacked: list[Sent] = field(default_factory=list)
    counters: list[int] = field(default_factory=lambda: [0] * TASKS)

    def new_batch(self, task: int, rng: random.Random) -> Sent:
        counter = self.counters[task]
        self.counters[task] += 1
        binary = task % 4 >= 2  # half the tasks send binary frames, half JSON
        pairs = []
        for index in range(rng.randint(1, 4)):
            # The key names the batch and the message: unique across the test.
            key = f"{task}:{counter}:{index}".encode()
            size = rng.randint(0, 300)
            # Binary frames carry arbitrary bytes; JSON text values stay UTF-8.
            value = rng.randbytes(size) if binary else rng.choice("abcxyz").encode() * size
            pairs.append((key, value))
        sent = Sent(STREAMS[task % len(STREAMS)], task, counter, tuple(pairs))
        for index, (key, _) in enumerate(pairs):
            self.sent[key] = (sent, index)
        return sent


@dataclass
class Totals:
    kills: int = 0
    acked_batches: int = 0
    acked_messages: int = 0
    unacked_batches: int = 0
    unacked_committed: int = 0  # unacknowledged batches that are in the stream anyway


def request_body(sent: Sent) -> tuple[bytes, str]:
    if sent.task % 4 >= 2:
        return encode_batch(sent.pairs).frame(), BATCH_CONTENT_TYPE
    document = {
        "messages": [{"key": key.decode(), "value": value.decode()} for key, value in sent.pairs]
    }
    return json.dumps(document).encode(), "application/json"


async def append(session: aiohttp.ClientSession, base: str, sent: Sent, ledger: Ledger) -> bool:
    """Send one batch; record the answer. False if the request failed (the server died)."""
    body, content_type = request_body(sent)
    try:
        async with session.post(
            f"{base}/streams/{sent.stream}",
            data=body,
            headers={**AUTH, "Content-Type": content_type},
        ) as response:
            # The kill never produces an error answer, only a dead connection:
            # any non-200 answer is a server defect.
            text = await response.text()
            assert response.status == 200, f"append answered {response.status}: {text}"
    except aiohttp.ClientError:
        # Reset, refused or cut short: not acknowledged, maybe committed.
        ledger.unacked.append(sent)
        return False
    answer = json.loads(text)
    assert answer["stream"] == sent.stream
    receipts = tuple((m["position"], m["sequence"], m["id"]) for m in answer["messages"])
    assert len(receipts) == len(sent.pairs)
    ledger.acks.append(Ack(sent, answer["position"], receipts))
    return True


async def client(
    session: aiohttp.ClientSession, base: str, task: int, rng: random.Random, ledger: Ledger
) -> None:
    """Append one batch after another, each after the last one's answer, until one fails."""
    for _ in range(MAX_REQUESTS_PER_ROUND):
        if not await append(session, base, ledger.new_batch(task, rng), ledger):
            return


@contextmanager
def server_process(folder: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``messagevault serve`` on ``folder``; SIGKILLed and reaped on the way out if alive."""
    command = [
        sys.executable,
        "-m",
        "messagevault.cli",
        "serve",
        "--port",
        str(port),
        "--storage",
        f"file:{folder}",
        "--fsync",
        "always",
    ]
    # Logs go to a file: a pipe nobody reads could fill up and stall the server.
    with (
        log.open("wb") as stderr,
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr) as process,
    ):
        try:
            yield process
        finally:
            # poll() first: never signal a pid that has been reaped (and maybe reused).
            if process.poll() is None:
                process.kill()
            process.wait(timeout=REAP_TIMEOUT)


async def wait_until_serving(
    session: aiohttp.ClientSession, base: str, process: subprocess.Popen[bytes]
) -> None:
    """Wait for /health, then make one authenticated request.

    The first request of a user costs an argon2 verification (~0.2 s of CPU);
    doing it here keeps that out of the kill window, which should be spent
    appending.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        assert process.poll() is None, f"server exited early with {process.returncode}"
        try:
            async with session.get(f"{base}/health") as response:
                if response.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        await asyncio.sleep(0.05)
    async with session.get(f"{base}/streams", headers=AUTH) as response:
        assert response.status == 200, await response.text()


async def run_round(
    folder: Path, log: Path, delay: float, rngs: list[random.Random], ledger: Ledger
) -> None:
    """Start the server, append for ``delay`` seconds after the first answer, SIGKILL it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server_process(folder, port, log) as process:
        # A fresh session per round: pooled connections to a dead server are useless.
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            await wait_until_serving(session, base, process)
            acked_before = len(ledger.acks)
            async with asyncio.TaskGroup() as group:
                for task in range(TASKS):
                    group.create_task(client(session, base, task, rngs[task], ledger))
                # The kill window opens at the round's first acknowledgement: a
                # slow moment of the machine (a late fsync, a busy core) must
                # not let the kill land before the restarted server took anything.
                deadline = time.monotonic() + STARTUP_TIMEOUT
                while len(ledger.acks) == acked_before and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(delay)
                process.kill()
                process.wait(timeout=REAP_TIMEOUT)
                # Leaving the group waits for every client to see the dead server.
        assert process.returncode == -signal.SIGKILL
    check_log(log)


def check_log(log: Path) -> None:
    """The server must not have logged an error (a failed commit, a handler crash).

    The SIGKILL may cut the line being written: a last line with no newline
    is that, and only that one is let go.
    """
    text = log.read_text()
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines.pop()  # cut by the kill mid-write (an empty file's one empty line too)
    for line in lines:
        if line.startswith("{"):
            entry = json.loads(line)
            assert entry["level"] not in ("error", "critical"), f"server logged: {line}"


def check_streams(folder: Path, ledger: Ledger, totals: Totals) -> None:
    """Read both streams from storage and hold them against the ledger."""
    storage = FileStorage(folder)
    present: set[Sent] = set()
    existing = set(storage.list_streams())
    for stream in STREAMS:
        if stream not in existing:
            assert not [a for a in ledger.acks if a.sent.stream == stream], f"{stream} is gone"
            continue
        with Reader.open(storage, stream) as reader:
            reader.verify()  # raises CorruptData on any bad frame
            checkpoint = reader.checkpoint()
            messages = list(reader.read())
        present |= check_stream(stream, messages, checkpoint.length, ledger)
    unacked = set(ledger.unacked)
    assert not unacked & {ack.sent for ack in ledger.acks}, "a batch both failed and was acked"
    totals.acked_batches = len(ledger.acks)
    totals.acked_messages = sum(len(ack.sent.pairs) for ack in ledger.acks)
    totals.unacked_batches = len(unacked)
    totals.unacked_committed = len(unacked & present)


def check_stream(stream: str, messages: list[Message], length: int, ledger: Ledger) -> set[Sent]:
    """Check one stream; return the batches it holds."""
    # The stream itself: dense sequences, ascending positions, ending at the checkpoint.
    assert [m.sequence for m in messages] == list(range(len(messages))), f"{stream}: sequences"
    positions = [m.position for m in messages]
    assert positions == sorted(set(positions)), f"{stream}: positions not ascending"
    assert (messages[-1].next_position if messages else 0) == length, f"{stream}: length"

    # Every message was sent, to this stream, with this value, and only once.
    keys = Counter(m.key for m in messages)
    duplicates = [key for key, count in keys.items() if count > 1]
    assert not duplicates, f"{stream}: messages stored twice: {duplicates[:5]}"
    at: dict[Sent, list[Message]] = {}
    for message in messages:
        assert message.key in ledger.sent, f"{stream}: never sent: {message.key!r}"
        sent, index = ledger.sent[message.key]
        assert sent.stream == stream, f"{message.key!r} sent to {sent.stream}, found in {stream}"
        assert message.value == sent.pairs[index][1], f"{stream}: value of {message.key!r}"
        at.setdefault(sent, []).append(message)

    # Batches are atomic: all of one, consecutive and in order, or none of it.
    for sent, found in at.items():
        indexes = [ledger.sent[m.key][1] for m in found]
        assert indexes == list(range(len(sent.pairs))), f"{stream}: batch torn: {sent}"
        sequences = [m.sequence for m in found]
        assert sequences == list(range(sequences[0], sequences[0] + len(found))), "not adjacent"

    # Each task's batches are in the order it sent them (it waits for each
    # answer before sending the next). ``at`` is in stream order.
    for task in range(TASKS):
        counters = [sent.counter for sent in at if sent.task == task]
        assert counters == sorted(counters), f"{stream}: task {task} out of order: {counters}"

    # Every acknowledged batch: where, with which numbers, its answer said.
    for ack in ledger.acks:
        if ack.sent.stream != stream:
            continue
        stored = at.get(ack.sent)
        assert stored is not None, f"{stream}: acknowledged batch lost: {ack.sent}"
        got = tuple((m.position, m.sequence, m.id.hex()) for m in stored)
        assert got == ack.receipts, f"{stream}: {ack.sent} acknowledged at {ack.receipts}"
        # The committed length the answer named covers the batch and was committed.
        end = stored[-1].next_position
        assert end <= ack.committed_length <= length, (
            f"{stream}: {ack.sent} ends at {end}, answer said committed length "
            f"{ack.committed_length}, stream is {length} long"
        )
    return set(at)


async def final_round(folder: Path, log: Path, rngs: list[random.Random], ledger: Ledger) -> None:
    """After all the kills: the server still appends to every stream and stops cleanly."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server_process(folder, port, log) as process:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            await wait_until_serving(session, base, process)
            for task in range(len(STREAMS)):  # task t writes STREAMS[t]
                assert await append(session, base, ledger.new_batch(task, rngs[task]), ledger)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=REAP_TIMEOUT) == 0
    check_log(log)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_server_survives_sigkill_during_appends(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    # A user made up front: the server then creates no admin and prints no password.
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(FileStorage(folder), users)

    schedule = random.Random(SEED)
    rngs = [random.Random(f"{SEED}-{task}") for task in range(TASKS)]
    ledger = Ledger()
    totals = Totals()
    started = time.monotonic()
    for number in range(ROUNDS):
        if time.monotonic() - started > TIME_BUDGET:
            break
        acked_before = len(ledger.acks)
        await run_round(
            folder, tmp_path / f"server-{number}.log", schedule.uniform(*KILL_DELAY), rngs, ledger
        )
        totals.kills += 1
        # The restarted server took appends again (the first round: took any).
        assert len(ledger.acks) > acked_before, f"round {number}: nothing acknowledged"
        check_streams(folder, ledger, totals)
    assert totals.kills >= MIN_KILLS, f"only {totals.kills} kills within {TIME_BUDGET} s"
    final_acks = len(ledger.acks)
    await final_round(folder, tmp_path / "server-final.log", rngs, ledger)
    check_streams(folder, ledger, totals)
    assert len(ledger.acks) == final_acks + len(STREAMS)
    # -s shows the numbers; they say how much the kills actually exercised.
    print(f"{totals} in {time.monotonic() - started:.1f}s")
