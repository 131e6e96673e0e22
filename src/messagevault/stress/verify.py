"""The read-back: every message a run wrote, read once more and checked.

Per stream, from where the run began to the end of its last acknowledged
batch: each message must be a stress message of one of the stream's
producers, each producer's sequence numbers must follow on without a gap or
repeat (order), key and value must be the bytes that were sent (content),
the send times must be plausible (one per batch, never decreasing per
producer, within the run's window), and each producer must have as many
messages as were acknowledged to it (count). The read goes the way the
consumers read (storage or server), and is timed, the reading alone and not
the checking: the table's ``read`` row.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import takewhile
from typing import TYPE_CHECKING, Any, Final

from messagevault.format import Message
from messagevault.stress.stats import Latency
from messagevault.stress.workload import Plan, Values, header_of

if TYPE_CHECKING:
    from messagevault.stress.connection import Connection

MAX_PROBLEMS: Final = 20  # listed; the rest are only counted
PROGRESS_EVERY: Final = 5.0  # seconds


@dataclass
class Readback:
    messages: int = 0
    batches: int = 0
    bytes: int = 0
    seconds: float = 0.0  # spent reading (not checking)
    # Time to read each batch, weighted by its messages (as the write row's acks).
    latency: Latency = field(default_factory=Latency)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "messages": self.messages,
            "batches": self.batches,
            "problem_count": self.problem_count,
            "problems": self.problems,
        }


def read_back(
    plan: Plan,
    *,
    connection: Connection,
    values: Values,
    starts: dict[str, int],
    ends: dict[str, int],
    acked: list[int],
    interrupted: threading.Event,
    progress: Callable[[int], None] = lambda checked: None,
    window: tuple[int, int] | None = None,
) -> Readback:
    """Read and check every stream of ``plan`` (stops early, unfinished, if ``interrupted``).

    ``progress`` hears the number of messages checked so far every
    ``PROGRESS_EVERY`` seconds: a long run's read-back is not silent either.
    ``window``: ``time.monotonic_ns()`` before the first batch was built and
    after the last was acknowledged; every send time must fall within it.
    """
    readback = Readback()
    with connection.client() as client, contextlib.ExitStack() as readers:
        for index in range(plan.streams):
            stream = plan.stream_name(index)
            start, end = starts[stream], ends[stream]
            messages: Iterator[Message] = iter(())
            if end > start and plan.read_from == "storage":
                reader = readers.enter_context(client.open_reader(stream))
                messages = reader.read(start, end=end)
            elif end > start:
                messages = takewhile(
                    functools.partial(_before, end=end), client.read(stream, start)
                )
            check = _StreamCheck(plan, values, stream, index, readback, window=window)
            if not check.run(messages, interrupted, progress):
                break
            check.counts(acked)
    return readback


def _before(message: Message, *, end: int) -> bool:
    return message.position < end


class _StreamCheck:
    """One stream's messages against what its producers sent."""

    def __init__(
        self,
        plan: Plan,
        values: Values,
        stream: str,
        index: int,
        readback: Readback,
        *,
        window: tuple[int, int] | None,
    ) -> None:
        self._plan = plan
        self._values = values
        self._stream = stream
        self._readback = readback
        self._window = window
        self._expected = dict.fromkeys(range(index, plan.producers, plan.streams), 0)
        self._last_sent: dict[int, tuple[int, int]] = {}  # producer -> (its batch, send time)

    def run(
        self,
        messages: Iterator[Message],
        interrupted: threading.Event,
        progress: Callable[[int], None],
    ) -> bool:
        """Check every message; ``False`` if ``interrupted`` stopped it.

        Only the reading is timed (each ``next``), so that the checking does
        not count as read latency; a batch's time is that of its messages.
        """
        readback = self._readback
        batch = (-1, -1)  # (producer, send time) of the batch being read
        batch_seconds, batch_messages = 0.0, 0
        report_at = time.monotonic() + PROGRESS_EVERY
        clock = time.perf_counter
        while True:
            began = clock()
            message = next(messages, None)
            took = clock() - began
            if message is None:
                break
            readback.seconds += took
            header = header_of(message.value)
            if header is None:
                batch_seconds += took
                self._problem(message, "not a stress message (value too short)")
                continue
            sent, producer, sequence = header
            if (producer, sent) != batch:
                if batch_messages:
                    readback.latency.record(batch_seconds, batch_messages)
                readback.batches += 1
                batch, batch_seconds, batch_messages = (producer, sent), 0.0, 0
                if interrupted.is_set():
                    return False
                now = time.monotonic()
                if now >= report_at:
                    progress(readback.messages)
                    report_at = now + PROGRESS_EVERY
            batch_seconds += took
            batch_messages += 1
            readback.messages += 1
            readback.bytes += len(message.key) + len(message.value)
            self._check(message, producer, sequence, sent)
        if batch_messages:
            readback.latency.record(batch_seconds, batch_messages)
        return True

    def _check(self, message: Message, producer: int, sequence: int, sent: int) -> None:
        want = self._expected.get(producer)
        if want is None:
            writes_to = (
                self._plan.stream_of(producer) if producer < self._plan.producers else "no stream"
            )
            self._problem(message, f"a message of producer {producer}, which writes to {writes_to}")
            return
        if sequence > want:
            self._problem(
                message,
                f"producer {producer}'s messages {want}-{sequence - 1} are missing "
                f"(next comes {sequence})",
            )
        elif sequence < want:
            self._problem(
                message,
                f"producer {producer}'s message {sequence} again or out of order "
                f"(after {want - 1})",
            )
        if sequence >= want:
            self._check_sent(message, producer, sequence, sent)
        self._expected[producer] = max(want, sequence + 1)
        wrong = self._values.problem(message.key, message.value)
        if wrong is not None:
            self._problem(message, f"producer {producer}'s message {sequence}: {wrong}")

    def _check_sent(self, message: Message, producer: int, sequence: int, sent: int) -> None:
        """The 8-byte send time: within the run, one per batch, never decreasing per producer.

        (A repeated message is reported as such, not checked again here.)
        """
        batch = sequence // self._plan.batch_size  # producers send whole batches from 0
        last = self._last_sent.get(producer)
        where = f"producer {producer}'s message {sequence}"
        if last is not None and last[0] == batch:  # the rest of a batch: as its first message
            if sent != last[1]:
                self._problem(message, f"{where}: send time differs from the rest of its batch")
            return
        self._last_sent[producer] = (batch, sent)
        if self._window is not None and not self._window[0] <= sent <= self._window[1]:
            offset = (sent - self._window[0]) / 1e9
            self._problem(
                message, f"{where}: send time outside the run ({offset:+,.3f} s from its start)"
            )
        elif last is not None and sent < last[1]:
            self._problem(message, f"{where}: send time before that of the batch before it")

    def _problem(self, message: Message, text: str) -> None:
        self._readback.problem(f"{self._stream} at position {message.position}: {text}")

    def counts(self, acked: list[int]) -> None:
        """Each producer's messages read against those acknowledged to it."""
        for producer, count in self._expected.items():
            if count != acked[producer]:
                self._readback.problem(
                    f"{self._stream}: producer {producer} had {acked[producer]:,} messages "
                    f"acknowledged, {count:,} read back"
                )
