"""Cluster benchmark: ingest with 1, 2 and 3 nodes on one storage, and failover time.

    make bench-cluster                         # files and Azurite, 3 runs, medians
    python benchmarks/cluster.py --duration 3 --runs 1 --backends file

Ingest: ``messagevault serve --node-id`` processes share one storage (a data
folder, or Azurite); ``messagevault stress`` processes publish batches of
100 x 100-byte values from 12 producers over 6 streams for ``--duration``
seconds, and read every message back to check it. Two ways of sending:

  any node  one stress process per node, each sending only to its node, on
            streams of its own: a stream written by another node is
            reached by forwarding (on n nodes, (n-1)/n of the appends)
  writers   one stress process given every node's URL: the client learns
            each stream's writer from the answers and sends there directly

Failover (3 nodes): a producer publishes to one stream through every node
while the stream's writer is killed with SIGKILL and restarted, ``--failovers``
times; the time from each kill to the next acknowledged append on that stream
is the failover time (p50 and max).

The machine has 2 cores: each node is a process of its own, so beyond one
node the nodes, the load generator and Azurite share those cores. Results go to
benchmarks/results/cluster-<time>.json and .md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import BenchmarkParser  # noqa: E402
from tests.azurite import Azurite  # noqa: E402
from tests.cluster_nodes import PASSWORD, USER, cluster_of  # noqa: E402

from messagevault.client import Client  # noqa: E402
from messagevault.errors import MessageVaultError  # noqa: E402

RESULTS = HERE / "results"
PRODUCERS = 12
STREAMS = 6


@contextlib.contextmanager
def storage_for(backend: str, folder: Path) -> Iterator[tuple[str, float]]:
    """The storage URL of a fresh storage, with the lease duration to use on it."""
    if backend == "file":
        yield f"file:{folder}", 2.0
        return
    azurite = Azurite()
    azurite.start()
    try:
        yield f"azure:{azurite.connection_string}", 15.0
    finally:
        azurite.close()


def _stress(
    urls: list[str], prefix: str, producers: int, streams: int, duration: float, out: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "messagevault.cli",
            "stress",
            "--url",
            ",".join(urls),
            "--producers",
            str(producers),
            "--streams",
            str(streams),
            "--batch-size",
            "100",
            "--value-size",
            "100",
            "--duration",
            str(duration),
            "--consumers",
            "0",
            "--stream-prefix",
            prefix,
            "--json",
            str(out),
        ],
        env={**os.environ, "MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def ingest(backend: str, nodes: int, mode: str, duration: float) -> dict[str, Any]:
    """One ingest run: msgs/s summed over the stress processes, and the p50/p99 ack latency."""
    with tempfile.TemporaryDirectory(prefix="mv-bench-cluster-") as temp:
        folder = Path(temp)
        with (
            storage_for(backend, folder / "data") as (storage, lease),
            cluster_of(
                nodes, folder, storage=storage, lease_duration=lease, arguments=["--no-access-log"]
            ) as cluster,
        ):
            run = uuid.uuid4().hex[:6]
            if mode == "writers":
                plan = [(cluster.urls, f"w{run}", PRODUCERS, STREAMS)]
            else:
                plan = [
                    ([url], f"a{run}n{i}", PRODUCERS // nodes, max(1, STREAMS // nodes))
                    for i, url in enumerate(cluster.urls)
                ]
            outputs = [folder / f"stress-{i}.json" for i in range(len(plan))]
            processes = [
                _stress(urls, prefix, producers, streams, duration, out)
                for (urls, prefix, producers, streams), out in zip(plan, outputs, strict=True)
            ]
            for process in processes:
                _, stderr = process.communicate(timeout=duration + 300)
                if process.returncode != 0:
                    kept = Path(tempfile.mkdtemp(prefix="mv-bench-cluster-failed-"))
                    for log in folder.glob("*.log"):  # the nodes' logs outlive the run
                        shutil.copy(log, kept)
                    raise RuntimeError(
                        f"(node logs kept in {kept}) "
                        f"stress failed ({process.returncode}): {stderr.decode()[-2000:]}"
                    )
            rates, p50s, p99s, forwarded = [], [], [], 0.0
            for out in outputs:
                result = json.loads(out.read_text())
                write = next(row for row in result["table"] if row["phase"] == "write")
                rates.append(write["msgs_per_s"])
                p50s.append(write["latency_ms"]["p50"])
                p99s.append(write["latency_ms"]["p99"])
            for node in cluster.nodes:
                forwarded += _forwarded(node.url)
    return {
        "backend": backend,
        "nodes": nodes,
        "mode": mode,
        "msgs_per_s": sum(rates),
        "p50_ms": max(p50s),
        "p99_ms": max(p99s),
        "forwarded_appends": forwarded,
    }


def _forwarded(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("messagevault_forwarded_appends_total")
    )


def failovers(backend: str, count: int) -> list[float]:
    """Seconds from each SIGKILL of a stream's writer to the next acknowledged append."""
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mv-bench-failover-") as temp:
        folder = Path(temp)
        with (
            storage_for(backend, folder / "data") as (storage, lease),
            cluster_of(
                3, folder, storage=storage, lease_duration=lease, arguments=["--no-access-log"]
            ) as cluster,
        ):
            acks: list[float] = []
            stop = threading.Event()
            errors: list[str] = []

            def produce() -> None:
                with Client(
                    cluster.urls, user=USER, password=PASSWORD, retry_timeout=120
                ) as client:
                    number = 0
                    while not stop.is_set() and number < 1_000_000:
                        try:
                            client.publish("failover", [f"m{number}".encode()])
                        except MessageVaultError as exc:
                            errors.append(str(exc))
                            continue
                        acks.append(time.monotonic())
                        number += 1

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            try:
                _wait_for(lambda: len(acks) > 10, 60)
                for _ in range(count):
                    writer = cluster.writer_of("failover")
                    assert writer is not None, "no writer found"
                    killed = time.monotonic()
                    writer.kill()
                    _wait_for(lambda killed=killed: bool(acks) and acks[-1] > killed, 120)
                    times.append(next(at for at in acks if at > killed) - killed)
                    writer.start()
                    _wait_for(lambda: len(acks) > 0 and time.monotonic() - acks[-1] < 1, 60)
            finally:
                stop.set()
                producer.join(timeout=150)
            if errors:
                raise RuntimeError(f"the producer failed: {errors[:3]}")
    return times


