"""Azure benchmark: append and SAS read-back on Azurite, beside raw page-blob speed.

    make bench-azure           # full size, 3 runs, medians
    python benchmarks/azure.py --scale 0.1 --runs 1

Workloads W1 and W2 of the core benchmark (keys b"key-%012d", 16 bytes):
  W1  1,000,000 messages x 100-byte values, batches of 1,000
  W2    200,000 messages x 1,000-byte values, batches of 100
are appended through ``AzureStorage`` (one commit per batch: Put Page, then the
conditional checkpoint update) and read back by a ``Reader`` built from the
stream's SAS URL alone, checking every key and value. In the same run the same
number of bytes (the stream's committed length, in whole pages) is uploaded to a
plain page blob with ``upload_page`` calls of 4 MiB and downloaded in 4 MiB
ranges: with the generated client's ranged GET (what ``AzureStreamStore.read``
uses) and, for reference, with ``BlobClient.download_blob``. Targets: append at
>= 70% of the raw upload rate, read at >= 70% of the raw ranged download rate,
both in MB/s of stream bytes.

Ack latency, in the same run (issue 12's Azurite target):
  Put Page  one 4 KiB page per ``upload_page``, sequential, 3,000 of them
  W3        2,000 sequential batches of 10 x 100 B through ``messagevault serve
            --storage azure:...`` with the blocking ``Client``
  bare      the same W3 through ``serve`` on file storage without fsync: the
            server and HTTP alone, for where the time beyond storage goes
each as p50/p99 per run, and the ratio W3 p50 / Put Page p50 (target: at most
1.3, one round trip per append); the three reverse order every other run.
``--latency-only`` runs just this part. The benchmark starts its own Azurite
(from node_modules; ``make bench-azure`` installs it). Results go to
benchmarks/results/azure-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from rich.box import SIMPLE
from rich.console import Console
from rich.table import Table

# Run as a script, this file's folder comes first on sys.path, where this very
# file would shadow the Azure SDK's ``azure`` package; the repo root instead
# makes tests/azurite.py importable.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import urllib.request  # noqa: E402 - imports http, which this folder's http.py would shadow

from azure.core.exceptions import ResourceNotFoundError  # noqa: E402
from azure.storage.blob import BlobClient  # noqa: E402
from azure.storage.blob import __version__ as sdk_version  # noqa: E402
from benchmarks.report import benchmark_arguments, save_results  # noqa: E402
from tests.azurite import Azurite  # noqa: E402

from messagevault import (  # noqa: E402
    MemoryStorage,
    Reader,
    Writer,
    encode_batch,
)
from messagevault.client import Client  # noqa: E402
from messagevault.committer import GroupCommitter  # noqa: E402
from messagevault.server.auth import Users, save_users  # noqa: E402
from messagevault.storage.azure import CONTAINER_PREFIX, DATA_BLOB, AzureStorage  # noqa: E402
from messagevault.stress.embedded import EmbeddedServer, free_port, stress_users  # noqa: E402
from messagevault.stress.stats import Latency  # noqa: E402

CHUNK = 4 * 1024 * 1024  # Azure's Put Page limit; also the reader's default chunk
PAGE = 512
TARGET_RATIO = 0.70
# Which raw phase each of ours is held against (the two targets).
BASELINES = {
    "append": "raw upload",
    "group append": "raw upload",
    "read": "raw download",
    "group read": "raw download",
}
# Also shown, no target: the read against a ranged GET of the stream's own
# blob, whose one-extent-per-commit layout Azurite serves more slowly.
LAYOUT_BASELINES = {"read": "stream blob download"}

# Each ours/raw pair swaps places every other run, so that drift (the
# machine is shared, Azurite's heap grows) hits both sides alike. The stream
# must exist before its own blob is downloaded.
ORDERS = (
    (
        "raw upload",
        "append",
        "group append",
        "raw download",
        "read",
        "group read",
        "sdk download",
        "stream blob download",
    ),
    (
        "group append",
        "append",
        "raw upload",
        "group read",
        "read",
        "raw download",
        "stream blob download",
        "sdk download",
    ),
)

Batches = list[list[tuple[bytes, bytes]]]


@dataclass(frozen=True)
class Workload:
    name: str
    messages: int
    value_size: int
    batch_size: int


WORKLOADS = [Workload("W1", 1_000_000, 100, 1_000), Workload("W2", 200_000, 1_000, 100)]

# Phase name -> what it measures, in table order.
PHASES = {
    "raw upload": "upload_page, 4 MiB",
    "append": "Writer.append, 1 commit/batch",
    # What the server's group commit does under load: waiting batches share a
    # commit of up to 4 MiB (one Put Page, one checkpoint update).
    "group append": "GroupCommitter, <= 4 MiB/commit",
    "raw download": "ranged GET, 4 MiB",
    "sdk download": "download_blob, 4 MiB",
    "stream blob download": "ranged GET of stream's blob",
    "read": "SAS Reader, verified",
    # Azurite serves a blob written in 2,000 small commits (one extent each)
    # far slower than one written in 4 MiB pieces, for any reader: compare
    # "read" with "stream blob download", and this row with "raw download".
    "group read": "same, stream written by group append",
}


@dataclass
class Case:
    workload: str
    phase: str
    messages: int
    stream_bytes: int  # the stream's committed length; raw phases move it in whole pages
    commits: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_per_s(self) -> float:
        return self.stream_bytes / self.median / 1e6

    @property
    def msgs_per_s(self) -> float | None:
        return self.messages / self.median if self.phase in BASELINES else None

    @property
    def commits_per_s(self) -> float | None:
        return self.commits / self.median if self.phase in ("append", "group append") else None


def make_batches(workload: Workload) -> Batches:
    filler = os.urandom(workload.value_size)
    pairs = [
        (b"key-%012d" % i, (b"%012d" % i + filler)[: workload.value_size])
        for i in range(workload.messages)
    ]
    size = workload.batch_size
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def stream_image(batches: Batches) -> bytes:
    """The bytes the stream will hold (bar timestamps), written the page-blob way in memory."""
    storage = MemoryStorage(page_size=PAGE)
    with Writer.open(storage, "image") as writer:
        for batch in batches:
            writer.append(batch)
    store = storage.open_stream("image")
    try:
        length = store.read_checkpoint().length
        return store.read(0, length)
    finally:
        store.close()


def append_phase(storage: AzureStorage, name: str, batches: Batches) -> float:
    writer = Writer.open(storage, name)
    try:
        started = time.perf_counter()
        for batch in batches:
            writer.append(batch)
        return time.perf_counter() - started
    finally:
        writer.close()


def group_append_phase(storage: AzureStorage, name: str, batches: Batches) -> tuple[float, int]:
    """Group commit as the server does it: batches queue while a commit is in flight.

    The producer submits every batch without waiting (encoding included in
    the timing); ``GroupCommitter`` commits whatever has queued, up to one
    4 MiB Put Page and one checkpoint update per commit, in order.
    """
    committer = GroupCommitter(Writer.open(storage, name))
    try:
        started = time.perf_counter()
        futures = [committer.submit(encode_batch(batch)) for batch in batches]
        for future in futures:
            future.result()
        return time.perf_counter() - started, committer.stats.commits
    finally:
        committer.close()


def read_phase(storage: AzureStorage, name: str, batches: Batches, messages: int) -> float:
    store = storage.open_stream(name)
    try:
        access = store.read_access()
    finally:
        store.close()
    started = time.perf_counter()
    with Reader.from_read_access(access) as reader:
        # strict=True fails if the stream holds more or fewer messages than written.
        written = chain.from_iterable(batches)
        for message, (key, value) in zip(reader.read(), written, strict=True):
            if message.value != value or message.key != key:
                raise SystemExit(f"content mismatch at sequence {message.sequence}")
        seconds = time.perf_counter() - started
        if reader.checkpoint().next_sequence != messages:
            raise SystemExit("message count mismatch")
    return seconds


def raw_upload_phase(blob: BlobClient, image: bytes) -> float:
    padded = image + bytes(-len(image) % PAGE)
    chunks = [padded[i : i + CHUNK] for i in range(0, len(padded), CHUNK)]
    blob.create_page_blob(len(padded))
    started = time.perf_counter()
    for index, chunk in enumerate(chunks):
        blob.upload_page(chunk, offset=index * CHUNK, length=len(chunk))
    return time.perf_counter() - started


def ranged_get(blob: BlobClient, offset: int, size: int) -> bytes:
    # The very call AzureStreamStore.read makes: one GET, no Get Page Ranges.
    return b"".join(blob._client.blob.download(range=f"bytes={offset}-{offset + size - 1}"))


def sdk_get(blob: BlobClient, offset: int, size: int) -> bytes:
    return blob.download_blob(offset=offset, length=size).readall()


def download_phase(
    blob: BlobClient, length: int, get: Callable[[BlobClient, int, int], bytes]
) -> float:
    started = time.perf_counter()
    received = 0
    for offset in range(0, length, CHUNK):
        received += len(get(blob, offset, min(CHUNK, length - offset)))
    seconds = time.perf_counter() - started
    if received != length:
        raise SystemExit(f"downloaded {received} bytes of {length}")
    return seconds


def measure_run(
    storage: AzureStorage,
    workload: Workload,
    batches: Batches,
    image: bytes,
    run: int,
    group_commits: list[int],
) -> dict[str, float]:
    """One run of every phase, in this run's order; returns seconds per phase.

    ``group_commits`` receives how many commits the group append made.
    """

    def group_append() -> float:
        seconds, commits = group_append_phase(storage, f"{stream}-g", batches)
        group_commits.append(commits)
        return seconds

    tag = f"{workload.name.lower()}-r{run}"
    stream = f"bench-{tag}"
    raw_container = storage.service.get_container_client(f"raw-{tag}")
    raw_container.create_container()
    raw = raw_container.get_blob_client(DATA_BLOB)
    stream_blob = storage.service.get_blob_client(CONTAINER_PREFIX + stream, DATA_BLOB)
    padded = len(image) + -len(image) % PAGE
    steps: dict[str, Callable[[], float]] = {
        "raw upload": lambda: raw_upload_phase(raw, image),
        "append": lambda: append_phase(storage, stream, batches),
        "group append": group_append,
        "group read": lambda: read_phase(storage, f"{stream}-g", batches, workload.messages),
        "raw download": lambda: download_phase(raw, padded, ranged_get),
        "read": lambda: read_phase(storage, stream, batches, workload.messages),
        "sdk download": lambda: download_phase(raw, padded, sdk_get),
        "stream blob download": lambda: download_phase(stream_blob, padded, ranged_get),
    }
    order = ORDERS[run % 2]
    try:
        return {phase: steps[phase]() for phase in order}
    finally:
        # Deleted data stays on Azurite's disk until its extent GC (every 10
        # min), so at least drop it from the live set right away. A phase that
        # failed early may not have created the stream: keep its error, not ours.
        for container in (
            raw_container.container_name,
            CONTAINER_PREFIX + stream,
            f"{CONTAINER_PREFIX}{stream}-g",
        ):
            with contextlib.suppress(ResourceNotFoundError):
                storage.service.delete_container(container)


# Ack latency: one raw Put Page round trip against W3 through the server.
PUT_PAGE_SIZE = 4096  # a W3 commit (~1.2 KB of frame plus the tail page) fits in it
PUT_PAGES = 3_000
W3_BATCHES, W3_BATCH_SIZE, W3_VALUE_SIZE = 2_000, 10, 100
WARMUP = 50  # requests before timing: connections, the server's password cache
LATENCY_TARGET = 1.3
USER, PASSWORD = "bench", "bench-password"
SERVER_START_TIMEOUT = 60.0


@dataclass
class LatencyRun:
    put_page_p50: float  # milliseconds
    put_page_p99: float
    w3_p50: float
    w3_p99: float
    # W3 through serve on file storage without fsync: the server and HTTP alone.
    bare_p50: float
    bare_p99: float

    @property
    def ratio(self) -> float:
        return self.w3_p50 / self.put_page_p50

    @property
    def storage_ratio(self) -> float:
        """W3 p50 less the bare server's, per Put Page p50: what storage adds per append."""
        return (self.w3_p50 - self.bare_p50) / self.put_page_p50


