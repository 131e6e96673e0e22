"""Seek benchmark: seeks by sequence and time through the sparse index, against the header walk.

    make bench-seek            # 10M messages, files then Azurite, 3 runs, medians
    python benchmarks/seek.py --scale 0.01 --runs 1 --backends file

Per backend (local files; Azurite, started from node_modules):
  seek     --seeks random ``Reader.seek(sequence=N)`` and as many ``Reader.seek(time=T)``
           over a stream of 10,000,000 messages: 100,000 frames of 100 messages of
           20-60 B values, 256 frames per commit, the default index policy. Median and
           p95 time per seek, and the storage round trips each made (counted by a
           wrapper around the stream's store): index reads, data reads, and the rest
           (checkpoint read, index size), beside the index's entries and log2 of them.
  walk     the first --walk-seeks of those same seeks through a store whose index_size()
           is 0, so that ``seek`` walks frame headers from the first readable position
           (a stream without an index; what seeks cost before it): the ratio is the
           walk's median over the index's median on those same seeks. Only a few,
           since each walks half the stream on average.
  append   ack latency of --appends sequential one-message appends (100 B) through
           ``GroupCommitter``, by ``commit_here`` and by ``submit``, to a fresh stream
           with the index off, on (default policy) and dense (an entry every frame: the
           most index writes the flush bound allows). The modes take turns in one
           process and rotate every run, so that the machine's noise hits each alike;
           p50/p99/p99.9 per run, medians over runs. Files use fsync=always.

The seek stream is built once per shape and backend and kept in --cache
(the file stream, and Azurite's data folder), since building it dominates;
a build that did not finish is thrown away and done again. Results go to
benchmarks/results/seek-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.box import SIMPLE
from rich.console import Console
from rich.table import Table

# Run as a script, this file's folder comes first on sys.path, where
# benchmarks/azure.py would shadow the Azure SDK's ``azure`` package and
# benchmarks/http.py the standard library's ``http``; the repo root instead
# makes tests/azurite.py and benchmarks.report importable.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import benchmark_arguments, save_results  # noqa: E402
from tests.azurite import Azurite  # noqa: E402

from messagevault import FileStorage, Reader, Writer, encode_batch  # noqa: E402
from messagevault.checkpoint import Checkpoint  # noqa: E402
from messagevault.committer import GroupCommitter  # noqa: E402
from messagevault.errors import StreamNotFound  # noqa: E402
from messagevault.format import EncodedBatch  # noqa: E402
from messagevault.index import (  # noqa: E402
    DEFAULT_EVERY_BYTES,
    DEFAULT_EVERY_FRAMES,
    ENTRY_SIZE,
    INDEX_HEADER_SIZE,
    IndexPolicy,
    decode_entry,
)
from messagevault.storage.azure import CONTAINER_PREFIX, AzureStorage  # noqa: E402
from messagevault.storage.base import Storage, StreamStore  # noqa: E402

MESSAGES = 10_000_000
BATCH_SIZE = 100  # messages per frame
VALUE_SIZES = (20, 60)  # bytes, uniform
FRAMES_PER_COMMIT = 256
SEEKS = 300  # of each kind, per run
WALK_SEEKS = 5  # of each kind, per run
APPENDS = 2_000  # per mode and path, per run
APPEND_WARMUP = 50
APPEND_VALUE = 100
BACKENDS = ("file", "azurite")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "messagevault-bench-seek"
)
# Index modes of the append phase: off, the default policy, and an entry every frame
# (entries are then written as often as the flush bound lets them: every second or
# every 256 entries).
INDEX_MODES: dict[str, IndexPolicy | None] = {
    "off": None,
    "on": IndexPolicy(),
    "dense": IndexPolicy(every_frames=1),
}
PATHS = ("commit_here", "submit")


@dataclass(frozen=True)
class Shape:
    """What the seek stream holds; its cache is keyed by all of it."""

    messages: int
    batch_size: int
    every_bytes: int
    every_frames: int

    @property
    def name(self) -> str:
        return (
            f"seek-{self.messages}-{self.batch_size}-{VALUE_SIZES[0]}-{VALUE_SIZES[1]}"
            f"-{FRAMES_PER_COMMIT}-i{self.every_bytes}-{self.every_frames}"
        )

    @property
    def policy(self) -> IndexPolicy:
        return IndexPolicy(every_bytes=self.every_bytes, every_frames=self.every_frames)


@dataclass
class Built:
    """What building the stream recorded (kept beside the cache as <name>.json)."""

    messages: int
    length: int
    frames: int
    first_ms: int
    last_ms: int
    build_seconds: float
    index_bytes: int = 0  # the index object's size (page blobs: grown in steps, zeros past the end)
    entries: int = 0


def count_entries(store: StreamStore) -> tuple[int, int]:
    """The index object's size and how many valid entries it holds."""
    size = store.index_size()
    raw = store.read_index(0, size) if size else b""
    entries = 0
    for offset in range(INDEX_HEADER_SIZE, size - ENTRY_SIZE + 1, ENTRY_SIZE):
        if decode_entry(raw, offset) is None:
            break
        entries += 1
    return size, entries


