"""HTTP benchmark: `messagevault serve` in its own process, loaded over loopback by aiohttp.

    make bench-http            # full size, 3 runs per case, medians
    python benchmarks/http.py --scale 0.1 --runs 1
    python benchmarks/http.py --only W1 --runs 1 --profile /tmp/prof   # cProfile the server

The server runs as a subprocess on the file backend with fsync per commit
(``serve --fsync always``); this process is the load client (one asyncio loop,
one aiohttp session with a connection pool, HTTP Basic auth). Every case gets
a fresh data folder and a fresh server, stopped by PID when the case ends.

Workloads (keys b"key-%012d", 16 bytes; values printable ASCII, so that JSON
reads carry them as UTF-8 text, not base64):
  W1  1,000,000 x 100 B in batches of 1,000; 1, 4 and 8 concurrent producers (--producers)
  W2    200,000 x 1,000 B in batches of 100; 1, 4 and 8 producers
  W3  2,000 sequential batches of 10 x 100 B, 1 producer: ack latency p50/p99/max
  W4  1,000,000 x 100 B in batches of 100, 16 concurrent producers on one stream
W1, W2 (at the most producers) and W4 run a second time with the request
header ``Prefer: return=minimal``: the answer then carries the batch's first
and last receipts (from which the client can derive the rest) instead of one
JSON receipt per message, which costs the server ~0.45 us and the client
more than that per message.
W1 with one producer also runs through the client library (``--clients``):
``Client.publish`` (blocking, in a thread) and the producers of
``messagevault stress`` (``messagevault.stress.driver``, ``AsyncClient.publish``
on the event loop: the one asyncio load driver, shared with the stress
command) send the same batches, held ready as lists of (key, value) pairs and
encoded by ``publish`` inside the timing, and read them back with ``read`` (a
"read client" phase: every frame's CRCs checked, one ``Message`` per message).
Next to them, the raw driver with minimal answers at one producer: the client
library asks for those too, so the two compare like for like. The table's
last lines give the client's share of the raw driver's msgs/s. The raw driver
(aiohttp, frames pre-encoded before the clock starts) stays for the other
cases because it measures the server alone, without the client library's
encoding: the ceiling the targets and the peers' figures are set against.
W3's percentiles come from an HDR histogram (``messagevault.stress.stats``).
All producers write to one stream and wait for each batch's ack before they
send their next one, so more producers is what gives group commit something
to group. Batches are sent as application/x-messagevault-batch bodies,
pre-encoded with ``encode_batch(pairs).frame()`` before the clock starts, as a
client library would hold them ready; every ack's JSON is parsed and checked.
Commits are the stream checkpoint's commit counter after the case.

Everything is then read back by one consumer through
GET /streams/{stream}/messages?from=POS&limit=10000, once per read format
(--read-formats, default json,binary): JSON pages paged by ``next``, and the
stored frames themselves (Accept: application/x-messagevault-batch, no limit:
up to 8 MiB of frames a page, paged by X-Next), whose headers and CRCs the
client checks as the client library would; ndjson on request. Each timed
read checks every message's key, value and sequence; afterwards the
benchmark checks that each message arrived exactly once and each producer's
messages in the order it sent them.

Server and client CPU time are reported as a share of one core for each phase
(the machine may have only 2 cores, shared by both processes). Peer figures
come from /work/shared/notes/peers.md. Results go to benchmarks/results/http-<time>.json.
"""

# ruff: noqa: E402 - the imports must follow the sys.path fix below

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where this very
# file would shadow the standard library's ``http`` package (aiohttp and urllib
# import it); the repo root instead makes tests/azurite.py importable.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import base64
import dataclasses
import gc
import json
import random
import shutil
import statistics
import string
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import aiohttp
from benchmarks.report import (
    Clock,
    Phase,
    Rates,
    benchmark_arguments,
    save_results,
    scaled_messages,
)
from benchmarks.serving import PASSWORD, USER, Server
from rich.console import Console
from rich.table import Table

from messagevault import FileStorage, Message, Reader, encode_batch
from messagevault.client import AsyncClient, Client
from messagevault.format import frame_columns, read_header
from messagevault.server.auth import Users
from messagevault.stress.driver import Connection
from messagevault.stress.driver import run as stress_run
from messagevault.stress.stats import Latency, Recorder
from messagevault.stress.workload import Plan

