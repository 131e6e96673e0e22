"""A StatsD client: counters, timers and gauges over UDP, batched, never in the way.

Plain-text StatsD, one metric a line (``name:1|c``, ``name:3.2|ms``,
``name:5|g``), as Etsy's daemon and its successors read it. Lines are
queued, and a daemon thread sends them as packets of at most ``max_packet``
bytes, newline separated: as soon as a few packets' worth are waiting, and
otherwise every ``flush_interval`` seconds. ``flush()`` and ``close()`` send
what is queued.

Metrics must never slow or fail the work they describe, so recording one
is a line appended to a deque: no lock, no system call, nothing raised.
(Sending from the caller's thread was tried: a send releases the GIL, and a
busy committer thread then waited 0.6 ms on average to get it back, a
delay to every group commit that filled a packet.) The sender thread uses a
non-blocking socket connected to an address resolved once, in the
constructor; a packet it cannot send (no daemon: ECONNREFUSED from an ICMP;
a full socket buffer: EAGAIN) is dropped and its metrics counted in
``dropped``, as are metrics beyond ``MAX_QUEUED`` lines waiting and values
StatsD would refuse. A host that does not resolve, or an address that
cannot be connected to, is no error either: a warning is logged, metrics
are dropped (and counted), and the sender thread tries again every
``RETRY_EVERY`` seconds, so that a daemon's DNS name missing at boot does
not keep a server from starting. Only a malformed address is a ValueError.

Names are made safe for Graphite: dots separate levels, any character
outside ``[A-Za-z0-9_.-]`` becomes ``_``, and empty levels go. A free-form
part of a name (a stream name, an error code) becomes one level with
``level()``.

    statsd = StatsD.from_address("127.0.0.1:8125", prefix="mv1")
    statsd.timing("api.append", 1.7)        # mv1.api.append:1.700|ms
    statsd.incr("storage.append.events", 20)
    statsd.gauge(f"stream.{level(name)}", 5324)
    statsd.close()

This module is a leaf: it imports nothing from messagevault, so the server,
the stress tester and any user code can share it.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

DEFAULT_PORT = 8125
# 1432 bytes: an IPv4 datagram that fits a 1500-byte Ethernet frame with room
# for IP options, the size StatsD's own documentation recommends.
DEFAULT_MAX_PACKET = 1432
MIN_PACKET = 64  # room for one metric line with a sensible name
NAMES_CACHED = 4096  # sanitised names kept by default; beyond, the cache starts over
# Lines waiting that wake the sender before its interval: a few packets'
# worth, so that a busy server sends small bursts, which a daemon reads
# without overflowing its socket's buffer.
WAKE_LINES = 128
MAX_QUEUED = 65536  # lines waiting; beyond, new metrics are dropped (the sender is stuck)
# Sends to a daemon that is away fail over and over (every other packet,
# with ECONNREFUSED): say so in the log at most this often, in seconds.
WARN_EVERY = 60.0
# Seconds between attempts to resolve and connect to a daemon's address
# that failed: a DNS lookup may take seconds, and the name may be missing
# for hours.
RETRY_EVERY = 15.0

log = logging.getLogger("messagevault.statsd")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_DOTS = re.compile(r"\.{2,}")


def sanitize(name: str) -> str:
    """``name`` as Graphite can store it: dots kept as levels, other unsafe characters ``_``."""
    return _DOTS.sub(".", _UNSAFE.sub("_", name)).strip(".")


def level(text: str) -> str:
    """``text`` as one level of a metric name (its dots too become ``_``); never empty."""
    return _UNSAFE.sub("_", text).replace(".", "_") or "_"


def resolve(host: str, port: int) -> list[tuple[int, int, int, tuple[Any, ...]]]:
    """The UDP addresses of ``host:port``: (family, type, protocol, address); OSError if none.

    A module function so that tests can stand in for the system's resolver.
    """
    return [
        (family, kind, protocol, target)
        for family, kind, protocol, _, target in socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM
        )
    ]


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPv6]:PORT"`` as (host, port); ValueError naming the fault."""
    text = address.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"StatsD address {address!r}: write an IPv6 address as [::1]:8125")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"StatsD address {address!r} has no port: write HOST:PORT")
        if ":" in host:
            raise ValueError(
                f"StatsD address {address!r}: put an IPv6 address in brackets, [::1]:8125"
            )
    if not host:
        raise ValueError(f"StatsD address {address!r} has no host: write HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"StatsD address {address!r}: the port must be a number in 1..65535")
    return host, int(port_text)


class StatsD:
    """Sends metrics to a StatsD daemon at ``host:port`` over UDP; thread-safe.

    ``prefix`` goes before every name (``prefix.name``), so that several
    servers can share one daemon. ``dropped`` counts metrics that were not
    sent (no daemon, buffers full, values StatsD cannot take).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        prefix: str = "",
        flush_interval: float = 0.5,
        max_packet: int = DEFAULT_MAX_PACKET,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"StatsD port {port} is not in 1..65535")
        if not flush_interval > 0:
            raise ValueError(f"StatsD flush interval must be above 0 seconds, not {flush_interval}")
        if max_packet < MIN_PACKET:
            raise ValueError(f"StatsD packets must allow at least {MIN_PACKET} bytes")
        self.host = host
        self.address: tuple[Any, ...] = (host, port)  # once resolved, the daemon's
        self.prefix = f"{sanitize(prefix)}." if sanitize(prefix) else ""
        self.flush_interval = flush_interval
        self.max_packet = max_packet
        self.dropped = 0
        self._warned_at = -WARN_EVERY
        self._socket: socket.socket | None = None
        # Appended by any thread, taken by one sender at a time: deque's
        # append and popleft are atomic, so recording takes no lock.
        self._queue: deque[str] = deque()
        self._sending = threading.Lock()
        self._counting = threading.Lock()  # for ``dropped``, off the common path
        self._names: dict[str, str] = {}
        # Raise it when the names used are more, but bounded (see statsd_metrics).
        self.names_cached = NAMES_CACHED
        self._closed = False
        self._tried_at = time.monotonic()
        failure = self._connect()
        if failure is not None:
            log.warning(
                "StatsD: %s:%s cannot be used (%s); metrics are dropped until it can, "
                "tried again every %g s",
                host,
                port,
                failure,
                RETRY_EVERY,
            )
        self._wake = threading.Event()
        self._sender = threading.Thread(target=self._send_regularly, name="statsd", daemon=True)
        self._sender.start()

    @classmethod
    def from_address(cls, address: str, *, prefix: str = "") -> StatsD:
        """A client for ``"HOST:PORT"`` or ``"[::1]:PORT"``; ValueError with the fault if bad."""
        host, port = parse_address(address)
        return cls(host, port, prefix=prefix)

    def incr(self, name: str, count: int = 1) -> None:
        """Add ``count`` to counter ``name``."""
        self._record(f"{self._name(name)}:{count}|c", 1)

    def timing(self, name: str, milliseconds: float) -> None:
        """One measurement of timer ``name`` (the daemon keeps percentiles of these)."""
        if not 0 <= milliseconds < math.inf:  # StatsD refuses negative times; NaN too
            self._drop(1)
            return
        self._record(f"{self._name(name)}:{milliseconds:.3f}|ms", 1)

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name`` to ``value``."""
        if not math.isfinite(value):
            self._drop(1)
            return
        metric = self._name(name)
        # An int as it is: a stream's length must not become 5.324e+09.
        number = str(value) if isinstance(value, int) else repr(value)
        if value < 0:
            # A signed gauge value is a change, not a value: zero it first, in
            # the same packet, so the daemon ends at the value.
            self._record(f"{metric}:0|g\n{metric}:{number}|g", 2)
        else:
            self._record(f"{metric}:{number}|g", 1)

    def flush(self) -> None:
        """Send the queued metrics now, from this thread; after ``close()``, nothing."""
        if not self._closed:
            self._drain()

    def close(self) -> None:
        """Send what is queued and stop; later metrics are dropped quietly."""
        with self._sending:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._sender:
            self._sender.join(timeout=5)
        self._drain()
        with self._sending:  # a flush() racing this one finds no socket, and sends nothing
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def __enter__(self) -> StatsD:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _name(self, name: str) -> str:
        full = self._names.get(name)
        if full is None:
            if len(self._names) >= self.names_cached:  # names built from unbounded data
                self._names = {}
            full = self._names[name] = self.prefix + (sanitize(name) or "_")
        return full

    def _record(self, line: str, metrics: int) -> None:
        queue = self._queue
        if self._closed:
            return
        if len(line) > self.max_packet or len(queue) >= MAX_QUEUED:
            self._drop(metrics)  # a line that could never be sent whole; a stuck sender
            return
        queue.append(line)
        if len(queue) >= WAKE_LINES and not self._wake.is_set():
            self._wake.set()

    def _connect(self) -> str | None:
        """Resolve the daemon's address and connect a socket to it; what failed, if it did."""
        host, port = self.host, self.address[1]
        try:
            found = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            return f"{host!r} does not resolve: {exc}"
        if not found:
            return f"{host!r} has no address"
        # A name with both kinds of address (localhost: 127.0.0.1 and ::1) is
        # reached over IPv4, where StatsD daemons listen unless told otherwise.
        found.sort(key=lambda address: address[0] != socket.AF_INET)
        family, kind, protocol, target = found[0]
        sock = socket.socket(family, kind, protocol)
        sock.setblocking(False)
        try:
            # Connected, so the kernel checks the address once, not per packet.
            sock.connect(target)
        except OSError as exc:  # no route to it (an IPv6 address on an IPv4-only host)
            sock.close()
            return f"cannot be reached: {exc.strerror or exc}"
        with self._sending:
            if self._closed:  # closed meanwhile: nothing will be sent
                sock.close()
            else:
                self.address = target[:2]
                self._socket = sock
        return None

    def _drain(self) -> None:
        """Send what is queued now, in packets of at most ``max_packet`` bytes."""
        with self._sending:
            queue = self._queue
            if self._socket is None:  # no address yet (or closed): dropped, counted
                waiting = len(queue)
                lines = [queue.popleft() for _ in range(waiting)]
                self._drop(sum(line.count("\n") + 1 for line in lines))
                return
            packet: list[str] = []
            size = 0
            # What was there on entry: lines keep coming from busy threads.
            for _ in range(len(queue)):
                line = queue.popleft()
                added = len(line) + 1 if packet else len(line)  # with its newline
                if size + added > self.max_packet:
                    self._send(packet)
                    packet, size, added = [], 0, len(line)
                packet.append(line)
                size += added
            if packet:
                self._send(packet)

    def _send(self, lines: list[str]) -> None:
        packet = "\n".join(lines).encode("ascii", "replace")
        assert self._socket is not None  # _drain checked, under the same lock
        try:
            self._socket.send(packet)
        except OSError as exc:  # the daemon away, buffers full, the socket closed: metrics only
            self._drop(sum(line.count("\n") + 1 for line in lines))
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                log.warning(
                    "StatsD: sending to %s:%s fails (%s); metrics are dropped (%d so far)",
                    *self.address,
                    exc.strerror or exc,
                    self.dropped,
                )

    def _drop(self, metrics: int) -> None:
        with self._counting:
            self.dropped += metrics

    def _send_regularly(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if self._socket is None and time.monotonic() - self._tried_at >= RETRY_EVERY:
                self._tried_at = time.monotonic()
                failure = self._connect()
                if failure is None:
                    log.info("StatsD: sending to %s:%s", *self.address)
                elif self._tried_at - self._warned_at >= WARN_EVERY:
                    self._warned_at = self._tried_at
                    log.warning(
                        "StatsD: %s:%s still cannot be used (%s); metrics are dropped (%d so far)",
                        self.host,
                        self.address[1],
                        failure,
                        self.dropped,
                    )
            if not self._closed:  # close() sends the rest itself
                self._drain()
