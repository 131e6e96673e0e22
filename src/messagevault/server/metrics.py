"""Prometheus metrics of one server: requests, commits, queues, the process.

Requests are counted as they are answered (``Metrics.observe``, a request
observer), commits as they are made (``Metrics.committed``, a commit
observer, in the committer threads); the gauges are read from the hub when
scraped. docs/OPERATIONS.md describes every metric and its labels.

Labels are bounded: routes are the app's patterns, methods the usual seven
(any other is "other"), statuses and error codes are fixed sets, and
``stream`` takes at most ``max_stream_series`` names, the first streams
seen; every later stream is counted under ``stream="_other"`` (no stream can
have that name: names never start with ``_``).
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    Metric,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from messagevault.committer import Commit
from messagevault.server.hub import StreamHub

if TYPE_CHECKING:
    from messagevault.server.cluster import Cluster

if TYPE_CHECKING:
    from messagevault.server.retention_task import Applied
    from messagevault.server.served import Served

# Every counter and histogram would get a ``_created`` gauge beside it, a
# second series per label set saying when the server started; scrapes
# already know that (process_start_time_seconds).
disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped upstream)

# Seconds. Acknowledged appends take ~1-2 ms on a local disk and plain reads
# less: the buckets start well below a millisecond so that their p99 is seen.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Seconds a long poll or a tail was held open: waiting, not serving.
HELD_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Append requests per commit: 1 is no grouping; a commit takes up to 4 MiB.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# Reads answered at once, and the ones that waited (``Served.kind``).
HELD_KINDS = frozenset({"long_poll", "tail"})
# A client may send any token as a method; the label takes these, or "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

READ_ROUTE = "/streams/{stream}/messages"  # its waiting reads are not in flight

DEFAULT_MAX_STREAM_SERIES = 100
OTHER_STREAMS = "_other"


class StreamLabels:
    """The ``stream`` label of a stream: its name for the first ``limit`` streams, else ``_other``.

    First come, kept for the server's life: a stream's series never moves,
    so its counters never go backwards, and a server with thousands of
    streams has at most ``limit + 1`` series per metric. Thread-safe (the
    committer threads and the event loop both ask).
    """

    def __init__(self, limit: int = DEFAULT_MAX_STREAM_SERIES) -> None:
        if limit < 0:
            raise ValueError(f"the per-stream series limit must be 0 or more, not {limit}")
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, stream: str) -> str:
        if stream in self._named:
            return stream
        with self._lock:
            if stream in self._named or len(self._named) < self.limit:
                self._named.add(stream)
                return stream
        return OTHER_STREAMS


class Metrics:
    """The registry ``/metrics`` serves, and the observers that feed it."""

    def __init__(
        self,
        hub: StreamHub,
        *,
        max_stream_series: int = DEFAULT_MAX_STREAM_SERIES,
        cluster: Cluster | None = None,
    ) -> None:
        # A registry per app: tests start many apps in one process, and each
        # must count only its own (the default registry would collide).
        self.registry = registry = CollectorRegistry()
        self.streams = StreamLabels(max_stream_series)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info("messagevault_build", "The running MessageVault", registry=registry).info(
            {
                "version": version("messagevault"),
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
            }
        )
        # Requests being handled now, by route: counted by the middleware
        # (``started``/``finished``) on the event loop, read when scraped.
        self.in_flight: dict[str, int] = {}
        registry.register(HubCollector(hub, self.streams, self.in_flight))
        registry.register(NodeCollector(cluster))
        self.forwarded_appends = Counter(
            "messagevault_forwarded_appends",
            "Appends this node forwarded to the node that writes their stream",
            ["stream"],
            registry=registry,
        )
        self.requests = Counter(
            "messagevault_requests",
            "HTTP requests answered, by method, route pattern, status and error code (ok: none)",
            ["method", "route", "status", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "messagevault_request_seconds",
            "Time from a request's arrival to its answer; long polls that waited and "
            "tails are in messagevault_held_read_seconds instead",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.held = Histogram(
            "messagevault_held_read_seconds",
            "Time long polls that waited (kind=long_poll) and Server-Sent-Event tails "
            "(kind=tail) were held open",
            ["kind"],
            buckets=HELD_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "messagevault_commit_seconds",
            "Time of one storage commit (write, flush, checkpoint); its count is the commits",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_batches = Histogram(
            "messagevault_commit_batches",
            "Append requests carried by one storage commit (above 1: group commit at work)",
            ["stream"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.committed_messages = Counter(
            "messagevault_committed_messages",
            "Messages committed (acknowledged appends)",
            ["stream"],
            registry=registry,
        )
        self.committed_bytes = Counter(
            "messagevault_committed_bytes",
            "Bytes committed to storage (whole frames)",
            ["stream"],
            registry=registry,
        )
        self.duplicate_appends = Counter(
            "messagevault_duplicate_appends",
            "Appends answered with the receipts of the same producer batch committed before "
            "(a retry whose first answer was lost); nothing was appended",
            ["stream"],
            registry=registry,
        )
        self.retention_trimmed_bytes = Counter(
            "messagevault_retention_trimmed_bytes",
            "Bytes of stream data that retention made unreadable (trimmed from the front)",
            ["stream"],
            registry=registry,
        )
        self.retention_released_bytes = Counter(
            "messagevault_retention_released_bytes",
            "Storage that retention's trims gave back (hole punched, pages cleared)",
            ["stream"],
            registry=registry,
        )
        # ``labels()`` looks its child up under a lock on every call; label
        # sets are few, so each child is looked up once.
        self._counted: dict[tuple[str, str, int, str | None], Callable[[], None]] = {}
        self._timed: dict[tuple[str, str], Callable[[float], None]] = {}
        self._per_stream: dict[str, _StreamChildren] = {}

    def started(self, route: str) -> None:
        """A request of ``route`` is being handled (on the event loop)."""
        self.in_flight[route] = self.in_flight.get(route, 0) + 1

    def finished(self, route: str) -> None:
        """It was answered, or it failed (on the event loop)."""
        self.in_flight[route] -= 1

    def observe(self, served: Served) -> None:
        """Count one answered request and its time (a request observer, on the event loop)."""
        method = served.method if served.method in METHODS else "other"
        key = (method, served.route, served.status, served.error)
        count = self._counted.get(key)
        if count is None:
            code = served.error or "ok"
            count = self.requests.labels(method, served.route, str(served.status), code).inc
            self._counted[key] = count
        # A tail refused at once (404, 401) was not held open: timed as asked.
        held = served.kind in HELD_KINDS and served.status < 400
        timer_key = ("held", served.kind) if held else (method, served.route)
        time_it = self._timed.get(timer_key)
        if time_it is None:
            timer = self.held.labels(served.kind) if held else self.latency.labels(*timer_key)
            time_it = self._timed[timer_key] = timer.observe
        count()
        time_it(served.seconds)
        if served.kind == "duplicate" and served.stream is not None:
            self.duplicate_appends.labels(self.streams(served.stream)).inc()

    def forwarded(self, stream: str) -> None:
        """An append was forwarded to its stream's writer (several nodes)."""
        self.forwarded_appends.labels(self.streams(stream)).inc()

    def retention_trimmed(self, applied: Applied) -> None:
        """Count one trim made by retention (on the event loop)."""
        stream = self.streams(applied.stream)
        self.retention_trimmed_bytes.labels(stream).inc(applied.trimmed_bytes)
        self.retention_released_bytes.labels(stream).inc(applied.released_bytes)

    def committed(self, commit: Commit) -> None:
        """Count one storage commit (a commit observer, in a committer thread)."""
        children = self._per_stream.get(commit.stream)
        if children is None:
            stream = self.streams(commit.stream)
            children = self._per_stream[commit.stream] = _StreamChildren(
                self.commit_seconds.labels(stream).observe,
                self.commit_batches.labels(stream).observe,
                self.committed_messages.labels(stream).inc,
                self.committed_bytes.labels(stream).inc,
            )
        children.seconds(commit.seconds)
        children.batches(commit.batches)
        children.messages(commit.messages)
        children.bytes(commit.bytes)


