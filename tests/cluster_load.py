"""Producers, direct appends and checks for the cluster tests (failover, fencing).

``LoadProducer`` publishes numbered messages, one batch at a time, each
batch under the producer's own id for that stream and its next batch
number, and sends a batch again, the same bytes, until it is acknowledged:
so each message must end up in its stream exactly once, in the producer's
order, however often writers die. ``check_stream`` reads a stream from
storage (not through a node) and says what is missing, doubled, out of
order or foreign. ``DirectAppend`` sends one batch to one node's URL with no
retry and keeps its answer as it came, for the fencing tests, which judge
every answer a deposed writer gives.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from messagevault.client import Client
from messagevault.client.base import batch_of
from messagevault.errors import MessageVaultError
from messagevault.format import EncodedBatch
from messagevault.reader import Reader
from messagevault.storage.base import Storage
from messagevault.wire import BATCH_CONTENT_TYPE
from tests.cluster_nodes import Cluster

WRITER_HEADER = "X-MessageVault-Writer"
RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
# Answers that may not commit anything the producer's retries cannot tell from
# a repeat: every other error code means a bug on one side or the other.
RETRIED_CODES = frozenset(
    {
        "server_unreachable",
        "no_writer",
        "not_writer",
        "writer_unreachable",
        "committer_closed",
        "stale_writer",
        "stream_locked",
        "storage_error",
        "not_ready",
        "overloaded",
        "internal_error",
        "unknown",
    }
)


@dataclass(frozen=True)
class Ack:
    """One acknowledged batch: the producer's messages ``first .. first + count - 1``."""

    stream: str
    producer: str
    first: int
    count: int
    sent: float  # time.monotonic() when the producer first sent the batch
    at: float  # time.monotonic() when the answer came
    duplicate: bool


def message_value(producer: str, number: int) -> bytes:
    return f"{producer}/{number}".encode()


def parse_value(value: bytes) -> tuple[str, int] | None:
    producer, _, number = value.decode(errors="replace").rpartition("/")
    return (producer, int(number)) if producer and number.isdigit() else None


