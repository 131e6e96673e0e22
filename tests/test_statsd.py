"""StatsD: the client's lines and packets; the server's metrics as a real daemon receives them."""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage
from messagevault import statsd as statsd_module
from messagevault.committer import Commit
from messagevault.server import StreamHub, create_app
from messagevault.server.app import METRICS
from messagevault.server.metrics import StreamLabels
from messagevault.server.served import Served
from messagevault.server.statsd_metrics import StatsDMetrics, install
from messagevault.statsd import MAX_QUEUED, WAKE_LINES, StatsD, level, parse_address, sanitize
from tests.azurite import free_port
from tests.serve_process import serve_process
from tests.statsd_daemon import StatsDDaemon, free_udp_port

Client = TestClient[web.Request, web.Application]
PASSWORD = "statsd-test-password"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A UDP socket on a loopback port, standing in for the daemon in unit tests."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _receive(sock: socket.socket, lines: int, timeout: float = 5.0) -> list[bytes]:
    """Packets until they hold ``lines`` lines (or ``timeout`` passes)."""
    packets: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sum(packet.count(b"\n") + 1 for packet in packets) < lines:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            packets.append(sock.recv(65536))
        except TimeoutError:
            break
    return packets


def _client(sock: socket.socket, **options: Any) -> StatsD:
    return StatsD("127.0.0.1", sock.getsockname()[1], **options)


@pytest.fixture
def daemon(statsd_daemon: StatsDDaemon) -> StatsDDaemon:
    statsd_daemon.reset()
    return statsd_daemon


# -- the client, against a plain UDP socket -------------------------------------------------


def test_lines_are_plain_statsd(listener: socket.socket) -> None:
    with _client(listener, prefix="mv1") as statsd:
        statsd.incr("storage.append.events", 20)
        statsd.incr("api.errors.overloaded")
        statsd.timing("api.append", 1.25)
        statsd.gauge("stream.orders", 5_324_000_000_123)  # an int stays whole
        statsd.gauge("ratio", 0.5)
        statsd.gauge("delta", -5)  # a signed value is a change to StatsD: zeroed first
        statsd.flush()
        packets = _receive(listener, 7)
    assert b"".join(packets).split(b"\n") == [
        b"mv1.storage.append.events:20|c",
        b"mv1.api.errors.overloaded:1|c",
        b"mv1.api.append:1.250|ms",
        b"mv1.stream.orders:5324000000123|g",
        b"mv1.ratio:0.5|g",
        b"mv1.delta:0|g",
        b"mv1.delta:-5|g",
    ]


def test_lines_are_batched_into_packets_no_larger_than_max_packet(
    listener: socket.socket,
) -> None:
    sent = [f"metric.number{i}:{i}|c".encode() for i in range(300)]
    with _client(listener, max_packet=200, flush_interval=60) as statsd:
        for i in range(300):
            statsd.incr(f"metric.number{i}", i)
        statsd.flush()
        packets = _receive(listener, 300)
    assert all(len(packet) <= 200 for packet in packets)
    assert len(packets) < 300 / 5  # several lines a packet, not one each
    assert b"\n".join(packets).split(b"\n") == sent


def test_the_flusher_sends_a_partial_packet_without_being_asked(listener: socket.socket) -> None:
    with _client(listener, flush_interval=0.05) as statsd:
        statsd.incr("lonely")
        assert _receive(listener, 1) == [b"lonely:1|c"]


def test_a_few_packets_worth_wake_the_sender_before_its_interval(listener: socket.socket) -> None:
    with _client(listener, flush_interval=60) as statsd:
        for i in range(WAKE_LINES):
            statsd.incr(f"early.{i}")
        packets = _receive(listener, WAKE_LINES)  # no flush(): the sender was woken
    assert b"\n".join(packets).split(b"\n") == [
        f"early.{i}:1|c".encode() for i in range(WAKE_LINES)
    ]


def test_a_stuck_sender_bounds_the_queue(listener: socket.socket) -> None:
    with _client(listener, flush_interval=60) as statsd:
        with statsd._sending:  # as if a send never returned
            for _ in range(MAX_QUEUED + 5):
                statsd.incr("piling.up")
            assert statsd.dropped == 5
        statsd.flush()  # the backlog goes, as far as the listener's buffer takes it
        assert not statsd._queue
        assert _receive(listener, 1)[0].startswith(b"piling.up:1|c\n")