def put_page_latency(storage: AzureStorage, tag: str, count: int) -> Latency:
    """``count`` sequential one-page ``upload_page`` calls, as a commit's data write makes."""
    container = storage.service.get_container_client(f"raw-latency-{tag}")
    container.create_container()
    try:
        blob = container.get_blob_client(DATA_BLOB)
        blob.create_page_blob((count + WARMUP) * PUT_PAGE_SIZE)
        page = os.urandom(PUT_PAGE_SIZE)
        latency = Latency()
        for index in range(count + WARMUP):
            started = time.perf_counter()
            blob.upload_page(page, offset=index * PUT_PAGE_SIZE, length=PUT_PAGE_SIZE)
            if index >= WARMUP:
                latency.record(time.perf_counter() - started)
        return latency
    finally:
        storage.service.delete_container(container.container_name)


class AzureServer:
    """``messagevault serve --storage azure:...`` on a loopback port, stopped by PID."""

    def __init__(self, connection_string: str, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / f"serve-{self.port}.log"
        command = [
            *(sys.executable, "-m", "messagevault.leash", "serve"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--storage", f"azure:{connection_string}", "--no-access-log"),
        ]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,  # the leash: the server stops if this process dies
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited early: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"the server did not come up in {SERVER_START_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.log.unlink(missing_ok=True)


def w3_publishes(url: str, stream: str, batches: int) -> Latency:
    """W3's ack latency: ``batches`` sequential publishes of 10 x 100 B, blocking client."""
    filler = os.urandom(W3_VALUE_SIZE)
    data = [
        [(b"key-%012d" % (n * W3_BATCH_SIZE + i), filler) for i in range(W3_BATCH_SIZE)]
        for n in range(batches)
    ]
    with Client(url, user=USER, password=PASSWORD) as client:
        for _ in range(WARMUP):
            client.publish(stream, [(b"warmup", b"v")])
        latency = Latency()
        for batch in data:
            started = time.perf_counter()
            client.publish(stream, batch)
            latency.record(time.perf_counter() - started)
        if client.info(stream).messages != WARMUP + batches * W3_BATCH_SIZE:
            raise SystemExit("W3: the stream does not hold every message published")
    return latency


def w3_azure(connection_string: str, tag: str, batches: int, folder: Path) -> Latency:
    server = AzureServer(connection_string, folder)
    try:
        server.wait_until_up()
        return w3_publishes(server.url, f"w3-{tag}", batches)
    finally:
        server.stop()


def w3_bare(batches: int, folder: Path, users: Users) -> Latency:
    """W3 through serve on file storage, fsync never: the server and HTTP, next to no storage."""
    with EmbeddedServer(
        fsync="never", parent=folder, user=USER, password=PASSWORD, users=users
    ) as server:
        return w3_publishes(server.url, "w3-bare", batches)


def latency_runs(
    storage: AzureStorage, connection_string: str, runs: int, scale: float, folder: Path
) -> list[LatencyRun]:
    pages = max(20, int(PUT_PAGES * scale))
    batches = max(20, int(W3_BATCHES * scale))
    users = stress_users(PASSWORD, USER)
    save_users(storage, users)
    results: list[LatencyRun] = []
    for run in range(runs):
        tag = f"r{run}"
        steps: dict[str, Callable[[], Latency]] = {
            "put": functools.partial(put_page_latency, storage, tag, pages),
            "w3": functools.partial(w3_azure, connection_string, tag, batches, folder),
            "bare": functools.partial(w3_bare, batches, folder, users),
        }
        # Reverse the order every other run, so that drift hits all sides alike.
        order = list(steps) if run % 2 == 0 else list(reversed(steps))
        measured = {name: steps[name]() for name in order}
        with contextlib.suppress(ResourceNotFoundError):
            storage.service.delete_container(f"{CONTAINER_PREFIX}w3-{tag}")
        put, w3, bare = measured["put"], measured["w3"], measured["bare"]
        result = LatencyRun(
            put.percentile_ms(50),
            put.percentile_ms(99),
            w3.percentile_ms(50),
            w3.percentile_ms(99),
            bare.percentile_ms(50),
            bare.percentile_ms(99),
        )
        print(
            f"latency run {run + 1}/{runs}: Put Page p50 {result.put_page_p50:.3f} ms "
            f"p99 {result.put_page_p99:.3f} ms; W3 p50 {result.w3_p50:.3f} ms "
            f"p99 {result.w3_p99:.3f} ms; bare server W3 p50 {result.bare_p50:.3f} ms; "
            f"W3 p50 / Put Page p50 {result.ratio:.2f} "
            f"(less the bare server: {result.storage_ratio:.2f})",
            flush=True,
        )
        results.append(result)
    return results


def print_latency_table(results: list[LatencyRun]) -> dict[str, float]:
    """Medians over the runs (the ratio is the median of each run's own ratio)."""
    medians = {
        "put_page_p50_ms": statistics.median(r.put_page_p50 for r in results),
        "put_page_p99_ms": statistics.median(r.put_page_p99 for r in results),
        "w3_p50_ms": statistics.median(r.w3_p50 for r in results),
        "w3_p99_ms": statistics.median(r.w3_p99 for r in results),
        "bare_p50_ms": statistics.median(r.bare_p50 for r in results),
        "bare_p99_ms": statistics.median(r.bare_p99 for r in results),
        "ratio": statistics.median(r.ratio for r in results),
        "storage_ratio": statistics.median(r.storage_ratio for r in results),
    }
    table = Table(
        title=f"Ack latency on Azurite, median of {len(results)}",
        caption="vs Put Page: W3 p50 (less the bare server's, last row) / Put Page p50 "
        "of the same run, median over runs",
        box=SIMPLE,
    )
    for column in ("case", "p50 ms", "p99 ms", "vs Put Page", "target"):
        table.add_column(column, justify="left" if column == "case" else "right")
    ok = "ok" if medians["ratio"] <= LATENCY_TARGET else "MISSED"
    table.add_row(
        f"Put Page, {PUT_PAGE_SIZE} B",
        f"{medians['put_page_p50_ms']:.3f}",
        f"{medians['put_page_p99_ms']:.3f}",
        "",
        "",
    )
    table.add_row(
        f"W3 via serve, {W3_BATCH_SIZE} x {W3_VALUE_SIZE} B",
        f"{medians['w3_p50_ms']:.3f}",
        f"{medians['w3_p99_ms']:.3f}",
        f"{medians['ratio']:.2f}x",
        f"<= {LATENCY_TARGET}x {ok}",
    )
    table.add_row(
        "W3 via serve, file, no fsync",
        f"{medians['bare_p50_ms']:.3f}",
        f"{medians['bare_p99_ms']:.3f}",
        "",
        "",
    )
    table.add_row(
        "W3 less the bare server",
        f"{medians['w3_p50_ms'] - medians['bare_p50_ms']:.3f}",
        "",
        f"{medians['storage_ratio']:.2f}x",
        "",
    )
    Console(width=100).print(table)
    return medians


def azurite_version() -> str:
    package = HERE.parent / "node_modules" / "azurite" / "package.json"
    try:
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def print_table(cases: list[Case], runs: int, scale: float) -> None:
    """The table (fits 100 columns), then what each phase does; run times are in the JSON."""
    table = Table(
        title=f"MessageVault on Azurite {azurite_version()}, median of {runs} (scale {scale})",
        caption="vs base: append and group append against raw upload, read and group read "
        "against raw download; vs blob: read against a ranged GET of the stream's own blob",
        box=SIMPLE,
    )
    left = ("workload", "phase")
    columns = ("msgs/s", "MB/s", "commits/s", "vs base", "vs blob", "target")
    for column in (*left, *columns):
        table.add_column(column, justify="left" if column in left else "right")
    by_key = {(c.workload, c.phase): c for c in cases}
    for case in cases:
        ratio = layout_ratio = mark = ""
        baseline = BASELINES.get(case.phase)
        if baseline is not None:
            share = case.mb_per_s / by_key[(case.workload, baseline)].mb_per_s
            ratio = f"{share:.0%}"
            mark = f">= {TARGET_RATIO:.0%} {'ok' if share >= TARGET_RATIO else 'MISSED'}"
        layout = LAYOUT_BASELINES.get(case.phase)
        if layout is not None:
            layout_ratio = f"{case.mb_per_s / by_key[(case.workload, layout)].mb_per_s:.0%}"
        table.add_row(
            case.workload,
            case.phase,
            "" if case.msgs_per_s is None else f"{case.msgs_per_s:,.0f}",
            f"{case.mb_per_s:,.1f}",
            "" if case.commits_per_s is None else f"{case.commits_per_s:,.0f}",
            ratio,
            layout_ratio,
            mark,
        )
    Console(width=100).print(table)
    print("Phases:")
    for phase, how in PHASES.items():
        print(f"  {phase}: {how}")


def save(
    cases: list[Case],
    latency: list[LatencyRun],
    medians: dict[str, float],
    args: argparse.Namespace,
) -> Path:
    by_key = {(c.workload, c.phase): c for c in cases}
    records: list[dict[str, Any]] = []
    for case in cases:
        record: dict[str, Any] = {
            **asdict(case),
            "median_s": case.median,
            "mb_per_s": case.mb_per_s,
            "msgs_per_s": case.msgs_per_s,
            "commits_per_s": case.commits_per_s,
        }
        baseline = BASELINES.get(case.phase)
        if baseline is not None:
            raw = by_key[(case.workload, baseline)]
            record["baseline"] = baseline
            record["ratio"] = case.mb_per_s / raw.mb_per_s
            # Same-run pairs too: less exposed to drift than the ratio of medians.
            record["paired_ratios"] = [
                r / o for o, r in zip(case.seconds, raw.seconds, strict=True)
            ]
            record["target_ratio"] = TARGET_RATIO
            record["ok"] = record["ratio"] >= TARGET_RATIO
            layout = LAYOUT_BASELINES.get(case.phase)
            if layout is not None:
                record[f"ratio_vs_{layout.replace(' ', '_')}"] = (
                    case.mb_per_s / by_key[(case.workload, layout)].mb_per_s
                )
        records.append(record)
    if latency:
        records.append(
            {
                "workload": "W3",
                "phase": "ack latency",
                "runs": [asdict(run) | {"ratio": run.ratio} for run in latency],
                **medians,
                "target_ratio": LATENCY_TARGET,
                "ok": medians["ratio"] <= LATENCY_TARGET,
            }
        )
    return save_results(
        args.output,
        "azure",
        {"runs": args.runs, "scale": args.scale},
        records,
        {"azurite": azurite_version(), "azure_storage_blob": sdk_version},
    )


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--latency-only", action="store_true", help="only Put Page and W3 ack latency"
    )
    args = parser.parse_args()

    cases: list[Case] = []
    latency: list[LatencyRun] = []
    azurite = Azurite()
    try:
        azurite.start()
        storage = AzureStorage.from_connection_string(azurite.connection_string)
        latency = latency_runs(
            storage, azurite.connection_string, args.runs, args.scale, azurite.location
        )
        for base in [] if args.latency_only else WORKLOADS:
            workload = Workload(
                base.name,
                max(base.batch_size, int(base.messages * args.scale)),
                base.value_size,
                base.batch_size,
            )
            batches = make_batches(workload)
            image = stream_image(batches)
            # The harness holds millions of pre-built objects that a real
            # producer would not; freezing them keeps every GC pass from
            # rescanning them.
            gc.collect()
            gc.freeze()
            workload_cases = {
                phase: Case(workload.name, phase, workload.messages, len(image), len(batches))
                for phase in PHASES
            }
            group_commits: list[int] = []
            for run in range(args.runs):
                timings = measure_run(storage, workload, batches, image, run, group_commits)
                for phase, seconds in timings.items():
                    workload_cases[phase].seconds.append(seconds)
                # A line per run as it finishes: a long benchmark is never silent.
                phases = ", ".join(
                    f"{phase} {workload.messages / seconds:,.0f} msgs/s"
                    for phase, seconds in timings.items()
                )
                print(f"{workload.name} run {run + 1}/{args.runs}: {phases}", flush=True)
            workload_cases["group append"].commits = int(statistics.median(group_commits))
            cases.extend(workload_cases.values())
            del batches, image
            gc.unfreeze()
            gc.collect()
    finally:
        azurite.close()

    if cases:
        print_table(cases, args.runs, args.scale)
    medians = print_latency_table(latency)
    print(f"saved {save(cases, latency, medians, args)}")


if __name__ == "__main__":
    main()
