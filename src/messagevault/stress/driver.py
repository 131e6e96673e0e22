"""Drive a stress run: producers on the event loop, consumers in threads, then the read-back.

Producers are tasks of one asyncio loop sharing one ``AsyncClient``; each
sends a batch, waits for its acknowledgement and sends the next, until its
share of ``--count`` is sent or ``--duration`` is up, or ``interrupted`` is
set (Ctrl-C): then it stops after the batch in flight, so every message sent
is acknowledged. A producer that fails (the server went away) stops the
others at once; what was measured until then is the outcome, partial, with
the error named, and nothing is read back. Consumers are threads with
blocking readers (a ``Reader`` on the storage, or a ``Client``
long-polling the server); each follows one
stream from where the run started and records the end-to-end latency of what
it sees. When the producers are done, consumers read on until they reach
the last acknowledged batch (or ``DRAIN_TIMEOUT``). Then everything written
is read back once more and checked (``verify``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from messagevault.client import AsyncClient, Client
from messagevault.errors import StreamNotFound
from messagevault.format import Message
from messagevault.stress.connection import Connection as Connection  # noqa: PLC0414
from messagevault.stress.stats import Recorder, Second
from messagevault.stress.verify import Readback, read_back
from messagevault.stress.workload import MessageSource, Plan, Values, header_of

# Seconds between checkpoint reads of a consumer at the tail of storage: short while
# data flows (the end-to-end latency), backing off while idle (against Azure each is a GET).
STORAGE_POLL = 0.002
STORAGE_POLL_IDLE = 0.1
DRAIN_TIMEOUT = 60.0  # seconds consumers get, after the producers stop, to see everything
TICK = 1.0
MIN_LAST_TICK = 0.5  # seconds: a shorter last interval is left out of the series


@dataclass
class Outcome:
    """All a run found out, for the table, the JSON and the exit code."""

    plan: Plan
    recorder: Recorder
    write_seconds: float
    partial: bool  # interrupted: the producers stopped early
    starts: dict[str, int]  # stream -> its length when the run began
    ends: dict[str, int]  # stream -> end of the last batch acknowledged
    acked: list[int]  # per producer: messages acknowledged
    consumers_done: bool = True  # every consumer saw everything written
    readback: Readback | None = None  # None: skipped (interrupted)
    consumer_errors: list[str] = field(default_factory=list)
    error: str | None = None  # a producer failed: the run stopped there (then partial)
    # CPU time per second of writing (1.0 = one core busy): this process (producers
    # and consumers), and the server when its CPU time can be read (embedded).
    cpu_share: float = float("nan")
    server_cpu_share: float | None = None


class Backoff:
    """Waits that double from ``first`` up to ``most`` while nothing comes; ``reset()`` on data."""

    def __init__(self, first: float = STORAGE_POLL, most: float = STORAGE_POLL_IDLE) -> None:
        self._first = first
        self._most = most
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(wait * 2, self._most)
        return wait

    def reset(self) -> None:
        self._next = self._first


class Consumer(threading.Thread):
    """Follows one stream from ``start`` and records what it sees, until ``stop``."""

    def __init__(
        self,
        index: int,
        *,
        stream: str,
        start: int,
        plan: Plan,
        connection: Connection,
        recorder: Recorder,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"messagevault-stress-consumer-{index}", daemon=True)
        self.stream = stream
        self.position = start
        self._plan = plan
        self._connection = connection
        self._recorder = recorder
        self._halt = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self._connection.client() as client:
                if self._plan.read_from == "storage":
                    self._from_storage(client)
                else:
                    self._from_server(client)
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc

    def _from_storage(self, client: Client) -> None:
        reader = None
        backoff = Backoff()
        while reader is None and not self._halt.is_set():
            try:
                reader = client.open_reader(self.stream)
            except StreamNotFound:  # before the first batch creates it
                self._halt.wait(backoff.next())
        if reader is None:
            return
        backoff.reset()
        with reader:
            while not self._halt.is_set():
                committed = reader.checkpoint().length
                if self.position < committed:
                    backoff.reset()
                    self._see(reader.read(self.position, committed=committed))
                    self.position = committed
                else:
                    self._halt.wait(backoff.next())

    def _from_server(self, client: Client) -> None:
        while not self._halt.is_set():
            try:
                self._see(client.follow(self.stream, self.position, stop=self._halt))
            except StreamNotFound:
                self._halt.wait(0.01)

    def _see(self, messages: Iterator[Message]) -> None:
        """Record each batch seen as one end-to-end latency, weighted by its messages.

        A producer's batch is one frame, so its last message (by the
        producer's sequence) closes it: recorded then, not when the next
        one arrives, which may be a long poll later.
        """
        sent = 0
        count = size = 0
        record = self._recorder.saw
        batch_size = self._plan.batch_size
        quotas = [self._plan.quota(p) for p in range(self._plan.producers)]
        for message in messages:
            header = header_of(message.value)
            if header is None or header[1] >= len(quotas):
                continue  # not ours: the read-back reports it
            sent, producer, sequence = header
            count += 1
            size += len(message.key) + len(message.value)
            self.position = message.next_position
            if (sequence + 1) % batch_size == 0 or sequence + 1 == quotas[producer]:
                record(count, size, (time.monotonic_ns() - sent) / 1e9)
                count = size = 0
            if self._halt.is_set():
                break
        if count:
            record(count, size, (time.monotonic_ns() - sent) / 1e9)


async def run(
    plan: Plan,
    connection: Connection,
    recorder: Recorder,
    interrupted: threading.Event,
    *,
    on_tick: Callable[[Second], None] = lambda point: None,
    on_note: Callable[[str], None] = lambda text: None,
    verify: bool = True,
    messages: MessageSource | None = None,
    server_cpu: Callable[[], float] | None = None,
) -> Outcome:
    """Run ``plan`` against the server of ``connection``; figures go to ``recorder``.

    ``messages`` replaces the checkable stress messages (a benchmark's own,
    held ready); consumers and the read-back need the stress messages, so
    it goes with ``consumers=0`` and ``verify=False``. ``server_cpu`` gives
    the server's CPU seconds so far (an embedded server's), for its share.
    """
    values = Values(plan.value_size)
    if messages is not None and (plan.consumers or verify):
        raise ValueError("messages of your own go with consumers=0 and verify=False")
    streams = [plan.stream_name(i) for i in range(plan.streams)]
    async with connection.async_client() as client:
        await client.streams()  # the password check (argon2, slow on purpose) before the clock
        starts = {stream: await _length(client, stream) for stream in streams}
        ends = dict(starts)
        acked = [0] * plan.producers
        consumers_stop = threading.Event()
        consumers = [
            Consumer(
                index,
                stream=streams[index % plan.streams],
                start=starts[streams[index % plan.streams]],
                plan=plan,
                connection=connection,
                recorder=recorder,
                stop=consumers_stop,
            )
            for index in range(plan.consumers)
        ]
        for consumer in consumers:
            consumer.start()
        recorder.begin()
        cpu_began = time.process_time()
        server_cpu_began = server_cpu() if server_cpu is not None else 0.0
        ticker = asyncio.create_task(_tick(recorder, on_tick))
        began = recorder.started
        deadline = None if plan.duration is None else began + plan.duration
        sending_began = time.monotonic_ns()  # the window every send time must fall in
        try:
            producing = functools.partial(
                _produce,
                client,
                plan=plan,
                messages=messages or values,
                deadline=deadline,
                interrupted=interrupted,
                recorder=recorder,
                acked=acked,
                ends=ends,
            )
            error = await _all_producers(plan.producers, producing)
            if error is not None:
                on_note(f"a producer failed, the run stops: {error}")
            sending_ended = time.monotonic_ns()
            write_seconds = time.monotonic() - began
            cpu_share = (time.process_time() - cpu_began) / max(write_seconds, 1e-9)
            server_cpu_share = (
                (server_cpu() - server_cpu_began) / max(write_seconds, 1e-9)
                if server_cpu is not None
                else None
            )
            ticker.cancel()  # the series covers the writing only
            if recorder.since_tick() >= MIN_LAST_TICK or not recorder.series:
                on_tick(recorder.tick())  # a sliver of a second would draw a false dip
            written = recorder.write.messages
            on_note(f"sent {written:,} messages in {write_seconds:.1f} s")
            if consumers and not interrupted.is_set() and error is None:
                on_note("waiting for the consumers to see the last batches")
            consumers_done = error is None and await _drain(consumers, ends, interrupted)
        finally:
            consumers_stop.set()
            for consumer in consumers:
                await asyncio.to_thread(consumer.join, 10)
            ticker.cancel()
    outcome = Outcome(
        plan,
        recorder,
        write_seconds,
        interrupted.is_set() or error is not None,
        starts,
        ends,
        acked,
        consumers_done,
        cpu_share=cpu_share,
        server_cpu_share=server_cpu_share,
        consumer_errors=_consumer_errors(consumers),
        error=error,
    )
    if verify and not outcome.partial:
        on_note(f"reading back {recorder.write.messages:,} messages to check them")
        outcome.readback = await asyncio.to_thread(
            functools.partial(
                read_back,
                plan,
                connection=connection,
                values=values,
                starts=starts,
                ends=ends,
                acked=acked,
                interrupted=interrupted,
                window=(sending_began, sending_ended),
                progress=lambda checked: on_note(
                    f"read back {checked:,} of {recorder.write.messages:,} messages"
                ),
            )
        )
        if interrupted.is_set():
            outcome.readback, outcome.partial = None, True
    return outcome


async def _all_producers(
    count: int, producing: Callable[..., Coroutine[Any, Any, None]]
) -> str | None:
    """Run ``producing(producer=i)`` for each producer; the first failure, which stops them all."""
    try:
        async with asyncio.TaskGroup() as group:
            for producer in range(count):
                group.create_task(producing(producer=producer))
    except ExceptionGroup as failed:  # the group cancelled the other producers
        return _describe(failed.exceptions[0])
    return None


def _consumer_errors(consumers: list[Consumer]) -> list[str]:
    return [
        f"consumer {c.name.rsplit('-', 1)[1]} on {c.stream}: {c.error}"
        for c in consumers
        if c.error is not None
    ]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


async def _length(client: AsyncClient, stream: str) -> int:
    try:
        return (await client.info(stream)).length
    except StreamNotFound:
        return 0


async def _tick(recorder: Recorder, on_tick: Callable[[Second], None]) -> None:
    while True:
        await asyncio.sleep(TICK)
        on_tick(recorder.tick())


async def _produce(
    client: AsyncClient,
    *,
    plan: Plan,
    messages: MessageSource,
    producer: int,
    deadline: float | None,
    interrupted: threading.Event,
    recorder: Recorder,
    acked: list[int],
    ends: dict[str, int],
) -> None:
    stream = plan.stream_of(producer)
    quota = plan.quota(producer)
    message_size = 0  # key + value; every message of a plan has the same size
    sequence = 0
    while not interrupted.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            return
        count = plan.batch_size if quota is None else min(plan.batch_size, quota - sequence)
        if count <= 0:
            return
        # The values carry the time before they are built (end-to-end); the ack
        # clock starts after, at the publish.
        batch = messages.batch(producer, sequence, count, time.monotonic_ns())
        sent = time.monotonic_ns()
        if not message_size:
            message_size = len(batch[0][0]) + len(batch[0][1])
        result = await client.publish(stream, batch)
        recorder.wrote(count, count * message_size, (time.monotonic_ns() - sent) / 1e9)
        sequence += count
        acked[producer] = sequence
        ends[stream] = max(ends[stream], result.end)


async def _drain(
    consumers: list[Consumer], ends: dict[str, int], interrupted: threading.Event
) -> bool:
    """Wait until each consumer has seen its stream's last batch; ``False`` if time ran out."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline and not interrupted.is_set():
        waiting = [
            c for c in consumers if c.position < ends[c.stream] and c.is_alive() and not c.error
        ]
        if not waiting:
            return all(c.position >= ends[c.stream] for c in consumers)
        await asyncio.sleep(0.01)
    return False
