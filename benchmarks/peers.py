"""Peer benchmark: MessageVault against Redis Streams, NATS JetStream and Durable Streams, one run.

    make bench-peers                                    # full size, 3 runs, medians
    python benchmarks/peers.py --scale 0.05 --runs 1    # a quick look
    python benchmarks/peers.py --only W3,messagevault,redis-always
    python benchmarks/peers.py --only messagevault,ds     # Durable Streams: both servers

Systems (benchmarks/peer_systems.py says how each is started and driven):
  messagevault    ``messagevault serve --fsync always`` on file storage, its client library
  redis-always    redis-server, AOF with appendfsync always, redis-py + hiredis
  redis-everysec  the same with appendfsync everysec
  nats            nats-server -js, file storage, nats-py
  messagevault-ds  the same MessageVault server's Durable Streams endpoint (/v1/stream/),
                  driven over the protocol by benchmarks/ds_driver.py
  ds-reference    the protocol's Node reference server (@durable-streams/server, from
                  package.json's node_modules), file-backed, driven by the same driver
                  (``ds`` names both Durable Streams systems)
Redis's and NATS's servers come from Debian's packages, installed with apt-get when
missing (``--no-install`` skips a missing one instead); a peer that cannot run
here is skipped, and the table says so loudly. Each case gets a fresh server on
a free 127.0.0.1 port with a temporary folder, stopped by PID when it ends,
also on failure or Ctrl-C.

Workloads (keys b"key-%012d", 16 bytes; values printable ASCII):
  W1  1,000,000 x 100 B in batches of 1,000, one producer
  W2    200,000 x 1,000 B in batches of 100, one producer
      (both also read back as JSON: MessageVault's ``Client.read_records``)
  W3  2,000 sequential batches of 10 x 100 B: ack latency p50/p99
  W4  1,000,000 x 100 B in batches of 100 from 16 concurrent producers
The messages are built once per workload and the same lists go to every
system. Every producer waits for a batch's ack before it sends its next one.
Then one consumer reads everything back from the start (timed), and the same
check runs for every system (untimed): the count read and stored, every key
and value, each message once, and each producer's messages in the order it
sent them. A mismatch stops the benchmark with an error naming the message.

The table gives msgs/s (write, read) and W3's ack latency, each a median over
``--runs``, and for every peer's cell the ratio MessageVault / peer. The Durable
Streams systems get a table of their own, beside MessageVault's native API, with
the ratios MessageVault native / reference and MessageVault DS / reference. Results go
to benchmarks/results/peers-<time>.json and .md, with the machine and versions
(benchmarks/peer_report.py); ``--readme`` copies the newest table into README.md.
"""

# ruff: noqa: E402 - the imports must follow the sys.path fix below

from __future__ import annotations

import sys
from pathlib import Path

# As a script, this folder would come first on sys.path, where benchmarks/http.py
# shadows the standard library's ``http``; the repo root goes there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import gc
import random
import shutil
import string
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from benchmarks.peer_report import (
    DS_RATIO_NOTE,
    RATIO_NOTE,
    README,
    TABLE_WIDTH,
    VAULT,
    Result,
    cpu_note,
    ds_table_cells,
    has_columns,
    notes,
    refresh_readme,
    render_table,
    save,
    table_cells,
)
from benchmarks.peer_systems import (
    BY_KEY,
    SYSTEMS,
    Batch,
    Running,
    System,
    apt_binaries,
    driver,
    find_binary,
    install,
    missing_clients,
    missing_server,
    start,
    versions,
)
from benchmarks.report import Clock, Phase, benchmark_arguments, scaled_messages

from messagevault.server.auth import Users
from messagevault.stress.stats import Latency


@dataclass(frozen=True)
class Workload:
    name: str
    messages: int
    value_size: int
    batch_size: int
    producers: int
    latency: bool = False  # W3: every batch's ack time is kept
    json_read: bool = False  # W1, W2: read back a second time as JSON where a system can


WORKLOADS = (
    Workload("W1", 1_000_000, 100, 1_000, 1, json_read=True),
    Workload("W2", 200_000, 1_000, 100, 1, json_read=True),
    Workload("W3", 20_000, 100, 10, 1, latency=True),
    Workload("W4", 1_000_000, 100, 100, 16),
)


