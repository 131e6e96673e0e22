"""The benchmarks still run (tiny scale): they are tools, not timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_core_benchmark_runs_and_saves_results(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "core.py"),
            "--scale",
            "0.002",
            "--runs",
            "1",
            "--dir",
            str(tmp_path),
            "--output",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "W1" in result.stdout
    (saved,) = (tmp_path / "results").glob("core-*.json")
    cases = json.loads(saved.read_text())["cases"]
    assert {(c["workload"], c["fsync"], c["phase"]) for c in cases} >= {
        ("W1", "never", "append"),
        ("W1", "always", "read"),
        ("W2", "always", "append"),
    }
    assert all(c["msgs_per_s"] > 0 for c in cases)
