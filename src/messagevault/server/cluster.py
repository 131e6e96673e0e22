"""Several server nodes over one storage: which node writes each stream, and getting appends there.

Each stream is written by the node that holds its lease (``streams/<stream>``,
``storage/leases.py``); each live node holds ``nodes/<node-id>``, naming the
address other nodes reach it at. Any node takes any request:

- reads are served from storage by whichever node gets them;
- an append to a stream this node writes is committed here; one to a stream
  another node writes is forwarded to that node, with the cluster's own
  credentials, and its answer relayed unchanged;
- an append to a stream nobody writes (new, or its writer gone) goes to the
  live node that rendezvous hashing prefers for that stream, which takes the
  stream's lease; so new streams spread over the nodes.

A writer that dies (SIGKILL, a crash) stops renewing: its leases end after
their duration, or at once when another node finds its address refusing
connections for ``DEAD_AFTER`` seconds and breaks them. That second way is
safe even if the writer were alive (a network fault): every write under a
lease is fenced by its generation (``storage/leases.py``), so a deposed
writer's writes fail and change nothing. A node that shuts down releases its
leases after its last commit, so its streams move at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web

from messagevault.errors import (
    LeaseHeld,
    LeaseLost,
    MessageVaultError,
    NoWriter,
    StorageError,
    WriterUnreachable,
)
from messagevault.storage.leases import DEFAULT_DURATION as DEFAULT_LEASE_DURATION
from messagevault.storage.leases import HeldLease, LeaseRecord, Leases, held_record
from messagevault.wire import DUPLICATE_HEADER, WRITER_HEADER

log = logging.getLogger("messagevault.cluster")

TOKEN_FILE: Final = "cluster-token"  # noqa: S105 - the name of the system file holding the secret
NODE_SCHEME: Final = "MessageVault-Node"  # Authorization: MessageVault-Node <token>
NODE_HEADER: Final = "X-MessageVault-Node"  # the node that forwarded a request
ON_BEHALF_HEADER: Final = "X-MessageVault-User"  # whose append it forwards (for the log)
# A writer whose address refused connections this long (seconds) is taken for dead.
DEAD_AFTER: Final = 1.0
# How long a stream's lease record is trusted without asking storage again (seconds).
RECORD_TTL: Final = 1.0
DEFAULT_FORWARD_WAIT: Final = 10.0  # seconds an append waits for a writer before no_writer
# Seconds a forwarded append may wait for the writer's answer: beyond a commit
# riding out storage faults (30 s) and a full queue's wait (10 s).
FORWARD_READ_TIMEOUT: Final = 60.0
# Headers of an append that the writer needs; everything else stays here.
_FORWARDED_REQUEST_HEADERS: Final = ("Content-Type", "Prefer", "X-Request-Id", "Content-Encoding")
# Headers of the writer's answer relayed to the client, beside the body and status.
_RELAYED_ANSWER_HEADERS: Final = (
    "Content-Type",
    "Retry-After",
    "Preference-Applied",
    DUPLICATE_HEADER,
    WRITER_HEADER,
)


def stream_lease(stream: str) -> str:
    return f"streams/{stream}"


def node_lease(node_id: str) -> str:
    return f"nodes/{node_id}"


def load_token(files: object) -> str:
    """The cluster's node-to-node secret, created by the first node that needs it.

    Kept as a system file in the storage: whoever can read the storage can
    write its streams anyway, so that is where the nodes' trust already lies.
    Created exclusively, so that nodes starting together agree on one.
    """
    read = files.read_system_file  # type: ignore[attr-defined]
    token = read(TOKEN_FILE)
    if token is None:
        create = getattr(files, "create_system_file", None)
        fresh = secrets.token_urlsafe(32).encode()
        if create is not None:
            create(TOKEN_FILE, fresh)
        else:  # a storage without exclusive create: the last writer wins, read back below
            files.write_system_file(TOKEN_FILE, fresh)  # type: ignore[attr-defined]
        token = read(TOKEN_FILE)
    if not token:
        raise StorageError(f"the cluster token ({TOKEN_FILE}) is empty in storage")
    return bytes(token).decode().strip()


def _preference(node_id: str, stream: str) -> bytes:
    return hashlib.blake2b(f"{node_id}\0{stream}".encode(), digest_size=8).digest()


@dataclass
class Forwarded:
    """A writer's answer to a forwarded append, to relay unchanged."""

    status: int
    body: bytes
    headers: dict[str, str]


