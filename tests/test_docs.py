"""The documents' snippets run: each ```python block of a page, in order, in one namespace.

They run against a real ``messagevault serve`` subprocess, configured as a
reader would: through MESSAGEVAULT_URL, MESSAGEVAULT_USER and
MESSAGEVAULT_PASSWORD.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve_process import serve_process

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "docs", "docs-password"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        monkeypatch.setenv("MESSAGEVAULT_URL", url)
        monkeypatch.setenv("MESSAGEVAULT_USER", USER)
        monkeypatch.setenv("MESSAGEVAULT_PASSWORD", PASSWORD)
        monkeypatch.chdir(tmp_path)
        yield url


def run_page(page: Path) -> str:
    """Run the page's blocks; what they printed, for the test to check."""
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for number, block in enumerate(blocks, 1):
            code = compile(block, f"{page.name} block {number}", "exec")
            exec(code, namespace)
    return printed.getvalue()


def test_client_guide_runs(server: str) -> None:
    printed = run_page(ROOT / "docs" / "client.md").splitlines()
    # What the page's comments promise.
    assert "999" in printed  # the producer's last sequence, and the consumer's count
    assert printed.count("999") == 2
    assert "1" in printed  # the async producer's receipt
    assert any(line.startswith("stream_not_found ") for line in printed)


def sh_blocks(page: Path) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def test_cli_guide_runs(tmp_path: Path) -> None:
    """docs/cli.md's shell blocks, in order, in one bash: they start and stop their own server."""
    import os
    import subprocess
    import sys

    from tests.azurite import free_port

    script = "\n".join(
        [
            # Whatever fails on the way, the page's server is stopped (by PID).
            'trap \'[ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null; true\' EXIT',
            *sh_blocks(ROOT / "docs" / "cli.md"),
        ]
    )
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(free_port()),
        "TMPDIR": str(tmp_path),  # the page's mktemp -d lands here
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
    }
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "orders: OK" in done.stdout  # verify
    assert '"copied": 1' in done.stdout  # the incremental copy took only the new message
