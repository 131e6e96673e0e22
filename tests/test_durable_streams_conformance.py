"""The official Durable Streams conformance suite, against its reference server and MessageVault.

Issue 16's target: MessageVault passes every test the protocol's Node reference
server passes in the same suite. The reference runs once per pytest session
(shared by the xdist workers through a file under the session's temp root);
each MessageVault run compares against it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.durable_streams import (
    ConformanceError,
    Results,
    check_base_url,
    parse_report,
    reference_server,
    regressions,
    run_conformance,
    shared_reference_results,
    summary,
)
from tests.serve_process import serve_process

# The reference server (0.3.7, long polls held 500 ms) passed 326 of the suite's
# 338 tests (0.3.6); 6 fail and 6 are the opt-in subscription tests, skipped.
REFERENCE_PASSES_AT_LEAST = 324
ANONYMOUS_OPTION = "--allow-anonymous"
# Two offset=now long-poll tests need an idle long poll to end within 5 s
# (tests/durable_streams/__init__.py); --max-wait also bounds the Durable
# Streams routes' hold (30 s otherwise), as the reference's is 500 ms in its run.
MESSAGEVAULT_SERVE_ARGUMENTS = [ANONYMOUS_OPTION, "all:write", "--max-wait", "1"]
# That hold in ms, for the suite's own timeouts of tests that wait one out.
MESSAGEVAULT_LONG_POLL_MS: int | None = 1000


# A run may wait for the other worker's reference run, then run the suite
# (each bounded by SUITE_TIMEOUT, 240 s): more than pytest's 300 s default.
RUN_TIMEOUT = 600


@pytest.fixture(scope="session")
def reference_baseline(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Results:
    """The suite's results against the reference server, once for the whole session."""
    # Under xdist each worker's temp root is a child of the session's: the parent is shared.
    base = tmp_path_factory.getbasetemp()
    return shared_reference_results(base if worker_id == "master" else base.parent)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_the_reference_server_baseline(reference_baseline: Results) -> None:
    print(summary({"reference": reference_baseline}))
    assert len(reference_baseline.passed) >= REFERENCE_PASSES_AT_LEAST, summary(
        {"reference": reference_baseline}
    )
    # Creating, appending and reading are the protocol's core: a harness that
    # mangles requests or reports fails these first.
    core = [name for name in reference_baseline.outcomes if "Basic Stream Operations" in name]
    assert core
    assert all(reference_baseline.outcomes[name].status == "passed" for name in core)


def _serve_has_anonymous_option() -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return ANONYMOUS_OPTION in help_text


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("backend", ["file", "azure"])
def test_messagevault_passes_what_the_reference_passes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not _serve_has_anonymous_option():
        pytest.xfail(
            f"`messagevault serve` has no {ANONYMOUS_OPTION} option yet: the suite sends no "
            "credentials (issue 16, being built)"
        )
    storage = None
    if backend == "azure":
        azurite = request.getfixturevalue("azurite")
        request.getfixturevalue("azure_storage")  # deletes the suite's streams afterwards
        storage = f"azure:{azurite.connection_string}"
    with serve_process(
        tmp_path / "data",
        "admin",
        "admin-password",
        arguments=MESSAGEVAULT_SERVE_ARGUMENTS,
        storage=storage,
        log=tmp_path / "serve.log",
    ) as url:
        results = run_conformance(
            url,
            tmp_path / "suite",
            long_poll_timeout_ms=MESSAGEVAULT_LONG_POLL_MS,
            # The property-based tests create ~100 streams each: a dozen storage round
            # trips apiece on Azure, past vitest's 5 s per test on a shared Azurite.
            test_timeout_ms=AZURE_TEST_TIMEOUT_MS if backend == "azure" else None,
        )
    # Asked for only now, so that with two workers the reference runs beside this one.
    baseline: Results = request.getfixturevalue("reference_baseline")
    label = f"messagevault ({backend})"
    print(summary({"reference": baseline, label: results}))
    missing = regressions(baseline, results)
    assert not missing, f"{len(missing)} tests the reference server passes fail on {label}:\n" + (
        "\n".join(f"  {name}: {results.outcomes[name].first_line}" for name in missing)
    )


AZURE_TEST_TIMEOUT_MS = 30_000


@pytest.mark.parametrize(
    "url", ["", "127.0.0.1:8080", "ftp://127.0.0.1/", "http://", "http://127.0.0.1:1/?a=b"]
)
def test_a_bad_server_url_is_refused_before_anything_runs(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server URL must be"):
        run_conformance(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_url_where_nothing_answers_is_refused(tmp_path: Path) -> None:
    with reference_server(tmp_path / "server") as url:
        pass  # now stopped: its port is free and nothing answers there
    with pytest.raises(ConformanceError, match=f"nothing answers at {url}"):
        run_conformance(url, tmp_path / "suite")
    assert not (tmp_path / "suite").exists()


def test_a_bad_long_poll_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="long_poll_timeout_ms must be positive"):
        run_conformance("http://127.0.0.1:1", tmp_path, long_poll_timeout_ms=0)
    with (
        pytest.raises(ValueError, match="long_poll_timeout_ms must be positive"),
        reference_server(tmp_path / "server", long_poll_timeout_ms=-5),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_base_url_loses_its_trailing_slash() -> None:
    # The suite appends /v1/stream/... to it: a trailing slash would double it.
    assert check_base_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"


def test_a_timed_out_test_says_so() -> None:
    # vitest's JSON report gives a timeout as a bare stack, "Error: STACK_TRACE_ERROR".
    stack = "Error: STACK_TRACE_ERROR\n    at task (file:///chunk-artifact.js:1784:27)"
    report = {
        "testResults": [
            {
                "assertionResults": [
                    {
                        "fullName": "s waits",
                        "status": "failed",
                        "duration": 5000.9,
                        "failureMessages": [stack],
                    },
                    {
                        "fullName": "s asserts",
                        "status": "failed",
                        "duration": 3.0,
                        "failureMessages": ["AssertionError: expected 404 to be 200\n    at x"],
                    },
                    {"fullName": "s opt-in", "status": "skipped", "failureMessages": []},
                    {"fullName": "s later", "status": "todo", "failureMessages": []},
                ]
            }
        ]
    }
    results = parse_report(report, "http://127.0.0.1:1")
    assert results.outcomes["s waits"].first_line == "timed out after 5.0 s"
    assert results.outcomes["s asserts"].first_line == "AssertionError: expected 404 to be 200"
    assert results.failed == ["s waits", "s asserts"]
    assert results.skipped == ["s opt-in", "s later"]