def test_close_sends_what_is_buffered_then_drops_quietly(listener: socket.socket) -> None:
    statsd = _client(listener, flush_interval=60)
    statsd.timing("last", 2)
    statsd.close()
    assert _receive(listener, 1) == [b"last:2.000|ms"]
    statsd.incr("after.close")
    statsd.flush()
    statsd.close()
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
        listener.recv(65536)


def test_a_line_exactly_max_packet_long_is_sent_one_longer_dropped(
    listener: socket.socket,
) -> None:
    with _client(listener, max_packet=64) as statsd:
        fits = "f" * (64 - len(":1|c"))
        statsd.incr(fits)
        statsd.incr(fits + "x")
        statsd.flush()
        assert _receive(listener, 1) == [f"{fits}:1|c".encode()]
        assert statsd.dropped == 1


def test_flush_after_close_is_a_quiet_no_op(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    statsd = _client(listener, flush_interval=60)
    statsd.close()
    # A metric recorded by a thread that checked just before the close.
    statsd._queue.append("late:1|c")
    with caplog.at_level(logging.DEBUG, logger="messagevault.statsd"):
        statsd.flush()
    assert caplog.records == []


def _resolver_away_until(
    monkeypatch: pytest.MonkeyPatch, back: threading.Event
) -> list[tuple[str, int]]:
    """The resolver seam: names fail to resolve (as NXDOMAIN) until ``back`` is set.

    No query leaves the machine: the system's resolver is never asked.
    """
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[tuple[int, int, int, tuple[Any, ...]]]:
        asked.append((host, port))
        if not back.is_set():
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, ("127.0.0.1", port))]

    monkeypatch.setattr(statsd_module, "resolve", resolve)
    return asked


def test_a_host_that_does_not_resolve_yet_is_retried_and_metrics_flow_once_it_does(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    back = threading.Event()
    asked = _resolver_away_until(monkeypatch, back)
    monkeypatch.setattr(statsd_module, "RETRY_EVERY", 0.05)
    port = listener.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="messagevault.statsd"):
        statsd = StatsD("statsd.example.invalid", port, flush_interval=0.02)  # no ValueError
    try:
        assert "does not resolve" in caplog.text
        statsd.incr("while.away", 3)
        statsd.flush()
        assert statsd.dropped == 1  # dropped, and counted
        for _ in range(200):  # until the sender thread asked again (bounded: 10 s)
            if len(asked) >= 3:
                break
            time.sleep(0.05)
        assert len(asked) >= 3, asked  # it keeps asking, not only at boot
        back.set()
        for _ in range(200):  # until it resolved (bounded: 10 s)
            if statsd.address == ("127.0.0.1", port):
                break
            time.sleep(0.05)
        statsd.incr("once.back")
        statsd.flush()
        assert _receive(listener, 1) == [b"once.back:1|c"]
    finally:
        statsd.close()


def test_an_address_that_cannot_be_connected_to_drops_metrics_without_error() -> None:
    # Broadcast: connect() refuses it (EACCES) with no packet sent.
    with StatsD("255.255.255.255", 8125, flush_interval=60) as statsd:
        statsd.incr("nowhere")
        statsd.flush()
        assert statsd.dropped == 1


def test_values_statsd_would_refuse_are_dropped_and_counted(listener: socket.socket) -> None:
    with _client(listener, max_packet=64) as statsd:
        statsd.timing("negative", -1)
        statsd.timing("nan", float("nan"))
        statsd.gauge("infinite", float("inf"))
        statsd.incr("x" * 80)  # longer than a packet can be
        statsd.incr("kept")
        statsd.flush()
        assert _receive(listener, 1) == [b"kept:1|c"]
        assert statsd.dropped == 4


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("api.append", "api.append"),
        ("stream.my orders/eu:1|c", "stream.my_orders_eu_1_c"),
        ("a..b.", "a.b"),
        (".leading", "leading"),
        ("naïve-name_ok", "na_ve-name_ok"),
    ],
)
def test_names_are_made_safe_for_graphite(name: str, safe: str) -> None:
    assert sanitize(name) == safe


