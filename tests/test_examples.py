"""examples/publisher.py and examples/tail.py run against a real server subprocess.

(examples/projection.py has its own tests in test_projection_example.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from messagevault.client import Client
from tests.serve_process import serve_process

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
USER, PASSWORD = "example", "example-password"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        yield url


def _environment(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MESSAGEVAULT_URL": url,
        "MESSAGEVAULT_USER": USER,
        "MESSAGEVAULT_PASSWORD": PASSWORD,
    }


def _example(url: str, name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=_environment(url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_publisher_publishes_a_batch_then_single_messages(server: str) -> None:
    stdout = _example(server, "publisher.py", "--stream", "orders", "--count", "2500")
    assert "batch: sequence 0 at position 0" in stdout
    assert "2500 orders: last at sequence 2500" in stdout
    with Client(server, user=USER, password=PASSWORD) as client:
        messages = list(client.read("orders"))
    assert len(messages) == 2501
    assert messages[0].key == b"ShopOpened"
    assert [m.value for m in messages[1:3]] == [
        b'{"order": 0, "amount": 1}',
        b'{"order": 1, "amount": 2}',
    ]
    assert {m.key for m in messages[1:]} == {b"OrderPlaced"}


def test_tail_replays_from_a_position(server: str) -> None:
    with Client(server, user=USER, password=PASSWORD) as client:
        client.publish("orders", [("OrderPlaced", f"order {i}") for i in range(3)])
    stdout = _example(server, "tail.py", "orders", "--from", "0", "--limit", "3")
    assert stdout.splitlines() == [
        "#0 @0 OrderPlaced: order 0",
        "#1 @100 OrderPlaced: order 1",  # 96 bytes of v2 header: publish has a producer id
        "#2 @104 OrderPlaced: order 2",
    ]


def _waiting_reads(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith('messagevault_waiting_reads{stream="orders"}')
    )


def test_tail_from_the_end_shows_only_new_messages(server: str) -> None:
    with Client(server, user=USER, password=PASSWORD) as client:
        client.publish("orders", ["old"])
        tail = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "tail.py"), "orders", "--limit", "2"],
            env=_environment(server),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while _waiting_reads(server) < 1:  # the tail waits at the end of the stream
                assert tail.poll() is None, tail.stderr.read() if tail.stderr else ""
                assert time.monotonic() < deadline, "tail never reached the end of the stream"
                time.sleep(0.05)
            client.publish("orders", [("Late", "new 1"), ("Late", "new 2")])
            stdout, stderr = tail.communicate(timeout=60)
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.wait(timeout=30)
    assert tail.returncode == 0, stderr
    assert stdout.splitlines() == ["#1 @108 Late: new 1", "#2 @208 Late: new 2"]
