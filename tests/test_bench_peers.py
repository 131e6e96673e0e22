"""benchmarks/peers.py: its table and checks, and tiny runs against real servers.

The runs use the servers found on this machine and never install any
(``--no-install``): a peer whose server binary or Python client is missing is
skipped here, with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import peer_report as report
from benchmarks import peers
from benchmarks.ds_driver import DurableStreamsDriver, Producer, ProtocolError
from benchmarks.peer_systems import (
    BY_KEY,
    SYSTEMS,
    find_binary,
    missing_clients,
    missing_server,
    start,
)

from messagevault.server.auth import Users

SCRIPT = Path(peers.__file__)
PACKAGE_JSON = Path(__file__).resolve().parent.parent / "package.json"
DS_SYSTEMS = ["messagevault", "messagevault-ds", "ds-reference"]


def run_peers(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--no-install", "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def server_pids(stdout: str) -> list[int]:
    """The PIDs the progress lines say each case's server had."""
    return [int(pid) for pid in re.findall(r"server pid (\d+) on 127\.0\.0\.1:", stdout)]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie would still answer; its state in /proc says so.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        raise AssertionError(f"server process {pid} is still there (state {state})")


def require(system_keys: list[str]) -> None:
    for key in system_keys:
        system = BY_KEY[key]
        if system.binary is not None and find_binary(system.binary) is None:
            pytest.skip(f"{system.binary} is not installed here (make bench-peers installs it)")
        if (why := missing_server(system) or missing_clients(system)) is not None:
            pytest.skip(why)


# The figures: ratios, cells, the table ----------------------------------------------------


def result(system: str, workload: str, seconds: float, latency: float = 1.0) -> report.Result:
    return report.Result(
        system,
        workload,
        messages=1000,
        payload_bytes=116_000,
        producers=1,
        batch_size=100,
        write_s=[seconds, seconds * 3, seconds / 3],  # the median is ``seconds``
        read_s=[seconds / 2],
        read_json_s=[seconds / 4] if system == "messagevault" else [],
        latency_ms={"p50": [latency], "p99": [latency * 4]},
    )


def test_ratio_is_messagevault_over_the_peer_and_none_without_both() -> None:
    assert report.ratio(300.0, 100.0) == 3.0
    assert report.ratio(1.5, 0.5) == 3.0  # for latency, above 1 means MessageVault is slower
    assert report.ratio(None, 100.0) is None
    assert report.ratio(100.0, None) is None
    assert report.ratio(100.0, 0.0) is None


def test_values_and_cells_are_formatted_by_kind() -> None:
    assert report.format_value(1_234_567, "write") == "1.23M"
    assert report.format_value(64_512, "read") == "64.5k"
    assert report.format_value(950, "write") == "950"
    assert report.format_value(0.3456, "p99") == "0.35"
    assert report.format_value(None, "p50") == "-"
    assert report.format_cell(64_512, "write", 3.814) == "64.5k (3.81x)"
    assert report.format_cell(64_512, "write", None) == "64.5k"


