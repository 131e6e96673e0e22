"""The JavaScript reader (clients/js/) on streams the Python writer produced.

Python writes the streams and lists what they hold; ``node --test`` reads
them with the JS reader and compares. So ``make test`` runs the JS tests too
(the golden files and damage cases need no streams and run in the same call).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from messagevault import FileStorage, Reader, Writer
from messagevault.client import Client
from messagevault.format import Message, encode_batch
from messagevault.index import IndexPolicy
from messagevault.server import StreamHub, create_app
from messagevault.server.auth import Authenticator, Users, save_users
from messagevault.storage.azure import AzureStorage
from tests.served import ServedApp

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = ROOT / "clients" / "js" / "test"
NODE = shutil.which("node")
STREAM = "js-remote"
USER, PASSWORD = "js-reader", "js-reader-secret"
DENSE = IndexPolicy(every_bytes=2048, every_frames=3, flush_interval=0)

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (Azurite needs it too)")


def _listed(message: Message) -> dict[str, Any]:
    return {
        "position": message.position,
        "next_position": message.next_position,
        "sequence": message.sequence,
        "timestamp": message.timestamp,
        "id_hex": message.id.hex(),
        "key_hex": message.key.hex(),
        "value_size": len(message.value),
        "value_sha256": hashlib.sha256(message.value).hexdigest(),
    }


def _varied(writer: Writer) -> int | None:
    """Frames of one to two thousand messages, keys of 0-255 bytes, and a value in pieces."""
    for n in range(30):
        key = ("Ünïcode-" * (n % 40))[: (n * 37) % 256].encode()[:255]
        writer.append(
            [(key, bytes([n, i % 256]) * ((n * 97 + i * 13) % 1500)) for i in range(1 + n % 7)]
        )
    writer.append([(b"Tick", b"%d" % i) for i in range(2000)])
    # A v2 frame of many messages: a producer's batch (positions past a 96-byte header).
    batch = encode_batch([(b"Produced", b"p%d" % i) for i in range(9)])
    writer.append_batches([batch.with_producer(b"js-reader-test-p", 3)])
    big = hashlib.shake_256(b"js reader piece").digest(4 * 1024 * 1024 + 123_456)
    writer.append([(b"Blob", big)])
    writer.append([(b"After", b'{"json": true}'), (b"", b"")])
    return None


def _trimmed(writer: Writer) -> int | None:
    results = [writer.append([(b"T", bytes([n]) * (50 + 40 * n))] * (1 + n % 3)) for n in range(20)]
    writer.trim(results[8][1].position)  # mid-frame: the whole frame stays
    return None


def _compressed(writer: Writer) -> int | None:
    """Where the compressed frame starts: the JS reader has no zstd and must say so there."""
    writer.append([(b"Plain", b"x" * 100)] * 3)
    return writer.append([(b"Squeezed", b"abc" * 500)] * 4, compress=True).frame_position


def _write_streams(root: Path) -> dict[str, Any]:
    storage = FileStorage(root)
    listing: dict[str, Any] = {}
    for name, fill in (("varied", _varied), ("trimmed", _trimmed), ("compressed", _compressed)):
        with Writer.open(storage, name, index=DENSE) as writer:
            compressed_at = fill(writer)
            checkpoint = writer.checkpoint
        with Reader.open(storage, name) as reader:
            messages = [_listed(message) for message in reader.read(checkpoint.first_position)]
        folder = root / name
        listing[name] = {
            "data": str(folder / "data"),
            "checkpoint": str(folder / "checkpoint"),
            "index": str(folder / "index"),
            "length": checkpoint.length,
            "next_sequence": checkpoint.next_sequence,
            "first_position": checkpoint.first_position,
            "compressed_position": compressed_at,
            "messages": messages,
        }
    return {"streams": listing}


def _run_node(env: dict[str, str], *paths: Path) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, "--test", *map(str, paths)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_js_reader_reads_what_the_python_writer_wrote(tmp_path: Path) -> None:
    manifest = tmp_path / "streams.json"
    manifest.write_text(json.dumps(_write_streams(tmp_path / "data")))
    run = _run_node({"MV_JS_STREAMS": str(manifest)}, JS_TESTS)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # The Python-written streams were read, not skipped.
    passed = [
        line
        for line in run.stdout.splitlines()
        if line.startswith("ok ") and "python-written streams" in line and "# SKIP" not in line
    ]
    assert len(passed) == 5, run.stdout[-6000:]


def _serve_and_run_node(
    storage: FileStorage | AzureStorage, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """A real server over ``storage`` with Basic auth, a stream published through it, node run."""
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(storage, users)
    app = create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=0))
    with ServedApp(app) as served, Client(served.url, user=USER, password=PASSWORD) as client:
        for n in range(12):
            client.publish(
                STREAM, [(f"Kind{n % 3}", b"%d:" % i + b"v" * (n * 50)) for i in range(1 + n % 4)]
            )
        client.publish(STREAM, [("Blob", hashlib.shake_256(b"remote piece").digest(4_300_000))])
        client.publish(STREAM, [("After", b"tail")])
        info = client.info(STREAM)
        with Reader.open(storage, STREAM) as reader:
            # On Azure the stored checkpoint trails the acknowledged commits a moment.
            for _ in range(100):
                if reader.checkpoint().length >= info.length:
                    break
                time.sleep(0.05)
            messages = [_listed(message) for message in reader.read(0)]
        assert len(messages) == 32
        # Message 1 of a four-message frame: a read from it skips into the frame.
        middle = next(i for i, m in enumerate(messages) if m["sequence"] == 4)
        access = info.read_access
        sas = access.location if access is not None and access.kind == "azure-sas" else None
        remote = {
            "server": served.url,
            "stream": STREAM,
            "username": USER,
            "password": PASSWORD,
            "sas": sas,
            "length": info.length,
            "messages": messages,
            "middle": middle,
        }
        manifest = tmp_path / "remote.json"
        manifest.write_text(json.dumps(remote))
        return _run_node({"MV_JS_REMOTE": str(manifest)}, JS_TESTS / "remote.test.js")


def _passed(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line for line in run.stdout.splitlines() if line.startswith("ok ") and "# SKIP" not in line
    ]


def test_js_reader_through_a_real_server(tmp_path: Path) -> None:
    run = _serve_and_run_node(FileStorage(tmp_path / "data"), tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert len(_passed(run)) == 3, run.stdout[-6000:]  # the SAS test has nothing to read


def test_js_reader_through_an_azure_sas_url(azure_storage: AzureStorage, tmp_path: Path) -> None:
    run = _serve_and_run_node(azure_storage, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert len(_passed(run)) == 4, run.stdout[-6000:]