@dataclass
class _Suspect:
    """An address that refused connections: since when, for ``DEAD_AFTER``."""

    since: float
    last: float


@dataclass
class Cluster:
    """This node's part in a cluster: its leases, its view of the others, forwarding.

    ``run`` runs a blocking storage call off the event loop (the hub's I/O
    pool). ``open_writer(stream)`` and ``close_writer(stream, reason)`` are
    the hub's: they open a stream's writer under the lease this node just
    took, and stop it when the lease is gone.
    """

    leases: Leases
    node_id: str
    token: str
    run: Callable[..., Awaitable[object]]
    open_writer: Callable[[str], Awaitable[None]]
    close_writer: Callable[[str], Awaitable[None]]
    lease_duration: float = DEFAULT_LEASE_DURATION
    forward_wait: float = DEFAULT_FORWARD_WAIT
    address: str = ""  # set by start(), once the port is known
    held: dict[str, HeldLease] = field(default_factory=dict)  # streams this node writes
    _node: HeldLease | None = None
    _live_nodes: list[LeaseRecord] = field(default_factory=list)
    _looking: asyncio.Future[None] | None = None  # a look at nodes/ under way
    _records: dict[str, tuple[LeaseRecord | None, float]] = field(default_factory=dict)
    _suspects: dict[str, _Suspect] = field(default_factory=dict)
    _taking: dict[str, asyncio.Lock] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None
    _renewing: asyncio.Task[None] | None = None
    _stopping: bool = False

    # Starting and stopping -------------------------------------------------

    async def start(self, address: str) -> None:
        """Join: hold this node's lease (``nodes/<id>``) and start renewing.

        The node lease of an earlier run of this node (same id) is taken
        over: that run is gone, since its address now answers as us or
        refuses connections. A live node elsewhere with the same id is an
        error (``LeaseHeld``): two nodes must not share an id.
        """
        self.address = address
        self._session = aiohttp.ClientSession(
            # A writer that takes longer than FORWARD_READ_TIMEOUT to answer
            # (frozen, say) gets the append answered writer_unreachable.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=1.0, sock_connect=1.0, sock_read=FORWARD_READ_TIMEOUT
            ),
            connector=aiohttp.TCPConnector(limit=256, enable_cleanup_closed=True),
        )
        name = node_lease(self.node_id)
        try:
            self._node = await self._acquire(name)
        except LeaseHeld as held:
            record = held_record(held)
            other = record.address if record is not None else None
            if other and other != address and await self._answers(other):
                raise LeaseHeld(
                    f"node id {self.node_id!r} is in use by a live node at {other}; "
                    "give each node its own --node-id"
                ) from None
            await self.run(self.leases.break_, name)
            self._node = await self._acquire(name)
        await self._refresh_nodes()
        self._renewing = asyncio.create_task(self._renew_forever(), name="lease-renewal")
        log.info(
            "joined the cluster",
            extra={"node": self.node_id, "address": address, "lease_duration": self.lease_duration},
        )

    async def stop(self) -> None:
        """Leave: release every lease so the streams move at once (after the hub's last commit)."""
        self._stopping = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        for stream, lease in list(self.held.items()):
            with contextlib.suppress(MessageVaultError):
                await self.run(self.leases.release, lease)
            log.info(
                "handed over stream",
                extra={"stream": stream, "node": self.node_id, "reason": "this node stopped"},
            )
        self.held.clear()
        if self._node is not None:
            with contextlib.suppress(MessageVaultError):
                await self.run(self.leases.release, self._node)
        if self._session is not None:
            await self._session.close()

    async def _acquire(self, name: str) -> HeldLease:
        held = await self.run(
            _acquire,
            self.leases,
            name,
            self.node_id,
            self.address,
            self.lease_duration,
        )
        assert isinstance(held, HeldLease)
        return held

    # Renewal ------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        interval = max(self.lease_duration / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_once()
            except Exception:  # the loop must outlive any one failure
                log.exception("lease renewal failed", extra={"node": self.node_id})

    async def renew_once(self) -> None:
        """Renew every lease this node holds; stop writing the streams whose lease is gone."""
        renewals = [self._renew_stream(stream, lease) for stream, lease in list(self.held.items())]
        await asyncio.gather(self._renew_node(), *renewals)
        await self._refresh_nodes()

    async def _renew_node(self) -> None:
        if self._node is None:
            return
        try:
            self._node = await self._renewed(self._node)
        except LeaseLost:
            # Another process took our node id (a second node started with
            # it): say so loudly; this node goes on serving its streams,
            # whose own leases decide who writes them.
            log.error(
                "this node's lease was taken by another process with the same node id",
                extra={"node": self.node_id},
            )
            with contextlib.suppress(MessageVaultError):
                self._node = await self._acquire(node_lease(self.node_id))
        except MessageVaultError as exc:
            log.warning("cannot renew this node's lease", extra={"error": str(exc)})

    async def _renew_stream(self, stream: str, lease: HeldLease) -> None:
        try:
            renewed = await self._renewed(lease)
        except LeaseLost as exc:
            await self.lost(stream, lease, f"lease lost ({exc})")
            return
        except MessageVaultError as exc:
            # Storage unreachable: keep writing while the lease surely lasts,
            # stop before it may have ended (another node may take it then).
            if lease.expires_in() < self.lease_duration / 3:
                await self.lost(stream, lease, f"could not renew the lease in time ({exc})")
            return
        if self.held.get(stream) is lease:
            self.held[stream] = renewed

    async def _renewed(self, lease: HeldLease) -> HeldLease:
        renewed = await self.run(self.leases.renew, lease)
        assert isinstance(renewed, HeldLease)
        return renewed

    async def lost(self, stream: str, lease: HeldLease, reason: str) -> None:
        """Stop writing ``stream`` at once: its lease is gone (or may be)."""
        if self.held.get(stream) is not lease:
            return
        del self.held[stream]
        self._records.pop(stream, None)
        log.warning(
            "stopped writing stream",
            extra={
                "stream": stream,
                "node": self.node_id,
                "generation": lease.generation,
                "reason": reason,
            },
        )
        await self.close_writer(stream)

    async def confirm(self, stream: str) -> bool:
        """Whether this node still writes ``stream``, asked of storage now (a renewal).

        For answers drawn from the writer's memory alone, such as a
        producer's sequence refused: a writer deposed a moment ago, not yet
        told, would refuse from a table that the new writer has moved on
        from. False (and the stream let go of) when the lease is gone.
        """
        lease = self.held.get(stream)
        if lease is None:
            return False
        await self._renew_stream(stream, lease)
        return stream in self.held

    async def check(self, stream: str) -> None:
        """The stream's writer was found deposed: renew its lease now, and let it go if lost."""
        lease = self.held.get(stream)
        if lease is not None:
            await self._renew_stream(stream, lease)

    async def _look_at_nodes(self) -> None:
        """Refresh the view of live nodes now; placements at the same moment share one look."""
        looking = self._looking
        if looking is None or looking.done():
            looking = self._looking = asyncio.ensure_future(self._refresh_nodes())
        await asyncio.shield(looking)

    async def _refresh_nodes(self) -> None:
        try:
            records = await self.run(self.leases.list, "nodes/")
        except MessageVaultError as exc:
            log.warning("cannot list the cluster's nodes", extra={"error": str(exc)})
            return
        assert isinstance(records, list)
        now = time.time()
        self._live_nodes = [record for record in records if record.live(now)]

    # Finding a stream's writer --------------------------------------------

    async def writer_for(
        self, stream: str, *, forwarded: bool, deadline: float | None = None
    ) -> str | None:
        """Where an append to ``stream`` goes: ``None`` for this node, else the writer's address.

        Takes the stream's lease when nobody writes it and this node is the
        one to (the preferred live node, or any node a forwarded append
        reached: a forwarded append is never forwarded again). Waits until
        ``deadline`` (the loop's time; by default ``forward_wait`` from now)
        for a writer, then ``NoWriter``.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.forward_wait
        pause = 0.02
        while True:
            if stream in self.held:
                return None
            try:
                address = await self._route(stream, forwarded=forwarded)
            except (LeaseHeld, StorageError) as exc:
                reason: str = str(exc)
                self.forget(stream)
            else:
                if address is not None or stream in self.held:
                    return address
                reason = "the stream's lease could not be taken"
            if loop.time() + pause > deadline:
                raise NoWriter(
                    f"no node could write stream {stream!r} within {self.forward_wait:g} s "
                    f"({reason}); try again shortly"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _route(self, stream: str, *, forwarded: bool) -> str | None:
        record = await self.record(stream)
        now = time.time()
        if record is not None and record.live(now):
            if record.holder != self.node_id and record.address:
                if not await self._dead(record.address):
                    return record.address
                await self.take(stream, record, f"its writer {record.holder} refuses connections")
                return None
            # Ours by name but not held here: an earlier run of this node.
            await self.take(stream, record, "this node restarted")
            return None
        if not forwarded:
            await self._look_at_nodes()  # placing a stream: with the nodes that joined since
            preferred = self._preferred(stream)
            if (
                preferred is not None
                and preferred.holder != self.node_id
                and preferred.address
                and not self._refusing(preferred.address)
            ):
                return preferred.address
        reason = "new stream" if record is None else "its writer's lease had ended"
        await self.take(stream, record, reason)
        return None

    def _preferred(self, stream: str) -> LeaseRecord | None:
        """The live node that rendezvous hashing picks to write ``stream`` (None: no view yet)."""
        if not self._live_nodes:
            return None
        return max(self._live_nodes, key=lambda node: _preference(node.holder or "", stream))

    async def record(self, stream: str) -> LeaseRecord | None:
        """The stream's lease as storage says, at most ``RECORD_TTL`` seconds old."""
        cached = self._records.get(stream)
        now = time.monotonic()
        if cached is not None and now - cached[1] < RECORD_TTL:
            return cached[0]
        record = await self.run(self.leases.inspect, stream_lease(stream))
        assert record is None or isinstance(record, LeaseRecord)
        self._records[stream] = (record, now)
        return record

    def forget(self, stream: str) -> None:
        """Ask storage again next time: the cached writer turned out wrong."""
        self._records.pop(stream, None)

    async def take(self, stream: str, record: LeaseRecord | None, reason: str) -> None:
        """Become the stream's writer: (break a dead holder's lease,) take it, open the writer.

        ``record`` is the lease as judged (None: never taken); a live one is
        broken first. ``LeaseHeld`` when another node took it first.
        """
        lock = self._taking.setdefault(stream, asyncio.Lock())
        async with lock:
            if stream in self.held:
                return
            if self._stopping:
                raise NoWriter("this node is shutting down")
            name = stream_lease(stream)
            if record is not None and record.live():
                # Break only the lease judged: a cached record may be a
                # moment old, and another node may have taken over since.
                self.forget(stream)
                current = await self.record(stream)
                if current is None or current.generation != record.generation:
                    raise LeaseHeld(f"stream {stream!r} changed writers meanwhile")
                await self.run(self.leases.break_, name)
            self.forget(stream)
            lease = await self._acquire(name)
            self.held[stream] = lease
            try:
                await self.open_writer(stream)
            except BaseException:
                del self.held[stream]
                with contextlib.suppress(MessageVaultError):
                    await self.run(self.leases.release, lease)
                raise
            log.info(
                "writing stream",
                extra={
                    "stream": stream,
                    "node": self.node_id,
                    "generation": lease.generation,
                    "previous_writer": record.holder if record is not None else None,
                    "reason": reason,
                },
            )

    # Failure detection ------------------------------------------------------

    def _refusing(self, address: str) -> bool:
        """Whether ``address`` has refused connections for ``DEAD_AFTER`` seconds, until lately.

        Refusals long past say nothing: a node restarts at its address.
        """
        suspect = self._suspects.get(address)
        return (
            suspect is not None
            and suspect.last - suspect.since >= DEAD_AFTER
            and time.monotonic() - suspect.last < DEAD_AFTER
        )

    async def _dead(self, address: str) -> bool:
        """Whether the writer at ``address`` is gone: it kept refusing, and still does now.

        Asked before its lease is broken: a node that came back at that
        address a moment ago keeps what it holds.
        """
        if not self._refusing(address):
            return False
        if await self._answers(address):
            self._reached(address)
            return False
        return True

    def _refused(self, address: str) -> None:
        now = time.monotonic()
        suspect = self._suspects.get(address)
        if suspect is None or now - suspect.last > 2 * DEAD_AFTER:
            self._suspects[address] = _Suspect(now, now)  # a new outage
        else:
            suspect.last = now

    def _reached(self, address: str) -> None:
        self._suspects.pop(address, None)

    async def _answers(self, address: str) -> bool:
        """Whether something listens at ``address`` (a connection can be made)."""
        assert self._session is not None
        try:
            async with self._session.get(
                f"{address}/health", allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2)
            ):
                return True
        except aiohttp.ClientConnectorError:
            return False
        except (aiohttp.ClientError, TimeoutError):
            return True  # connected, then something else went wrong: something lives there

    # Forwarding --------------------------------------------------------------

    async def forward(
        self, stream: str, address: str, request: web.Request, body: bytes, user: str
    ) -> Forwarded | None:
        """Send an append to the writer at ``address``; its answer, to relay as it is.

        ``None`` when this node became the stream's writer meanwhile: the
        append is to be committed here. A writer that cannot be connected to
        is tried again (it may be restarting, or another node may be taking
        its streams over) until the wait ends; one that no longer writes the
        stream (``not_writer``) sends us looking again. A connection that
        breaks after the append was sent leaves it in doubt:
        ``WriterUnreachable``.
        """
        assert self._session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.forward_wait
        headers = {
            name: request.headers[name]
            for name in _FORWARDED_REQUEST_HEADERS
            if name in request.headers
        }
        headers["Authorization"] = f"{NODE_SCHEME} {self.token}"
        headers[NODE_HEADER] = self.node_id
        headers[ON_BEHALF_HEADER] = user
        query = f"?{request.query_string}" if request.query_string else ""
        pause = 0.02
        while True:
            try:
                async with self._session.post(
                    f"{address}/streams/{stream}{query}", data=body, headers=headers
                ) as answer:
                    content = await answer.read()
                    status = answer.status
                    relayed = {
                        name: answer.headers[name]
                        for name in _RELAYED_ANSWER_HEADERS
                        if name in answer.headers
                    }
            except aiohttp.ClientConnectorError:
                self._refused(address)  # nothing was sent: safe to send elsewhere
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise WriterUnreachable(
                    f"the connection to stream {stream!r}'s writer at {address} broke during "
                    f"the append ({type(exc).__name__}); it may have been committed"
                ) from None
            else:
                self._reached(address)
                if status != 503 or b'"not_writer"' not in content:
                    return Forwarded(status, content, relayed)
                self.forget(stream)  # the writer moved on the way
            if loop.time() + pause > deadline:
                raise NoWriter(
                    f"stream {stream!r}'s writer at {address} cannot be reached; try again shortly"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
            next_address = await self.writer_for(stream, forwarded=False, deadline=deadline)
            if next_address is None:
                return None
            address = next_address

    async def relay(
        self, address: str, method: str, path: str, user: str, *, body: bytes | None = None
    ) -> Forwarded:
        """Send an admin's request (a ``DELETE``; a trim, whose JSON ``body``) to ``address``.

        Sent once, with the cluster's credentials, on behalf of ``user``:
        ``NoWriter`` when that node cannot be connected to (nothing was
        sent), ``WriterUnreachable`` when the connection broke after.
        """
        assert self._session is not None
        headers = {
            "Authorization": f"{NODE_SCHEME} {self.token}",
            NODE_HEADER: self.node_id,
            ON_BEHALF_HEADER: user,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, f"{address}{path}", headers=headers, data=body
            ) as answer:
                content = await answer.read()
                relayed = {
                    name: answer.headers[name]
                    for name in _RELAYED_ANSWER_HEADERS
                    if name in answer.headers
                }
                return Forwarded(answer.status, content, relayed)
        except aiohttp.ClientConnectorError:
            self._refused(address)
            raise NoWriter(f"the node at {address} cannot be reached; try again shortly") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WriterUnreachable(
                f"the connection to the node at {address} broke during {method} {path} "
                f"({type(exc).__name__}); it may have been done"
            ) from None

    async def release_stream(self, stream: str) -> None:
        """Let go of ``stream``'s lease at once (it was deleted): the next append places it anew."""
        lease = self.held.pop(stream, None)
        self._records.pop(stream, None)
        if lease is not None:
            with contextlib.suppress(MessageVaultError):
                await self.run(self.leases.release, lease)

    # Node-to-node credentials ----------------------------------------------

    def is_node(self, authorization: str | None) -> bool:
        """Whether ``authorization`` carries this cluster's node token."""
        if not authorization or not authorization.startswith(f"{NODE_SCHEME} "):
            return False
        offered = authorization[len(NODE_SCHEME) + 1 :].strip()
        return hmac.compare_digest(offered.encode(), self.token.encode())

    # What /cluster shows -------------------------------------------------------

    async def describe(self) -> dict[str, object]:
        nodes = await self.run(self.leases.list, "nodes/")
        streams = await self.run(self.leases.list, "streams/")
        assert isinstance(nodes, list) and isinstance(streams, list)
        return {
            "node": self.node_id,
            "address": self.address,
            "lease_duration": self.lease_duration,
            **lease_report(nodes, streams, written_here=set(self.held)),
        }

    @property
    def role(self) -> str:
        """``writer`` while this node writes a stream, else ``standby``."""
        return "writer" if self.held else "standby"


def lease_report(
    nodes: list[LeaseRecord], streams: list[LeaseRecord], *, written_here: set[str] | None = None
) -> dict[str, list[dict[str, object]]]:
    """What the leases say: the nodes, and which node writes each stream (``GET /cluster``).

    From storage alone, so ``messagevault cluster --storage`` shows the same
    without a server. ``written_here``: the streams the asking node writes.
    """
    now = time.time()
    report_streams = []
    for record in streams:
        live = record.live(now)
        entry: dict[str, object] = {
            "stream": record.name.removeprefix("streams/"),
            "writer": record.holder if live else None,
            "address": record.address if live else None,
            "generation": record.generation,
            "expires_at": record.expires_at if live else None,
        }
        if written_here is not None:
            entry["written_here"] = entry["stream"] in written_here
        report_streams.append(entry)
    return {
        "nodes": [
            {
                "node": record.name.removeprefix("nodes/"),
                "address": record.address,
                "live": record.live(now),
                "expires_at": record.expires_at,
            }
            for record in nodes
        ],
        "streams": report_streams,
    }


def _acquire(leases: Leases, name: str, holder: str, address: str, duration: float) -> HeldLease:
    return leases.acquire(name, holder=holder, address=address, duration=duration)
