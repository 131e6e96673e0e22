"""The systems benchmarks/peers.py races: how each is installed, started, driven and stopped.

Every system is handed the same batches (lists of (key, value) pairs) and
hands back what it read as two lists, keys and values, which peers.py then
verifies in one way for all. Each server is a fresh process of its own on a
free 127.0.0.1 port, its data in a temporary folder, stopped by its PID.

How each one is driven, the way its documentation shows:
  MessageVault  ``Client.publish`` of each batch (one producer, in a thread) or
                ``AsyncClient.publish`` (concurrent producers); ``Client.read``, and
                for W1 and W2 also ``Client.read_records`` (the JSON read: NDJSON
                pages of 10,000, every record decoded, key and value to bytes).
  Redis         redis-py with hiredis: one non-transactional pipeline of XADDs per
                batch, one thread per producer; XRANGE pages of 10,000 to read
                back. Each entry has two fields, ``k`` (the key) and ``v``.
  NATS          nats-py: ``publish_async`` of each message of a batch, then the
                batch's acks gathered (one task per producer); a pull consumer's
                ``fetch`` of 10,000 to read back. A message's subject is ``bench.<key>``.
  Durable Streams  the protocol's Node reference server (file-backed, as
                tests/durable_streams starts it for the conformance run) and
                MessageVault's ``/v1/stream/`` endpoint (``serve --fsync always
                --allow-anonymous all:write``), both through benchmarks/ds_driver.py:
                a POST of a JSON array per batch (an idempotent producer per lane),
                catch-up GETs from offset -1 to read back.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.ds_driver import DurableStreamsDriver
from benchmarks.serving import PASSWORD, USER, Server
from tests.azurite import free_port
from tests.durable_streams import REFERENCE_SCRIPT
from tests.durable_streams import ROOT as REPO

import messagevault
from messagevault.client import AsyncClient, Client
from messagevault.server.auth import Users

Batch = list[tuple[bytes, bytes]]
NATIVE = "native"
DURABLE_STREAMS = "durable-streams"
STREAM = "bench"
READ_PAGE = 10_000  # messages a read asks for at a time (Redis, NATS)
SUBJECTS = "bench."  # NATS: a message's subject is this plus its key


@dataclass(frozen=True)
class System:
    key: str  # as --only names it
    title: str  # as the table heads it
    durability: str  # when an acknowledged write reaches the disk
    # The server's executable: Redis's and NATS's from Debian's packages, node for the
    # reference server (its package from npm); None: MessageVault's own.
    binary: str | None
    clients: tuple[str, ...]  # Python distributions the driver needs
    driven: str  # how the benchmark writes and reads
    protocol: str = NATIVE  # NATIVE: the system's own; DURABLE_STREAMS: over that protocol


DS_DRIVEN = (
    "benchmarks/ds_driver.py (http.client, a persistent connection per thread): a POST of a "
    "JSON array of {key, value} per batch from an idempotent producer (Producer-Id/Epoch/Seq, "
    "a thread per producer), catch-up GETs from offset -1 until Stream-Up-To-Date, every "
    "element decoded (msgspec)"
)

SYSTEMS = (
    System(
        "messagevault",
        "MessageVault",
        "serve --fsync always: data flushed before each ack (group commit), checkpoint lazily",
        None,
        ("aiohttp",),
        "Client.publish per batch (AsyncClient.publish for 16 producers), Client.read; "
        "read JSON: Client.read_records (NDJSON pages of 10,000, msgspec)",
    ),
    System(
        "redis-always",
        "Redis AOF always",
        "appendonly yes, appendfsync always: AOF fsynced before replies (per event-loop "
        "pass); default RDB save points",
        "redis-server",
        ("redis", "hiredis"),
        "redis-py + hiredis, a pipeline of XADDs per batch (a thread per producer), "
        "XRANGE pages of 10,000",
    ),
    System(
        "redis-everysec",
        "Redis AOF everysec",
        "appendonly yes, appendfsync everysec (Redis's recommended default): acks may "
        "precede the fsync by up to ~1-2 s",
        "redis-server",
        ("redis", "hiredis"),
        "redis-py + hiredis, a pipeline of XADDs per batch (a thread per producer), "
        "XRANGE pages of 10,000",
    ),
    System(
        "nats",
        "NATS JetStream",
        "file storage, 1 replica; Debian's 2.9 has no sync_interval option (2.10+), so "
        "acks precede the fsync, done every 2 min (its docs: use sync_interval always "
        "without replication)",
        "nats-server",
        ("nats-py",),
        "nats-py, publish_async per message and the batch's acks gathered (a task per "
        "producer), pull consumer fetch of 10,000 to read; subject bench.<key>",
    ),
    System(
        "messagevault-ds",
        "MessageVault DS",
        "serve --fsync always (as MessageVault's), its Durable Streams endpoint "
        "/v1/stream/ with --allow-anonymous all:write",
        None,
        ("msgspec",),
        DS_DRIVEN,
        DURABLE_STREAMS,
    ),
    System(
        "ds-reference",
        "DS reference",
        "the protocol's Node reference server (@durable-streams/server), file-backed: each "
        "append written and fdatasynced (concurrent appends share one) before the stream's "
        "metadata is committed to LMDB and the append acked",
        "node",
        ("msgspec",),
        DS_DRIVEN,
        DURABLE_STREAMS,
    ),
)
BY_KEY = {system.key: system for system in SYSTEMS}

# The Debian package that brings each server, and the service it sets up on install.
PACKAGES = {"redis-server": "redis-server", "nats-server": "nats-server"}
# The Durable Streams reference server comes from npm (package.json), not from apt.
REFERENCE_PACKAGE = REPO / "node_modules" / "@durable-streams" / "server" / "package.json"


def apt_binaries(systems: Sequence[System]) -> list[str]:
    """The servers of ``systems`` that apt-get can install when missing."""
    return sorted({s.binary for s in systems if s.binary in PACKAGES})


def missing_server(system: System) -> str | None:
    """Why a server that apt-get does not bring cannot run here (the reference server), or None."""
    if system.key != "ds-reference":
        return None
    if find_binary("node") is None:
        return "node not found: the Durable Streams reference server runs under Node"
    if not REFERENCE_PACKAGE.exists():
        return "@durable-streams/server not installed: make node_modules/.installed (npm ci)"
    return None


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    if found := shutil.which(name):
        return found
    for folder in ("/usr/sbin", "/usr/bin"):
        path = Path(folder) / name
        if os.access(path, os.X_OK):
            return str(path)
    return None


def install(binaries: list[str], say: Callable[[str], None]) -> dict[str, str]:
    """``apt-get install`` the packages of the missing ``binaries``.

    Returns, for each binary still missing afterwards, why. A package's own
    service (Debian starts one on install where it can) is stopped and
    disabled: the benchmark starts its own servers and never relies on it.
    """
    missing = [b for b in binaries if find_binary(b) is None]
    if not missing:
        return {}
    packages = sorted({PACKAGES[b] for b in missing})
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "no apt-get here" if apt is None else "apt-get needs root"
        return {b: f"{b} not found and {why}: install {PACKAGES[b]} to race it" for b in missing}
    say(f"{', '.join(missing)} not found: apt-get install -y {' '.join(packages)} (Debian's)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [apt, "install", "-y", "-q", *packages]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # perhaps the package lists are not there yet
        subprocess.run([apt, "update", "-q"], env=environment, capture_output=True, check=False)
        done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    for package in packages:
        _stop_service(package)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
    return {
        b: f"{b} could not be installed (apt-get exit {done.returncode}: {tail[0]})"
        for b in missing
        if find_binary(b) is None
    }


def _stop_service(name: str) -> None:
    """Stop and disable the system service a package may have started (none is relied on)."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        command = ["systemctl", "disable", "--now", name]
    elif Path(f"/etc/init.d/{name}").exists() and shutil.which("service"):
        command = ["service", name, "stop"]
    else:
        return
    subprocess.run(command, capture_output=True, check=False, timeout=60)


