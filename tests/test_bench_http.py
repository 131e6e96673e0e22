"""The HTTP benchmark still runs (tiny scale): a tool, not a timed test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.test_benchmarks import run_benchmark


def test_http_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    stdout, report = run_benchmark(
        "http",
        tmp_path,
        *("--scale", "0.002", "--runs", "1"),
        *("--dir", str(tmp_path), "--output", str(tmp_path / "results")),
        *("--read-formats", "json,ndjson,binary"),
    )
    for workload in ("W1", "W2", "W3", "W4"):
        assert workload in stdout
    cases = report["cases"]
    full = {
        (workload, producers, "full", phase, "raw")
        for workload, producers in (
            ("W1", 1),
            ("W1", 4),
            ("W1", 8),
            ("W2", 1),
            ("W2", 4),
            ("W2", 8),
            ("W3", 1),
            ("W4", 16),
        )
        for phase in ("write", "read json", "read ndjson", "read binary")
    }
    # Minimal-receipt variants: written with Prefer: return=minimal, read back as binary.
    minimal = [
        (workload, producers, receipts, phase, "raw")
        for workload, producers in (("W1", 8), ("W2", 8), ("W4", 16), ("W1", 1))
        for receipts, phase in (("minimal", "write"), ("full", "read binary"))
    ]
    # W1 x1 through the client library: publish, then read it back with read.
    clients = [
        ("W1", 1, receipts, phase, driver)
        for driver in ("client", "async-client")
        for receipts, phase in (("minimal", "write"), ("full", "read client"))
    ]
    got = Counter(
        (c["workload"], c["producers"], c["receipts"], c["phase"], c["driver"]) for c in cases
    )
    assert got == Counter([*full, *minimal, *clients])
    assert set(report["client_shares"]) == {"client", "async-client"}
    assert all(c["msgs_per_s"] > 0 for c in cases)
    assert all(c["commits"][0] >= 1 for c in cases if c["phase"] == "write")
    (w3,) = (c for c in cases if c["workload"] == "W3" and c["phase"] == "write")
    assert 0 < w3["median_latency_ms"]["p50"] <= w3["median_latency_ms"]["max"]
    # Every case's server was stopped and its data folder removed.
    assert not list(tmp_path.glob("mv-bench-http-*"))