class CountingStore:
    """A stream store that counts the round trips made through it, by kind."""

    def __init__(self, store: StreamStore) -> None:
        self._store = store
        self.index_reads = 0
        self.data_reads = 0
        self.other = 0  # checkpoint reads, index sizes
        self.data_bytes = 0

    def read(self, offset: int, size: int) -> bytes:
        self.data_reads += 1
        self.data_bytes += size
        return self._store.read(offset, size)

    def read_index(self, offset: int, size: int) -> bytes:
        self.index_reads += 1
        return self._store.read_index(offset, size)

    def index_size(self) -> int:
        self.other += 1
        return self._store.index_size()

    def read_checkpoint(self) -> Checkpoint:
        self.other += 1
        return self._store.read_checkpoint()

    def reset(self) -> tuple[int, int, int]:
        counts = self.index_reads, self.data_reads, self.other
        self.index_reads = self.data_reads = self.other = self.data_bytes = 0
        return counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class WithoutIndex(CountingStore):
    """The same stream as if it had no index: seeks walk frame headers from its start."""

    def index_size(self) -> int:
        self.other += 1  # a stream without an index still pays for learning so
        return 0


@dataclass
class Seek:
    kind: str  # "sequence" or "time"
    target: int  # a sequence, or ms
    seconds: float
    index_reads: int
    data_reads: int
    other: int
    position: int


@dataclass
class SeekCase:
    backend: str
    kind: str
    how: str  # "index" or "walk"
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, figure: str) -> float:
        return statistics.median(run[figure] for run in self.runs)


@dataclass
class AppendCase:
    backend: str
    path: str
    index: str
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, figure: str) -> float:
        return statistics.median(run[figure] for run in self.runs)


# --- the seek stream ------------------------------------------------------------------


def batches_of(shape: Shape, seed: int) -> Iterator[list[EncodedBatch]]:
    """The stream's commits: FRAMES_PER_COMMIT frames of ``batch_size`` messages each."""
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 20)
    low, high = VALUE_SIZES
    sequence = 0
    group: list[EncodedBatch] = []
    while sequence < shape.messages:
        count = min(shape.batch_size, shape.messages - sequence)
        messages = []
        for number in range(sequence, sequence + count):
            start = rng.randrange(len(pool) - high)
            messages.append((b"key-%012d" % number, pool[start : start + rng.randint(low, high)]))
        group.append(encode_batch(messages))
        sequence += count
        if len(group) == FRAMES_PER_COMMIT:
            yield group
            group = []
    if group:
        yield group


def build(storage: Storage, shape: Shape) -> Built:
    """Write the stream (direct ``Writer``, group commits) and wait for its index."""
    started = time.perf_counter()
    first_ms = last_ms = 0
    frames = 0
    with Writer.open(storage, shape.name, index=shape.policy) as writer:
        for group in batches_of(shape, seed=14):
            results = writer.append_batches(group)
            if not frames:
                first_ms = results[0].timestamp
            last_ms = results[-1].timestamp
            frames += len(results)
        length = writer.checkpoint.length
    seconds = time.perf_counter() - started
    return Built(shape.messages, length, frames, first_ms, last_ms, seconds)