def test_table_has_every_measured_row_with_ratios_and_marks_skipped_peers() -> None:
    systems = [BY_KEY[k] for k in ("messagevault", "redis-always", "redis-everysec", "nats")]
    results = {
        ("messagevault", "W1"): result("messagevault", "W1", 0.01),  # 100k msgs/s
        ("redis-always", "W1"): result("redis-always", "W1", 0.04),  # 25k msgs/s
        ("messagevault", "W3"): result("messagevault", "W3", 0.5, latency=1.5),
        ("redis-always", "W3"): result("redis-always", "W3", 0.5, latency=0.5),
    }
    cells = report.table_cells(results, systems, {"nats": "nats-server not found"})
    header, *rows = cells
    assert header == [
        "",
        "MessageVault",
        "Redis AOF always",
        "Redis AOF everysec",
        "NATS JetStream",
    ]
    by_label = {row[0]: row[1:] for row in rows}
    # W2 and W4 were not run: no rows for them.
    assert list(by_label) == [
        "W1 write msgs/s",
        "W1 read msgs/s",
        "W1 read JSON msgs/s",
        "W3 ack p50 ms",
        "W3 ack p99 ms",
    ]
    assert by_label["W1 write msgs/s"] == ["100.0k", "25.0k (4.00x)", "-", "SKIPPED"]
    assert by_label["W1 read msgs/s"] == ["200.0k", "50.0k (4.00x)", "-", "SKIPPED"]
    # MessageVault's JSON read against the peer's ordinary read.
    assert by_label["W1 read JSON msgs/s"] == ["400.0k", "50.0k (8.00x)", "-", "SKIPPED"]
    assert by_label["W3 ack p50 ms"] == ["1.50", "0.50 (3.00x)", "-", "SKIPPED"]
    assert by_label["W3 ack p99 ms"] == ["6.00", "2.00 (3.00x)", "-", "SKIPPED"]

    rendered = report.render_table(cells, "Median of 3 run(s), scale 1")
    assert "25.0k (4.00x)" in rendered
    assert max(map(len, rendered.splitlines())) <= report.TABLE_WIDTH

    markdown = report.markdown_table(cells).splitlines()
    assert (
        markdown[0]
        == "|  | MessageVault | Redis AOF always | Redis AOF everysec | NATS JetStream |"
    )
    assert markdown[1] == "| --- | ---: | ---: | ---: | ---: |"
    assert markdown[2] == "| W1 write msgs/s | 100.0k | 25.0k (4.00x) | - | SKIPPED |"
    assert len(markdown) == 1 + 1 + 5


def test_a_json_row_needs_messagevaults_json_read() -> None:
    systems = [BY_KEY[k] for k in ("messagevault", "redis-always")]
    results = {
        ("messagevault", "W1"): result("messagevault", "W1", 0.01),
        ("redis-always", "W1"): result("redis-always", "W1", 0.04),
    }
    results["messagevault", "W1"].read_json_s.clear()
    labels = [row[0] for row in report.table_cells(results, systems, {})[1:]]
    assert labels == ["W1 write msgs/s", "W1 read msgs/s"]
    del results["messagevault", "W1"]  # the peer alone: no JSON row either
    labels = [row[0] for row in report.table_cells(results, systems, {})[1:]]
    assert labels == ["W1 write msgs/s", "W1 read msgs/s"]


def test_a_full_table_of_four_systems_fits_100_columns() -> None:
    systems = list(SYSTEMS)
    results = {
        (s.key, w.name): result(s.key, w.name, 1e-6, latency=123.456)  # the widest figures
        for s in systems
        for w in peers.WORKLOADS
    }
    rendered = report.render_table(report.table_cells(results, systems, {}), "a title")
    lines = rendered.splitlines()
    assert len(lines) == 1 + 3 + len(report.ROWS) + 1  # title, header, rows, bottom rule
    assert max(map(len, lines)) <= report.TABLE_WIDTH
    # The Durable Streams systems are in a table of their own, which fits too.
    assert "DS reference" not in lines[2]
    ds_cells = report.ds_table_cells(results, systems, {})
    assert ds_cells is not None
    ds_lines = report.render_table(ds_cells, "a title").splitlines()
    assert len(ds_lines) == 1 + 3 + len(report.ROWS) + 1
    assert max(map(len, ds_lines)) <= report.TABLE_WIDTH


