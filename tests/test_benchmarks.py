"""The benchmarks still run (tiny scale): they are tools, not timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(name: str, tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run ``benchmarks/<name>.py`` as a script; its stdout and the report it saved."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (saved,) = (tmp_path / "results").glob(f"{name}-*.json")
    return result.stdout, json.loads(saved.read_text())


def test_core_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    stdout, report = run_benchmark(
        "core",
        tmp_path,
        *("--scale", "0.002", "--runs", "1"),
        *("--dir", str(tmp_path), "--output", str(tmp_path / "results")),
    )
    assert "W1" in stdout
    cases = report["cases"]
    assert {(c["workload"], c["fsync"], c["phase"]) for c in cases} >= {
        ("W1", "never", "append"),
        ("W1", "always", "read"),
        ("W2", "always", "append"),
    }
    assert all(c["msgs_per_s"] > 0 for c in cases)
    assert set(report["always_share_of_never"]) == {"W1", "W2"}
    assert "W2: append with fsync=always at" in stdout


def test_core_benchmark_refuses_bad_choices_in_one_line(tmp_path: Path) -> None:
    for args, expected in (
        (("--workloads", "W1,W9"), "unknown workload(s) W9"),
        (("--fsync", "always,sometimes"), "unknown fsync policy"),
        (("--preallocate", "-1"), "--preallocate must be 0 or more"),
    ):
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "core.py"), *args, "--output", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert expected in result.stderr.splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_large_values_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    stdout, report = run_benchmark(
        "large_values",
        tmp_path,
        *("--scale", "0.0005", "--runs", "1"),
        *("--dir", str(tmp_path), "--output", str(tmp_path / "results")),
    )
    assert "256 MiB" in stdout
    cases = report["cases"]
    assert {(c["label"], c["kind"], c["phase"]) for c in cases} == {
        (label, kind, phase)
        for label in ("1 MiB", "16 MiB", "256 MiB")
        for kind in ("json", "json-plain", "random")
        for phase in ("append", "read")
    }
    assert all(c["mb_per_s"] > 0 and c["raw_mb_per_s"] > 0 for c in cases)
    # Compression on JSON-like text stores less than the values; random bytes stay as they are.
    stored = {(c["label"], c["kind"]): c["stored_bytes"] / c["payload_bytes"] for c in cases}
    assert stored[("256 MiB", "json")] < 0.5 < 1 <= stored[("256 MiB", "random")]
    (markdown,) = (tmp_path / "results").glob("large_values-*.md")
    assert "| 256 MiB | random | read |" in markdown.read_text()


def test_benchmarks_refuse_bad_options_in_one_line_before_running(tmp_path: Path) -> None:
    """Each was a traceback or a silent run of nothing (or of the wrong thing) before."""
    for name, args, expected in (
        *((name, ("--runs", "0"), "--runs must be at least 1, not 0") for name in ("core", "http")),
        ("follow", ("--followers", "0"), "--followers must be at least 1, not 0"),
        ("follow", ("--direct", "-1"), "--direct must be at least 1, not -1"),
        ("cluster", ("--runs", "0"), "--runs must be at least 1, not 0"),
        ("cluster", ("--backends", "file,azur"), "unknown backend(s) azur"),
        ("cluster", ("--modes", "all"), "unknown mode(s) all"),
        ("cluster", ("--nodes", "1,x"), "--nodes must be whole numbers"),
        ("cluster", ("--nodes", "0"), "--nodes must each be 1 to 12"),
        ("cluster", ("--duration", "0"), "--duration must be more than 0"),
    ):
        output = ("--out" if name == "cluster" else "--output", str(tmp_path))
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), *args, *output],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, (name, args, result.stderr)
        assert expected in result.stderr.splitlines()[-1], (name, args, result.stderr)
    assert not list(tmp_path.iterdir())