def cached_stream(storage: Storage, shape: Shape, marker: Path) -> Built:
    """The stream of ``shape``, built now unless ``marker`` says a finished build is there."""
    if marker.exists():
        built = Built(**json.loads(marker.read_text()))
        store = storage.open_stream(shape.name)
        try:
            checkpoint = store.read_checkpoint()
            built.index_bytes, built.entries = count_entries(store)
        finally:
            store.close()
        if checkpoint.next_sequence == built.messages and checkpoint.length == built.length:
            print(f"{shape.name}: reusing the stream built before ({marker.parent})", flush=True)
            return built
        raise SystemExit(f"{marker} does not match its stream: remove {marker.parent} and rerun")
    with contextlib.suppress(StreamNotFound):
        storage.delete_stream(shape.name)  # an unfinished build
    print(f"{shape.name}: building {shape.messages:,} messages", flush=True)
    built = build(storage, shape)
    store = storage.open_stream(shape.name)
    try:
        built.index_bytes, built.entries = count_entries(store)
    finally:
        store.close()
    kept = {k: v for k, v in asdict(built).items() if k not in ("index_bytes", "entries")}
    marker.write_text(json.dumps(kept))
    print(
        f"{shape.name}: built in {built.build_seconds:.1f} s "
        f"({built.messages / built.build_seconds:,.0f} msgs/s, {built.length / 1e6:,.0f} MB)",
        flush=True,
    )
    return built


# --- seeks ----------------------------------------------------------------------------


def time_seeks(store: CountingStore, name: str, kind: str, targets: list[int]) -> list[Seek]:
    reader = Reader(store, name)
    seeks = []
    for target in targets:
        store.reset()
        started = time.perf_counter()
        if kind == "sequence":
            position = reader.seek(sequence=target)
        else:
            position = reader.seek(time=target / 1000)
        seconds = time.perf_counter() - started
        seeks.append(Seek(kind, target, seconds, *store.reset(), position))
    return seeks


def check_answers(store: StreamStore, name: str, seeks: list[Seek], built: Built) -> None:
    """Sequence seeks land on their message; time seeks on a message at or after the time."""
    reader = Reader(store, name)
    for seek in seeks:
        if seek.position >= built.length:
            if seek.kind == "sequence" or seek.target <= built.last_ms:
                raise SystemExit(f"seek {seek} answered the end of the stream")
            continue
        message = next(iter(reader.read(seek.position)))
        if seek.kind == "sequence" and message.sequence != seek.target:
            raise SystemExit(f"seek {seek} found sequence {message.sequence}")
        if seek.kind == "time" and message.timestamp < seek.target:
            raise SystemExit(f"seek {seek} found a message of {message.timestamp} ms")


def summary(seeks: list[Seek]) -> dict[str, float]:
    times = sorted(s.seconds for s in seeks)
    return {
        "seeks": len(seeks),
        "median_ms": statistics.median(times) * 1000,
        "p95_ms": percentile(times, 95) * 1000,
        "index_reads": statistics.mean(s.index_reads for s in seeks),
        "max_index_reads": max(s.index_reads for s in seeks),
        "data_reads": statistics.mean(s.data_reads for s in seeks),
        "max_data_reads": max(s.data_reads for s in seeks),
        "other_round_trips": statistics.mean(s.other for s in seeks),
    }


def percentile(ordered: list[float], percent: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(len(ordered) * percent / 100) - 1)]


def seek_run(
    storage: Storage, shape: Shape, built: Built, run: int, seeks: int, walk_seeks: int
) -> dict[tuple[str, str], dict[str, float]]:
    """One run's seeks by sequence and by time, through the index and (the first few) walking."""
    rng = random.Random(1000 + run)
    targets = {
        "sequence": [rng.randrange(built.messages) for _ in range(seeks)],
        "time": [rng.randint(built.first_ms, built.last_ms) for _ in range(seeks)],
    }
    raw = storage.open_stream(shape.name)
    figures: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for kind, wanted in targets.items():
            indexed = time_seeks(CountingStore(raw), shape.name, kind, wanted)
            walked = time_seeks(WithoutIndex(raw), shape.name, kind, wanted[:walk_seeks])
            for with_index, without in zip(indexed, walked, strict=False):
                if with_index.position != without.position:
                    raise SystemExit(f"index and walk disagree: {with_index} vs {without}")
            check_answers(raw, shape.name, indexed[:20], built)
            figures[(kind, "index")] = summary(indexed)
            walk = summary(walked)
            # The same seeks through the index, for a ratio over like for like.
            same = summary(indexed[: len(walked)])
            walk["ratio"] = walk["median_ms"] / same["median_ms"]
            walk["index_median_ms_same_seeks"] = same["median_ms"]
            walk["read_ratio"] = (walk["data_reads"] + walk["index_reads"]) / (
                same["data_reads"] + same["index_reads"]
            )
            figures[(kind, "walk")] = walk
    finally:
        raw.close()
    return figures