def missing_clients(system: System) -> str | None:
    """Why the system's Python client cannot be used, or None."""
    for distribution in system.clients:
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{distribution} not installed: pip install -e '.[bench]'"
    return None


def versions(system: System) -> dict[str, str]:
    """The server's and clients' versions."""
    found = {d: importlib.metadata.version(d) for d in system.clients}
    if system.key == "ds-reference":
        package = json.loads(REFERENCE_PACKAGE.read_text())["version"]
        node = find_binary("node") or "node"
        answer = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
        return {
            "@durable-streams/server": package,
            "node": answer.stdout.strip().lstrip("v"),
            **found,
        }
    if system.binary is None:
        return {"messagevault": messagevault.__version__, **found}
    binary = find_binary(system.binary)
    if binary is None:
        return found
    answer = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    # "Redis server v=7.0.15 sha=...", "nats-server: v2.9.10"
    version = re.search(r"v=?(\d+(?:\.\d+)+)", answer.stdout)
    return {system.binary: version[1] if version else answer.stdout.strip(), **found}


# Servers -------------------------------------------------------------------------------


class Running(Protocol):
    """A server process started for one case."""

    @property
    def pid(self) -> int: ...

    @property
    def port(self) -> int: ...

    def cpu_seconds(self) -> float: ...

    def stop(self) -> None: ...


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads); Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGTERM the child when this process dies (None elsewhere).

    Redis and NATS cannot watch a pipe as MessageVault's leash does. libc is
    loaded here, before the fork, so the child only makes the one call; the
    signal comes when the *thread* that started the child ends, and ``start``
    runs on the main thread.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not hasattr(signal, "SIGTERM") or os.uname().sysname != "Linux":
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class PeerServer:
    """A peer's server process on a loopback port, its output in a log file.

    It dies with this process (``_die_with_parent``): a benchmark killed
    outright leaves no Redis or NATS holding a port.
    """

    def __init__(
        self,
        command: list[str],
        port: int,
        folder: Path,
        *,
        cwd: Path | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.log = folder / "server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd or folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - one prctl call, libc loaded before
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"server did not listen on 127.0.0.1:{self.port} in {timeout:g} s")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class VaultServer:
    """benchmarks/serving.py's ``messagevault serve --fsync always``, seen as ``Running``."""

    def __init__(self, folder: Path, users: Users) -> None:
        self.server = Server(folder, users=users)

    @property
    def pid(self) -> int:
        return self.server.process.pid

    @property
    def port(self) -> int:
        return self.server.port

    def wait_until_up(self) -> None:
        self.server.wait_until_up()

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()

    def stop(self) -> None:
        self.server.stop()