def _wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long")
        time.sleep(0.01)


def main() -> None:
    parser = BenchmarkParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each ingest run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="file,azure")
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--modes", default="any,writers")
    parser.add_argument("--failovers", type=int, default=5, help="kills per backend (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    backends = options.backends.split(",")
    modes = options.modes.split(",")
    try:
        sizes = [int(n) for n in options.nodes.split(",")]
    except ValueError:
        parser.error(f"--nodes must be whole numbers separated by commas, not {options.nodes!r}")
    if unknown := [b for b in backends if b not in ("file", "azure")]:
        parser.error(f"unknown backend(s) {','.join(unknown)}: choose from file,azure")
    if unknown := [m for m in modes if m not in ("any", "writers")]:
        parser.error(f"unknown mode(s) {','.join(unknown)}: choose from any,writers")
    if not all(1 <= n <= PRODUCERS for n in sizes):
        parser.error(f"--nodes must each be 1 to {PRODUCERS}, not {options.nodes}")
    if not options.duration > 0 or options.failovers < 0:
        parser.error("--duration must be more than 0 and --failovers 0 or more")
    console = Console(width=132)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []  # runs that failed (their stress error), made again
    for run in range(options.runs):
        for backend in backends:
            for nodes in sizes:
                for mode in modes:
                    if mode == "writers" and nodes == 1:
                        continue  # one node: the two ways are the same
                    row = None
                    for _attempt in range(2):  # a failed run is said, counted and made again once
                        try:
                            row = ingest(backend, nodes, mode, options.duration)
                            break
                        except RuntimeError as exc:
                            console.print(f"[red]{backend} {nodes} node(s) {mode} failed:[/] {exc}")
                            failures.append(
                                {
                                    "backend": backend,
                                    "nodes": nodes,
                                    "mode": mode,
                                    "run": run,
                                    "error": str(exc)[-1000:],
                                }
                            )
                    if row is None:
                        continue
                    row["run"] = run
                    rows.append(row)
                    console.print(
                        f"run {run + 1} {backend} {nodes} node(s) {mode}: "
                        f"{row['msgs_per_s']:,.0f} msgs/s, p50 {row['p50_ms']} ms"
                    )
    failover_times = {
        backend: failovers(backend, options.failovers) for backend in backends if options.failovers
    }
    table = Table(
        title="Ingest through 1-3 nodes (medians of runs; 12 producers, 6 streams, 100 x 100 B)"
    )
    for column in (
        "backend",
        "nodes",
        "sent to",
        "msgs/s",
        "vs 1 node",
        "ack p50 ms",
        "ack p99 ms",
        "forwarded",
    ):
        table.add_column(column, justify="right")
    summary = []
    for backend in backends:
        base = None
        for nodes in sizes:
            for mode in modes:
                mine = [
                    r
                    for r in rows
                    if (r["backend"], r["nodes"], r["mode"]) == (backend, nodes, mode)
                ]
                if not mine:
                    continue
                rate = statistics.median(r["msgs_per_s"] for r in mine)
                if nodes == 1:
                    base = rate
                entry = {
                    "backend": backend,
                    "nodes": nodes,
                    "mode": mode,
                    "msgs_per_s": rate,
                    "vs_one_node": rate / base if base else None,
                    "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                    "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                    "forwarded_appends": statistics.median(r["forwarded_appends"] for r in mine),
                }
                summary.append(entry)
                table.add_row(
                    backend,
                    str(nodes),
                    "any node" if mode == "any" else "writers",
                    f"{rate:,.0f}",
                    f"{entry['vs_one_node']:.2f}x" if entry["vs_one_node"] else "",
                    f"{entry['p50_ms']:.2f}",
                    f"{entry['p99_ms']:.2f}",
                    f"{entry['forwarded_appends']:,.0f}",
                )
    console.print(table)
    failover_table = Table(
        title="Failover: SIGKILL of a stream's writer to the next acknowledged append (3 nodes)"
    )
    for column in ("backend", "kills", "p50 s", "max s", "each s"):
        failover_table.add_column(column, justify="right")
    for backend, times in failover_times.items():
        failover_table.add_row(
            backend,
            str(len(times)),
            f"{statistics.median(times):.2f}",
            f"{max(times):.2f}",
            " ".join(f"{t:.2f}" for t in times),
        )
    if failover_times:
        console.print(failover_table)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "kind": "cluster",
        "time": stamp,
        "options": {k: str(v) for k, v in vars(options).items()},
        "cpus": os.cpu_count(),
        "runs": rows,
        "summary": summary,
        "failovers": failover_times,
        "failed_runs": failures,
    }
    path = options.out / f"cluster-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    with (options.out / f"cluster-{stamp}.md").open("w") as markdown:
        Console(file=markdown, width=120, no_color=True).print(table)
        if failover_times:
            Console(file=markdown, width=120, no_color=True).print(failover_table)
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed and were made again: see failed_runs[/]")
    console.print(f"saved {path}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
