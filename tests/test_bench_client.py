"""The client-library benchmark still runs (tiny scale): a tool, not a timed test."""

from __future__ import annotations

from pathlib import Path

from tests.test_benchmarks import run_benchmark


def test_client_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    stdout, report = run_benchmark(
        "client",
        tmp_path,
        *("--scale", "0.005", "--runs", "1"),
        "--output",
        str(tmp_path / "results"),
    )
    assert "vs publish" in stdout
    assert report["benchmark"] == "client"
    cases = {c["case"]: c for c in report["cases"]}
    assert set(cases) == {"publish", "send", "async publish", "async send"}
    assert all(c["msgs_per_s"] > 0 and len(c["seconds"]) == 1 for c in cases.values())
