"""The Azure benchmark still runs (tiny scale, its own Azurite): a tool, not a timed test."""

from __future__ import annotations

from pathlib import Path

from tests.test_benchmarks import run_benchmark


def test_azure_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    stdout, report = run_benchmark(
        "azure",
        tmp_path,
        *("--scale", "0.002", "--runs", "2"),  # two runs, so that both phase orders are exercised
        *("--output", str(tmp_path / "results")),
    )
    for word in ("W1", "W2", "raw upload", "append", "raw download", "read", "MB/s", "target"):
        assert word in stdout
    assert report["benchmark"] == "azure"
    cases = {(c["workload"], c["phase"]): c for c in report["cases"]}
    for workload in ("W1", "W2"):
        for phase in ("raw upload", "append", "raw download", "sdk download", "read"):
            case = cases[(workload, phase)]
            assert len(case["seconds"]) == 2
            assert case["mb_per_s"] > 0
        for phase, baseline in (("append", "raw upload"), ("read", "raw download")):
            case = cases[(workload, phase)]
            assert case["baseline"] == baseline
            assert case["ratio"] > 0
            assert case["msgs_per_s"] > 0
        assert cases[(workload, "append")]["commits_per_s"] > 0
    latency = cases[("W3", "ack latency")]
    assert len(latency["runs"]) == 2
    for figure in ("put_page_p50_ms", "w3_p50_ms", "bare_p50_ms", "ratio", "storage_ratio"):
        assert latency[figure] > 0
    assert "W3 via serve" in stdout
