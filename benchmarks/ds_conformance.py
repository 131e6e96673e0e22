"""Run the official Durable Streams conformance suite against any server; print each test's outcome.

    python benchmarks/ds_conformance.py URL                # the suite against URL
    python benchmarks/ds_conformance.py URL --compare      # and the reference server beside it
    python benchmarks/ds_conformance.py                    # the reference server alone
    make ds-conformance URL=http://127.0.0.1:8080 ARGS=--compare

URL is the server's root: the suite adds /v1/stream/<name> itself and sends no
credentials (serve MessageVault with --allow-anonymous all:write). With
--compare the reference server (Node, file-backed, 500 ms long polls) runs the
suite at the same time, and the tests it passes that URL does not are listed
last; the exit status is then 1 if there are any. One run takes 30-60 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run as a script, this folder comes first on sys.path; the repository root is what it needs.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from tests.durable_streams import (  # noqa: E402
    ConformanceError,
    Results,
    check_answers,
    check_base_url,
    regressions,
    run_conformance,
    run_reference,
    summary,
)

MARKS = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the Durable Streams conformance suite against a server.",
        epilog="Without URL, the suite runs against the protocol's Node reference server.",
    )
    parser.add_argument("url", nargs="?", help="the server's root URL, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the reference server, and list the tests it passes that URL does not",
    )
    parser.add_argument(
        "--long-poll-ms",
        type=int,
        help="how long the server holds an idle long poll (the suite assumes 20000)",
    )
    parser.add_argument(
        "--failed-only", action="store_true", help="list only the failed tests, not every test"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where vitest's JSON report and log go (default: a new temp folder, kept)",
    )
    arguments = parser.parse_args()
    if arguments.compare and not arguments.url:
        parser.error("--compare needs a URL to compare with the reference server")
    if arguments.long_poll_ms is not None and arguments.long_poll_ms <= 0:
        parser.error(f"--long-poll-ms must be positive, not {arguments.long_poll_ms}")
    if arguments.url:
        try:
            arguments.url = check_base_url(arguments.url)
        except ValueError as error:
            parser.error(str(error))
    return arguments


def _print_tests(label: str, results: Results, failed_only: bool) -> None:
    print(f"{label} ({results.base_url}):")
    for name, outcome in results.outcomes.items():
        if failed_only and outcome.status != "failed":
            continue
        line = f"  {MARKS[outcome.status]}  {name}"
        print(f"{line}\n          {outcome.first_line}" if outcome.status == "failed" else line)
    print()


def main() -> int:
    arguments = _arguments()
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="ds-conformance-"))
    runs: dict[str, Results] = {}
    try:
        if arguments.url:
            check_answers(arguments.url)  # before the reference's half minute, not after
        with ThreadPoolExecutor(max_workers=2) as pool:
            reference = (
                pool.submit(run_reference, work_dir / "reference")
                if arguments.compare or not arguments.url
                else None
            )
            target = (
                pool.submit(
                    run_conformance,
                    arguments.url,
                    work_dir / "server",
                    long_poll_timeout_ms=arguments.long_poll_ms,
                )
                if arguments.url
                else None
            )
            if reference is not None:
                runs["reference"] = reference.result()
            if target is not None:
                runs["server"] = target.result()
    except (ConformanceError, ValueError) as error:
        print(f"ds_conformance: {error}", file=sys.stderr)
        return 2
    for label, results in runs.items():
        _print_tests(label, results, arguments.failed_only)
    print(summary(runs))
    print(f"\nvitest's reports and logs: {work_dir}")
    if arguments.compare:
        missing = regressions(runs["reference"], runs["server"])
        print(f"\n{len(missing)} tests the reference server passes fail on {arguments.url}:")
        for name in missing:
            print(f"  {name}\n      {runs['server'].outcomes[name].first_line}")
        return 1 if missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
