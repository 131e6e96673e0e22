"""examples/projection.py: counts by key that stay exact across restarts and kills.

Run as a user would: the script in a subprocess, against a ``messagevault
serve`` subprocess (``--url`` and the MESSAGEVAULT_* variables) and against
a data folder (``--storage``). The counts it prints, and those it saved with
its position, are compared with counting the stream directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from messagevault import FileStorage, Message, Reader, Writer
from messagevault.positions import FilePositionStore
from tests.serve_process import serve_process
from tests.test_consumer_crash import Producer

SCRIPT = Path(__file__).parents[1] / "examples" / "projection.py"
STREAM = "orders"
USER, PASSWORD = "app", "secret"
KILLS = 20
SEED = 77


def stored(root: Path) -> list[Message]:
    with Reader.open(FileStorage(root), STREAM) as reader:
        return list(reader.read())


def expected_counts(messages: list[Message], up_to: int | None = None) -> dict[str, int]:
    counts = Counter(
        m.key.decode("utf-8", "backslashreplace")
        for m in messages
        if up_to is None or m.next_position <= up_to
    )
    return dict(counts)


def projection(
    tmp_path: Path, *options: str, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    variables = {"MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD}
    if url is not None:
        variables["MESSAGEVAULT_URL"] = url
    return subprocess.run(
        [sys.executable, str(SCRIPT), STREAM, "--positions", str(tmp_path / "positions"), *options],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **variables},
        check=False,
        cwd=tmp_path,
    )


def keyed(start: int, count: int) -> list[tuple[bytes, bytes]]:
    keys = [b"placed", b"paid", b"shipped", "café".encode(), b"\xff\xfe"]
    return [(keys[i % 5 if i % 11 else 4], b"%d" % i) for i in range(start, start + count)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        yield url


def test_projection_through_the_server_resumes_exactly(server: str, tmp_path: Path) -> None:
    from messagevault.client import Client

    with Client(server, user=USER, password=PASSWORD) as client:
        client.publish(STREAM, keyed(0, 300))
        first = projection(tmp_path, "--until-end", "--url", server, "--save-every", "7")
        assert first.returncode == 0, first.stderr
        assert "resuming at the beginning" in first.stderr
        assert json.loads(first.stdout) == expected_counts(stored(tmp_path / "data"))
        client.publish(STREAM, keyed(300, 250))
    second = projection(tmp_path, "--until-end", url=server)  # MESSAGEVAULT_URL, not --url
    assert second.returncode == 0, second.stderr
    messages = stored(tmp_path / "data")
    assert f"resuming at {messages[299].next_position}" in second.stderr
    assert json.loads(second.stdout) == expected_counts(messages)
    assert sum(json.loads(second.stdout).values()) == 550


def test_projection_from_storage(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    with Writer.open(storage, STREAM) as writer:
        writer.append(keyed(0, 120))
    storage_url = f"file:{tmp_path / 'data'}"
    first = projection(tmp_path, "--until-end", "--storage", storage_url, "--name", "p1")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == expected_counts(stored(tmp_path / "data"))
    saved = FilePositionStore(tmp_path / "positions").load("p1")
    assert saved is not None and saved.state == json.loads(first.stdout)


def test_projection_bad_input_is_one_line(tmp_path: Path) -> None:
    result = projection(tmp_path, "--storage", str(tmp_path), "--name", "Not Valid")
    assert result.returncode == 1
    assert result.stderr.startswith("error: consumer name 'Not Valid' is not valid")
    assert "Traceback" not in result.stderr
    missing = projection(tmp_path, "--storage", str(tmp_path), "--until-end")
    assert missing.returncode == 1 and "error: stream 'orders' does not exist" in missing.stderr


@pytest.mark.slow
def test_projection_counts_stay_exact_across_kills(server: str, tmp_path: Path) -> None:
    """SIGKILLed at random moments while a producer publishes; the counts never drift."""
    from messagevault.client import Client

    rng = random.Random(SEED)
    store = FilePositionStore(tmp_path / "positions")
    name = f"count-by-key-{STREAM}"
    environment = {**os.environ, "MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD}
    checked = 0
    with Client(server, user=USER, password=PASSWORD) as client:
        client.publish(STREAM, keyed(0, 50))
        with Producer(lambda pairs: client.publish(STREAM, pairs), SEED):
            for _ in range(KILLS):
                child = subprocess.Popen(
                    [
                        *(sys.executable, str(SCRIPT), STREAM, "--url", server),
                        *("--positions", str(tmp_path / "positions")),
                        *("--save-every", str(rng.choice([1, 3, 20])), "--save-interval", "0.05"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=environment,
                )
                assert child.stderr is not None
                line = child.stderr.readline()  # printed once the saved counts are loaded
                assert line.startswith(b"projection: resuming at"), line
                time.sleep(rng.uniform(0, 0.3))
                child.send_signal(signal.SIGKILL)
                child.wait(30)
                child.stderr.close()
                saved = store.load(name)
                if saved is not None:
                    # The counts saved are exactly those of the messages before the position.
                    messages = stored(tmp_path / "data")
                    assert saved.state == expected_counts(messages, saved.position)
                    checked += saved.position > 0
    final = projection(tmp_path, "--until-end", "--url", server)
    assert final.returncode == 0, final.stderr
    messages = stored(tmp_path / "data")
    assert json.loads(final.stdout) == expected_counts(messages)
    assert checked >= KILLS // 2
    print(f"projection: {KILLS} kills, {len(messages)} messages counted exactly")