def test_a_free_form_part_is_one_level(listener: socket.socket) -> None:
    assert level("v1.2/orders") == "v1_2_orders"
    assert level("") == "_"
    with _client(listener, prefix="eu west.1") as statsd:
        statsd.incr(f"stream.{level('odd.name')}.append.ok")
        statsd.flush()
        assert _receive(listener, 1) == [b"eu_west.1.stream.odd_name.append.ok:1|c"]


@pytest.mark.parametrize(
    ("address", "fault"),
    [
        ("", "has no port"),
        ("localhost", "has no port"),
        (":8125", "has no host"),
        ("localhost:", "must be a number"),
        ("localhost:http", "must be a number"),
        ("localhost:0", "must be a number in 1..65535"),
        ("localhost:65536", "must be a number in 1..65535"),
        ("::1:8125", "brackets"),
        ("[::1]8125", "as [::1]:8125"),
        ("[::1", "as [::1]:8125"),
    ],
)
def test_bad_addresses_are_one_clear_error(address: str, fault: str) -> None:
    with pytest.raises(ValueError, match="StatsD") as caught:
        StatsD.from_address(address)
    assert fault in str(caught.value)
    assert "\n" not in str(caught.value)


def test_addresses_ipv4_ipv6_and_names() -> None:
    assert parse_address("127.0.0.1:8125") == ("127.0.0.1", 8125)
    assert parse_address("[::1]:9125") == ("::1", 9125)
    assert parse_address(" statsd.local:8125 ") == ("statsd.local", 8125)
    with StatsD.from_address("localhost:8125") as statsd:
        assert statsd.address[1] == 8125


def test_ipv6_loopback() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        sock.settimeout(5)
        with StatsD.from_address(f"[::1]:{sock.getsockname()[1]}") as statsd:
            statsd.incr("over.ipv6")
            statsd.flush()
            assert sock.recv(1024) == b"over.ipv6:1|c"


def test_nobody_listening_never_raises_counts_what_was_lost_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_udp_port()
    statsd = StatsD("127.0.0.1", port, max_packet=100, flush_interval=0.01)
    try:
        for i in range(2000):  # the ICMP "port unreachable" of one send fails a later one
            statsd.incr("nobody.home", i)
            statsd.timing("nobody.home", i)
            statsd.gauge("nobody.home", i)
        statsd.flush()
    finally:
        statsd.close()
    assert statsd.dropped > 0
    warnings = [r for r in caplog.records if r.name == "messagevault.statsd"]
    assert len(warnings) == 1  # not one per failed packet
    assert f"127.0.0.1:{port}" in warnings[0].getMessage()
    assert "refused" in warnings[0].getMessage().lower()


def test_a_name_with_ipv4_and_ipv6_addresses_is_reached_over_ipv4(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    both = [
        (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port)),
    ]
    # As getaddrinfo answers for localhost where /etc/hosts has both: ::1 first.
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: list(both))
    with StatsD("localhost", port) as statsd:
        assert statsd.address == ("127.0.0.1", port)
        statsd.incr("reached")
        statsd.flush()
        assert listener.recv(1024) == b"reached:1|c"


