"""What a stress run measures: HDR histograms of latency and a per-second series of rates.

Latencies are recorded in microseconds into ``hdrh`` histograms (HdrHistogram,
3 significant figures, up to an hour), weighted by message count where a
whole batch shares one latency. Percentiles come from the histograms, never
from sorted lists. Producers record on the event loop and consumers in their
threads, so every record takes the one lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from hdrh.histogram import HdrHistogram

LOWEST_US: Final = 1
HIGHEST_US: Final = 3_600_000_000
SIGNIFICANT_FIGURES: Final = 3
PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


class Latency:
    """An HDR histogram of latencies in microseconds; read out in milliseconds."""

    def __init__(self) -> None:
        self._histogram = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)

    def record(self, seconds: float, count: int = 1) -> None:
        micros = min(max(round(seconds * 1e6), LOWEST_US), HIGHEST_US)
        self._histogram.record_value(micros, count)

    @property
    def count(self) -> int:
        return int(self._histogram.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return float(self._histogram.get_value_at_percentile(percentile)) / 1000

    def summary(self) -> dict[str, float | int]:
        """count, mean, p50, p90, p99, p99.9 and max in milliseconds (empty: count 0 only)."""
        if not self.count:
            return {"count": 0}
        figures: dict[str, float | int] = {
            "count": self.count,
            "mean": float(self._histogram.get_mean_value()) / 1000,
        }
        for name, percentile in PERCENTILES:
            figures[name] = self.percentile_ms(percentile)
        figures["max"] = float(self._histogram.get_max_value()) / 1000
        return figures

    def reset(self) -> None:
        self._histogram.reset()


@dataclass
class Flow:
    """One direction's totals (written, or seen by consumers) and its latency histogram."""

    messages: int = 0
    batches: int = 0
    bytes: int = 0  # keys + values
    latency: Latency = field(default_factory=Latency)

    def add(self, messages: int, batches: int, size: int, seconds: float) -> None:
        self.messages += messages
        self.batches += batches
        self.bytes += size
        self.latency.record(seconds, messages)


@dataclass
class Second:
    """One point of the per-second series."""

    t: float  # seconds since the run started, at the end of this interval
    write_msgs_per_s: float
    write_mb_per_s: float
    write_batches_per_s: float
    ack_p50_ms: float | None
    ack_p99_ms: float | None
    read_msgs_per_s: float
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None


class MetricsSink(Protocol):
    """Where figures are pushed as they happen (``messagevault.statsd.StatsD`` fits)."""

    def incr(self, name: str, count: int = 1) -> None: ...

    def timing(self, name: str, milliseconds: float) -> None: ...


class Recorder:
    """Totals, histograms and the per-second series of one run (thread-safe)."""

    def __init__(self, sink: MetricsSink | None = None) -> None:
        self._lock = threading.Lock()
        self._sink = sink
        self.write = Flow()
        self.seen = Flow()  # what consumers saw, with end-to-end latency per message
        self._interval_write = Flow()
        self._interval_seen = Flow()
        self.series: list[Second] = []
        self.started = time.monotonic()
        self._last_tick = self.started
        self.first_seen: float | None = None
        self.last_seen: float | None = None

    def begin(self) -> None:
        """The clock starts now (after the set-up): the series' time 0."""
        self.started = self._last_tick = time.monotonic()

    def wrote(self, messages: int, size: int, ack_seconds: float) -> None:
        """One acknowledged batch."""
        with self._lock:
            self.write.add(messages, 1, size, ack_seconds)
            self._interval_write.add(messages, 1, size, ack_seconds)
        if self._sink is not None:
            self._sink.incr("write.messages", messages)
            self._sink.incr("write.batches")
            self._sink.incr("write.bytes", size)
            self._sink.timing("write.ack", ack_seconds * 1000)

    def saw(self, messages: int, size: int, e2e_seconds: float, batches: int = 1) -> None:
        """Messages one consumer saw that were sent together (one end-to-end latency)."""
        now = time.monotonic()
        with self._lock:
            self.seen.add(messages, batches, size, e2e_seconds)
            self._interval_seen.add(messages, batches, size, e2e_seconds)
            if self.first_seen is None:
                self.first_seen = now
            self.last_seen = now
        if self._sink is not None:
            self._sink.incr("read.messages", messages)
            self._sink.incr("read.batches", batches)
            self._sink.timing("e2e", e2e_seconds * 1000)

    def since_tick(self) -> float:
        return time.monotonic() - self._last_tick

    def tick(self) -> Second:
        """Close the current interval (about a second) into a point of the series."""
        now = time.monotonic()
        with self._lock:
            span = max(now - self._last_tick, 1e-9)
            written, seen = self._interval_write, self._interval_seen
            write_ack, seen_e2e = written.latency, seen.latency
            point = Second(
                t=round(now - self.started, 3),
                write_msgs_per_s=written.messages / span,
                write_mb_per_s=written.bytes / span / 1e6,
                write_batches_per_s=written.batches / span,
                ack_p50_ms=write_ack.percentile_ms(50) if write_ack.count else None,
                ack_p99_ms=write_ack.percentile_ms(99) if write_ack.count else None,
                read_msgs_per_s=seen.messages / span,
                e2e_p50_ms=seen_e2e.percentile_ms(50) if seen_e2e.count else None,
                e2e_p99_ms=seen_e2e.percentile_ms(99) if seen_e2e.count else None,
            )
            # New intervals rather than reset histograms: the old ones may be read outside the lock.
            self._interval_write, self._interval_seen = Flow(), Flow()
            self._last_tick = now
            self.series.append(point)
            return point

    def series_json(self) -> list[dict[str, Any]]:
        return [vars(point).copy() for point in self.series]
