"""Property-based API tests with schemathesis against the served /openapi.json.

A real server process on a loopback port (file storage, auth on); schemathesis
generates requests from the document (a bounded number per operation) and
checks that nothing answers 5xx and every answer matches the schema.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.serve_process import serve_process

AUTH = "Basic " + base64.b64encode(b"tester:secret").decode()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_process(tmp_path_factory.mktemp("schema"), "tester", "secret") as url:
        yield url


def test_api_matches_its_schema(server_url: str) -> None:
    # The schema is driven by hand: schemathesis's pytest plugin does not load
    # under this pytest version, its engine does.
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            if case.path == "/streams/{stream}/messages" and case.query:
                case.query.pop("wait", None)  # long-polls would only make the run slow
            case.call_and_validate(
                headers={"Authorization": AUTH},
                timeout=30,
                # A schema cannot say which integers are message positions, so a
                # schema-valid ``from`` may rightly be refused: no 5xx, and every
                # answer in the documented shape, is what is checked.
                excluded_checks=[positive_data_acceptance],
            )

        check()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {
        "POST /streams/{stream}",
        "GET /streams/{stream}",
        "GET /streams",
        "GET /streams/{stream}/messages",
        "GET /health",
    } <= set(checked)