def scaled(workload: Workload, scale: float) -> Workload:
    """Fewer messages (whole batches, at least one per producer); the rest unchanged."""
    messages = scaled_messages(workload.messages, workload.batch_size, workload.producers, scale)
    return replace(workload, messages=messages)


@dataclass
class Data:
    """One workload's messages, built once and handed to every system."""

    keys: list[bytes]
    values: list[bytes]
    batches: list[Batch]
    payload_bytes: int  # keys + values

    def lanes(self, producers: int) -> list[list[Batch]]:
        """Producer p sends batches p, p + producers, p + 2 * producers..."""
        return [self.batches[p::producers] for p in range(producers)]


def make_data(workload: Workload) -> Data:
    alphabet = string.ascii_letters + string.digits
    filler = "".join(random.Random(7).choices(alphabet, k=workload.value_size)).encode()
    count, size = workload.messages, workload.batch_size
    keys = [b"key-%012d" % i for i in range(count)]
    values = [(b"%012d" % i + filler)[: workload.value_size] for i in range(count)]
    pairs = list(zip(keys, values, strict=True))
    batches = [pairs[i : i + size] for i in range(0, count, size)]
    payload = sum(map(len, keys)) + sum(map(len, values))
    return Data(keys, values, batches, payload)


class VerificationFailed(Exception):
    """What a system read back is not what was written."""


