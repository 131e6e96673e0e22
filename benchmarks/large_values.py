"""Large values: MB/s of appending and reading back 1 MiB, 16 MiB and 256 MiB values.

    make bench-large           # full size: 256 MiB of values per case, 3 runs, medians
    python benchmarks/large_values.py --scale 0.01 --runs 1

In process, on the file backend with fsync per commit (``always``): each value
is one batch, so one commit; a value over 4 MiB is stored in pieces (HEAD and
CONTINUATION frames). Three kinds of data:

  json        JSON-like text, compress=True (what compression is for)
  json-plain  the same text, stored uncompressed (what compression saves)
  random      random bytes, compress=False (incompressible)

Every case is measured against raw file throughput in the same run: the same
value bytes written to a plain file with an fdatasync after each value, and read
back a value at a time. MB/s count value bytes (uncompressed), so a compressed
case can beat raw; "x raw" is the median of each run's ratio to raw (paired:
both ran back to back on the same bytes). ``--scale`` shrinks the
values (not their count), so a tiny run still has every case. Results go to
benchmarks/results/large_values-<time>.json and .md.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from messagevault import FileStorage, Reader, Writer

# Run as a script, only this file's folder is on sys.path; the repo root makes
# the shared ``benchmarks.report`` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import benchmark_arguments, save_results

MiB = 1024 * 1024
SIZES = (1 * MiB, 16 * MiB, 256 * MiB)
BYTES_PER_CASE = 256 * MiB  # value bytes written per case and run, whatever the value size
KINDS = ("json", "json-plain", "random")


@dataclass
class Case:
    label: str  # nominal value size
    value_size: int  # as run (--scale)
    values: int
    kind: str
    phase: str  # append or read
    stored_bytes: int  # bytes the stream holds after one run
    seconds: list[float]  # MessageVault, one per run
    raw_seconds: list[float]  # plain file I/O on the same bytes, one per run

    @property
    def payload_bytes(self) -> int:
        return self.value_size * self.values

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / statistics.median(self.seconds) / 1e6

    @property
    def raw_mb_per_s(self) -> float:
        return self.payload_bytes / statistics.median(self.raw_seconds) / 1e6

    @property
    def ratio(self) -> float:
        """Median over runs of MessageVault's speed over raw's in that same run.

        Paired run by run: the shared disk's speed drifts by several times
        from one minute to the next, and both sides of a run see the same.
        """
        return statistics.median(
            raw / seconds for seconds, raw in zip(self.seconds, self.raw_seconds, strict=True)
        )


def json_text(size: int, seed: int) -> bytes:
    """JSON-like records up to ``size`` bytes: repetitive keys, varying numbers and names."""
    rng = random.Random(seed)
    names = [f"customer-{rng.randrange(10**6):06d}" for _ in range(500)]
    records = []
    total = 0
    while total < size:
        record = json.dumps(
            {
                "id": total,
                "type": rng.choice(("OrderPlaced", "OrderShipped", "OrderCancelled")),
                "customer": rng.choice(names),
                "total": f"{rng.randrange(100000) / 100:.2f}",
                "items": [
                    {"sku": f"SKU-{rng.randrange(5000)}", "qty": rng.randrange(1, 9)}
                    for _ in range(rng.randrange(1, 4))
                ],
            }
        ).encode()
        records.append(record)
        total += len(record) + 1
    return b"\n".join(records)[:size]


def make_values(kind: str, size: int, count: int) -> list[bytes]:
    """``count`` distinct values (no two alike, so nothing is cached or deduplicated)."""
    if kind == "random":
        return [os.urandom(size) for _ in range(count)]
    base = json_text(size, seed=size)
    # Rotating one text gives distinct values without generating each anew.
    step = max(1, size // max(count, 1))
    return [base[i * step :] + base[: i * step] for i in range(count)]


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def messagevault_run(values: list[bytes], compress: bool, folder: Path) -> tuple[float, float, int]:
    """(append seconds, read seconds, stored bytes) for one run in a fresh folder."""
    storage = FileStorage(folder, fsync="always")
    with Writer.open(storage, "bench") as writer:

        def append() -> None:
            for value in values:
                writer.append([(b"value", value)], compress=compress)

        append_seconds = timed(append)
        stored = writer.checkpoint.length

    with Reader.open(storage, "bench") as reader:

        def read() -> None:
            count = 0
            for message, value in zip(reader.read(), values, strict=True):
                if message.value != value:
                    raise SystemExit(f"content mismatch at sequence {message.sequence}")
                count += 1
            if count != len(values):
                raise SystemExit("value count mismatch")

        read_seconds = timed(read)
    return append_seconds, read_seconds, stored


def raw_run(values: list[bytes], folder: Path) -> tuple[float, float]:
    """The same bytes with plain file I/O: write + fdatasync per value, then read them back."""
    path = folder / "raw"

    def write() -> None:
        with path.open("wb", buffering=0) as file:
            for value in values:
                file.write(value)
                os.fdatasync(file.fileno())  # what the file backend calls per commit

    def read() -> None:
        with path.open("rb", buffering=0) as file:
            for value in values:
                if file.read(len(value)) != value:
                    raise SystemExit("raw content mismatch")

    return timed(write), timed(read)


def run_size(nominal: int, scale: float, runs: int, where: Path | None) -> list[Case]:
    size = max(1024, int(nominal * scale))
    count = max(1, BYTES_PER_CASE // nominal)
    label = f"{nominal // MiB} MiB"
    cases: list[Case] = []
    for kind in KINDS:
        values = make_values(kind, size, count)
        gc.collect()
        timings: dict[str, list[float]] = {
            "append": [],
            "read": [],
            "raw-write": [],
            "raw-read": [],
        }
        stored = 0
        for run in range(1, runs + 1):
            folder = Path(tempfile.mkdtemp(prefix="mv-bench-large-", dir=where))
            try:
                # Taking turns at going first, so that neither side always
                # meets the disk still busy with the other's writes.
                if run % 2:
                    append_s, read_s, stored = messagevault_run(values, kind == "json", folder)
                    raw_write_s, raw_read_s = raw_run(values, folder)
                else:
                    raw_write_s, raw_read_s = raw_run(values, folder)
                    append_s, read_s, stored = messagevault_run(values, kind == "json", folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for name, seconds in zip(
                timings, (append_s, read_s, raw_write_s, raw_read_s), strict=True
            ):
                timings[name].append(seconds)
            payload = size * count / 1e6
            # A line per run as it finishes: a long benchmark is never silent.
            print(
                f"{label} {kind} run {run}/{runs}: append {payload / append_s:,.0f} MB/s "
                f"(raw {payload / raw_write_s:,.0f}), read {payload / read_s:,.0f} MB/s "
                f"(raw {payload / raw_read_s:,.0f}), stored {stored / 1e6:,.1f} MB",
                flush=True,
            )
        del values
        for phase, raw in (("append", "raw-write"), ("read", "raw-read")):
            cases.append(
                Case(label, size, count, kind, phase, stored, timings[phase], timings[raw])
            )
    return cases


COLUMNS = ("value", "data", "phase", "MB/s", "raw MB/s", "x raw", "stored/value", "min..max s")


def rows(cases: list[Case]) -> list[list[str]]:
    return [
        [
            case.label,
            case.kind,
            case.phase,
            f"{case.mb_per_s:,.0f}",
            f"{case.raw_mb_per_s:,.0f}",
            f"{case.ratio:.2f}",
            f"{case.stored_bytes / case.payload_bytes:.2f}",
            f"{min(case.seconds):.2f}..{max(case.seconds):.2f}",
        ]
        for case in cases
    ]


def markdown(title: str, cells: list[list[str]]) -> str:
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(row) + " |"

    separator = [*("---" for _ in COLUMNS[:3]), *("---:" for _ in COLUMNS[3:])]
    return "\n".join([f"## {title}", "", line(COLUMNS), line(separator), *map(line, cells), ""])


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the test streams")
    args = parser.parse_args()

    cases: list[Case] = []
    for nominal in SIZES:
        cases += run_size(nominal, args.scale, args.runs, args.dir)

    title = (
        f"MessageVault large values, file backend, fsync always, median of {args.runs} "
        f"(scale {args.scale})"
    )
    cells = rows(cases)
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in COLUMNS[:3] else "right")
    for row in cells:
        table.add_row(*row)
    Console(width=max(Console().width, 110)).print(table)
    path = save_results(
        args.output,
        "large_values",
        {"runs": args.runs, "scale": args.scale, "fsync": "always"},
        [
            {
                **asdict(case),
                "payload_bytes": case.payload_bytes,
                "mb_per_s": case.mb_per_s,
                "raw_mb_per_s": case.raw_mb_per_s,
                "ratio_to_raw": case.ratio,
            }
            for case in cases
        ],
    )
    path.with_suffix(".md").write_text(markdown(title, cells), encoding="utf-8")
    print(f"saved {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
