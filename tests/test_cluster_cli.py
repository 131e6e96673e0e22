"""``messagevault serve --node-id``: its bad options, and a node id already in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from messagevault.cli import main
from messagevault.client import Client
from messagevault.storage import FileStorage
from tests.azurite import free_port
from tests.cluster_nodes import PASSWORD, USER, cluster_of

NODE_N1 = ("--node-id", "n1")


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--node-id", "bad id"], "--node-id"),
        (["--node-id", ""], "--node-id"),
        (["--node-id", "-leading-dash"], "--node-id"),
        (["--node-id", "n1", "--advertise", "ftp://127.0.0.1:9"], "--advertise"),
        (["--node-id", "n1", "--advertise", "http://user:pw@127.0.0.1:9"], "--advertise"),
        (["--node-id", "n1", "--advertise", "http://127.0.0.1:9/path"], "--advertise"),
        (["--node-id", "n1", "--advertise", "http://127.0.0.1:port"], "--advertise"),
        (["--node-id", "n1", "--advertise", "http://127.0.0.1:9?x=1"], "--advertise"),
        (["--node-id", "n1", "--lease-duration", "0.1"], "--lease-duration"),
        (["--node-id", "n1", "--lease-duration", "61"], "--lease-duration"),
        (["--node-id", "n1", "--port", "0"], "--advertise"),
        (
            ["--node-id", "n1", "--host", "0.0.0.0", "--allow-plain-http"],
            "--advertise",
        ),
    ],
)
def test_bad_cluster_options_are_refused_before_anything_starts(
    tmp_path: Path, arguments: list[str], complaint: str
) -> None:
    result = CliRunner().invoke(
        main, ["serve", "--storage", f"file:{tmp_path}", "--port", str(free_port()), *arguments]
    )
    assert result.exit_code == 2, result.output
    assert complaint in result.output
    assert not (tmp_path / "_system" / "leases").exists()  # no lease taken


def test_azure_leases_last_15_to_60_seconds(tmp_path: Path) -> None:
    # Refused before any request: nothing listens at this account's address.
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        f"BlobEndpoint=http://127.0.0.1:{free_port()}/devstoreaccount1;"
    )
    result = CliRunner().invoke(
        main,
        ["serve", "--port", str(free_port()), "--node-id", "n1", "--lease-duration", "5"],
        env={"MESSAGEVAULT_STORAGE": f"azure:{connection}"},
    )
    assert result.exit_code == 2, result.output
    assert "15-60" in result.output


def test_a_node_id_in_use_by_a_live_node_is_refused(tmp_path: Path) -> None:
    with cluster_of(1, tmp_path) as cluster:
        port = free_port()
        started = subprocess.run(
            [sys.executable, "-m", "messagevault.cli", "serve", "--port", str(port), *NODE_N1],
            env={**os.environ, "MESSAGEVAULT_STORAGE": f"file:{tmp_path}"},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 1, started.stderr
        assert b"in use by a live node at " + cluster.nodes[0].url.encode() in started.stderr
        # The live node keeps its lease and goes on serving.
        (record,) = FileStorage(tmp_path).leases().list("nodes/")
        assert record.address == cluster.nodes[0].url and record.live()
        assert cluster.nodes[0].get("/ready")["node"] == "n1"


def test_cluster_command_through_a_node_and_from_storage_alone(tmp_path: Path) -> None:
    with cluster_of(2, tmp_path) as cluster:
        node = cluster.nodes[0]
        with Client(node.url, user=USER, password=PASSWORD) as client:
            client.publish("cli-cluster", [b"v"])
        writer = cluster.writer_of("cli-cluster")
        assert writer is not None
        runner = CliRunner()
        environment = {"MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD}
        through = runner.invoke(
            main, ["cluster", "--url", node.url, "--format", "json"], env=environment
        )
        assert through.exit_code == 0, through.output
        shown = json.loads(through.output)
        assert shown["node"] == "n1"
        (stream,) = shown["streams"]
        assert (stream["stream"], stream["writer"]) == ("cli-cluster", writer.node_id)
        from_storage = runner.invoke(
            main, ["cluster", "--storage", f"file:{tmp_path}", "--format", "table"]
        )
        assert from_storage.exit_code == 0, from_storage.output
        assert "cli-cluster" in from_storage.output
        assert writer.url in from_storage.output
        assert "n1" in from_storage.output and "n2" in from_storage.output
    # Every node stopped: the leases say so, and nobody writes the stream.
    stopped = CliRunner().invoke(
        main, ["cluster", "--storage", f"file:{tmp_path}", "--format", "json"]
    )
    shown = json.loads(stopped.output)
    assert [n["live"] for n in shown["nodes"]] == [False, False]
    assert shown["streams"][0]["writer"] is None


def test_cluster_command_on_a_single_server_storage(tmp_path: Path) -> None:
    FileStorage(tmp_path).open_stream("plain-stream", create=True).close()
    shown = CliRunner().invoke(
        main, ["cluster", "--storage", f"file:{tmp_path}", "--format", "json"]
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == {"nodes": [], "streams": []}


def test_publishing_straight_to_storage_that_nodes_serve_is_refused(tmp_path: Path) -> None:
    with cluster_of(1, tmp_path) as cluster:
        refused = CliRunner().invoke(
            main, ["publish", "--storage", f"file:{tmp_path}", "beside-nodes", "value"]
        )
        assert refused.exit_code == 1, refused.output
        assert (
            f"served by server nodes (n1): publish through them, e.g. --url {cluster.urls[0]}"
            in (refused.output)
        )
        assert "beside-nodes" not in FileStorage(tmp_path).list_streams()
    # With every node stopped, storage is the user's to write again.
    allowed = CliRunner().invoke(
        main, ["publish", "--storage", f"file:{tmp_path}", "beside-nodes", "value"]
    )
    assert allowed.exit_code == 0, allowed.output


def test_cluster_command_says_what_it_found_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    FileStorage(tmp_path).open_stream("plain-stream", create=True).close()
    shown = CliRunner().invoke(
        main, ["cluster", "--storage", f"file:{tmp_path}", "--format", "table"]
    )
    assert shown.exit_code == 0, shown.output
    assert "No server nodes share this storage" in shown.output
    missing = CliRunner().invoke(
        main, ["cluster", "--storage", f"file:{tmp_path / 'typo'}", "--format", "json"]
    )
    assert missing.exit_code == 1
    assert f"there is no folder {tmp_path / 'typo'}" in missing.output
