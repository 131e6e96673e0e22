"""A fault-injecting TCP proxy on loopback, for tests of retries and exactly-once publishing.

``FaultProxy`` listens on 127.0.0.1 (a free port) and relays each connection
to ``127.0.0.1:target_port``. It runs its own event loop in a background
thread, so sync tests and async (pytest-aiohttp) tests use it the same way::

    with serve_process(root, "app", "secret") as url, FaultProxy(port_of(url), policy) as proxy:
        with Client(proxy.url, user="app", password="secret") as client:
            ...
        assert proxy.stats.count(Fault.DROP_ANSWER) > 0

Faults are decided per *exchange*: the bytes a client sends until the
server's first answer bytes come back (one HTTP request and its answer,
since our clients never pipeline). For each exchange the proxy:

* ``PASS``: relays both ways untouched;
* ``DELAY``: holds the request, then the answer, ``delay`` seconds each;
* ``DROP_ANSWER``: relays the whole request, waits for the server's answer,
  discards it and resets the client connection. The server answers a
  publish only after committing it, so this is the "lost acknowledgement":
  the batch is stored, the client sees a reset or EOF;
* ``RESET_REQUEST``: relays a strict prefix of the request's first chunk,
  then resets both connections. The server acts on a request only once its
  whole body has arrived, so nothing is stored.

Which fault comes next is drawn by a ``FaultPolicy`` from a seeded
``random.Random``: the same seed and the same sequence of exchanges give the
same faults (``stats.history``), so a failure is replayed from its seed.
Tests force faults for the next exchanges with ``proxy.force(...)``; forced
faults draw nothing from the policy, so they do not shift its sequence.

How issue 11's exactly-once test will use it: start ``messagevault serve``
(``tests.serve_process``), put a ``FaultProxy`` with e.g.
``FaultPolicy(seed, drop_answer=0.1, reset_request=0.1, delay=0.1)`` in
front of it, and publish numbered messages through a ``Client`` on
``proxy.url`` that retries. Meanwhile kill the server with SIGKILL at random
moments (drawn from the same seed), start it again on a new port and
``proxy.retarget(new_port)``; while it is down the proxy resets the
connections it cannot relay (``stats.upstream_failures``). At the end, read
the stream from the server directly (not through the proxy) and check that
every message is stored exactly once, in order, at the positions its
receipt states; assert ``stats.count(...)`` of each fault is above zero so
the test cannot pass by never injecting anything, and print the seed on
failure.

Bounds: at most ``max_connections`` relayed at once (more are reset on
arrival and counted in ``stats.refused``), delays at most ``MAX_DELAY``,
connecting to the target at most ``connect_timeout``, and ``stop()`` closes
the listener and every connection and joins the thread within its timeout.
Half-closed connections are not relayed as such: when either side ends, the
proxy closes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass
from types import TracebackType

LOOPBACK = "127.0.0.1"
MAX_DELAY = 1.0
CHUNK = 64 * 1024
LISTEN_BACKLOG = 128
HISTORY = 10_000


class Fault(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    DROP_ANSWER = "drop_answer"
    RESET_REQUEST = "reset_request"


@dataclass(frozen=True)
class Decision:
    """The fault for one exchange: ``delay`` seconds each way for DELAY, and for
    RESET_REQUEST the share (0 <= cut < 1) of the first request chunk relayed."""

    fault: Fault
    delay: float = 0.0
    cut: float = 0.5


class FaultPolicy:
    """Draws a ``Decision`` per exchange with the given probabilities; PASS otherwise.

    Each draw takes exactly three numbers from the seeded generator whatever
    it decides, so the sequence of decisions depends only on the seed.
    """

    def __init__(
        self,
        seed: int,
        *,
        drop_answer: float = 0.0,
        reset_request: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.01,
    ) -> None:
        chances = {
            Fault.DROP_ANSWER: drop_answer,
            Fault.RESET_REQUEST: reset_request,
            Fault.DELAY: delay,
        }
        for fault, chance in chances.items():
            if not 0.0 <= chance <= 1.0:
                raise ValueError(f"{fault.value} probability must be in [0, 1], got {chance}")
        if sum(chances.values()) > 1.0:
            raise ValueError(f"fault probabilities add up to more than 1: {sum(chances.values())}")
        if not 0.0 <= max_delay <= MAX_DELAY:
            raise ValueError(f"max_delay must be in [0, {MAX_DELAY}] seconds, got {max_delay}")
        self.seed = seed
        self.max_delay = max_delay
        self._chances = chances
        self._random = random.Random(seed)  # seeded: faults replay from the seed

    def decide(self) -> Decision:
        draw, delay, cut = (self._random.random() for _ in range(3))
        for fault, chance in self._chances.items():
            if draw < chance:
                return Decision(fault, delay * self.max_delay, cut)
            draw -= chance
        return Decision(Fault.PASS)


class FaultStats:
    """What the proxy did; thread-safe (written on the proxy's loop, read by tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._applied: Counter[Fault] = Counter()
        self._history: deque[Fault] = deque(maxlen=HISTORY)
        self._events: Counter[str] = Counter()

    def applied(self, fault: Fault) -> None:
        with self._lock:
            self._applied[fault] += 1
            self._history.append(fault)

    def event(self, name: str) -> None:
        with self._lock:
            self._events[name] += 1

    def count(self, fault: Fault) -> int:
        with self._lock:
            return self._applied[fault]

    @property
    def history(self) -> list[Fault]:
        """Faults applied, in order (the last ``HISTORY``)."""
        with self._lock:
            return list(self._history)

    @property
    def connections(self) -> int:
        """Connections relayed (accepted and connected to the target)."""
        with self._lock:
            return self._events["connections"]

    @property
    def refused(self) -> int:
        """Connections reset on arrival because ``max_connections`` were open."""
        with self._lock:
            return self._events["refused"]

    @property
    def upstream_failures(self) -> int:
        """Connections reset because the target could not be reached."""
        with self._lock:
            return self._events["upstream_failures"]


class _Cut(Exception):
    """A fault ends the connection: reset both sides."""


class _Exchange:
    """The state one connection's two relays share: the current exchange's decision."""

    def __init__(self) -> None:
        self.decision: Decision | None = None
        self.answered = False


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` to 127.0.0.1:``target_port`` that injects faults.

    Use as a context manager (``start()``/``stop()``). ``policy`` defaults to
    passing everything through.
    """

    def __init__(
        self,
        target_port: int,
        policy: FaultPolicy | None = None,
        *,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
    ) -> None:
        if not 0 < target_port < 65536:
            raise ValueError(f"target port must be in 1..65535, got {target_port}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self._target_port = target_port
        self._policy = policy or FaultPolicy(0)
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._forced: deque[Decision] = deque()
        # Each connection's handler, with its socket until the handler owns it.
        self._handlers: dict[asyncio.Task[None], socket.socket | None] = {}
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0
        self.stats = FaultStats()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def open_connections(self) -> int:
        return len(self._handlers)

    def retarget(self, target_port: int) -> None:
        """Relay new connections to ``target_port`` (a server restarted elsewhere)."""
        if not 0 < target_port < 65536:
            raise ValueError(f"target port must be in 1..65535, got {target_port}")
        self._target_port = target_port

    def force(self, *faults: Fault | Decision) -> None:
        """Apply these faults to the next exchanges, in order, before the policy's."""
        for fault in faults:
            if isinstance(fault, Fault):
                fault = Decision(fault, self._policy.max_delay)
            self._forced.append(fault)

    # Lifetime ------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the fault proxy was already started")
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the fault proxy did not start within {timeout} s")
        if self._startup_error is not None:
            raise RuntimeError(f"the fault proxy did not start: {self._startup_error}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and all connections; join the thread within ``timeout``."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the fault proxy thread did not stop within {timeout} s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                listener = socket.socket()
                listener.bind((LOOPBACK, 0))
                listener.listen(LISTEN_BACKLOG)
                listener.setblocking(False)
                self._port = int(listener.getsockname()[1])
            except BaseException as exc:
                self._startup_error = exc
                return
            finally:
                self._ready.set()
            with listener:
                # A reader callback rather than loop.sock_accept: cancelling that
                # can race an accept in 3.11 and leak the accepted socket.
                loop.add_reader(listener.fileno(), self._accept, listener)
                loop.run_forever()
                loop.remove_reader(listener.fileno())
                loop.run_until_complete(self._shut())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _ = listener.accept()
            except OSError:  # none waiting (BlockingIOError), or out of descriptors
                return
            sock.setblocking(False)
            if len(self._handlers) >= self._max_connections:
                self.stats.event("refused")
                _reset(sock)
                sock.close()
                continue
            handler = loop.create_task(self._handle(sock))
            self._handlers[handler] = sock
            handler.add_done_callback(self._handled)

    def _handled(self, handler: asyncio.Task[None]) -> None:
        sock = self._handlers.pop(handler)
        if sock is not None:  # cancelled before it took the socket over
            sock.close()

    async def _shut(self) -> None:
        for _ in range(10):
            handlers = list(self._handlers)
            if not handlers:
                break
            for handler in handlers:
                handler.cancel()
            # Cancelled again in the next round if a cancel was swallowed (an
            # await that completed in the same iteration as the cancel).
            await asyncio.wait(handlers, timeout=0.2)
        # Closed transports release their sockets in callbacks of the next iterations.
        await asyncio.sleep(0.01)

    # Relaying ------------------------------------------------------------------------

    def _next_decision(self) -> Decision:
        try:
            return self._forced.popleft()
        except IndexError:
            return self._policy.decide()

    async def _handle(self, sock: socket.socket) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        client: asyncio.StreamWriter | None = None
        upstream: asyncio.StreamWriter | None = None
        cut = True
        try:
            client_reader, client = await asyncio.open_connection(sock=sock)
            self._handlers[handler] = None  # its transport closes it from now on
            try:
                async with asyncio.timeout(self._connect_timeout):
                    upstream_reader, upstream = await asyncio.open_connection(
                        LOOPBACK, self._target_port
                    )
            except (OSError, TimeoutError):
                self.stats.event("upstream_failures")
                return
            self.stats.event("connections")
            exchange = _Exchange()
            relays = [
                asyncio.ensure_future(self._requests(exchange, client_reader, upstream)),
                asyncio.ensure_future(self._answers(exchange, upstream_reader, client)),
            ]
            try:
                done, _ = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for relay in relays:
                    relay.cancel()
                await asyncio.gather(*relays, return_exceptions=True)
            cut = any(relay.exception() is not None for relay in done)
        finally:
            if upstream is not None:
                _close(upstream, reset=cut)
            if client is not None:
                _close(client, reset=cut)

    async def _requests(
        self, exchange: _Exchange, client: asyncio.StreamReader, upstream: asyncio.StreamWriter
    ) -> None:
        while chunk := await client.read(CHUNK):
            starts = exchange.decision is None or exchange.answered
            if starts:
                exchange.decision, exchange.answered = self._next_decision(), False
                if exchange.decision.fault in (Fault.PASS, Fault.DELAY):
                    self.stats.applied(exchange.decision.fault)
            decision = exchange.decision
            assert decision is not None
            if decision.fault is Fault.RESET_REQUEST:
                # A strict prefix of this chunk is a strict prefix of the request.
                upstream.write(chunk[: min(int(len(chunk) * decision.cut), len(chunk) - 1)])
                await upstream.drain()
                self.stats.applied(Fault.RESET_REQUEST)
                raise _Cut
            if decision.fault is Fault.DELAY and starts:
                await asyncio.sleep(decision.delay)
            upstream.write(chunk)
            await upstream.drain()

    async def _answers(
        self, exchange: _Exchange, upstream: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        while chunk := await upstream.read(CHUNK):
            decision = exchange.decision
            if decision is not None and decision.fault is Fault.DROP_ANSWER:
                self.stats.applied(Fault.DROP_ANSWER)
                raise _Cut
            if decision is not None and decision.fault is Fault.DELAY and not exchange.answered:
                await asyncio.sleep(decision.delay)
            exchange.answered = True
            client.write(chunk)
            await client.drain()


def _close(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close a connection: gracefully, or with an RST and unsent bytes dropped."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _reset(sock)
        writer.transport.abort()
    else:
        writer.close()


def _reset(sock: socket.socket) -> None:
    """Make closing ``sock`` send an RST rather than a FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def port_of(url: str) -> int:
    """The port of a ``http://127.0.0.1:PORT`` URL (as ``serve_process`` yields)."""
    return int(url.rsplit(":", 1)[1].rstrip("/"))
