"""The fault-injecting proxy in front of a real ``messagevault serve``.

What the server stored is always checked through the server directly, never
through the proxy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from messagevault.client import AsyncClient, Client
from messagevault.errors import ServerUnreachable, StreamNotFound
from tests.azurite import free_port
from tests.fault_proxy import Decision, Fault, FaultPolicy, FaultProxy, port_of
from tests.serve_process import serve_process

USER, PASSWORD = "app", "secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module (each test uses its own streams): its URL."""
    with serve_process(tmp_path_factory.mktemp("fault_proxy"), USER, PASSWORD) as url:
        yield url


def _client(url: str) -> Client:
    # No retries (and no producer ids, which would retry a publish until it is
    # answered): each publish is exactly one exchange, so faults map to publishes.
    return Client(url, user=USER, password=PASSWORD, retries=0, timeout=10, idempotent=False)


def _stored(server: str, stream: str) -> list[bytes]:
    with _client(server) as direct:
        try:
            return [message.value for message in direct.read(stream)]
        except StreamNotFound:
            return []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_passes_requests_and_answers_through(server: str) -> None:
    with FaultProxy(port_of(server)) as proxy, _client(proxy.url) as client:
        receipts = [client.publish("pass", [f"m{i}".encode()]) for i in range(3)]
        read = [message.value for message in client.read("pass")]
    assert read == [b"m0", b"m1", b"m2"] == _stored(server, "pass")
    assert [r[0].position for r in receipts] == sorted({r[0].position for r in receipts})
    assert proxy.stats.count(Fault.PASS) >= 4
    assert proxy.stats.history == [Fault.PASS] * len(proxy.stats.history)
    assert proxy.stats.connections == 1  # keep-alive: exchanges are told apart on one connection


def test_a_dropped_answer_leaves_the_batch_committed(server: str) -> None:
    with FaultProxy(port_of(server)) as proxy, _client(proxy.url) as client:
        proxy.force(Fault.DROP_ANSWER)
        with pytest.raises(ServerUnreachable, match="may or may not have been committed"):
            client.publish("lost-ack", [b"committed, unacknowledged"])
        client.publish("lost-ack", [b"next"])
    assert _stored(server, "lost-ack") == [b"committed, unacknowledged", b"next"]
    assert proxy.stats.history == [Fault.DROP_ANSWER, Fault.PASS]


@pytest.mark.parametrize("cut", [0.0, 0.5, 0.999])
def test_a_request_reset_midway_stores_nothing(server: str, cut: float) -> None:
    stream = f"reset-{int(cut * 1000)}"
    with _client(server) as direct:
        direct.publish(stream, [b"before"])
    with FaultProxy(port_of(server)) as proxy, _client(proxy.url) as client:
        proxy.force(Decision(Fault.RESET_REQUEST, cut=cut))
        with pytest.raises(ServerUnreachable):
            client.publish(stream, [b"torn" * 100])
        client.publish(stream, [b"after"])
    assert _stored(server, stream) == [b"before", b"after"]
    assert proxy.stats.history == [Fault.RESET_REQUEST, Fault.PASS]


def test_delayed_bytes_are_still_delivered(server: str) -> None:
    policy = FaultPolicy(1, delay=1.0, max_delay=0.02)
    with FaultProxy(port_of(server), policy) as proxy, _client(proxy.url) as client:
        client.publish("delay", [b"a", b"b"])
        read = [message.value for message in client.read("delay")]
    assert read == [b"a", b"b"] == _stored(server, "delay")
    assert proxy.stats.count(Fault.DELAY) >= 2
    assert proxy.stats.count(Fault.PASS) == 0


def test_a_seeded_policy_decides_the_same_faults() -> None:
    def decisions(seed: int) -> list[Decision]:
        policy = FaultPolicy(seed, drop_answer=0.3, reset_request=0.3, delay=0.2)
        return [policy.decide() for _ in range(50)]

    assert decisions(42) == decisions(42)
    assert decisions(42) != decisions(43)
    assert {decision.fault for decision in decisions(42)} == set(Fault)
    assert all(0 <= d.delay <= 0.01 and 0 <= d.cut < 1 for d in decisions(42))