STREAM_PREFIX = "bench"
STREAM = f"{STREAM_PREFIX}-0"  # the name the stress engine gives its first stream
BATCH_CONTENT_TYPE = "application/x-messagevault-batch"
READ_LIMIT = 10_000  # the server's max_read_messages


@dataclass(frozen=True)
class Workload:
    name: str
    messages: int
    value_size: int
    batch_size: int
    producers: int
    latency: bool = False  # W3: time every request, report percentiles
    # "full": one receipt per message (the default answer); "minimal": the
    # producer sends Prefer: return=minimal and gets first/last receipts.
    receipts: str = "full"
    # "raw": this file's aiohttp loop with pre-encoded frames; "client" and
    # "async-client": messagevault.client's Client / AsyncClient.
    driver: str = "raw"

    @property
    def label(self) -> str:
        suffix = "-minimal" if self.receipts == "minimal" else ""
        driver = "" if self.driver == "raw" else f"-{self.driver}"
        return f"{self.name}x{self.producers}{suffix}{driver}"


CLIENT_DRIVERS = ("client", "async-client")


def workloads(producers: list[int], clients: bool = True) -> list[Workload]:
    """The issue's workloads; W1 and W2 once per producer count (``--producers``).

    W1, W2 and W4 run once more with ``Prefer: return=minimal`` (write only:
    the stored stream is the same), at the largest producer count. With
    ``clients``, W1 with one producer runs through the client library, and
    through the raw driver with minimal answers, the client's own kind.
    """
    most = max(producers)
    by_client = [
        Workload("W1", 1_000_000, 100, 1_000, 1, receipts="minimal", driver=driver)
        for driver in ("raw", *CLIENT_DRIVERS)
        if driver != "raw" or most > 1  # else the minimal case above is this one
    ]
    return [
        *(Workload("W1", 1_000_000, 100, 1_000, p) for p in producers),
        Workload("W1", 1_000_000, 100, 1_000, most, receipts="minimal"),
        *(by_client if clients else []),
        *(Workload("W2", 200_000, 1_000, 100, p) for p in producers),
        Workload("W2", 200_000, 1_000, 100, most, receipts="minimal"),
        Workload("W3", 20_000, 100, 10, 1, latency=True),
        # The issue gives no size for W4; W1's million messages keeps it comparable.
        Workload("W4", 1_000_000, 100, 100, 16),
        Workload("W4", 1_000_000, 100, 100, 16, receipts="minimal"),
    ]


# (workload, phase) -> msgs/s target, from the issue.
TARGETS: dict[tuple[str, str], float] = {
    ("W1", "write"): 1_000_000,
    ("W1", "read"): 1_000_000,
    ("W2", "write"): 200_000,
    ("W4", "write"): 500_000,
}
W3_TARGET_MS = {"p50": 1.0, "p99": 3.0}

# From /work/shared/notes/peers.md (2026-11-26, same machine kind, one producer,
# Python clients): Redis Streams with AOF always (the comparable durability)
# and NATS JetStream (fsync every 2 min; its reads by pull fetch, push
# consumers reached 85-111k). Ranges are the notes' two runs; W3 is p50/p99.
PEERS: dict[tuple[str, str], str] = {
    ("W1", "write"): "Redis 49-64k, NATS 23-24k",
    ("W1", "read"): "Redis 186-222k, NATS 24k",
    ("W2", "write"): "Redis 22-37k, NATS 24-28k",
    ("W2", "read"): "Redis 133-197k, NATS 26k",
    ("W3", "write"): "Redis 0.24-0.35/0.45-2.8 ms, NATS 0.52/1.1-1.8",
}


@dataclass
class Case(Rates):
    workload: str
    producers: int
    phase: str  # "write", or "read <format>"
    messages: int
    payload_bytes: int  # keys + values
    receipts: str = "full"  # writes: "minimal" when sent with Prefer: return=minimal
    driver: str = "raw"  # or "client", "async-client": messagevault.client did the work
    seconds: list[float] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)  # writes only
    server_cpu_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # W3 writes

    @property
    def kind(self) -> str:
        """``write`` or ``read``: what targets and peer figures are keyed by."""
        return self.phase.split()[0]

    @property
    def commits_per_s(self) -> float | None:
        if not self.commits:
            return None
        return statistics.median(c / s for c, s in zip(self.commits, self.seconds, strict=True))

    @property
    def msgs_per_commit(self) -> float | None:
        return self.messages / statistics.median(self.commits) if self.commits else None

    def cpu_share(self, seconds: list[float]) -> float:
        """Median CPU time per wall second (1.0 = one core busy)."""
        return statistics.median(c / s for c, s in zip(seconds, self.seconds, strict=True))

    def latency(self, name: str) -> float:
        return statistics.median(self.latency_ms[name])