def verify(
    keys: list[bytes], values: list[bytes], stored: int, workload: Workload, data: Data
) -> None:
    """The same check for every system: count, every key and value, once each, producer order."""
    if stored != workload.messages:
        raise VerificationFailed(f"the stream holds {stored} messages, {workload.messages} sent")
    if len(keys) != workload.messages or len(values) != len(keys):
        raise VerificationFailed(f"read {len(keys)} messages back, {workload.messages} sent")
    if keys == data.keys and values == data.values:
        return  # in sending order: every producer's order holds (the common case, in C)
    seen = bytearray(workload.messages)
    last = [-1] * workload.producers
    for at, (key, value) in enumerate(zip(keys, values, strict=True)):
        index = int(key[4:]) if key[:4] == b"key-" and key[4:].isdigit() else -1
        if not 0 <= index < workload.messages or data.keys[index] != key:
            raise VerificationFailed(f"message {at}: unexpected key {key[:40]!r}")
        if value != data.values[index]:
            raise VerificationFailed(f"message {at} ({key.decode()}): the value differs")
        if seen[index]:
            raise VerificationFailed(f"message {at} ({key.decode()}): read twice")
        seen[index] = 1
        producer = (index // workload.batch_size) % workload.producers
        if index < last[producer]:
            raise VerificationFailed(
                f"message {at} ({key.decode()}): producer {producer}'s messages out of order"
            )
        last[producer] = index


@dataclass
class Measured:
    write: Phase
    read: Phase
    latencies: list[float]
    keys: list[bytes]
    values: list[bytes]
    stored: int
    # The JSON read (W1, W2 of a system that has one): its phase, keys and values.
    read_json: tuple[Phase, list[bytes], list[bytes]] | None = None


Say = Callable[[str], None]


async def drive(
    system: System, server: Running, workload: Workload, data: Data, say: Say
) -> Measured:
    """Warm up, write every lane (timed), read the stream back (timed)."""
    client = driver(system, server)
    case = f"{system.key} {workload.name}"
    try:
        await client.open()
        latencies: list[float] = []
        say(f"{case}: writing {workload.messages:,} messages")
        clock = Clock(server)
        await client.write(data.lanes(workload.producers), latencies if workload.latency else None)
        write = clock.stop()
        say(f"{case}: written in {write.seconds:.1f} s; reading them back")
        clock = Clock(server)
        keys, values = await client.read(workload.messages)
        read = clock.stop()
        read_json = None
        if workload.json_read:
            clock = Clock(server)
            as_json = await client.read_json(workload.messages)
            if as_json is not None:
                read_json = (clock.stop(), *as_json)
                say(f"{case}: read {len(as_json[0]):,} as JSON in {read_json[0].seconds:.1f} s")
        stored = await client.stored()
    finally:
        await client.close()
    say(f"{case}: read {len(keys):,} in {read.seconds:.1f} s; checking them")
    return Measured(write, read, latencies, keys, values, stored, read_json)


def run_case(
    system: System,
    workload: Workload,
    data: Data,
    users: Users,
    result: Result,
    args: argparse.Namespace,
    say: Say,
) -> None:
    """One system, one workload, one run: a fresh server, stopped by PID whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix=f"mv-bench-peers-{system.key}-", dir=args.dir))
    server: Running | None = None
    try:
        server = start(system, folder, users)
        say(f"{system.key} {workload.name}: server pid {server.pid} on 127.0.0.1:{server.port}")
        measured = asyncio.run(drive(system, server, workload, data, say))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    # The tests' seam: a driver that read a wrong value (``KEY``, or ``KEY:json``).
    tampered = measured.values
    if args.tamper == f"{system.key}:json" and measured.read_json is not None:
        tampered = measured.read_json[2]
    if args.tamper in (system.key, f"{system.key}:json"):
        middle = len(tampered) // 2
        tampered[middle] = b"tampered" + tampered[middle][8:]
    try:
        verify(measured.keys, measured.values, measured.stored, workload, data)
        if measured.read_json is not None:
            _, json_keys, json_values = measured.read_json
            try:
                verify(json_keys, json_values, measured.stored, workload, data)
            except VerificationFailed as failure:
                raise VerificationFailed(f"read as JSON: {failure}") from None
    except VerificationFailed as failure:
        raise SystemExit(
            f"VERIFICATION FAILED: {system.key} {workload.name}: {failure}"
        ) from failure
    result.write_s.append(measured.write.seconds)
    result.read_s.append(measured.read.seconds)
    phases = [("write", measured.write), ("read", measured.read)]
    if measured.read_json is not None:
        result.read_json_s.append(measured.read_json[0].seconds)
        phases.append(("read_json", measured.read_json[0]))
    for name, phase in phases:
        result.client_cpu_s.setdefault(name, []).append(phase.client_cpu_s)
        result.server_cpu_s.setdefault(name, []).append(phase.server_cpu_s)
    line = (
        f"{system.key} {workload.name}: write {workload.messages / measured.write.seconds:,.0f}"
        f" msgs/s, read {workload.messages / measured.read.seconds:,.0f} msgs/s"
    )
    if measured.read_json is not None:
        line += f", read JSON {workload.messages / measured.read_json[0].seconds:,.0f} msgs/s"
    if measured.latencies:
        histogram = Latency()  # the stress command's HDR histogram, as bench-http uses
        for seconds in measured.latencies:
            histogram.record(seconds)
        summary = histogram.summary()
        for name in ("p50", "p99", "max"):
            result.latency_ms.setdefault(name, []).append(summary[name])
        line += f", ack p50 {result.latency_ms['p50'][-1]:.2f} ms"
        line += f" p99 {result.latency_ms['p99'][-1]:.2f} ms"
    say(line + ", verified")


# The command -------------------------------------------------------------------------------


def choose(
    only: str | None, parser: argparse.ArgumentParser
) -> tuple[list[Workload], list[System]]:
    """``--only``: workload names and system keys, comma-separated; each kind defaults to all."""
    if not only:
        return list(WORKLOADS), list(SYSTEMS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    workloads = {w.name: w for w in WORKLOADS}
    aliases = {
        "redis": ["redis-always", "redis-everysec"],
        "ds": ["messagevault-ds", "ds-reference"],
    }
    unknown = [n for n in names if n not in workloads and n not in BY_KEY and n not in aliases]
    if unknown or not names:
        parser.error(
            f"--only: unknown {', '.join(unknown) or '(empty)'}; choose from "
            f"{', '.join([*workloads, *BY_KEY, *aliases])}"
        )
    wanted = {k for n in names for k in aliases.get(n, [n])}
    chosen_workloads = [w for w in WORKLOADS if w.name in wanted] or list(WORKLOADS)
    chosen_systems = [s for s in SYSTEMS if s.key in wanted] or list(SYSTEMS)
    return chosen_workloads, chosen_systems


def available(
    systems: list[System], allow_install: bool, say: Say
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Why each system that cannot run here is skipped; and each other's versions."""
    binaries = apt_binaries(systems)
    if allow_install:
        why_missing = install(binaries, say)
    else:
        why_missing = {
            b: f"{b} not found (--no-install)" for b in binaries if find_binary(b) is None
        }
    skipped: dict[str, str] = {}
    found: dict[str, dict[str, str]] = {}
    for system in systems:
        reason = (
            why_missing.get(system.binary or "")
            or missing_server(system)
            or missing_clients(system)
        )
        if reason is not None:
            skipped[system.key] = reason
            say(f"SKIPPING {system.key}: {reason}")
        else:
            found[system.key] = versions(system)
    return skipped, found


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated workloads (W1..W4) and/or systems (messagevault, redis-always, "
        "redis-everysec, redis, nats, messagevault-ds, ds-reference, ds) to run; default all",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the servers' folders go")
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="skip a peer whose server is missing instead of apt-get installing it",
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="run nothing: copy the newest peers-*.md of --output into README.md's "
        "'Against the peers' section",
    )
    parser.add_argument(
        "--install-servers",
        action="store_true",
        help="run nothing: apt-get install the peers' servers that are missing (make test "
        "does, so that the peer tests run); exit 1 if one cannot be had",
    )
    # For the tests: corrupt one value a system read back, to see the check fail.
    parser.add_argument("--tamper", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.readme:
        refresh_readme(args.output, README)
        return
    if args.install_servers:
        binaries = apt_binaries(SYSTEMS)
        still_missing = install(binaries, print)
        for why in still_missing.values():
            print(why)
        sys.exit(1 if still_missing else 0)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be above 0 and at most 1, not {args.scale}")
    workloads, systems = choose(args.only, parser)

    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {text}", flush=True)

    skipped, found = available(systems, args.install, say)
    runnable = [s for s in systems if s.key not in skipped]
    users = Users()
    if any(s.key == VAULT for s in runnable):
        users.set_password("bench", "bench-password")  # hashed once (argon2 is slow on purpose)
        users.grant("bench", ["all:write"])

    results: dict[tuple[str, str], Result] = {}
    for base in workloads if runnable else []:
        workload = scaled(base, args.scale)
        say(
            f"{workload.name}: {workload.messages:,} x {workload.value_size} B in batches of "
            f"{workload.batch_size:,}, {workload.producers} producer(s)"
        )
        data = make_data(workload)
        # The harness holds millions of ready-made objects a real client would
        # not; frozen, they are not rescanned by every collection.
        gc.collect()
        gc.freeze()
        for run in range(args.runs):
            # Each run starts with another system, so that slow moments spread.
            order = runnable[run % len(runnable) :] + runnable[: run % len(runnable)]
            for system in order:
                say(f"{system.key} {workload.name}: run {run + 1} of {args.runs}")
                result = results.setdefault(
                    (system.key, workload.name),
                    Result(
                        system.key,
                        workload.name,
                        workload.messages,
                        data.payload_bytes,
                        workload.producers,
                        workload.batch_size,
                    ),
                )
                run_case(system, workload, data, users, result, args, say)
        del data
        gc.unfreeze()
        gc.collect()

    title = f"Median of {args.runs} run(s), scale {args.scale:g}"
    cells = table_cells(results, systems, skipped)
    ds_cells = ds_table_cells(results, systems, skipped)
    texts = []
    if has_columns(cells):
        print(render_table(cells, title), end="")
        texts.append(RATIO_NOTE)
    if ds_cells is not None:
        print(render_table(ds_cells, f"Durable Streams: {title}"), end="")
        texts.append(DS_RATIO_NOTE)
    cpu = cpu_note(results, systems)
    for text in [*texts, *([cpu] if cpu else []), *notes(systems, skipped, found)]:
        print(textwrap.fill(text, TABLE_WIDTH, subsequent_indent="  "))
    json_path, markdown_path = save(
        *(args.output, args.runs, args.scale, results, systems, skipped, found, cells, title),
        ds_cells,
    )
    print(f"saved {json_path} and {markdown_path.name}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Each case's server was stopped and its folder removed on the way out.
        raise SystemExit("interrupted: every server stopped, nothing saved") from None