# --- append latency -------------------------------------------------------------------


def append_latencies(
    storage: Storage, name: str, policy: IndexPolicy | None, path: str, count: int
) -> tuple[list[float], list[float]]:
    """Seconds per sequential one-message append through a ``GroupCommitter``.

    Also the seconds each index write took meanwhile: they happen after an
    append is answered, but in the committing thread (``commit_here``'s
    caller), so they are what the index could add to an append's latency.
    """
    value = os.urandom(APPEND_VALUE)
    warmup = min(APPEND_WARMUP, count)
    batches = [encode_batch([(b"key-%012d" % n, value)]) for n in range(warmup + count)]
    writer = Writer.open(storage, name, index=policy)
    index_writes: list[float] = []
    if writer.indexer is not None:
        flush = writer.indexer.flush

        def timed_flush() -> None:
            started = time.perf_counter()
            flush()
            index_writes.append(time.perf_counter() - started)

        writer.indexer.flush = timed_flush  # type: ignore[method-assign]
    committer = GroupCommitter(writer)
    latencies: list[float] = []
    try:
        for number, batch in enumerate(batches):
            started = time.perf_counter()
            if path == "submit" or committer.commit_here(batch) is None:
                committer.submit(batch).result()
            if number >= warmup:
                latencies.append(time.perf_counter() - started)
        during = list(index_writes)  # not the one closing makes
    finally:
        committer.close()
    return latencies, during


def append_run(
    storage: Storage, backend: str, run: int, count: int, drop: Callable[[str], None]
) -> dict[tuple[str, str], dict[str, float]]:
    """Every index mode and path once, the modes in this run's turn."""
    modes = list(INDEX_MODES)
    modes = modes[run % len(modes) :] + modes[: run % len(modes)]
    figures: dict[tuple[str, str], dict[str, float]] = {}
    for mode in modes:
        for path in PATHS if run % 2 == 0 else PATHS[::-1]:
            name = f"latency-r{run}-{mode}-{path.replace('_', '-')}"
            latencies, index_writes = append_latencies(
                storage, name, INDEX_MODES[mode], path, count
            )
            latencies.sort()
            drop(name)
            figures[(path, mode)] = {
                "p50_ms": statistics.median(latencies) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
                "p999_ms": percentile(latencies, 99.9) * 1000,
                "max_ms": latencies[-1] * 1000,
                "index_writes": len(index_writes),
                "index_write_ms": statistics.median(index_writes) * 1000 if index_writes else 0,
            }
    line = ", ".join(f"{p} {m} p50 {f['p50_ms']:.3f} ms" for (p, m), f in figures.items())
    print(f"{backend} append run {run + 1}: {line}", flush=True)
    return figures


# --- backends -------------------------------------------------------------------------


class CachedAzurite(Azurite):
    """Azurite on a data folder that outlives it (``stop``, never ``close``)."""

    def __init__(self, location: Path) -> None:
        super().__init__()
        shutil.rmtree(self.location, ignore_errors=True)
        self.location = location
        location.mkdir(parents=True, exist_ok=True)


@dataclass
class Backend:
    name: str
    storage: Storage
    scratch: Storage  # where the append phase's streams go
    drop: Callable[[str], None]  # deletes an append phase's stream
    marker: Path