def test_many_threads_share_one_client(listener: socket.socket) -> None:
    # Room for every packet, as a test cannot promise to read as fast as four threads send.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def record(statsd: StatsD) -> None:
        for _ in range(2000):
            statsd.incr("threads.count")

    with _client(listener, flush_interval=0.01) as statsd:
        workers = [threading.Thread(target=record, args=(statsd,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        statsd.flush()
        packets = _receive(listener, 8000)
        assert statsd.dropped == 0
    assert all(len(packet) <= statsd.max_packet for packet in packets)
    assert b"\n".join(packets).split(b"\n") == [b"threads.count:1|c"] * 8000


def test_the_daemon_reads_what_the_client_means(daemon: StatsDDaemon) -> None:
    with StatsD.from_address(daemon.address, prefix="mv") as statsd:
        statsd.incr("storage.append.events", 100)
        statsd.timing("storage.append.time", 3.2)
        statsd.gauge("stream.orders", 5324)
        statsd.gauge("level", 7)
        statsd.gauge("level", -2)
    assert daemon.wait_for("gauges", "mv.level", -2) == -2
    assert daemon.counters()["mv.storage.append.events"] == 100
    assert daemon.gauges()["mv.stream.orders"] == 5324
    assert daemon.timers()["mv.storage.append.time"] == [3.2]
    assert daemon.counters()["statsd.bad_lines_seen"] == 0


# -- the server's metrics, in a real daemon ---------------------------------------------------


def _post(url: str, stream: str, values: list[str]) -> dict[str, Any]:
    body = json.dumps({"messages": [{"key": "k", "value": value} for value in values]})
    request = urllib.request.Request(
        f"{url}/streams/{stream}", data=body.encode(), headers=_headers(json=True)
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def _get(url: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}{path}", headers=_headers())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def _headers(*, json: bool = False) -> dict[str, str]:
    token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    if json:
        headers["Content-Type"] = "application/json"
    return headers


def test_serve_pushes_the_original_metric_names(daemon: StatsDDaemon, tmp_path: Path) -> None:
    batches = [[f"message {b}.{m}" for m in range(1 + b % 4)] for b in range(24)]
    messages = sum(len(batch) for batch in batches)
    arguments = ["--statsd", daemon.address, "--statsd-prefix", "node1"]
    with serve_process(tmp_path, "admin", PASSWORD, arguments=arguments) as url:
        # Concurrent appends, so that some commits carry several of them.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda batch: _post(url, "orders", batch), batches))
        length = _get(url, "/streams/orders")["length"]
        assert length == max(answer["position"] for answer in answers)
        _get(url, "/streams/orders/messages?from=0&limit=5")
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(url, "/streams/orders/messages?from=3")  # not a message boundary
        assert refused.value.code == 400
        refused.value.close()
        assert daemon.wait_for("gauges", "node1.stream.orders", length) == length
        assert daemon.wait_for("counters", "node1.api.errors.invalid_position", 1) == 1

    counters, gauges, timers = daemon.counters(), daemon.gauges(), daemon.timers()
    assert counters["statsd.bad_lines_seen"] == 0
    assert counters["node1.storage.append.events"] == messages
    assert counters["node1.storage.append.bytes"] == length  # frames from 0 to the end
    assert counters["node1.stream.orders.append.ok"] == len(batches)
    assert counters["node1.stream.orders.append.events"] == messages
    assert gauges["node1.stream.orders"] == length
    assert len(timers["node1.api.append"]) == len(batches)  # one per acknowledged request
    commits = len(timers["node1.storage.append.time"])
    assert 1 <= commits <= len(batches)
    assert len(timers["node1.storage.append.batches"]) == commits  # one value per commit
    assert sum(timers["node1.storage.append.batches"]) == len(batches)
    assert sum(timers["node1.storage.append.messages"]) == messages
    assert len(timers["node1.api.info"]) == 1
    assert len(timers["node1.api.read"]) == 1  # the refused read is counted, not timed
    assert all(value >= 0 for value in timers["node1.api.append"])


async def test_reads_that_wait_are_timed_apart(
    daemon: StatsDDaemon, aiohttp_client: Any, tmp_path: Path
) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    app = create_app(hub)
    statsd = StatsD.from_address(daemon.address, prefix="in")
    statsd.flush_interval = 0.05
    install(app, hub, statsd)
    client: Client = await aiohttp_client(app)
    await client.post("/streams/orders", json={"messages": [{"key": "k", "value": "v"}]})
    length = (await (await client.get("/streams/orders")).json())["length"]
    plain = await client.get("/streams/orders/messages", params={"from": 0})
    assert len((await plain.json())["messages"]) == 1
    waited = await client.get("/streams/orders/messages", params={"from": length, "wait": 1})
    assert (await waited.json())["messages"] == []
    tail = await client.get(
        "/streams/orders/messages", params={"from": 0}, headers={"Accept": "text/event-stream"}
    )
    assert (await tail.content.readline()).startswith(b"id: ")
    # The server stops first: its shutdown ends the tail, then its cleanup
    # closes the StatsD client, which sends everything.
    await client.server.close()
    tail.close()
    await client.close()
    names = ("in.api.read", "in.api.read.wait", "in.api.tail")
    for _ in range(200):  # UDP may be on its way (bounded: 10 s)
        timers = daemon.timers()
        if all(name in timers for name in names):
            break
        time.sleep(0.05)
    # One each: the read that waited is not an api.read, nor is the tail.
    assert {name: len(timers.get(name, [])) for name in names} == dict.fromkeys(names, 1)
    assert daemon.counters()["statsd.bad_lines_seen"] == 0


async def test_no_daemon_fails_no_append_nor_read(aiohttp_client: Any, tmp_path: Path) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    app = create_app(hub)
    # Packets of one line: every metric sends one, from the event loop and
    # the committer thread alike, into the "port unreachable" of nobody.
    statsd = StatsD("127.0.0.1", free_udp_port(), max_packet=64)
    install(app, hub, statsd)
    client: Client = await aiohttp_client(app)
    for i in range(50):
        answer = await client.post(
            "/streams/orders", json={"messages": [{"key": "k", "value": f"m{i}"}]}
        )
        assert answer.status == 200, await answer.text()
        read = await client.get("/streams/orders/messages", params={"from": 0, "limit": 1})
        assert read.status == 200, await read.text()
    assert statsd.dropped > 0  # it did try, and failed, to send
    await client.close()


def test_appends_are_acknowledged_with_no_daemon_listening(tmp_path: Path) -> None:
    away = f"127.0.0.1:{free_udp_port()}"
    with serve_process(tmp_path, "admin", PASSWORD, arguments=["--statsd", away]) as url:
        answers = [_post(url, "orders", [f"m{i}", f"n{i}"]) for i in range(100)]
        assert [answer["messages"][0]["sequence"] for answer in answers] == list(range(0, 200, 2))
        assert _get(url, "/streams/orders")["messages"] == 200


# ``python -c`` this, then serve's arguments: ``messagevault serve`` whose
# resolver fails every ``.invalid`` name at once, as NXDOMAIN, without
# asking the machine's DNS server (which may be off the machine).
OFFLINE_RESOLVER = """
import runpy, socket, sys
import messagevault.statsd as statsd
system_resolve = statsd.resolve
def resolve(host, port):
    if host.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return system_resolve(host, port)
statsd.resolve = resolve
sys.argv[0] = "messagevault"
runpy.run_module("messagevault.cli", run_name="__main__")
"""


def test_serve_starts_and_acknowledges_appends_when_the_statsd_host_does_not_resolve(
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    with serve_process(
        tmp_path / "data",
        "admin",
        PASSWORD,
        arguments=["--statsd", "statsd.example.invalid:8125"],
        log=log,
        launcher=["-c", OFFLINE_RESOLVER],
    ) as url:
        answers = [_post(url, "orders", [f"m{i}"]) for i in range(20)]
        assert [answer["messages"][0]["sequence"] for answer in answers] == list(range(20))
        assert _get(url, "/streams/orders")["messages"] == 20
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warnings = [line["message"] for line in lines if line["logger"] == "messagevault.statsd"]
    assert any("does not resolve" in warning for warning in warnings), warnings
    assert lines[-1]["message"] == "stopped"


def test_appends_are_acknowledged_after_the_daemon_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = StatsDDaemon()
    try:
        daemon.start()
        # Set as the environment, as the other serve options can be.
        monkeypatch.setenv("MESSAGEVAULT_STATSD", daemon.address)
        monkeypatch.setenv("MESSAGEVAULT_STATSD_PREFIX", "from-env")
        with serve_process(tmp_path, "admin", PASSWORD) as url:
            for i in range(10):
                _post(url, "orders", [f"before {i}"])
            assert daemon.wait_for("counters", "from-env.storage.append.events", 10) == 10
            daemon.stop()
            for i in range(100):
                _post(url, "orders", [f"after {i}"])
            assert _get(url, "/streams/orders")["messages"] == 110
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("arguments", "variables", "fault"),
    [
        (["--statsd", "localhost"], {}, "has no port"),
        (["--statsd", "127.0.0.1:99999"], {}, "1..65535"),
        ([], {"MESSAGEVAULT_STATSD": "[::1"}, "[::1]:8125"),
    ],
)
def test_serve_refuses_a_bad_statsd_address_and_starts_nothing(
    tmp_path: Path, arguments: list[str], variables: dict[str, str], fault: str
) -> None:
    data = tmp_path / "data"
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "serve", "--port", str(port), *arguments],
        env={**os.environ, "MESSAGEVAULT_STORAGE": f"file:{data}", **variables},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert fault in result.stderr
    assert "--statsd" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()  # no storage opened, no admin created


# -- docs/OPERATIONS.md's Graphite names, as the daemon's graphite backend writes them ---------

OPERATIONS = Path(__file__).parent.parent / "docs" / "OPERATIONS.md"


def _carbon(server: socket.socket, received: list[str], stop: threading.Event) -> None:
    """A stand-in for carbon's plaintext port: keep every ``path value time`` line."""
    server.settimeout(0.1)
    while not stop.is_set():
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        with connection:
            data = b""
            connection.settimeout(5)
            while chunk := connection.recv(65536):
                data += chunk
        received.extend(line.split(" ")[0] for line in data.decode().splitlines())


def _documented_series() -> list[str]:
    """Every Graphite path (or pattern) of the StatsD section, braces expanded."""
    text = OPERATIONS.read_text()
    section = text[text.index("## StatsD and Graphite") :]
    section = section[: section.find("\n## ", 3) if "\n## " in section[3:] else None]
    paths = re.findall(r"(?<=[`(])(stats(?:_counts)?\.[\w.*{},]+[\w}])", section)
    expanded: list[str] = []
    for path in paths:
        braces = re.search(r"\{([^}]*)\}", path)
        if braces is None:
            expanded.append(path)
            continue
        head, tail = path[: braces.start()], path[braces.end() :]
        expanded.extend(head + alternative + tail for alternative in braces.group(1).split(","))
    return expanded


def test_the_graphite_series_in_the_docs_are_what_statsd_writes() -> None:
    documented = _documented_series()
    assert len(documented) >= 10, documented
    config = re.search(r"percentThreshold: (\[[\d., ]+\])", OPERATIONS.read_text())
    assert config is not None, "the documented statsd.js sets percentThreshold"
    stop = threading.Event()
    received: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        carbon = threading.Thread(target=_carbon, args=(server, received, stop))
        carbon.start()
        daemon = StatsDDaemon(
            backends=["./backends/graphite"],
            graphiteHost="127.0.0.1",
            graphitePort=server.getsockname()[1],
            flushInterval=300,
            percentThreshold=json.loads(config.group(1)),
        )
        try:
            daemon.start()
            with StatsD.from_address(daemon.address, prefix="node1") as statsd:
                metrics = StatsDMetrics(statsd)
                metrics.committed(Commit("orders", 2, 20, 2400, 0.0015, 2400))
                for route, status, error in [
                    ("/streams/{stream}", 200, None),
                    ("/streams/{stream}", 503, "overloaded"),
                    ("/streams/{stream}", 503, "storage_error"),
                ]:
                    metrics.served(Served("POST", route, "orders", status, error, 0.002))
            deadline = time.monotonic() + 20
            while not all(any(fnmatch.fnmatchcase(s, d) for s in received) for d in documented):
                assert time.monotonic() < deadline, "statsd did not flush what the docs name"
                time.sleep(0.1)
        finally:
            daemon.close()
            stop.set()
            carbon.join(timeout=10)
    missing = [d for d in documented if not any(fnmatch.fnmatchcase(s, d) for s in received)]
    assert not missing, sorted(set(received))


def test_per_stream_names_are_bounded_as_prometheus_series_are(listener: socket.socket) -> None:
    with _client(listener, flush_interval=60) as statsd:
        metrics = StatsDMetrics(statsd, StreamLabels(2))
        for stream in ("alpha", "beta", "gamma", "delta", "alpha"):
            metrics.committed(Commit(stream, 1, 5, 500, 0.001, 1000))
        statsd.flush()
        lines = b"\n".join(_receive(listener, 5 * 8)).decode().split("\n")
        # The name cache holds every name sent: it never starts over.
        assert statsd.names_cached >= 3 * (2 + 1)
    per_stream = sorted({line.split(":")[0] for line in lines if line.startswith("stream.")})
    assert per_stream == [
        "stream._other.append.events",
        "stream._other.append.ok",
        "stream.alpha",
        "stream.alpha.append.events",
        "stream.alpha.append.ok",
        "stream.beta",
        "stream.beta.append.events",
        "stream.beta.append.ok",
    ]
    assert lines.count("stream._other.append.events:5|c") == 2  # gamma's and delta's


def test_serve_bounds_statsd_stream_names_with_metrics_streams(tmp_path: Path) -> None:
    hub = StreamHub(FileStorage(tmp_path))
    app = create_app(hub, max_stream_series=7)
    with StatsD("127.0.0.1", free_udp_port()) as statsd:
        metrics = install(app, hub, statsd)
        # The same bound, and the same first streams, as /metrics' stream label.
        assert metrics.streams is app[METRICS].streams
        assert metrics.streams.limit == 7
