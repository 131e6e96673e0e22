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