@dataclass
class Data:
    """One workload's pre-built requests and what reading them back must yield."""

    frames: list[bytes]  # one pre-encoded batch per request, in key order
    keys: list[str]  # as JSON reads return them
    values: list[str]
    raw_keys: list[bytes]  # as binary reads return them
    raw_values: list[bytes]
    payload_bytes: int
    # The same batches as lists of (key, value) pairs: what a client library is given.
    batches: list[list[tuple[bytes, bytes]]] = field(default_factory=list)


def make_data(workload: Workload) -> Data:
    alphabet = string.ascii_letters + string.digits
    filler = "".join(random.Random(7).choices(alphabet, k=workload.value_size))
    count, size = workload.messages, workload.batch_size
    keys = [f"key-{i:012d}" for i in range(count)]
    values = [(f"{i:012d}" + filler)[: workload.value_size] for i in range(count)]
    raw_keys = [k.encode() for k in keys]
    raw_values = [v.encode() for v in values]
    frames = [
        encode_batch(
            list(zip(raw_keys[i : i + size], raw_values[i : i + size], strict=True))
        ).frame()
        for i in range(0, count, size)
    ]
    payload = sum(map(len, raw_keys)) + sum(map(len, raw_values))
    batches = []
    if workload.driver != "raw":
        pairs = list(zip(raw_keys, raw_values, strict=True))
        batches = [pairs[i : i + size] for i in range(0, count, size)]
    return Data(frames, keys, values, raw_keys, raw_values, payload, batches)