class _StreamChildren:
    __slots__ = ("batches", "bytes", "messages", "seconds")

    def __init__(
        self,
        seconds: Callable[[float], None],
        batches: Callable[[float], None],
        messages: Callable[[float], None],
        bytes_: Callable[[float], None],
    ) -> None:
        self.seconds = seconds
        self.batches = batches
        self.messages = messages
        self.bytes = bytes_


class NodeCollector(Collector):
    """This server's role: the only server of its storage, or one node of several."""

    def __init__(self, cluster: Cluster | None) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        cluster = self.cluster
        role = GaugeMetricFamily(
            "messagevault_node_role",
            "1 for this server's role: single (the only server of its storage), or, one of "
            "several nodes, writer (writes at least one stream) or standby",
            labels=["node", "role"],
        )
        if cluster is None:
            role.add_metric(["", "single"], 1)
        else:
            role.add_metric([cluster.node_id, cluster.role], 1)
        yield role
        yield GaugeMetricFamily(
            "messagevault_streams_written",
            "Streams whose lease this node holds (several nodes); the only server: all it opened",
            value=len(cluster.held) if cluster is not None else 0,
        )


class HubCollector(Collector):
    """Gauges read from the hub when scraped: streams open, queues, lengths, waiting reads.

    Nothing is done on the append path for them.
    """

    def __init__(
        self, hub: StreamHub, streams: StreamLabels, in_flight: dict[str, int] | None = None
    ) -> None:
        self.hub = hub
        self.streams = streams
        self.in_flight = in_flight if in_flight is not None else {}

    def collect(self) -> Iterator[Metric]:
        committers = self.hub.committers()
        yield GaugeMetricFamily(
            "messagevault_streams_open",
            "Streams this server has a writer open for",
            value=len(committers),
        )
        queued: dict[str, float] = {}
        length: dict[str, float] = {}
        first: dict[str, float] = {}
        for stream, committer in committers.items():
            label = self.streams(stream)
            checkpoint = committer.writer.checkpoint
            queued[label] = queued.get(label, 0) + committer.queued_bytes
            length[label] = length.get(label, 0) + checkpoint.length
            first[label] = first.get(label, 0) + checkpoint.first_position
        waiting: dict[str, float] = {}
        for stream, count in self.hub.waiting_reads().items():
            label = self.streams(stream)
            waiting[label] = waiting.get(label, 0) + count
        # Reads held open waiting for a commit are not work in progress: they
        # are messagevault_waiting_reads. (A tail sending messages is.)
        in_flight = dict(self.in_flight)  # a copy: the loop may change it meanwhile
        if READ_ROUTE in in_flight:
            in_flight[READ_ROUTE] = max(0, in_flight[READ_ROUTE] - int(sum(waiting.values())))
        family = GaugeMetricFamily(
            "messagevault_requests_in_flight",
            "Requests being handled now, by route pattern; reads waiting for a commit "
            "are not counted (they are messagevault_waiting_reads)",
            labels=["route"],
        )
        for route, count in sorted(in_flight.items()):
            family.add_metric([route], count)
        yield family
        for name, help_text, values in (
            (
                "messagevault_commit_queue_bytes",
                "Bytes of appends waiting for a commit (appends wait for room beyond "
                "--max-queued-bytes)",
                queued,
            ),
            (
                "messagevault_stream_length_bytes",
                "Committed length of the stream (_other: the sum of the other streams)",
                length,
            ),
            (
                "messagevault_stream_first_position_bytes",
                "The stream's first readable position: bytes below it were trimmed "
                "(_other: the sum of the other streams)",
                first,
            ),
            (
                "messagevault_waiting_reads",
                "Long polls and Server-Sent-Event tails waiting for the next commit",
                waiting,
            ),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["stream"])
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
            yield family
