"""The seek benchmark still runs (a tiny stream, files and its own Azurite): a tool, not a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_benchmarks import BENCHMARKS, run_benchmark

# A stream of 1,000 frames with an entry every 16 KiB: enough entries for a binary
# search, and far enough apart that a walk from the start needs many more reads.
TINY = ("--scale", "0.01", "--every-bytes", "16384", "--seeks", "20", "--walk-seeks", "2")


def test_seek_benchmark_runs_reuses_its_stream_and_saves_results(tmp_path: Path) -> None:
    cache, results = tmp_path / "cache", tmp_path / "results"
    arguments = (*TINY, "--runs", "2", "--appends", "20", "--cache", str(cache))
    stdout, report = run_benchmark("seek", tmp_path, *arguments, "--output", str(results))
    assert "building 100,000 messages" in stdout
    for words in ("Seeks, median of 2 runs", "Append ack latency", "commit_here", "idx writes"):
        assert words in stdout
    assert report["benchmark"] == "seek"
    for backend in ("file", "azurite"):
        stream = report["streams"][backend]
        assert stream["messages"] == 100_000
        assert stream["frames"] == 1_000
        assert stream["entries"] > 100  # about one per 16 KiB of a 6.6 MB stream
        seeks = {
            (c["kind"], c["how"]): c
            for c in report["cases"]
            if c["phase"] == "seek" and c["backend"] == backend
        }
        for kind in ("sequence", "time"):
            index, walk = seeks[(kind, "index")], seeks[(kind, "walk")]
            assert len(index["runs"]) == len(walk["runs"]) == 2
            assert index["seeks"] == 20 and walk["seeks"] == 2
            # O(log n): a handful of index reads and one window of frame headers.
            assert 1 <= index["max_index_reads"] <= index["log2_entries"]
            assert index["max_data_reads"] <= 2
            assert walk["index_reads"] == 0
            assert walk["data_reads"] > 3 * (index["data_reads"] + index["index_reads"])
            assert walk["read_ratio"] > 3
        appends = {
            (c["path"], c["index"]): c
            for c in report["cases"]
            if c["phase"] == "append" and c["backend"] == backend
        }
        assert set(appends) == {
            (path, index) for path in ("commit_here", "submit") for index in ("off", "on", "dense")
        }
        assert all(len(c["runs"]) == 2 and c["p50_ms"] > 0 for c in appends.values())
        assert all(c["index_writes"] == 0 for (_, index), c in appends.items() if index == "off")
    (markdown,) = results.glob("seek-*.md")
    assert "Append ack latency" in markdown.read_text()

    # The second run finds both streams in the cache instead of building them again.
    for saved in results.iterdir():
        saved.unlink()
    again, _ = run_benchmark(
        "seek",
        tmp_path,
        *TINY,
        "--runs",
        "1",
        "--appends",
        "5",
        "--backends",
        "file",
        "--cache",
        str(cache),
        "--output",
        str(results),
    )
    assert "reusing the stream built before" in again
    assert "building" not in again


def test_seek_benchmark_refuses_bad_choices_in_one_line(tmp_path: Path) -> None:
    for args, expected in (
        (("--backends", "file,s3"), "unknown backend(s) s3"),
        (("--seeks", "0"), "--seeks must be 1 or more"),
        (("--walk-seeks", "500"), "--walk-seeks must be 1 to --seeks"),
        (("--every-bytes", "0"), "every_bytes and every_frames must be"),
        (("--scale", "0"), "--scale must be more than 0"),
    ):
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "seek.py"), *args, "--cache", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr.splitlines()[-1]
    assert not list(tmp_path.iterdir())
