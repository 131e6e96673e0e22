"""Trimming a stream of several nodes: any node takes the request, the stream's writer trims."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from messagevault import FileStorage
from messagevault.client import Client
from tests.cluster_nodes import PASSWORD, USER, Node, cluster_of
from tests.cluster_nodes import _auth as cluster_auth


def _trim(node: Node, stream: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {**cluster_auth(), "Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{node.url}/streams/{stream}/trim", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_trim_sent_to_any_node_is_done_by_the_writer(tmp_path: Path) -> None:
    with (
        cluster_of(2, tmp_path) as cluster,
        Client(cluster.urls, user=USER, password=PASSWORD) as client,
    ):
        results = [client.publish("orders", [("", f"message {n}")]) for n in range(6)]
        writer = cluster.writer_of("orders")
        assert writer is not None
        other = next(node for node in cluster.nodes if node is not writer)
        status, answer = _trim(other, "orders", {"before_sequence": 3})
        assert status == 200, answer
        assert (answer["first_position"], answer["first_sequence"]) == (
            results[3].frame_position,
            3,
        )
        assert answer["trimmed"] is True
        checkpoint = FileStorage(tmp_path).open_stream("orders").read_checkpoint()
        assert checkpoint.first_position == results[3].frame_position
        assert cluster.writer_of("orders") is writer  # forwarded, not taken over
        status, answer = _trim(other, "orders", {"before_sequence": 99})
        assert status == 400, answer
        assert answer["error"] == "invalid_position"
        assert [m.sequence for m in client.read("orders")] == [3, 4, 5]

        # A stream nobody writes yet: the node asked takes it, as for an append.
        FileStorage(tmp_path).open_stream("quiet", write=True, create=True).close()
        status, answer = _trim(other, "quiet", {"before_position": 0})
        assert status == 200, answer
        assert answer["trimmed"] is False
        status, answer = _trim(other, "missing", {"before_position": 0})
        assert status == 404, answer
