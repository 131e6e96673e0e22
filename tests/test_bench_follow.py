"""The follow-cost benchmark still runs (short idle, few followers): a tool, not a test.

It counts what it says it counts: the fixed-interval direct followers poll
far more than the ones that back off, and many followers through a server
cost storage about what one does. Ratios within one run, no clock targets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_benchmarks import BENCHMARKS, run_benchmark


def test_follow_benchmark_runs_counts_and_saves_results(tmp_path: Path) -> None:
    arguments = ("--idle", "4", "--warmup", "2", "--followers", "10", "--direct", "2")
    stdout, report = run_benchmark(
        "follow", tmp_path, *arguments, "--runs", "1", "--output", str(tmp_path / "results")
    )
    assert "Idle followers on Azurite" in stdout
    assert report["benchmark"] == "follow"
    cases = {case["case"]: case for case in report["cases"]}
    fixed, backoff = cases["direct, fixed 0.1 s"], cases["direct, backoff 0.1-2 s"]
    one, many = cases["server, 1 follower"], cases["server, 10 followers"]
    assert all(case["missed"] == 0 for case in cases.values()), cases
    assert fixed["requests_idle"] > 3 * backoff["requests_idle"], (fixed, backoff)
    # Once started: a server's first read rolls the stream forward, a one-off
    # cost of whichever of the two servers comes first.
    steady_one, steady_many = one["requests_after_warmup"], many["requests_after_warmup"]
    assert steady_many <= 1.5 * steady_one + 2, (one, many)
    assert fixed["requests_after_warmup"] > 3 * backoff["requests_after_warmup"], (fixed, backoff)


def test_follow_benchmark_refuses_a_warmup_longer_than_the_idle_time(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "follow.py"), "--idle", "5", "--warmup", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--warmup must be more than 0 and less than --idle" in result.stderr
