"""What every benchmark saves: one JSON file per run under results/, with the machine described."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

RESULTS = Path(__file__).resolve().parent / "results"


class BenchmarkParser(argparse.ArgumentParser):
    """Checks ``--runs`` once parsed: no benchmark can take medians of no runs."""

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        parsed, rest = super().parse_known_args(*args, **kwargs)
        if getattr(parsed, "runs", 1) < 1:
            self.error(f"--runs must be at least 1, not {parsed.runs}")
        return parsed, rest


def benchmark_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: --runs, --scale, --output.

    ``--runs`` is checked here (no medians of no runs); what ``--scale``
    may be differs between benchmarks, each checks its own.
    """
    parser = BenchmarkParser(description=description)
    parser.add_argument("--runs", type=int, default=3, help="runs to take medians of (1 or more)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the message counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def scaled_messages(messages: int, batch_size: int, producers: int, scale: float) -> int:
    """``scale`` of ``messages`` in whole batches, at least one batch per producer."""
    return max(producers, round(messages * scale / batch_size)) * batch_size


class Measurable(Protocol):
    """A server process whose CPU time can be read (the embedded server, a peer's server)."""

    def cpu_seconds(self) -> float: ...


@dataclass
class Phase:
    seconds: float
    server_cpu_s: float
    client_cpu_s: float


class Clock:
    """Wall time and both processes' CPU time over one phase."""

    def __init__(self, server: Measurable) -> None:
        self.server = server
        self.started = time.perf_counter()
        self.server_cpu = server.cpu_seconds()
        self.client_cpu = time.process_time()

    def stop(self) -> Phase:
        return Phase(
            time.perf_counter() - self.started,
            self.server.cpu_seconds() - self.server_cpu,
            time.process_time() - self.client_cpu,
        )


class Rates:
    """Medians and rates of a case timed over several runs (a mixin for its dataclass)."""

    messages: int
    payload_bytes: int  # keys + values
    seconds: list[float]  # one per run

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.median

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / self.median / 1e6


def save_results(
    output: Path,
    benchmark: str,
    fields: dict[str, Any],
    cases: list[dict[str, Any]],
    machine: dict[str, Any] | None = None,
) -> Path:
    """Write ``<output>/<benchmark>-<UTC time>.json`` and return its path.

    ``fields`` (runs, scale, settings...) go next to the benchmark's name and
    time; ``machine`` adds versions of what was measured against.
    """
    output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = output / f"{benchmark}-{stamp}.json"
    document = {
        "benchmark": benchmark,
        "time": stamp,
        **fields,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **(machine or {}),
        },
        "cases": cases,
    }
    path.write_text(json.dumps(document, indent=2))
    return path