@dataclass
class Acks:
    """Every acknowledgement of a run, shared by its producers."""

    items: list[Ack] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    def add(self, ack: Ack) -> None:
        with self._changed:
            self.items.append(ack)
            self._changed.notify_all()

    def first_after(self, stream: str, moment: float, timeout: float) -> Ack | None:
        """The first ack on ``stream`` of a batch first sent after ``moment``; waits ``timeout`` s.

        A batch sent before ``moment`` (a kill) may have been committed
        before it too, its answer still on the way: it says nothing of
        a new writer.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                later = [a for a in self.items if a.stream == stream and a.sent > moment]
                if later:
                    return min(later, key=lambda ack: ack.at)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.5))

    def acknowledged(self, stream: str) -> dict[str, int]:
        """Per producer, how many of its messages on ``stream`` were acknowledged."""
        with self._lock:
            counts: dict[str, int] = Counter()
            for ack in self.items:
                if ack.stream == stream:
                    counts[ack.producer] = max(counts[ack.producer], ack.first + ack.count)
            return dict(counts)


class LoadProducer(threading.Thread):
    """Publishes numbered messages to ``streams`` (in turn) until ``stop`` is set.

    ``spread``: each attempt goes to a node picked at random, through a
    single-node client (so appends are forwarded between nodes); otherwise
    one client that knows every node does the choosing (and learns each
    stream's writer). A batch is sent again, under the same producer id
    and batch number, until it is acknowledged or ``batch_timeout`` passes
    (then the producer stops, its ``gave_up`` set: that fails the test).
    """

    def __init__(
        self,
        name: str,
        streams: Sequence[str],
        urls: Sequence[str],
        credentials: tuple[str, str],
        acks: Acks,
        stop: threading.Event,
        *,
        spread: bool,
        batch_timeout: float = 60.0,
        max_batches: int = 100_000,
    ) -> None:
        super().__init__(name=f"producer-{name}", daemon=True)
        self.producer = name
        self.streams = list(streams)
        self.urls = list(urls)
        self.credentials = credentials
        self.acks = acks
        self.stop_event = stop
        self.spread = spread
        self.batch_timeout = batch_timeout
        self.max_batches = max_batches
        self.errors: Counter[str] = Counter()
        self.gave_up: str | None = None
        self.fatal: str | None = None
        self._random = random.Random(name)

    def _clients(self) -> list[Client]:
        user, password = self.credentials
        # A short retry_timeout: this producer's own loop retries the batch
        # (to another random node when spreading), and notes each failure.
        if self.spread:
            return [
                Client(url, user=user, password=password, timeout=10, retry_timeout=5)
                for url in self.urls
            ]
        return [
            Client(",".join(self.urls), user=user, password=password, timeout=10, retry_timeout=10)
        ]

    def run(self) -> None:
        clients = self._clients()
        try:
            self._publish(clients)
        except Exception as exc:  # the test reports it, with the others' results
            self.fatal = f"{type(exc).__name__}: {exc}"
        finally:
            for client in clients:
                client.close()

    def _publish(self, clients: list[Client]) -> None:
        producer_ids = {stream: uuid.uuid4().bytes for stream in self.streams}
        next_batch = dict.fromkeys(self.streams, 0)
        next_number = dict.fromkeys(self.streams, 0)
        for index in range(self.max_batches):
            if self.stop_event.is_set():
                return
            stream = self.streams[index % len(self.streams)]
            first = next_number[stream]
            count = self._random.randint(1, 4)
            pairs = [
                (self.producer.encode(), message_value(self.producer, first + offset))
                for offset in range(count)
            ]
            batch = batch_of(pairs).with_producer(producer_ids[stream], next_batch[stream])
            sent = time.monotonic()
            duplicate = self._until_acknowledged(clients, stream, batch)
            if duplicate is None:
                return
            self.acks.add(
                Ack(stream, self.producer, first, count, sent, time.monotonic(), duplicate)
            )
            next_batch[stream] += 1
            next_number[stream] += count

    def _until_acknowledged(
        self, clients: list[Client], stream: str, batch: EncodedBatch
    ) -> bool | None:
        """Whether the ack was a duplicate's; None if the producer gave up."""
        deadline = time.monotonic() + self.batch_timeout
        pause = 0.02
        while True:
            client = self._random.choice(clients)
            try:
                return client.publish_batch(stream, batch).duplicate
            except MessageVaultError as exc:
                code = getattr(exc, "code", type(exc).__name__)
                self.errors[code] += 1
                if code not in RETRIED_CODES:
                    self.fatal = f"{stream}: {code}: {exc}"
                    return None
                if time.monotonic() > deadline:
                    self.gave_up = f"{stream}: no ack in {self.batch_timeout:g} s ({code}: {exc})"
                    return None
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def check_stream(storage: Storage, stream: str, acknowledged: dict[str, int]) -> list[str]:
    """What is wrong with ``stream`` as storage holds it: one line per fault, [] if nothing.

    Every producer's messages 0 .. acknowledged - 1 must be there once each,
    in order; nothing else may be (a producer stops only after an ack, so
    no batch of the run is in doubt at the end).
    """
    seen: dict[str, list[int]] = {}
    foreign = 0
    reader = Reader.open(storage, stream)
    for message in reader.read():
        parsed = parse_value(bytes(message.value))
        if parsed is None or parsed[0] != bytes(message.key).decode(errors="replace"):
            foreign += 1
            continue
        seen.setdefault(parsed[0], []).append(parsed[1])
    faults = [f"{stream}: {foreign} messages that no producer sent"] if foreign else []
    for producer in sorted(set(seen) | set(acknowledged)):
        numbers = seen.get(producer, [])
        expected = list(range(acknowledged.get(producer, 0)))
        if numbers == expected:
            continue
        doubled = sorted(n for n, times in Counter(numbers).items() if times > 1)
        missing = sorted(set(expected) - set(numbers))
        extra = sorted(set(numbers) - set(expected))
        disordered = any(b <= a for a, b in itertools.pairwise(numbers))
        faults.append(
            f"{stream}/{producer}: {len(numbers)} messages, {len(expected)} acknowledged; "
            f"doubled {doubled[:10]}, missing {missing[:10]}, unacknowledged {extra[:10]}, "
            f"{'out of order' if disordered else 'in order'}"
        )
    return faults


# Direct appends (fencing) ------------------------------------------------------------


@dataclass
class DirectAppend:
    """One batch sent to one node with no retry, and the answer it got, as it came."""

    tag: str  # its messages' values: tag/0, tag/1, ...
    count: int
    producer_id: bytes
    url: str
    producer_seq: int = 0  # the batch's number under its producer id
    sent_at: float = 0.0
    answered_at: float | None = None
    status: int | None = None  # None: no answer (connection refused, reset, timed out)
    code: str | None = None  # the error code of an error answer
    detail: str | None = None  # and its detail
    writer: str | None = None  # X-MessageVault-Writer of the answer
    position: int | None = None  # the first message's, when acknowledged
    failure: str | None = None

    @property
    def batch(self) -> EncodedBatch:
        pairs = [(b"direct", message_value(self.tag, n)) for n in range(self.count)]
        return batch_of(pairs).with_producer(self.producer_id, self.producer_seq)

    @property
    def acknowledged(self) -> bool:
        return self.status == 200

    def send(self, stream: str, credentials: tuple[str, str], timeout: float) -> DirectAppend:
        parts = urlsplit(self.url)
        token = base64.b64encode(":".join(credentials).encode()).decode()
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        self.sent_at = time.monotonic()
        try:
            connection.request(
                "POST",
                f"/streams/{stream}",
                body=self.batch.frame(),
                headers={
                    "Content-Type": BATCH_CONTENT_TYPE,
                    "Authorization": f"Basic {token}",
                    "Accept": "application/json",
                },
            )
            answer = connection.getresponse()
            body = answer.read()
        except OSError as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            return self
        finally:
            connection.close()
        self.answered_at = time.monotonic()
        self.status = answer.status
        self.writer = answer.getheader(WRITER_HEADER)
        content: Any = json.loads(body) if body.startswith(b"{") else {}
        if answer.status == 200:
            self.position = int(content["messages"][0]["position"])
        else:
            self.code = str(content.get("error", f"http_{answer.status}"))
            self.detail = str(content.get("detail", ""))
        return self


class DirectSender(threading.Thread):
    """Sends batches to ``url`` one after another (each a fresh producer id) until stopped."""

    def __init__(
        self,
        name: str,
        url: str,
        stream: str,
        credentials: tuple[str, str],
        stop: threading.Event,
        *,
        timeout: float,
        max_batches: int = 10_000,
    ) -> None:
        super().__init__(name=f"direct-{name}", daemon=True)
        self.tag = name
        self.url = url
        self.stream = stream
        self.credentials = credentials
        self.stop_event = stop
        self.timeout = timeout
        self.max_batches = max_batches
        self.sent: list[DirectAppend] = []

    def run(self) -> None:
        for index in range(self.max_batches):
            if self.stop_event.is_set():
                return
            append = DirectAppend(f"{self.tag}-{index}", 2, uuid.uuid4().bytes, self.url)
            self.sent.append(append)
            append.send(self.stream, self.credentials, self.timeout)
            if append.status is None:
                time.sleep(0.05)  # refused or reset: do not spin


def node_logs(cluster: Cluster, lines: int = 20) -> str:
    """Each node's last ``lines`` log lines, less its successful requests, for failure messages."""
    return "\n".join(
        f"--- {node.node_id}\n"
        + "\n".join(
            [
                line
                for line in node.log.read_text(errors="replace").splitlines()
                if '"messagevault.access"' not in line or '"status": 200' not in line
            ][-lines:]
        )
        for node in cluster.nodes
    )


def stream_values(storage: Storage, stream: str) -> list[bytes]:
    """Every committed message's value, in order, read from storage."""
    return [bytes(message.value) for message in Reader.open(storage, stream).read()]


# Failover times ------------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    number: int
    stream: str
    node: str
    pause: float  # seconds between the kill and the restart
    seconds: float  # from the SIGKILL to the next acknowledged append on the stream


def report_failovers(
    backend: str, failovers: Sequence[Failover], extra: dict[str, Any]
) -> dict[str, Any]:
    """Print the failover table and p50/max; save them as JSON when asked.

    Under benchmarks/results when MESSAGEVAULT_SAVE_FAILOVERS is set (a run
    to quote), else nowhere: ``make test`` leaves the working tree clean.
    """
    times = [f.seconds for f in failovers]
    summary = {
        "backend": backend,
        "kills": len(failovers),
        "p50_s": round(statistics.median(times), 3) if times else None,
        "max_s": round(max(times), 3) if times else None,
    }
    print(f"\nfailover on {backend}: kill -> next acknowledged append on the stream")
    print(f"{'#':>3}  {'stream':<16} {'writer':<6} {'restart after':>13} {'failover':>9}")
    for f in failovers:
        print(f"{f.number:>3}  {f.stream:<16} {f.node:<6} {f.pause:>11.1f} s {f.seconds:>7.2f} s")
    print(f"p50 {summary['p50_s']} s, max {summary['max_s']} s over {len(times)} kills")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        **summary,
        "when": stamp,
        "failovers": [{**f.__dict__, "seconds": round(f.seconds, 3)} for f in failovers],
        **extra,
    }
    if os.environ.get("MESSAGEVAULT_SAVE_FAILOVERS"):
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"cluster-failover-{backend}-{stamp}.json"
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"saved {path}")
    return document


def wait_for(
    condition: Callable[[], Any], timeout: float, pause: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(pause)