@contextlib.contextmanager
def backend(name: str, cache: Path, shape: Shape) -> Iterator[Backend]:
    if name == "file":
        root = cache / "file"
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mv-bench-seek-") as scratch:
            # The seek stream is only read here; the appends are timed with fsync per commit.
            yield Backend(
                name,
                FileStorage(root, fsync="never"),
                FileStorage(scratch),
                lambda stream: shutil.rmtree(Path(scratch) / stream, ignore_errors=True),
                root / f"{shape.name}.json",
            )
        return
    azurite = CachedAzurite(cache / "azurite")
    try:
        azurite.start(timeout=120)  # a big data folder takes Azurite a while to load
        storage = AzureStorage.from_connection_string(azurite.connection_string)

        def drop(stream: str) -> None:
            storage.service.delete_container(CONTAINER_PREFIX + stream)

        yield Backend(name, storage, storage, drop, azurite.location / f"{shape.name}.json")
    finally:
        azurite.stop()
        with contextlib.suppress(OSError):
            os.unlink(azurite.log)


# --- report ---------------------------------------------------------------------------


def print_tables(
    console: Console,
    seek_cases: list[SeekCase],
    append_cases: list[AppendCase],
    streams: dict[str, Built],
    runs: int,
) -> None:
    for name, built in streams.items():
        console.print(
            f"{name}: {built.messages:,} messages in {built.frames:,} frames, "
            f"{built.length / 1e6:,.1f} MB; index {built.index_bytes:,} bytes, "
            f"{built.entries:,} entries (log2 {math.log2(max(built.entries, 1)):.1f}); "
            f"built in {built.build_seconds:,.1f} s"
        )
    table = Table(
        title=f"Seeks, median of {runs} runs",
        caption="reads per seek are means; walk: the same first seeks with no index "
        "(header walk from the start); x: walk median / index median on those seeks",
        box=SIMPLE,
    )
    columns = (
        *("backend", "seek by", "how", "seeks", "median ms", "p95 ms"),
        *("index rd", "data rd", "other", "x"),
    )
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for case in seek_cases:
        walk = case.how == "walk"
        table.add_row(
            case.backend,
            case.kind,
            case.how,
            f"{case.median('seeks'):.0f}",
            f"{case.median('median_ms'):,.3f}",
            f"{case.median('p95_ms'):,.3f}",
            f"{case.median('index_reads'):.1f}",
            f"{case.median('data_reads'):,.1f}",
            f"{case.median('other_round_trips'):.1f}",
            f"{case.median('ratio'):,.0f}x" if walk else "",
        )
    console.print(table)
    latency = Table(
        title=f"Append ack latency, one 100 B message at a time, median of {runs} runs",
        caption="index: off, on (default policy), dense (an entry every frame); "
        "vs off: p50 and p99 over the same path's with the index off; idx writes: index "
        "writes made during a run's appends (median), and the median time of one",
        box=SIMPLE,
    )
    for column in (
        *("backend", "path", "index", "p50 ms", "p99 ms", "p99.9 ms", "vs off"),
        *("idx writes", "ms each"),
    ):
        latency.add_column(
            column, justify="left" if column in ("backend", "path", "index") else "right"
        )
    off = {(c.backend, c.path): c for c in append_cases if c.index == "off"}
    for appends in append_cases:
        base = off[(appends.backend, appends.path)]
        versus = (
            ""
            if appends.index == "off"
            else f"{appends.median('p50_ms') / base.median('p50_ms'):.2f} / "
            f"{appends.median('p99_ms') / base.median('p99_ms'):.2f}"
        )
        latency.add_row(
            appends.backend,
            appends.path,
            appends.index,
            f"{appends.median('p50_ms'):.3f}",
            f"{appends.median('p99_ms'):.3f}",
            f"{appends.median('p999_ms'):.3f}",
            versus,
            f"{appends.median('index_writes'):.0f}",
            f"{appends.median('index_write_ms'):.3f}" if appends.index != "off" else "",
        )
    console.print(latency)


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="file,azurite")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built streams")
    parser.add_argument("--seeks", type=int, default=SEEKS, help="of each kind per run")
    parser.add_argument("--walk-seeks", type=int, default=WALK_SEEKS, help="without the index")
    parser.add_argument("--appends", type=int, default=APPENDS, help="per mode and path per run")
    parser.add_argument("--every-bytes", type=int, default=DEFAULT_EVERY_BYTES)
    parser.add_argument("--every-frames", type=int, default=DEFAULT_EVERY_FRAMES)
    args = parser.parse_args()
    backends = args.backends.split(",")
    problem = check_arguments(args, backends)
    if problem:
        parser.error(problem)
    shape = Shape(
        max(BATCH_SIZE, round(MESSAGES * args.scale)),
        BATCH_SIZE,
        args.every_bytes,
        args.every_frames,
    )

    seek_cases: dict[tuple[str, str, str], SeekCase] = {}
    append_cases: dict[tuple[str, str, str], AppendCase] = {}
    streams: dict[str, Built] = {}
    for name in backends:
        with backend(name, args.cache, shape) as chosen:
            built = streams[name] = cached_stream(chosen.storage, shape, chosen.marker)
            for run in range(args.runs):
                figures = seek_run(chosen.storage, shape, built, run, args.seeks, args.walk_seeks)
                for (kind, how), figure in figures.items():
                    seek_cases.setdefault((name, kind, how), SeekCase(name, kind, how))
                    seek_cases[(name, kind, how)].runs.append(figure)
                line = ", ".join(
                    f"{kind} {how} {f['median_ms']:.3f} ms" for (kind, how), f in figures.items()
                )
                print(f"{name} seek run {run + 1}/{args.runs}: {line}", flush=True)
            # Untimed: the first appends of a process pay for imports, caches, connections.
            append_latencies(
                chosen.scratch, "latency-warmup", None, "submit", args.appends // 4 + 1
            )
            chosen.drop("latency-warmup")
            for run in range(args.runs):
                appended = append_run(chosen.scratch, name, run, args.appends, chosen.drop)
                for (path, mode), figure in appended.items():
                    append_cases.setdefault((name, path, mode), AppendCase(name, path, mode))
                    append_cases[(name, path, mode)].runs.append(figure)

    ordered_appends = sorted(
        append_cases.values(),
        key=lambda c: (
            backends.index(c.backend),
            PATHS.index(c.path),
            list(INDEX_MODES).index(c.index),
        ),
    )
    print_tables(Console(width=110), list(seek_cases.values()), ordered_appends, streams, args.runs)
    saved = save(args, shape, list(seek_cases.values()), ordered_appends, streams)
    with saved.with_suffix(".md").open("w") as markdown:
        print_tables(
            Console(file=markdown, width=110, no_color=True),
            list(seek_cases.values()),
            ordered_appends,
            streams,
            args.runs,
        )
    print(f"saved {saved} and {saved.with_suffix('.md').name}")


