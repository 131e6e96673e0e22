"""The server's figures pushed to StatsD (``serve --statsd``), under the original's names.

MessageVault's first version reported to StatsD and was watched in
Graphite; these are its names, so that its dashboards keep working:

- timers ``api.append`` (an acknowledged append request, in ms), ``api.read``
  (a read answered with what was there), ``storage.append.time`` (one
  storage commit: write, flush, checkpoint);
- counters ``storage.append.events`` (messages committed) and
  ``storage.append.bytes`` (frame bytes committed), ``stream.<name>.append.ok``
  and ``stream.<name>.append.events`` (append requests and messages of one
  stream);
- gauge ``stream.<name>``: the stream's committed length (its position).

Added here: reads that wait are timed apart from ``api.read``, as their time
is mostly waiting (``api.read.wait`` for long polls, ``api.tail`` for
Server-Sent Events, timed until the tail ended); ``api.info`` for stream
info; ``storage.append.batches`` and ``storage.append.messages``, timers
whose "milliseconds" are the requests and messages of each commit, so that
Graphite shows how big group commits are (``upper_99``, ``mean``); and a
counter ``api.errors.<code>`` for every error answer (the codes are a fixed
set). Timers count only answers below 400: a refused request says nothing
about how fast appends are, and is counted under its code instead.
docs/OPERATIONS.md lists the Graphite names and queries.

Per-stream names are bounded as Prometheus' stream series are (the same
``StreamLabels``, so ``--metrics-streams``): the first streams get names of
their own, later ones are counted together under ``stream._other`` (no
gauge: one length of many streams means nothing).
"""

from __future__ import annotations

from aiohttp import web

from messagevault.committer import Commit
from messagevault.server.app import METRICS, REQUEST_OBSERVERS, Served
from messagevault.server.hub import StreamHub
from messagevault.server.metrics import OTHER_STREAMS, StreamLabels
from messagevault.statsd import StatsD, level

APPEND_ROUTE = ("POST", "/streams/{stream}")
READ_ROUTE = ("GET", "/streams/{stream}/messages")
INFO_ROUTE = ("GET", "/streams/{stream}")
# Served.kind of a read (the read handler sets it) to its timer.
READ_TIMERS = {"read": "api.read", "long_poll": "api.read.wait", "tail": "api.tail"}
NAMES_PER_STREAM = 3


class StatsDMetrics:
    """The commit and request observers that turn the server's events into StatsD metrics.

    Both run on hot paths (the committer threads, the event loop): they
    only format lines into the client's buffer, which never blocks.
    """

    def __init__(self, statsd: StatsD, streams: StreamLabels | None = None) -> None:
        self.statsd = statsd
        self.streams = streams or StreamLabels()
        # Every name this sends stays in the client's name cache: room for
        # the bounded per-stream ones and the fixed ones, so it never thrashes.
        statsd.names_cached = max(
            statsd.names_cached, NAMES_PER_STREAM * (self.streams.limit + 1) + 64
        )
        self._stream_names: dict[str, tuple[str | None, str, str]] = {}

    def committed(self, commit: Commit) -> None:
        statsd = self.statsd
        gauge, appends, events = self._names_of(commit.stream)
        statsd.timing("storage.append.time", commit.seconds * 1000)
        statsd.incr("storage.append.events", commit.messages)
        statsd.incr("storage.append.bytes", commit.bytes)
        statsd.timing("storage.append.batches", commit.batches)
        statsd.timing("storage.append.messages", commit.messages)
        if gauge is not None:
            statsd.gauge(gauge, commit.length)
        statsd.incr(appends, commit.batches)
        statsd.incr(events, commit.messages)

    def served(self, served: Served) -> None:
        if served.error is not None:
            self.statsd.incr(f"api.errors.{level(served.error)}")
            return
        if served.status >= 400:
            return
        route = (served.method, served.route)
        if route == APPEND_ROUTE:
            name = "api.append"
        elif route == READ_ROUTE:
            name = READ_TIMERS.get(served.kind, "api.read")
        elif route == INFO_ROUTE:
            name = "api.info"
        else:
            return
        self.statsd.timing(name, served.seconds * 1000)

    def _names_of(self, stream: str) -> tuple[str | None, str, str]:
        names = self._stream_names.get(stream)
        if names is None:
            label = self.streams(stream)
            base = f"stream.{level(label)}"
            names = (
                None if label == OTHER_STREAMS else base,
                f"{base}.append.ok",
                f"{base}.append.events",
            )
            if label != OTHER_STREAMS:  # the others are asked about again: bounded
                self._stream_names[stream] = names
        return names


def install(app: web.Application, hub: StreamHub, statsd: StatsD) -> StatsDMetrics:
    """Push ``app``'s and ``hub``'s figures to ``statsd``; it is closed with the app.

    Its close comes after the hub's (on_cleanup runs in order), so the last
    commits' metrics are sent too.
    """
    metrics = StatsDMetrics(statsd, app[METRICS].streams)
    hub.commit_observers.append(metrics.committed)
    app[REQUEST_OBSERVERS].append(metrics.served)

    async def close_statsd(app: web.Application) -> None:
        statsd.close()

    app.on_cleanup.append(close_statsd)
    return metrics