def test_durable_streams_table_has_both_ratios_to_the_reference() -> None:
    systems = [BY_KEY[k] for k in ("messagevault", "messagevault-ds", "ds-reference")]
    results = {
        ("messagevault", "W1"): result("messagevault", "W1", 0.01),  # 100k msgs/s
        ("messagevault-ds", "W1"): result("messagevault-ds", "W1", 0.02),  # 50k msgs/s
        ("ds-reference", "W1"): result("ds-reference", "W1", 0.04),  # 25k msgs/s
        ("messagevault-ds", "W3"): result("messagevault-ds", "W3", 0.5, latency=1.5),
        ("ds-reference", "W3"): result("ds-reference", "W3", 0.5, latency=0.5),
    }
    header, *rows = report.ds_table_cells(results, systems, {}) or []
    assert header == ["", *report.DS_COLUMNS]
    by_label = {row[0]: row[1:] for row in rows}
    assert list(by_label) == [
        "W1 write msgs/s",
        "W1 read msgs/s",
        "W1 read JSON msgs/s",
        "W3 ack p50 ms",
        "W3 ack p99 ms",
    ]
    assert by_label["W1 write msgs/s"] == ["100.0k", "50.0k", "25.0k", "4.00x", "2.00x"]
    assert by_label["W1 read msgs/s"] == ["200.0k", "100.0k", "50.0k", "4.00x", "2.00x"]
    # MessageVault's JSON read against the Durable Streams reads, which are JSON.
    assert by_label["W1 read JSON msgs/s"] == ["400.0k", "100.0k", "50.0k", "8.00x", "2.00x"]
    # MessageVault native did not run W3: no figure, no ratio.
    assert by_label["W3 ack p50 ms"] == ["-", "1.50", "0.50", "-", "3.00x"]
    # The peers' table leaves them out.
    assert report.table_cells(results, systems, {})[0] == ["", "MessageVault"]

    skipped = report.ds_table_cells(results, systems, {"ds-reference": "node not found"})
    assert skipped is not None
    assert skipped[1][1:] == ["100.0k", "50.0k", "SKIPPED", "-", "-"]
    # Without a Durable Streams system there is no such table.
    assert report.ds_table_cells(results, systems[:1], {}) is None


# The verification, the same for every system ------------------------------------------


def written(producers: int) -> tuple[peers.Workload, peers.Data]:
    workload = peers.Workload("W4", 40, 20, 5, producers)
    return workload, peers.make_data(workload)


def interleaved(data: peers.Data, producers: int) -> tuple[list[bytes], list[bytes]]:
    """The stream as concurrent producers could leave it: their messages interleaved one by one."""
    lanes = [[pair for batch in lane for pair in batch] for lane in data.lanes(producers)]
    pairs = [pair for row in zip(*lanes, strict=True) for pair in row]
    return [k for k, _ in pairs], [v for _, v in pairs]


def test_make_data_is_byte_identical_each_time_with_16_byte_keys() -> None:
    workload, data = written(1)
    again = peers.make_data(workload)
    assert (data.keys, data.values, data.batches) == (again.keys, again.values, again.batches)
    assert data.keys[7] == b"key-000000000007" and len(data.keys[7]) == 16
    assert {len(v) for v in data.values} == {20}
    assert data.payload_bytes == 40 * (16 + 20)
    assert [len(lane) for lane in data.lanes(4)] == [2, 2, 2, 2]
    assert data.lanes(4)[1][0] == data.batches[1]


def test_verify_accepts_every_producer_in_order_however_interleaved() -> None:
    workload, data = written(4)
    peers.verify(list(data.keys), list(data.values), 40, workload, data)
    keys, values = interleaved(data, 4)
    assert keys != data.keys
    peers.verify(keys, values, 40, workload, data)


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        ("value", r"message 21 \(key-000000000\d+\): the value differs"),
        ("missing", r"read 39 messages back, 40 sent"),
        ("stored", r"the stream holds 41 messages, 40 sent"),
        ("twice", r"read twice"),
        ("foreign key", r"message 3: unexpected key b'key-000000000099'"),
        ("bad key", r"message 3: unexpected key b'nonsense'"),
        ("order", r"producer \d's messages out of order"),
    ],
)
def test_verify_names_what_is_wrong(damage: str, complaint: str) -> None:
    workload, data = written(4)
    keys, values = interleaved(data, 4)
    stored = 40
    if damage == "value":
        values[21] = b"X" + values[21][1:]
    elif damage == "missing":
        del keys[5], values[5]
    elif damage == "stored":
        stored = 41
    elif damage == "twice":
        keys[30], values[30] = keys[2], values[2]
    elif damage == "foreign key":
        keys[3] = b"key-000000000099"
    elif damage == "bad key":
        keys[3] = b"nonsense"
    else:  # producer 0's first two messages swapped
        first, second = (i for i, k in enumerate(keys) if k in data.keys[:2])
        keys[first], keys[second] = keys[second], keys[first]
        values[first], values[second] = values[second], values[first]
    with pytest.raises(peers.VerificationFailed, match=complaint):
        peers.verify(keys, values, stored, workload, data)


# Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--only", "W9"], "--only: unknown W9; choose from W1, W2, W3, W4, messagevault"),
        (["--only", "W1,kafka"], "--only: unknown kafka"),
        (["--only", ","], "--only: unknown (empty)"),
        (["--runs", "0"], "--runs must be at least 1, not 0"),
        (["--scale", "0"], "--scale must be above 0 and at most 1, not 0.0"),
        (["--scale", "2"], "--scale must be above 0 and at most 1, not 2.0"),
    ],
)
def test_bad_options_get_one_line_and_start_nothing(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    ran = run_peers(tmp_path, "--output", str(tmp_path / "results"), *args)
    assert ran.returncode == 2
    assert complaint in ran.stderr.splitlines()[-1]
    assert "server pid" not in ran.stdout
    assert not list(tmp_path.iterdir())


# Tiny runs against the real servers --------------------------------------------------------


@pytest.mark.parametrize(
    "systems",
    [
        ["messagevault"],
        ["messagevault", "redis-always", "redis-everysec"],
        ["messagevault", "nats"],
    ],
    ids=["messagevault", "redis", "nats"],
)
def test_tiny_run_saves_json_and_markdown_and_stops_every_server(
    tmp_path: Path, systems: list[str]
) -> None:
    require(systems)
    output = tmp_path / "results"
    ran = run_peers(
        tmp_path,
        *("--scale", "0.002", "--runs", "1", "--output", str(output)),
        *("--only", ",".join(systems)),
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    # One fresh server per system and workload, each stopped by the end.
    pids = server_pids(ran.stdout)
    assert len(pids) == len(systems) * 4
    assert_gone(pids)
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # temp folders removed
    for workload in ("W1", "W2", "W3", "W4"):
        for system in systems:
            assert f"{system} {workload}: write " in ran.stdout
    assert ran.stdout.count(", verified") == len(systems) * 4
    assert ran.stdout.count("messagevault W1: read 2,000 as JSON in ") == 1
    assert ran.stdout.count(" as JSON in ") == 2  # W1 and W2, MessageVault's only
    # Progress phase by phase: writing, reading, checking.
    assert ran.stdout.count(": writing 2,000 messages") == len(systems) * 2  # W1, W4
    assert ran.stdout.count("; reading them back") == len(systems) * 4
    assert ran.stdout.count("; checking them") == len(systems) * 4

    (saved,) = output.glob("peers-*.json")
    document = json.loads(saved.read_text())
    assert document["benchmark"] == "peers"
    assert (document["runs"], document["scale"]) == (1, 0.002)
    assert {"cores", "memory_gib", "cpu_model", "kernel"} <= set(document["machine"])
    assert list(document["systems"]) == systems
    for key, described in document["systems"].items():
        assert described["skipped"] is None
        assert described["durability"]
        server = BY_KEY[key].binary or "messagevault"
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", described["versions"][server])
    cases = {(c["system"], c["workload"]): c for c in document["cases"]}
    assert set(cases) == {(s, w) for s in systems for w in ("W1", "W2", "W3", "W4")}
    w4 = cases["messagevault", "W4"]
    assert (w4["producers"], w4["batch_size"], w4["messages"]) == (16, 100, 2000)
    assert all(c["write_msgs_per_s"] > 0 and c["read_msgs_per_s"] > 0 for c in cases.values())
    json_reads = {key for key, case in cases.items() if "read_json_msgs_per_s" in case}
    assert json_reads == {("messagevault", "W1"), ("messagevault", "W2")}
    for system in systems:
        latency = cases[system, "W3"]["median_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    header, *rows = document["table"]
    assert len(header) == 1 + len(systems) and len(rows) == len(report.ROWS)
    if len(systems) > 1:
        assert all(re.fullmatch(r"\S+ \(\d+\.\d\dx\)", row[2]) for row in rows)

    markdown = saved.with_suffix(".md").read_text()
    assert markdown.startswith("MessageVault against its peers, ")
    assert "| W4 x16 write msgs/s |" in markdown
    assert report.RATIO_NOTE in markdown
    table_lines = [line for line in ran.stdout.splitlines() if line.startswith(("┃", "│", "┏"))]
    assert len(table_lines) == 2 + len(report.ROWS)
    assert max(len(line) for line in table_lines) <= report.TABLE_WIDTH


def test_tiny_run_races_the_durable_streams_servers_and_states_the_ratios(
    tmp_path: Path,
) -> None:
    require(DS_SYSTEMS)
    output = tmp_path / "results"
    ran = run_peers(
        tmp_path,
        *("--scale", "0.002", "--runs", "1", "--output", str(output)),
        *("--only", "messagevault,ds"),  # ds: both Durable Streams systems
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    pids = server_pids(ran.stdout)
    assert len(pids) == len(DS_SYSTEMS) * 4
    assert_gone(pids)
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    # Every case read everything back and passed the same check as the others.
    for workload in ("W1", "W2", "W3", "W4"):
        for system in DS_SYSTEMS:
            assert re.search(rf"^\[.*\] {system} {workload}: write .*, verified$", ran.stdout, re.M)
    assert ran.stdout.count(", verified") == len(DS_SYSTEMS) * 4
    assert ran.stdout.count("; checking them") == len(DS_SYSTEMS) * 4

    document = json.loads(next(output.glob("peers-*.json")).read_text())
    assert list(document["systems"]) == DS_SYSTEMS
    pinned = json.loads(PACKAGE_JSON.read_text())["devDependencies"]["@durable-streams/server"]
    reference = document["systems"]["ds-reference"]
    assert reference["versions"]["@durable-streams/server"] == pinned
    assert re.fullmatch(r"\d+\.\d+\.\d+", reference["versions"]["node"])
    assert "messagevault" in document["systems"]["messagevault-ds"]["versions"]
    cases = {(c["system"], c["workload"]): c for c in document["cases"]}
    assert set(cases) == {(s, w) for s in DS_SYSTEMS for w in ("W1", "W2", "W3", "W4")}
    assert cases["ds-reference", "W4"]["producers"] == 16
    for system in DS_SYSTEMS[1:]:
        latency = cases[system, "W3"]["median_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
        assert "read_json_msgs_per_s" not in cases[system, "W1"]  # their read is the JSON one

    # The peers' table has MessageVault alone; the Durable Streams one has the ratios.
    assert document["table"][0] == ["", "MessageVault"]
    header, *rows = document["ds_table"]
    assert header == ["", *report.DS_COLUMNS]
    assert len(rows) == len(report.ROWS)
    by_label = {row[0]: row[1:] for row in rows}
    for label, workload, metric in report.ROWS:
        if metric not in ("write", "read"):
            continue
        rate = {s: cases[s, workload][f"{metric}_msgs_per_s"] for s in DS_SYSTEMS}
        native, vault_ds, ref = rate["messagevault"], rate["messagevault-ds"], rate["ds-reference"]
        assert by_label[label][3:] == [f"{native / ref:.2f}x", f"{vault_ds / ref:.2f}x"]
    assert all(re.fullmatch(r"\d+\.\d\dx", cell) for row in rows for cell in row[4:])

    markdown = next(output.glob("peers-*.md")).read_text()
    assert "| MessageVault | MessageVault DS | DS reference | native / ref | DS / ref |" in markdown
    assert report.DS_RATIO_NOTE in markdown
    assert "Durable Streams: Median of 1 run(s), scale 0.002" in ran.stdout
    table_lines = [line for line in ran.stdout.splitlines() if line.startswith(("┃", "│", "┏"))]
    assert len(table_lines) == 2 * (2 + len(report.ROWS))  # the peers' table and this one
    assert max(len(line) for line in table_lines) <= report.TABLE_WIDTH


@pytest.mark.parametrize("system", ["messagevault-ds", "ds-reference"])
def test_the_durable_streams_driver_checks_acks_and_where_the_stream_ends(
    tmp_path: Path, system: str
) -> None:
    """Against the real server: what a benchmark case relies on the driver to refuse."""
    require([system])
    server = start(BY_KEY[system], tmp_path, Users())
    try:
        url = f"http://127.0.0.1:{server.port}"
        driver = DurableStreamsDriver(url, system, "checked")

        async def case() -> None:
            await driver.open()
            lanes = [[[(b"a-%d" % i, b"x" * i)] for i in range(3)], [[(b"b", b"y"), (b"c", b"")]]]
            # More than one read answer holds (MessageVault's hold 10,000 messages).
            many = [(b"m-%06d" % i, b"v") for i in range(12_000)]
            lanes.append([many[i : i + 1000] for i in range(0, len(many), 1000)])
            await driver.write(lanes, None)
            keys, values = await driver.read(12_005)
            pairs = list(zip(keys, values, strict=True))
            assert [pair for pair in pairs if pair[0].startswith(b"m-")] == many  # in order
            assert sorted(pair for pair in pairs if not pair[0].startswith(b"m-")) == [
                (b"a-0", b""),
                (b"a-1", b"x"),
                (b"a-2", b"xx"),
                (b"b", b"y"),
                (b"c", b""),
            ]
            assert await driver.stored() == 12_005
            # A message the read did not see: the stream ends elsewhere, and stored says so.
            late = Producer(url, "/v1/stream/checked", system)
            await asyncio.to_thread(late.send, [(b"late", b"z")])
            with pytest.raises(
                ProtocolError, match=r"HEAD says the stream ends at offset \S+, the read ended at"
            ):
                await driver.stored()
            # The same producer seq again is a duplicate (204): not an acknowledged new batch.
            late.seq = 0
            with pytest.raises(ProtocolError, match=r"POST of producer seq 0 answered 204"):
                await asyncio.to_thread(late.send, [(b"late", b"z")])
            late.close()
            await driver.close()

        asyncio.run(case())
    finally:
        server.stop()
    assert_gone([server.pid])


def test_a_durable_streams_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"ds-reference: a Durable Streams URL must be http://HOST:PORT, not ftp://x",
    ):
        DurableStreamsDriver("ftp://x", "ds-reference", "s")


@pytest.mark.parametrize(
    ("tamper", "read"),
    [
        ("messagevault", ""),
        ("messagevault:json", "read as JSON: "),
        ("messagevault-ds", ""),
        ("ds-reference", ""),
    ],
)
def test_a_wrong_message_read_back_fails_loudly_and_still_stops_the_server(
    tmp_path: Path, tamper: str, read: str
) -> None:
    system = tamper.split(":", maxsplit=1)[0]
    require([system])
    output = tmp_path / "results"
    ran = run_peers(
        tmp_path,
        *("--scale", "0.002", "--runs", "1", "--output", str(output)),
        *("--only", f"{system},W1", "--tamper", tamper),
    )
    assert ran.returncode == 1
    assert re.search(
        rf"VERIFICATION FAILED: {system} W1: {read}message 1000 \(key-000000001000\): "
        r"the value differs",
        ran.stderr,
    )
    (pid,) = server_pids(ran.stdout)
    assert_gone([pid])
    assert not output.exists()  # nothing saved
    assert not list(tmp_path.glob("mv-bench-peers-*"))


# The README's copy of the table ----------------------------------------------------------


def test_readme_gets_the_newest_table_between_its_markers_and_nothing_else(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "peers-20261201T090000Z.md").write_text("old table\n")
    (results / "peers-20261203T090000Z.md").write_text("new table\n")
    (results / "http-20261204T090000Z.json").write_text("{}")
    readme = tmp_path / "README.md"
    before = f"# Title\n\n## Against the peers\n{report.README_BEGIN}\nstale\n{report.README_END}\n"
    readme.write_text(before + "## Next\n")
    report.refresh_readme(results, readme)
    expected = (
        f"# Title\n\n## Against the peers\n{report.README_BEGIN}\nnew table\n{report.README_END}\n"
    )
    assert readme.read_text() == expected + "## Next\n"
    report.refresh_readme(results, readme)  # again: the same
    assert readme.read_text() == expected + "## Next\n"


def test_readme_without_markers_or_results_is_refused_and_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(SystemExit, match=r"no peers-\*\.md in .*: run make bench-peers first"):
        report.refresh_readme(tmp_path, readme)
    (tmp_path / "peers-20261203T090000Z.md").write_text("table\n")
    with pytest.raises(SystemExit, match=r"README\.md lacks the markers <!-- bench-peers"):
        report.refresh_readme(tmp_path, readme)
    assert readme.read_text() == "# Title\n"


def test_the_real_readme_has_the_markers() -> None:
    text = report.README.read_text()
    assert text.index(report.README_BEGIN) < text.index(report.README_END)


# A peer that cannot run here ---------------------------------------------------------------


def test_a_missing_server_is_skipped_with_its_reason_without_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peers, "find_binary", lambda name: None)
    said: list[str] = []
    systems = [BY_KEY["messagevault"], BY_KEY["nats"]]
    skipped, found = peers.available(systems, False, said.append)
    assert skipped == {"nats": "nats-server not found (--no-install)"}
    assert said == ["SKIPPING nats: nats-server not found (--no-install)"]
    assert set(found) == {"messagevault"}
    assert report.notes(systems, skipped, found)[1] == (
        "SKIPPED NATS JetStream: nats-server not found (--no-install)"
    )


def test_a_missing_reference_server_is_skipped_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks import peer_systems

    monkeypatch.setattr(peer_systems, "REFERENCE_PACKAGE", tmp_path / "package.json")
    said: list[str] = []
    systems = [BY_KEY["messagevault-ds"], BY_KEY["ds-reference"]]
    skipped, found = peers.available(systems, False, said.append)
    reason = "@durable-streams/server not installed: make node_modules/.installed (npm ci)"
    assert skipped == {"ds-reference": reason}
    assert said == [f"SKIPPING ds-reference: {reason}"]
    assert set(found) == {"messagevault-ds"}
    # Node's server is not one apt-get installs.
    assert peer_systems.apt_binaries(SYSTEMS) == ["nats-server", "redis-server"]


def test_install_says_why_not_where_apt_get_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import peer_systems

    monkeypatch.setattr(peer_systems, "find_binary", lambda name: None)
    monkeypatch.setattr(peer_systems.shutil, "which", lambda name: None)
    said: list[str] = []
    assert peer_systems.install(["redis-server", "nats-server"], said.append) == {
        "redis-server": "redis-server not found and no apt-get here: install redis-server to "
        "race it",
        "nats-server": "nats-server not found and no apt-get here: install nats-server to race it",
    }
    assert said == []  # nothing was tried