def check_arguments(args: argparse.Namespace, backends: list[str]) -> str | None:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        return f"unknown backend(s) {','.join(unknown)}: choose from {','.join(BACKENDS)}"
    for option in ("seeks", "appends"):  # --runs: benchmark_arguments
        if getattr(args, option) < 1:
            return f"--{option} must be 1 or more"
    if args.walk_seeks < 1 or args.walk_seeks > args.seeks:
        return "--walk-seeks must be 1 to --seeks"
    if not args.scale > 0:
        return "--scale must be more than 0"
    try:
        IndexPolicy(every_bytes=args.every_bytes, every_frames=args.every_frames)
    except ValueError as exc:
        return f"--every-bytes/--every-frames: {exc}"
    return None


def save(
    args: argparse.Namespace,
    shape: Shape,
    seek_cases: list[SeekCase],
    append_cases: list[AppendCase],
    streams: dict[str, Built],
) -> Path:
    cases: list[dict[str, Any]] = []
    for case in seek_cases:
        record: dict[str, Any] = {"phase": "seek", **asdict(case)}
        for figure in case.runs[0]:
            record[figure] = case.median(figure)
        built = streams[case.backend]
        record["log2_entries"] = math.log2(max(built.entries, 1))
        cases.append(record)
    for append in append_cases:
        record = {"phase": "append", **asdict(append)}
        for figure in append.runs[0]:
            record[figure] = append.median(figure)
        cases.append(record)
    return save_results(
        args.output,
        "seek",
        {
            "runs": args.runs,
            "scale": args.scale,
            "shape": asdict(shape)
            | {"value_sizes": VALUE_SIZES, "frames_per_commit": FRAMES_PER_COMMIT},
            "streams": {name: asdict(built) for name, built in streams.items()},
            "seeks_per_run": args.seeks,
            "walk_seeks_per_run": args.walk_seeks,
            "appends_per_run": args.appends,
        },
        cases,
    )


if __name__ == "__main__":
    main()