class ReferenceServer(PeerServer):
    """The Durable Streams Node reference server, file-backed in ``folder``, on a port it picks.

    It runs tests/durable_streams/reference_server.mjs, the script the
    conformance tests start it with, which prints its URL once it listens.
    """

    def __init__(self, folder: Path) -> None:
        node = find_binary("node")
        if node is None:
            raise SystemExit("node is not installed")
        command = [node, str(REFERENCE_SCRIPT), str(folder / "data")]
        # From the repository, where Node finds node_modules; the port is in the URL line.
        super().__init__(command, 0, folder, cwd=REPO)

    def wait_until_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.port:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited early:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the reference server printed no URL in {timeout:g} s")
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("http://127.0.0.1:"):
                    self.port = int(line.strip().rsplit(":", 1)[1])
            time.sleep(0.05)
        super().wait_until_up(max(1.0, deadline - time.monotonic()))


def _vault_durable_streams(folder: Path) -> PeerServer:
    """``messagevault serve --fsync always`` with anonymous writers for the protocol's routes.

    The benchmarks' embedded server has no way to pass ``--allow-anonymous``,
    so it is started here, with the same options otherwise (file storage,
    no access log). Its first start creates an admin, unused.
    """
    port = free_port()
    command = [
        *(sys.executable, "-m", "messagevault.cli", "serve", "--host", "127.0.0.1"),
        *("--port", str(port), "--storage", f"file:{folder / 'data'}", "--fsync", "always"),
        *("--no-access-log", "--allow-anonymous", "all:write"),
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")}
    return PeerServer(command, port, folder, environment=environment)


def start(system: System, folder: Path, users: Users) -> Running:
    """Start ``system``'s server with its data in ``folder``; it listens when this returns."""
    server: VaultServer | PeerServer
    if system.key == "messagevault-ds":
        server = _vault_durable_streams(folder)
    elif system.key == "ds-reference":
        server = ReferenceServer(folder)
    elif system.binary is None:
        server = VaultServer(folder, users)
    else:
        server = _peer(system, folder)
    try:
        server.wait_until_up()
    except BaseException:  # Ctrl-C too: the caller never got the PID to stop
        server.stop()
        raise
    return server


def _peer(system: System, folder: Path) -> PeerServer:
    """Redis or NATS started with its data in ``folder``, not yet answering."""
    assert system.binary is not None
    binary = find_binary(system.binary)
    if binary is None:
        raise SystemExit(f"{system.binary} is not installed")
    port = free_port()
    if system.key.startswith("redis"):
        fsync = system.key.removeprefix("redis-")
        # No config file: Redis's built-in defaults, plus what durability needs.
        command = [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--daemonize", "no", "--appendonly", "yes", "--appendfsync", fsync),
        ]
    else:
        store = folder / "jetstream"
        command = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    return PeerServer(command, port, folder)


# Drivers -------------------------------------------------------------------------------


class Driver(Protocol):
    """One client of one system: connects, writes the producers' lanes, reads everything back."""

    async def open(self) -> None:
        """Connect and warm up (untimed): first requests, one write elsewhere."""

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        """Each lane is one producer's batches, sent in order, each acked before the next.

        With ``latencies``, every batch's time from send to ack is appended to it.
        """

    async def read(self, expected: int) -> tuple[list[bytes], list[bytes]]:
        """Keys and values of the stream from its start, in stream order."""

    async def read_json(self, expected: int) -> tuple[list[bytes], list[bytes]] | None:
        """The same through the system's JSON read, each message decoded; None: it has none."""

    async def stored(self) -> int:
        """How many messages the system says the stream holds."""

    async def close(self) -> None: ...


def driver(system: System, server: Running) -> Driver:
    if system.protocol == DURABLE_STREAMS:
        return DurableStreamsDriver(f"http://127.0.0.1:{server.port}", system.key, STREAM)
    if system.binary is None:
        return VaultDriver(f"http://127.0.0.1:{server.port}")
    if system.key.startswith("redis"):
        return RedisDriver(server.port)
    return NatsDriver(server.port)


class Lanes:
    """Producer threads for a blocking client; on Ctrl-C they stop after their current batch."""

    def __init__(self, send: Callable[[Batch], None]) -> None:
        self.send = send
        self.stopping = threading.Event()

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        def write_all() -> None:
            if len(lanes) == 1:
                self.lane(lanes[0], latencies)
                return
            with ThreadPoolExecutor(len(lanes)) as pool:
                for sent in [pool.submit(self.lane, lane, latencies) for lane in lanes]:
                    sent.result()

        try:
            await asyncio.to_thread(write_all)
        except asyncio.CancelledError:
            # asyncio.run waits for the thread before it lets KeyboardInterrupt go.
            self.stopping.set()
            raise

    def lane(self, lane: list[Batch], latencies: list[float] | None) -> None:
        for batch in lane:
            if self.stopping.is_set():
                return
            started = time.perf_counter()
            self.send(batch)
            if latencies is not None:
                latencies.append(time.perf_counter() - started)


class VaultDriver:
    """MessageVault's client library: blocking ``Client`` for one producer, ``AsyncClient`` else."""

    def __init__(self, url: str) -> None:
        self.client = Client(url, user=USER, password=PASSWORD)
        self.async_client = AsyncClient(url, user=USER, password=PASSWORD)

    async def open(self) -> None:
        # The first request checks the password (argon2, slow by design, then cached).
        await asyncio.to_thread(self.client.streams)
        await asyncio.to_thread(self.client.publish, "warmup", [(b"k", b"v")])
        await self.async_client.publish("warmup", [(b"k", b"v")])

    def _send(self, batch: Batch) -> None:
        if self.client.publish(STREAM, batch).message_count != len(batch):
            raise SystemExit("MessageVault: the receipts do not cover the batch")

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        if len(lanes) == 1:
            # The blocking client is the faster one for a single producer
            # (README); its thread is the only busy one meanwhile.
            await Lanes(self._send).write(lanes, latencies)
            return
        await asyncio.gather(*(self._lane(lane, latencies) for lane in lanes))

    async def _lane(self, lane: list[Batch], latencies: list[float] | None) -> None:
        for batch in lane:
            started = time.perf_counter()
            if (await self.async_client.publish(STREAM, batch)).message_count != len(batch):
                raise SystemExit("MessageVault: the receipts do not cover the batch")
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    async def read(self, expected: int) -> tuple[list[bytes], list[bytes]]:
        def read_all() -> tuple[list[bytes], list[bytes]]:
            messages = list(self.client.read(STREAM))
            return [m.key for m in messages], [m.value for m in messages]

        return await asyncio.to_thread(read_all)

    async def read_json(self, expected: int) -> tuple[list[bytes], list[bytes]] | None:
        def read_all() -> tuple[list[bytes], list[bytes]]:
            keys: list[bytes] = []
            values: list[bytes] = []
            for record in self.client.read_records(STREAM):
                # As a reader of the records must: text unless they say base64.
                if record["encoding"] != "utf-8" or "key_encoding" in record:
                    raise SystemExit(f"MessageVault: a record in base64: {record!r:.200}")
                keys.append(record["key"].encode())
                values.append(record["value"].encode())
            return keys, values

        return await asyncio.to_thread(read_all)

    async def stored(self) -> int:
        return (await asyncio.to_thread(self.client.info, STREAM)).messages

    async def close(self) -> None:
        self.client.close()
        await self.async_client.aclose()


class RedisDriver:
    """redis-py (hiredis parser): pipelined XADD per batch, XRANGE pages to read."""

    def __init__(self, port: int) -> None:
        import redis

        # Thread-safe, with a pool of connections: one per producer thread.
        self.client = redis.Redis(host="127.0.0.1", port=port)

    async def open(self) -> None:
        import redis.utils

        if not redis.utils.HIREDIS_AVAILABLE:
            raise SystemExit("redis-py does not see hiredis: pip install -e '.[bench]'")
        await asyncio.to_thread(self.client.xadd, "warmup", {b"k": b"v"})

    def _send(self, batch: Batch) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in batch:
            pipe.xadd(STREAM, {b"k": key, b"v": value})
        if len(pipe.execute()) != len(batch):
            raise SystemExit("Redis: the pipeline's answers do not cover the batch")

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        # One thread per producer with the blocking client: measured faster than
        # redis.asyncio's pipelines (~50 against ~38k msgs/s for one producer,
        # ~120 against ~80k for 16).
        await Lanes(self._send).write(lanes, latencies)

    async def read(self, expected: int) -> tuple[list[bytes], list[bytes]]:
        def read_all() -> tuple[list[bytes], list[bytes]]:
            keys: list[bytes] = []
            values: list[bytes] = []
            start: bytes | str = "-"
            while page := self.client.xrange(STREAM, min=start, max="+", count=READ_PAGE):
                keys += [fields[b"k"] for _, fields in page]
                values += [fields[b"v"] for _, fields in page]
                start = b"(" + page[-1][0]  # exclusive: after the last entry read
            return keys, values

        return await asyncio.to_thread(read_all)

    async def read_json(self, expected: int) -> tuple[list[bytes], list[bytes]] | None:
        return None  # XRANGE answers in RESP; the table sets the JSON read against it

    async def stored(self) -> int:
        return int(await asyncio.to_thread(self.client.xlen, STREAM))

    async def close(self) -> None:
        self.client.close()


class NatsDriver:
    """nats-py JetStream: ``publish_async`` per message, the batch's acks gathered; pull fetch."""

    def __init__(self, port: int) -> None:
        self.url = f"nats://127.0.0.1:{port}"
        self.connection: Any = None
        self.jetstream: Any = None

    async def open(self) -> None:
        import nats
        from nats.js.api import StorageType

        self.connection = await nats.connect(self.url, allow_reconnect=False)
        self.jetstream = self.connection.jetstream()
        await self.jetstream.add_stream(
            name=STREAM, subjects=[SUBJECTS + ">"], storage=StorageType.FILE
        )
        await self.jetstream.add_stream(
            name="warmup", subjects=["warmup"], storage=StorageType.FILE
        )
        await self.jetstream.publish("warmup", b"v")

    async def _send(self, batch: Batch) -> None:
        publish = self.jetstream.publish_async
        futures = [await publish(SUBJECTS + key.decode(), value) for key, value in batch]
        acks = await asyncio.gather(*futures)
        if len({ack.seq for ack in acks if ack.stream == STREAM}) != len(batch):
            raise SystemExit("NATS: the acks do not cover the batch")

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        await asyncio.gather(*(self._lane(lane, latencies) for lane in lanes))

    async def _lane(self, lane: list[Batch], latencies: list[float] | None) -> None:
        for batch in lane:
            started = time.perf_counter()
            await self._send(batch)
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    async def read(self, expected: int) -> tuple[list[bytes], list[bytes]]:
        # A pull consumer fetching 10,000 at a time, bounded in memory. An
        # ordered (push) consumer was ~1.5x faster on 200,000 messages, but on
        # 500,000 nats-py dropped messages as a slow consumer (100,000 pending):
        # the server pushes faster than a Python reader takes them.
        import nats.errors
        from nats.js.api import AckPolicy, ConsumerConfig

        subscription = await self.jetstream.pull_subscribe(
            SUBJECTS + ">",
            durable="reader",
            stream=STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),  # a replay: nothing to ack
        )
        keys: list[bytes] = []
        values: list[bytes] = []
        skip = len(SUBJECTS)
        while len(keys) < expected:
            try:
                page = await subscription.fetch(min(READ_PAGE, expected - len(keys)), timeout=10)
            except nats.errors.TimeoutError:
                break  # fewer than expected: the verification says so
            keys += [m.subject[skip:].encode() for m in page]
            values += [m.data for m in page]
        await subscription.unsubscribe()
        return keys, values

    async def read_json(self, expected: int) -> tuple[list[bytes], list[bytes]] | None:
        return None  # messages come as bytes; the table sets the JSON read against fetch

    async def stored(self) -> int:
        return int((await self.jetstream.stream_info(STREAM)).state.messages)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