def test_a_seeded_run_replays_and_stores_what_each_fault_allows(server: str) -> None:
    """The same seed through the proxy twice: the same faults, the same outcomes."""

    def run(stream: str) -> tuple[list[Fault], list[bool]]:
        policy = FaultPolicy(7, drop_answer=0.25, reset_request=0.25, delay=0.25)
        outcomes = []
        with FaultProxy(port_of(server), policy) as proxy, _client(proxy.url) as client:
            for i in range(16):
                try:
                    client.publish(stream, [f"m{i}".encode()])
                    outcomes.append(True)
                except ServerUnreachable:
                    outcomes.append(False)
        history = proxy.stats.history
        assert len(history) == 16 and set(history) == set(Fault)
        # Only a reset request stores nothing; a dropped answer stores what it lost.
        assert _stored(server, stream) == [
            f"m{i}".encode() for i, fault in enumerate(history) if fault is not Fault.RESET_REQUEST
        ]
        assert outcomes == [fault in (Fault.PASS, Fault.DELAY) for fault in history]
        return history, outcomes

    assert run("seeded-1") == run("seeded-2")


def test_stop_closes_everything_and_joins_its_thread(server: str) -> None:
    before = _open_fds()
    proxy = FaultProxy(port_of(server)).start()
    with _client(proxy.url) as client:
        client.publish("stop", [b"x"])
    idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    held.sendall(b"POST /streams/stop HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        proxy.stop(timeout=5)
        assert not any(thread.name == "fault-proxy" for thread in threading.enumerate())
        assert proxy.open_connections == 0
        for sock in (idle, held):
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    finally:
        idle.close()
        held.close()
    assert _open_fds() == before
    proxy.stop()  # twice is harmless


def test_connections_beyond_the_bound_are_refused(server: str) -> None:
    with FaultProxy(port_of(server), max_connections=2) as proxy, contextlib.ExitStack() as open_:
        address = ("127.0.0.1", proxy.port)
        relayed = [open_.enter_context(socket.create_connection(address, 5)) for _ in range(2)]
        # The reset may come before connect() returns, or on the first read.
        with (
            contextlib.suppress(ConnectionResetError),
            socket.create_connection(address, 5) as third,
        ):
            assert third.recv(1) == b""
        assert proxy.stats.refused == 1
        for sock in relayed:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with sock.makefile("rb") as answer:
                assert answer.readline().startswith(b"HTTP/1.1 200")
        assert proxy.stats.connections == 2


def test_an_unreachable_target_resets_the_client_until_retargeted(server: str) -> None:
    with FaultProxy(free_port()) as proxy, _client(proxy.url) as client:
        with pytest.raises(ServerUnreachable):
            client.publish("retarget", [b"lost"])
        assert proxy.stats.upstream_failures == 1
        proxy.retarget(port_of(server))
        client.publish("retarget", [b"kept"])
    assert _stored(server, "retarget") == [b"kept"]


async def test_works_under_an_async_test_with_the_async_client(server: str) -> None:
    with FaultProxy(port_of(server)) as proxy:
        async with AsyncClient(
            proxy.url, user=USER, password=PASSWORD, retries=0, idempotent=False
        ) as client:
            proxy.force(Fault.DROP_ANSWER)
            with pytest.raises(ServerUnreachable):
                await client.publish("async", [b"unacknowledged"])
            await client.publish("async", [b"acknowledged"])
    assert _stored(server, "async") == [b"unacknowledged", b"acknowledged"]
    assert proxy.stats.history == [Fault.DROP_ANSWER, Fault.PASS]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_answer": -0.1}, r"drop_answer probability must be in \[0, 1\], got -0.1"),
        ({"delay": 1.5}, r"delay probability must be in \[0, 1\], got 1.5"),
        ({"drop_answer": 0.6, "reset_request": 0.6}, "add up to more than 1"),
        ({"max_delay": 5.0}, r"max_delay must be in \[0, 1.0\] seconds, got 5.0"),
    ],
)
def test_bad_policies_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPolicy(0, **options)


def test_bad_proxy_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"target port must be in 1\.\.65535, got 0"):
        FaultProxy(0)
    with pytest.raises(ValueError, match="max_connections must be at least 1, got 0"):
        FaultProxy(80, max_connections=0)
    proxy = FaultProxy(80)
    with pytest.raises(ValueError, match=r"target port must be in 1\.\.65535, got 70000"):
        proxy.retarget(70000)
    proxy.stop()  # never started: nothing to do
