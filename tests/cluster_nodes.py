"""Several ``messagevault serve --node-id`` processes on one storage, for tests and benchmarks.

Each node is a real subprocess on its own loopback port. Tests kill them
(SIGKILL, SIGSTOP/SIGCONT, SIGTERM) and restart them under the same id and
port; every process a ``Cluster`` started is stopped by PID when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from messagevault.server.auth import Users, save_users
from messagevault.storage import open_storage
from tests.azurite import free_port

START_TIMEOUT = 30.0
USER = "admin"
PASSWORD = "cluster-test-password"


@dataclass
class Node:
    """One node: its id, port and current process (None while it is down)."""

    node_id: str
    port: int
    storage: str
    log: Path
    arguments: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        """Start the process (again): same id, same port, its log appended to."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "messagevault.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--node-id",
                    self.node_id,
                    *self.arguments,
                ],
                env={
                    **os.environ,
                    "MESSAGEVAULT_STORAGE": self.storage,
                    "MESSAGEVAULT_FSYNC": os.environ.get("MESSAGEVAULT_TEST_FSYNC", "never"),
                },
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            except OSError:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"node {self.node_id} exited ({self.process.returncode}): "
                        f"{self.log.read_text(errors='replace')[-2000:]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {self.node_id} did not start") from None
                time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and reap: no goodbye, no lease released."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process must die too
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: leases handed over), then SIGKILL if it lingers; its exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            return None

    def get(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` as the admin; the JSON answer."""
        request = urllib.request.Request(f"{self.url}{path}", headers=_auth())
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.load(answer)


def _auth() -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, node_id: str) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def by_url(self, url: str) -> Node:
        return next(node for node in self.nodes if node.url == url.rstrip("/"))

    def writer_of(self, stream: str) -> Node | None:
        """The node /cluster (asked of any live node) names as the stream's writer."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            with contextlib.suppress(OSError, ValueError):
                for entry in node.get("/cluster")["streams"]:
                    if entry["stream"] == stream and entry["writer"]:
                        return self.node(entry["writer"])
                return None
        return None


@contextlib.contextmanager
def cluster_of(
    count: int,
    root: Path,
    *,
    storage: str | None = None,
    arguments: Sequence[str] = (),
    lease_duration: float | None = None,
) -> Iterator[Cluster]:
    """``count`` nodes (n1, n2, ...) on one storage (``file:root`` unless ``storage``), started.

    Every node is stopped by PID at the end, whatever the test did to it.
    """
    storage = storage or f"file:{root}"
    users = Users()
    users.set_password(USER, PASSWORD)
    users.grant(USER, ["admin"])
    save_users(open_storage(storage), users)  # type: ignore[arg-type]
    extra = list(arguments)
    if lease_duration is not None:
        extra += ["--lease-duration", str(lease_duration)]
    cluster = Cluster(
        [
            Node(f"n{i + 1}", free_port(), storage, root / f"n{i + 1}.log", extra)
            for i in range(count)
        ]
    )
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_ready()
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()


def clear_leases(storage: object) -> None:
    """End every lease held in ``storage`` (an earlier test's nodes and streams).

    On Azure the system container outlives each test's streams: a node
    lease an earlier cluster left behind (a SIGKILLed node never releases
    it) would count as a live node at a dead address for up to its duration.
    """
    leases = storage.leases()  # type: ignore[attr-defined]
    for record in leases.list(""):
        if record.held:
            leases.break_(record.name)


def credentials() -> tuple[str, str]:
    return USER, PASSWORD


def http_error_body(error: urllib.error.HTTPError) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.read() or b"{}")
    return body