async def produce(
    session: aiohttp.ClientSession,
    url: str,
    frames: list[bytes],
    batch_size: int,
    latencies: list[float] | None,
    receipts: str = "full",
) -> None:
    """Send ``frames`` one after the other, each acknowledged before the next."""
    headers = {"Content-Type": BATCH_CONTENT_TYPE}
    if receipts == "minimal":
        headers["Prefer"] = "return=minimal"
    for frame in frames:
        started = time.perf_counter()
        async with session.post(url, data=frame, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise SystemExit(f"append failed: {response.status} {body[:500]!r}")
        if latencies is not None:
            latencies.append(time.perf_counter() - started)
        # A producer uses its receipts; a short ack would be a lost message.
        ack = json.loads(body)
        covered = ack["count"] if receipts == "minimal" else len(ack["messages"])
        if covered != batch_size:
            raise SystemExit(f"ack does not cover the batch: {body[:500]!r}")


def client_produce(client: Client, batches: list[list[tuple[bytes, bytes]]], size: int) -> None:
    """``Client.publish`` each batch, one after the other (it encodes them)."""
    for batch in batches:
        if client.publish(STREAM, batch).message_count != size:
            raise SystemExit("publish: the receipts do not cover the batch")


class HeldBatches:
    """The workload's batches as the stress engine's messages: producer p sends p, p+N, p+2N..."""

    def __init__(self, batches: list[list[tuple[bytes, bytes]]], producers: int, size: int) -> None:
        self._batches = batches
        self._producers = producers
        self._size = size

    def batch(
        self, producer: int, first: int, count: int, sent_ns: int
    ) -> list[tuple[bytes, bytes]]:
        batch = self._batches[producer + first // self._size * self._producers]
        if len(batch) != count:
            raise SystemExit(f"the stress engine asked for {count} messages, not {len(batch)}")
        return batch


async def stress_produce(server: Server, workload: Workload, data: Data) -> float:
    """Send every batch with ``messagevault stress``'s producers (``AsyncClient.publish``).

    Returns the seconds the writing took. The stress engine checks each
    ack; the read-back below checks what was stored.
    """
    plan = Plan(
        producers=workload.producers,
        batch_size=workload.batch_size,
        value_size=workload.value_size,
        duration=None,
        count=workload.messages,
        consumers=0,
        stream_prefix=STREAM_PREFIX,
    ).check()
    outcome = await stress_run(
        plan,
        Connection(server.base, USER, PASSWORD),
        Recorder(),
        threading.Event(),
        verify=False,
        messages=HeldBatches(data.batches, workload.producers, workload.batch_size),
    )
    if outcome.recorder.write.messages != workload.messages:
        raise SystemExit(f"{workload.label}: {outcome.recorder.write.messages} messages acked")
    return outcome.write_seconds


ACCEPT = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "binary": BATCH_CONTENT_TYPE,
}

# One page of a read: keys, values, sequences, and where the next page starts.
Page = tuple[list[Any], list[Any], list[int], int]


def json_page(body: bytes, headers: Mapping[str, str], position: int) -> Page:
    document = json.loads(body)
    messages = document["messages"]
    return (
        [m["key"] for m in messages],
        [m["value"] for m in messages],
        [m["sequence"] for m in messages],
        document["next"],
    )


def ndjson_page(body: bytes, headers: Mapping[str, str], position: int) -> Page:
    messages = [json.loads(line) for line in body.splitlines()]
    return (
        [m["key"] for m in messages],
        [m["value"] for m in messages],
        [m["sequence"] for m in messages],
        int(headers["X-Next"]),
    )


def binary_page(body: bytes, headers: Mapping[str, str], position: int) -> Page:
    """Stored frames: check headers, CRCs and columns as the client library would, then split."""
    skip = int(headers["X-Skip"])
    keys: list[bytes] = []
    values: list[bytes] = []
    sequences: list[int] = []
    offset = 0
    # Each frame must sit where the previous one ended (the first, at ``from``
    # unless the server had to start inside a frame).
    at: int | None = position if skip == 0 else None
    while offset < len(body):
        header = read_header(body, offset, at)
        # The columnar decode: keys and values cut by one struct call, no
        # per-message objects (positions and sequences follow from the header).
        frame_keys, frame_values = frame_columns(body, offset, header, skip)
        keys += frame_keys
        values += frame_values
        sequences += range(header.base_sequence + skip, header.base_sequence + header.message_count)
        offset += header.frame_size
        at, skip = header.end, 0
    return keys, values, sequences, int(headers["X-Next"])


PAGE_DECODERS: dict[str, Callable[[bytes, Mapping[str, str], int], Page]] = {
    "json": json_page,
    "ndjson": ndjson_page,
    "binary": binary_page,
}


async def read_back(
    session: aiohttp.ClientSession, data: Data, batch_size: int, read_format: str
) -> list[tuple[int, int]]:
    """Page through the stream, checking every message.

    Returns the runs of consecutive keys read, as (first key index, count), in stream order.
    """
    url = f"/streams/{STREAM}/messages"
    headers = {"Accept": ACCEPT[read_format]}
    decode = PAGE_DECODERS[read_format]
    keys, values = (
        (data.raw_keys, data.raw_values) if read_format == "binary" else (data.keys, data.values)
    )
    runs: list[tuple[int, int]] = []
    read = position = 0
    # Stored frames are the bulk path: pages of up to 8 MiB of whole frames,
    # as the client library asks for them; the others page by message count.
    limit = "" if read_format == "binary" else f"&limit={READ_LIMIT}"
    while read < len(keys):
        async with session.get(f"{url}?from={position}{limit}", headers=headers) as r:
            body = await r.read()
            if r.status != 200:
                raise SystemExit(f"{read_format} read failed: {r.status} {body[:500]!r}")
            page_keys, page_values, sequences, position = decode(body, r.headers, position)
        if not page_keys:
            raise SystemExit(f"stream ends after {read} of {len(keys)} messages")
        check_page(page_keys, page_values, sequences, read, keys, values, batch_size, runs)
        read += len(page_keys)
    return runs


def check_page(
    page_keys: list[Any],
    page_values: list[Any],
    sequences: list[int],
    read: int,
    keys: list[Any],
    values: list[Any],
    batch_size: int,
    runs: list[tuple[int, int]],
) -> None:
    """Check one page read after ``read`` messages; add its runs of consecutive keys."""
    if sequences != list(range(read, read + len(page_keys))):
        raise SystemExit(f"read: sequence gap in the page from {read}")
    # The stream holds each producer batch whole and in order, so the page
    # is runs of consecutive keys, each ending at a batch boundary at the
    # latest: comparing runs by slices keeps the checking in C, where
    # looking up every key on its own would cost more than decoding it.
    at = 0
    while at < len(page_keys):
        try:
            start = int(page_keys[at][4:])
        except ValueError:
            raise SystemExit(f"read: unexpected key {page_keys[at]!r}") from None
        length = min(batch_size - start % batch_size, len(page_keys) - at)
        end = start + length
        if (
            page_keys[at : at + length] != keys[start:end]
            or page_values[at : at + length] != values[start:end]
        ):
            raise SystemExit(f"read: content mismatch at key {start}")
        runs.append((start, length))
        at += length


CLIENT_PAGE = 10_000  # messages checked at a time when the client library reads


def client_read_back(
    messages: Iterator[Message], data: Data, batch_size: int, start: int = 0
) -> list[tuple[int, int]]:
    """Check messages the client library's ``read`` yields, the first being message ``start``.

    As ``read_back`` checks its pages; the caller checks that all came.
    """
    runs: list[tuple[int, int]] = []
    read = start
    while page := list(islice(messages, CLIENT_PAGE)):
        check_page(
            [m.key for m in page],
            [m.value for m in page],
            [m.sequence for m in page],
            read,
            data.raw_keys,
            data.raw_values,
            batch_size,
            runs,
        )
        read += len(page)
    return runs


async def async_client_read_back(
    client: AsyncClient, data: Data, batch_size: int
) -> list[tuple[int, int]]:
    """``client_read_back`` for the ``AsyncClient``: checked 10,000 messages at a time."""
    runs: list[tuple[int, int]] = []
    page: list[Message] = []
    read = 0
    async for message in client.read(STREAM):
        page.append(message)
        if len(page) == CLIENT_PAGE:
            runs += client_read_back(iter(page), data, batch_size, start=read)
            read += len(page)
            page = []
    runs += client_read_back(iter(page), data, batch_size, start=read)
    return runs


def check_order(runs: list[tuple[int, int]], workload: Workload) -> None:
    """Each message exactly once; each producer's messages in the order it sent them."""
    covered = 0
    for start, length in sorted(runs):
        if start != covered:
            raise SystemExit(f"{workload.label}: messages missing or repeated at {start}")
        covered += length
    if covered != workload.messages:
        raise SystemExit(f"{workload.label}: {covered} of {workload.messages} messages read")
    last = [-1] * workload.producers
    for start, _ in runs:
        producer = (start // workload.batch_size) % workload.producers
        if start < last[producer]:
            raise SystemExit(f"{workload.label}: producer {producer} out of order at {start}")
        last[producer] = start


async def drive(
    server: Server, workload: Workload, data: Data, read_formats: list[str]
) -> tuple[Phase, list[float], dict[str, tuple[Phase, list[tuple[int, int]]]]]:
    """Warm up, write (timed), read back in each format (timed).

    Returns the write phase, the W3 latencies, and per read format its phase
    and the runs of keys it read, in stream order.
    """
    if workload.driver != "raw":
        return await drive_client(server, workload, data)
    producers = workload.producers
    connector = aiohttp.TCPConnector(limit=producers + 1)
    # Built by hand: aiohttp's BasicAuth helpers differ between its versions.
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    async with aiohttp.ClientSession(server.base, connector=connector, headers=headers) as session:
        # Untimed: the first request verifies the password (argon2, ~0.2 s by
        # design, then cached); then open every pooled connection and run one
        # append through the server's code paths on another stream.
        async with session.get("/streams") as response:
            if response.status != 200:
                raise SystemExit(f"warm-up failed: {response.status} {await response.text()}")

        async def ping() -> None:
            async with session.get("/streams") as response:
                await response.read()

        await asyncio.gather(*(ping() for _ in range(producers)))
        await produce(session, "/streams/warmup", data.frames[:1], workload.batch_size, None)

        latencies: list[float] = []
        clock = Clock(server)
        await asyncio.gather(
            *(
                produce(
                    session,
                    f"/streams/{STREAM}",
                    data.frames[p::producers],
                    workload.batch_size,
                    latencies if workload.latency else None,
                    workload.receipts,
                )
                for p in range(producers)
            )
        )
        write = clock.stop()

        reads: dict[str, tuple[Phase, list[tuple[int, int]]]] = {}
        for read_format in read_formats:
            clock = Clock(server)
            runs = await read_back(session, data, workload.batch_size, read_format)
            reads[read_format] = (clock.stop(), runs)
    return write, latencies, reads


async def drive_client(
    server: Server, workload: Workload, data: Data
) -> tuple[Phase, list[float], dict[str, tuple[Phase, list[tuple[int, int]]]]]:
    """``drive`` through the client library: publish every batch, then read them back.

    The blocking ``Client`` runs on this thread (the event loop has nothing
    else to do meanwhile); the ``AsyncClient`` on the loop.
    """
    size = workload.batch_size
    if workload.driver == "client":
        with Client(server.base, user=USER, password=PASSWORD) as client:
            # Untimed, as for the raw driver: the password check, a connection, one append.
            client.streams()
            client.publish("warmup", data.batches[0])
            clock = Clock(server)
            client_produce(client, data.batches, size)
            write = clock.stop()
            clock = Clock(server)
            runs = client_read_back(client.read(STREAM), data, size)
            read = clock.stop()
    else:
        async with AsyncClient(server.base, user=USER, password=PASSWORD) as async_client:
            await async_client.streams()
            await async_client.publish("warmup", data.batches[0])
            clock = Clock(server)
            seconds = await stress_produce(server, workload, data)
            # The engine's own clock leaves out its set-up (password check, stream info).
            write = dataclasses.replace(clock.stop(), seconds=seconds)
            clock = Clock(server)
            runs = await async_client_read_back(async_client, data, size)
            read = clock.stop()
    if sum(length for _, length in runs) != workload.messages:
        raise SystemExit(f"{workload.label}: the client read fewer than {workload.messages}")
    return write, [], {"client": (read, runs)}


def run_once(
    workload: Workload,
    data: Data,
    users: Users,
    write: Case,
    reads: dict[str, Case],
    args: argparse.Namespace,
    run: int,
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mv-bench-http-", dir=args.dir))
    server: Server | None = None
    try:
        profile = None
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile = args.profile / f"server-{workload.label}-run{run}.prof"
        server = Server(folder, profile, users=users)
        server.wait_until_up()
        writing, latencies, reading = asyncio.run(drive(server, workload, data, list(reads)))
        with Reader.open(FileStorage(folder / "data"), STREAM) as reader:
            checkpoint = reader.checkpoint()
        if checkpoint.next_sequence != workload.messages:
            raise SystemExit(f"{workload.label}: {checkpoint.next_sequence} messages stored")
        for _, runs in reading.values():
            check_order(runs, workload)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    phases = [(write, writing)] + [(reads[f], phase) for f, (phase, _) in reading.items()]
    for case, phase in phases:
        case.seconds.append(phase.seconds)
        case.server_cpu_s.append(phase.server_cpu_s)
        case.client_cpu_s.append(phase.client_cpu_s)
    write.commits.append(checkpoint.commit)
    if latencies:
        histogram = Latency()  # the stress command's HDR histogram, not percentiles by hand
        for seconds in latencies:
            histogram.record(seconds)
        summary = histogram.summary()
        for name in ("p50", "p99", "max"):
            write.latency_ms.setdefault(name, []).append(summary[name])


def print_progress(label: str, run: int, runs: int, cases: list[Case]) -> None:
    """One line per case and run as they finish: a long benchmark is never silent."""
    phases = ", ".join(
        f"{case.phase} {case.messages / case.seconds[-1]:,.0f} msgs/s" for case in cases
    )
    print(f"{label} run {run + 1}/{runs}: {phases}", flush=True)


def target_mark(case: Case) -> str:
    if case.workload == "W3" and case.phase == "write":
        marks = [
            f"{name}<={limit:g}ms {'ok' if case.latency(name) <= limit else 'MISSED'}"
            for name, limit in W3_TARGET_MS.items()
        ]
        return ", ".join(marks)
    target = TARGETS.get((case.workload, case.kind))
    if target is None:
        return ""
    return f">= {target:,.0f} {'ok' if case.msgs_per_s >= target else 'MISSED'}"


def scaled(base: Workload, scale: float) -> Workload:
    """Fewer messages (whole batches, at least one per producer); the rest unchanged."""
    messages = scaled_messages(base.messages, base.batch_size, base.producers, scale)
    return dataclasses.replace(base, messages=messages)


WIDTH = 100  # the tables fit a terminal of 100 columns


def _short_case(case: Case) -> str:
    driver = {"raw": "", "client": " client", "async-client": " async"}[case.driver]
    return f"{case.workload} x{case.producers}{driver}"


def _short_phase(case: Case) -> str:
    return "write (min)" if case.receipts == "minimal" else case.phase


def _short_target(case: Case) -> str:
    """``target_mark`` in fewer characters: ">=1M ok", "p50<=1ms ok, p99<=3ms MISSED"."""
    if case.workload == "W3" and case.phase == "write":
        return target_mark(case).replace(" ok", "").replace(" MISSED", "!")
    target = TARGETS.get((case.workload, case.kind))
    if target is None:
        return ""
    amount = f"{target / 1e6:g}M" if target >= 1e6 else f"{target / 1e3:g}k"
    return f">={amount} {'ok' if case.msgs_per_s >= target else 'MISSED'}"


def print_table(cases: list[Case], args: argparse.Namespace) -> None:
    """Two tables of at most 100 columns (rates; latency and costs), then the peers' figures."""
    console = Console(width=WIDTH)
    rates = Table(
        title=f"MessageVault HTTP, serve --fsync always, file backend: median of {args.runs} "
        f"(scale {args.scale})",
        caption="Raw driver: batches pre-encoded before timing; client/async: the client "
        "library (async: messagevault stress's producers). Each producer waits for its ack. "
        "(min): Prefer: return=minimal. Reads: one consumer, every message checked.",
    )
    for column in ("case", "phase", "msgs/s", "MB/s", "commits/s", "msgs/commit", "target"):
        rates.add_column(column, justify="left" if column in ("case", "phase") else "right")
    costs = Table(
        title="Ack latency (W3, HDR histogram), CPU as a share of one core, run times",
        caption="target: W3 p50<=1ms and p99<=3ms; ! marks a miss",
    )
    for column in ("case", "phase", "ack ms p50/p99/max", "server CPU", "client CPU", "runs s"):
        costs.add_column(column, justify="left" if column in ("case", "phase") else "right")
    for case in cases:
        commits, per_commit = case.commits_per_s, case.msgs_per_commit
        name, phase = _short_case(case), _short_phase(case)
        rates.add_row(
            name,
            phase,
            f"{case.msgs_per_s:,.0f}",
            f"{case.mb_per_s:,.1f}",
            "" if commits is None else f"{commits:,.0f}",
            "" if per_commit is None else f"{per_commit:,.0f}",
            _short_target(case),
        )
        latency = (
            "/".join(f"{case.latency(n):.2f}" for n in ("p50", "p99", "max"))
            if case.latency_ms
            else ""
        )
        costs.add_row(
            name,
            phase,
            latency,
            f"{case.cpu_share(case.server_cpu_s):.0%}",
            f"{case.cpu_share(case.client_cpu_s):.0%}",
            f"{min(case.seconds):.2f}..{max(case.seconds):.2f}",
        )
    console.print(rates)
    console.print(costs)
    print("Peers (peers.md, one producer; Redis AOF always / NATS):")
    for (workload, kind), figures in PEERS.items():
        if any(c.workload == workload and c.kind == kind for c in cases):
            print(f"  {workload} {kind}: {figures}")
    for line in client_shares(cases).values():
        print(textwrap.fill(line, WIDTH, subsequent_indent="  "))


def _find(cases: list[Case], phase: str, receipts: str, driver: str) -> Case | None:
    for case in cases:
        if (case.workload, case.producers, case.phase, case.receipts, case.driver) == (
            "W1",
            1,
            phase,
            receipts,
            driver,
        ):
            return case
    return None


def client_shares(cases: list[Case]) -> dict[str, str]:
    """The client library's msgs/s as a share of the raw driver's, W1 with one producer."""
    shares: dict[str, str] = {}
    raw_minimal = _find(cases, "write", "minimal", "raw")
    raw_full = _find(cases, "write", "full", "raw")
    raw_read = _find(cases, "read binary", "full", "raw")
    for driver in CLIENT_DRIVERS:
        write = _find(cases, "write", "minimal", driver)
        read = _find(cases, "read client", "full", driver)
        parts = []
        if write is not None and raw_minimal is not None:
            parts.append(
                f"publish {write.msgs_per_s / raw_minimal.msgs_per_s:.0%} of the raw driver "
                "(minimal answers, batches pre-encoded)"
            )
        if write is not None and raw_full is not None:
            parts.append(
                f"{write.msgs_per_s / raw_full.msgs_per_s:.0%} of raw W1 x1 (full answers)"
            )
        if read is not None and raw_read is not None:
            parts.append(f"read {read.msgs_per_s / raw_read.msgs_per_s:.0%} of raw binary reads")
        if parts:
            shares[driver] = f"W1 x1, {driver}: " + "; ".join(parts)
    return shares


def save(cases: list[Case], args: argparse.Namespace) -> Path:
    records: list[dict[str, Any]] = []
    for case in cases:
        record: dict[str, Any] = {
            **asdict(case),
            "median_s": case.median,
            "msgs_per_s": case.msgs_per_s,
            "mb_per_s": case.mb_per_s,
            "commits_per_s": case.commits_per_s,
            "msgs_per_commit": case.msgs_per_commit,
            "server_cpu_share": case.cpu_share(case.server_cpu_s),
            "client_cpu_share": case.cpu_share(case.client_cpu_s),
            "target": target_mark(case) or None,
            "peers": PEERS.get((case.workload, case.kind)),
        }
        if case.latency_ms:
            record["median_latency_ms"] = {n: case.latency(n) for n in case.latency_ms}
        records.append(record)
    return save_results(
        args.output,
        "http",
        {
            "runs": args.runs,
            "scale": args.scale,
            "settings": {
                "server": "messagevault serve --fsync always, file backend, subprocess",
                "client": "aiohttp, one process, one session, batches pre-encoded",
                "read_formats": args.read_formats,
                "read_limit": READ_LIMIT,
                "profiled": args.profile is not None,
            },
            "client_shares": client_shares(cases),
        },
        records,
        {"aiohttp": aiohttp.__version__},
    )


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the data folders")
    parser.add_argument(
        "--read-formats",
        default="json,binary",
        help="comma-separated read formats, each timed separately: json, ndjson, binary "
        "(the stored frames, Accept: application/x-messagevault-batch)",
    )
    parser.add_argument(
        "--producers",
        default="1,4,8",
        help="comma-separated concurrent producer counts for W1 and W2 (default 1,4,8)",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated workloads to run, e.g. W1,W3 (default all)"
    )
    parser.add_argument(
        "--no-clients",
        dest="clients",
        action="store_false",
        help="skip the W1 x1 cases through the client library (and their raw counterpart)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the server under cProfile, one .prof file per case and run in this folder "
        "(slows the server: figures are then not comparable)",
    )
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    args.read_formats = args.read_formats.split(",")
    if unknown := set(args.read_formats) - set(ACCEPT):
        parser.error(f"unknown read formats {sorted(unknown)}; choose from {sorted(ACCEPT)}")

    # One argon2 hash for every case's users file (hashing is slow on purpose).
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])

    cases: list[Case] = []
    for base in workloads([int(p) for p in args.producers.split(",")], args.clients):
        if wanted is not None and base.name not in wanted:
            continue
        workload = scaled(base, args.scale)
        data = make_data(workload)
        # The stored stream does not depend on the answer's shape: a minimal
        # variant is read back (and checked) in the fastest format only.
        read_formats = args.read_formats if workload.receipts == "full" else [args.read_formats[-1]]
        if workload.driver != "raw":
            read_formats = ["client"]  # through the client library's read
        write, *read_cases = (
            Case(
                workload.name,
                workload.producers,
                phase,
                workload.messages,
                data.payload_bytes,
                workload.receipts if phase == "write" else "full",
                workload.driver,
            )
            for phase in ["write"] + [f"read {f}" for f in read_formats]
        )
        reads = dict(zip(read_formats, read_cases, strict=True))
        # The harness holds millions of pre-built objects that a real client
        # would not; freezing them keeps every GC pass from rescanning them.
        gc.collect()
        gc.freeze()
        for run in range(args.runs):
            run_once(workload, data, users, write, reads, args, run)
            print_progress(workload.label, run, args.runs, [write, *read_cases])
        cases += [write, *read_cases]
        del data
        gc.unfreeze()
        gc.collect()

    print_table(cases, args)
    print(f"saved {save(cases, args)}")


if __name__ == "__main__":
    main()
