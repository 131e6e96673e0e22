"""``messagevault stress``: real processes against real servers, at tiny sizes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from messagevault.client import Client
from messagevault.stress.driver import Connection
from messagevault.stress.verify import read_back
from messagevault.stress.workload import Plan, Values
from tests.serve_process import serve_process

USER, PASSWORD = "loader", "loader-password"


def stress(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``messagevault stress``; its temporary folders go under ``tmp_path``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")} | {
        "TMPDIR": str(tmp_path),
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
    }
    return subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "stress", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment | (env or {}),
        cwd=tmp_path,
        check=False,
    )


def saved(path: Path) -> dict[str, Any]:
    run: dict[str, Any] = json.loads(path.read_text())
    return run


def by_phase(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["phase"]: row for row in run["table"]}


def left_behind(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob("mv-stress-*"))


def test_embedded_run_with_consumers_from_storage(tmp_path: Path) -> None:
    # A default profile does not make stress load that server: only --url or --profile do.
    (tmp_path / "no-config.toml").write_text(
        '[profiles.default]\nurl = "http://127.0.0.1:9"\nuser = "u"\npassword = "p"\n'
    )
    (tmp_path / "no-config.toml").chmod(0o600)
    result = stress(
        tmp_path,
        *("--count", "3000", "--producers", "3", "--streams", "2", "--batch-size", "50"),
        *("--value-size", "64", "--consumers", "2", "--json", "run.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "read-back: OK, 3,000 messages checked" in result.stdout
    for phase in ("write", "read", "e2e", "p99.9"):
        assert phase in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 100  # fits a terminal
    run = saved(tmp_path / "run.json")
    assert run["kind"] == "messagevault-stress" and not run["partial"]
    assert run["options"]["producers"] == 3 and run["options"]["fsync"] == "always"
    assert run["verification"] == {
        "ok": True,
        "messages": 3000,
        "batches": 60,  # 1,000 messages per producer, in batches of 50
        "problem_count": 0,
        "problems": [],
    }
    phases = by_phase(run)
    assert phases["write"]["messages"] == 3000
    # Every row's percentiles are over messages, as the caption says (the read-back's too).
    assert phases["write"]["latency_ms"]["count"] == phases["read"]["latency_ms"]["count"] == 3000
    # Each consumer reads one of the two streams: 2,000 + 1,000 messages seen.
    assert phases["end-to-end"]["messages"] == 3000
    for row in phases.values():
        latency = row["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
        assert latency["p99.9"] <= latency["max"] * 1.001
        assert row["msgs_per_s"] > 0 and row["mb_per_s"] > 0
    assert run["series"] and run["series"][0]["write_msgs_per_s"] > 0
    assert run["cpu_share"]["stress"] > 0 and run["cpu_share"]["server"] > 0
    assert not left_behind(tmp_path)  # the embedded server's folder is gone


def test_consumers_read_through_the_server(tmp_path: Path) -> None:
    result = stress(
        tmp_path,
        *("--count", "2000", "--producers", "2", "--consumers", "3", "--read-from", "server"),
        *("--embedded", "--fsync", "never", "--json", "run.json"),
        env={"MESSAGEVAULT_URL": "http://127.0.0.1:9"},  # --embedded outranks it
    )
    assert result.returncode == 0, result.stderr
    run = saved(tmp_path / "run.json")
    assert run["verification"]["ok"] and run["verification"]["messages"] == 2000
    assert run["options"]["read_from"] == "server" and run["options"]["fsync"] == "never"
    assert by_phase(run)["end-to-end"]["messages"] == 3 * 2000  # three consumers, one stream


def test_against_a_running_server_with_credentials(tmp_path: Path) -> None:
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        credentials = {"MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": PASSWORD}
        for _ in range(2):  # the second run starts where the first left the stream
            result = stress(
                tmp_path,
                *("--url", url, "--count", "500", "--json", "run.json"),
                env=credentials,
            )
            assert result.returncode == 0, result.stderr
            assert saved(tmp_path / "run.json")["verification"]["messages"] == 500
            assert result.stderr.startswith(f"loading {url} (from --url)\n")
        # The variable counts (an explicit setting) and the first line says so.
        from_variable = stress(
            tmp_path, "--count", "100", env=credentials | {"MESSAGEVAULT_URL": url}
        )
        assert from_variable.returncode == 0, from_variable.stderr
        assert from_variable.stderr.startswith(f"loading {url} (from MESSAGEVAULT_URL)\n")
        with Client(url, user=USER, password=PASSWORD) as client:
            assert client.info("stress-0").messages == 1100
        wrong = stress(
            tmp_path,
            *("--url", url, "--count", "10"),
            env={"MESSAGEVAULT_USER": USER, "MESSAGEVAULT_PASSWORD": "wrong"},
        )
        assert wrong.returncode == 1
        loading, error = wrong.stderr.splitlines()
        assert loading == f"loading {url} (from --url)"
        assert error.startswith("error:") and "did not accept user 'loader'" in error
        assert "Traceback" not in wrong.stderr


def test_read_back_reports_missing_repeated_and_altered_messages(tmp_path: Path) -> None:
    plan = Plan(producers=2, batch_size=10, value_size=40, duration=None, count=40).check()
    values = Values(plan.value_size)
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        connection = Connection(url, USER, PASSWORD)
        with Client(url, user=USER, password=PASSWORD) as client:
            # What two producers of this plan would send, but damaged on purpose:
            # producer 0 skips 10-19 and repeats 5; one of producer 1's values
            # has a byte changed.
            client.publish("stress-0", values.batch(0, 0, 10, 1))
            client.publish("stress-0", values.batch(1, 0, 10, 2))
            client.publish("stress-0", values.batch(0, 20, 10, 3))
            altered = values.batch(1, 10, 10, 4)
            key, value = altered[3]
            altered[3] = (key, value[:-1] + bytes([value[-1] ^ 1]))
            client.publish("stress-0", altered)
            end = client.publish("stress-0", values.batch(0, 5, 1, 5)).end

        def check(read_from: str) -> list[str]:
            readback = read_back(
                Plan(**{**plan.to_json(), "read_from": read_from}),
                connection=connection,
                values=values,
                starts={"stream": 0} | {"stress-0": 0},
                ends={"stress-0": end},
                acked=[30, 20],
                interrupted=threading.Event(),
            )
            assert not readback.ok and readback.messages == 41
            return readback.problems

        for read_from in ("storage", "server"):
            problems = check(read_from)
            assert any("producer 0's messages 10-19 are missing" in p for p in problems), problems
            assert any("producer 0's message 5 again or out of order" in p for p in problems)
            assert any("producer 1's message 13: value bytes differ" in p for p in problems)
            assert len(problems) == 3, problems


def test_read_back_checks_the_send_times(tmp_path: Path) -> None:
    plan = Plan(producers=1, batch_size=10, value_size=40, duration=None, count=40).check()
    values = Values(plan.value_size)
    window = (1_000, 2_000)  # time.monotonic_ns() before the first batch and after the last
    with serve_process(tmp_path / "data", USER, PASSWORD) as url:
        with Client(url, user=USER, password=PASSWORD) as client:
            client.publish("stress-0", values.batch(0, 0, 10, 1_100))
            client.publish("stress-0", values.batch(0, 10, 10, 1_050))  # before the batch before
            mixed = values.batch(0, 20, 10, 1_200)
            mixed[5] = values.batch(0, 25, 1, 1_201)[0]  # one message's time differs
            client.publish("stress-0", mixed)
            end = client.publish("stress-0", values.batch(0, 30, 10, 5_000)).end  # after the run
        readback = read_back(
            plan,
            connection=Connection(url, USER, PASSWORD),
            values=values,
            starts={"stress-0": 0},
            ends={"stress-0": end},
            acked=[40],
            interrupted=threading.Event(),
            window=window,
        )
    assert readback.messages == 40
    assert [problem.split(": ", 1)[1] for problem in readback.problems] == [
        "producer 0's message 10: send time before that of the batch before it",
        "producer 0's message 25: send time differs from the rest of its batch",
        "producer 0's message 30: send time outside the run (+0.000 s from its start)",
    ]


def test_report_png_and_html_with_compare(tmp_path: Path) -> None:
    first = stress(
        tmp_path,
        *("--count", "1500", "--batch-size", "50", "--consumers", "1", "--label", "first"),
        *("--json", "first.json", "--report", "first.png"),
    )
    assert first.returncode == 0, first.stderr
    png = (tmp_path / "first.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) >= (600, 400) and len(png) > 10_000
    second = stress(
        tmp_path,
        *("--count", "1500", "--fsync", "never", "--label", "first"),
        *("--report", "both.html", "--compare", "first.json", "--compare", "first.json"),
    )
    assert second.returncode == 0, second.stderr
    page = (tmp_path / "both.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    for index in (0, 1, 2):
        assert f'id="run-{index}-write_msgs_per_s"' in page
    assert 'id="run-3-' not in page
    # Three runs labelled alike are told apart.
    assert "<li>first: " in page and "<li>first (2): " in page and "<li>first (3): " in page
    # Self-contained: nothing fetched from elsewhere.
    assert "<script" not in page and "<link" not in page and "src=" not in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--producers", "0"], "--producers must be 1-256, not 0"),
        (["--value-size", "10"], "--value-size must be 20-"),
        (["--duration", "5", "--count", "5"], "give --duration or --count, not both"),
        (["--duration", "0"], "--duration must be more than 0"),
        (["--count", "0"], "--count must be 1-"),
        (["--streams", "3", "--producers", "2"], "--streams 3 needs at least as many --producers"),
        (["--consumers", "65"], "--consumers must be 0-64"),
        (["--batch-size", "100000", "--value-size", "1000"], "lower --batch-size or --value-size"),
        (["--stream-prefix", "Bad_Name"], "stream name"),
        (["--read-from", "disk"], "'disk' is not one of 'storage', 'server'"),
        (["--fsync", "sometimes"], "'sometimes' is not one of"),
        (["--report", "picture.gif"], "--report picture.gif: the name must end in .html or .png"),
        (["--compare", "run.json"], "--compare adds runs to a --report"),
        (["--report", "r.png", "--compare", "missing.json"], "--compare missing.json: cannot read"),
        (["--report", "r.png", "--compare", "bad.json"], "not a `messagevault stress --json`"),
        (["--json", "nowhere/run.json"], "--json nowhere/run.json: there is no folder"),
        (["--url", "http://127.0.0.1:1", "--embedded"], "give --embedded or a server"),
        (["--url", "http://127.0.0.1:1", "--fsync", "never"], "--fsync is for the embedded"),
        (["--statsd", "nonsense"], "--statsd:"),
        (["--producers", "many"], "'many' is not a valid integer"),
    ],
)
def test_bad_options_fail_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    result = stress(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert result.stdout == ""
    assert not left_behind(tmp_path)  # no server was started


def test_report_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    blocked = (
        "import sys; sys.modules['matplotlib'] = None; from messagevault.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, "stress", "--count", "10", "--report", "r.png"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"TMPDIR": str(tmp_path)},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --report needs matplotlib: pip install 'messagevault[report]'")
    assert not left_behind(tmp_path)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in command:
                found.append(int(entry.name))
    return found


def test_ctrl_c_gives_a_partial_table_and_stops_the_server(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")} | {
        "TMPDIR": str(tmp_path),
        "MESSAGEVAULT_CONFIG": str(tmp_path / "none.toml"),
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "messagevault.cli", "stress", "--duration", "120"),
            *("--consumers", "1", "--json", "run.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=tmp_path,
        start_new_session=True,  # its own process group, as a shell gives a command
    )
    try:
        deadline = time.monotonic() + 60
        while not _processes_mentioning(str(tmp_path / "mv-stress-")):  # the server is up
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        time.sleep(2.5)  # the producers are sending
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 130, stderr
    assert stdout.startswith("PARTIAL (interrupted) messagevault stress")
    assert "read-back: skipped (interrupted)" in stdout
    assert "interrupted (SIGINT): the producers stop after their batches in flight" in stderr
    # Not a terminal: a plain progress line after the first second (then every 5 s).
    assert "    1 s  sent " in stderr and "write " in stderr and "ack p99 " in stderr
    run = saved(tmp_path / "run.json")
    assert run["partial"] is True and run["verification"]["ok"] is None
    assert by_phase(run)["write"]["messages"] > 0
    assert not _processes_mentioning(str(tmp_path / "mv-stress-"))  # the server is gone
    assert not left_behind(tmp_path)


def test_statsd_gets_the_stress_figures(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.settimeout(0.5)
        port = daemon.getsockname()[1]
        result = stress(
            tmp_path,
            *("--count", "1000", "--batch-size", "100", "--consumers", "1"),
            *("--statsd", f"127.0.0.1:{port}", "--statsd-prefix", "bench"),
        )
        assert result.returncode == 0, result.stderr
        lines: list[str] = []
        for _ in range(200):  # what the command flushed before it ended is queued here
            try:
                lines += daemon.recv(65536).decode().splitlines()
            except TimeoutError:
                break
    totals: dict[str, int] = {}
    timers: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        value, kind = rest.split("|")[:2]
        if kind == "c":
            totals[name] = totals.get(name, 0) + int(float(value))
        elif kind == "ms":
            timers[name] = timers.get(name, 0) + 1
    assert totals["bench.write.messages"] == 1000
    assert totals["bench.write.batches"] == 10
    assert totals["bench.read.messages"] == 1000
    assert timers["bench.write.ack"] == 10
    assert timers["bench.e2e"] >= 1


@pytest.mark.parametrize("access_log", [False, True])
def test_embedded_server_logs_requests_only_when_asked(tmp_path: Path, access_log: bool) -> None:
    from messagevault.stress.embedded import EmbeddedServer

    server = EmbeddedServer(folder=tmp_path, fsync="never", access_log=access_log)
    with server, Client(server.url, user=server.user, password=server.password) as client:
        client.publish("orders", [(b"k", b"v")])
    lines = server.log.read_text().splitlines()
    assert any('"messagevault.access"' in line for line in lines) is access_log


def _stress_in_background(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")} | {
        "TMPDIR": str(tmp_path),
        "MESSAGEVAULT_CONFIG": str(tmp_path / "none.toml"),
    }
    environment |= env or {}
    return subprocess.Popen(
        [sys.executable, "-m", "messagevault.cli", "stress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=tmp_path,
        start_new_session=True,
    )


def _wait_for_sending(tmp_path: Path, process: subprocess.Popen[str]) -> list[int]:
    """The embedded server's PIDs, once it is up and the producers have sent for a while."""
    deadline = time.monotonic() + 60
    while not (servers := _processes_mentioning(str(tmp_path / "mv-stress-"))):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    time.sleep(2.5)  # the producers are sending
    return servers


def _gone(pids: list[int], timeout: float = 60) -> bool:
    """Whether every process of ``pids`` has ended (or is a zombie) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_sigterm_stops_like_ctrl_c_with_exit_143(tmp_path: Path) -> None:
    process = _stress_in_background(tmp_path, "--duration", "120", "--json", "run.json")
    try:
        servers = _wait_for_sending(tmp_path, process)
        os.kill(process.pid, signal.SIGTERM)  # a timeout or CI: to the command alone
    finally:
        stdout, stderr = _finish(process)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stdout.startswith("PARTIAL (interrupted) messagevault stress")
    assert "read-back: skipped (interrupted)" in stdout
    assert "interrupted (SIGTERM)" in stderr
    run = saved(tmp_path / "run.json")
    assert run["partial"] is True and by_phase(run)["write"]["messages"] > 0
    assert _gone(servers, timeout=0) and not left_behind(tmp_path)


def test_sighup_before_the_run_still_stops_the_server(tmp_path: Path) -> None:
    # SIGHUP while the server comes up or the producers run: nothing is left either way.
    process = _stress_in_background(tmp_path, "--duration", "120")
    try:
        deadline = time.monotonic() + 60
        while not (servers := _processes_mentioning(str(tmp_path / "mv-stress-"))):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGHUP)
    finally:
        _, stderr = _finish(process)
    assert process.returncode == 128 + signal.SIGHUP, stderr
    assert "Traceback" not in stderr
    assert _gone(servers, timeout=0) and not left_behind(tmp_path)


SIGNAL_INSIDE_POPEN = """
import os, signal, subprocess, sys
from pathlib import Path
from messagevault.stress.embedded import EmbeddedServer

class Popen(subprocess.Popen):  # the real one; the signal lands as it returns, after the fork
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print("started", self.pid, flush=True)
        os.kill(os.getpid(), signal.SIGHUP)

def stop(signum, frame):
    raise SystemExit(128 + signum)

signal.signal(signal.SIGHUP, stop)
subprocess.Popen = Popen
EmbeddedServer(parent=Path(sys.argv[1]))
print("not stopped", flush=True)
"""


def test_a_signal_while_the_embedded_server_starts_stops_it_before_leaving(
    tmp_path: Path,
) -> None:
    # SIGHUP inside Popen, child forked but not yet known: the server is still
    # stopped, and its folder removed, by the time the process has exited.
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_INSIDE_POPEN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 128 + signal.SIGHUP, result.stderr
    assert "not stopped" not in result.stdout
    server = int(result.stdout.split()[1])
    assert _gone([server], timeout=0), "the server outlived the process that started it"
    assert not left_behind(tmp_path)


def test_a_second_ctrl_c_still_removes_server_and_folder(tmp_path: Path) -> None:
    process = _stress_in_background(tmp_path, "--duration", "120", "--consumers", "2")
    try:
        servers = _wait_for_sending(tmp_path, process)
        # Ctrl-C again and again until it exits: some land while the server is stopping.
        for _ in range(100):
            if process.poll() is not None:
                break
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(0.02)
    finally:
        _, stderr = _finish(process)
    # (-SIGINT: one landed as the interpreter was exiting, when Python no longer handles it.)
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr
    assert _gone(servers, timeout=0) and not left_behind(tmp_path)


def test_the_embedded_server_dies_with_a_killed_stress(tmp_path: Path) -> None:
    process = _stress_in_background(tmp_path, "--duration", "120")
    try:
        servers = _wait_for_sending(tmp_path, process)
        process.kill()  # SIGKILL: no handler, no finally
        process.wait(timeout=30)
        # The server sees its leash (stdin) close, stops, and removes the folder.
        assert _gone(servers), "the embedded server outlived its parent"
        deadline = time.monotonic() + 30
        while left_behind(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left_behind(tmp_path)
    finally:
        _finish(process)
        for pid in _processes_mentioning(str(tmp_path / "mv-stress-")):
            os.kill(pid, signal.SIGKILL)  # only if the test failed: no orphan either way


def test_a_server_that_dies_mid_run_gives_a_partial_table_and_json(tmp_path: Path) -> None:
    from messagevault.stress.embedded import EmbeddedServer

    (tmp_path / "server").mkdir()
    with EmbeddedServer(folder=tmp_path / "server", fsync="never") as server:
        credentials = {"MESSAGEVAULT_USER": server.user, "MESSAGEVAULT_PASSWORD": server.password}
        process = _stress_in_background(
            tmp_path,
            *("--url", server.url, "--duration", "120", "--json", "run.json"),
            env=credentials,
        )
        try:
            deadline = time.monotonic() + 60
            with Client(server.url, user=server.user, password=server.password) as client:
                while not (client.streams() and client.info("stress-0").messages > 1000):
                    assert time.monotonic() < deadline and process.poll() is None
                    time.sleep(0.1)
            server.process.kill()  # the server fails mid-run
            server.process.wait(timeout=30)
        finally:
            stdout, stderr = _finish(process)
    assert process.returncode == 1, stderr
    assert stdout.startswith("PARTIAL (a producer failed")
    # The publish in flight was retried (safely: it has a producer id) until
    # the stress client's retry_timeout, and the server never came back.
    assert "read-back: skipped (the run stopped early: cannot reach the server" in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run stopped early: cannot reach the server")
    run = saved(tmp_path / "run.json")
    assert run["partial"] is True and run["error"].startswith("cannot reach the server")
    assert run["verification"] == {"ok": None, "skipped": "stopped early"}
    assert by_phase(run)["write"]["messages"] > 1000


def _big_outcome() -> Any:
    """An outcome with numbers as wide as a long, fast, sometimes slow run gives."""
    from messagevault.stress.driver import Outcome
    from messagevault.stress.stats import Recorder
    from messagevault.stress.verify import Readback

    plan = Plan(producers=16, streams=4, duration=None, count=10**9).check()
    recorder = Recorder()
    recorder.started = 0.0
    for seconds in (0.000_9, 0.012, 1.5, 59.0):
        recorder.wrote(250_000_000, 250_000_000 * 110, seconds)
        recorder.saw(250_000_000, 250_000_000 * 110, seconds * 2)
    recorder.last_seen = 80.0
    readback = Readback(messages=10**9, batches=10**7, bytes=110 * 10**9, seconds=70.0)
    readback.latency.record(0.000_05, 10**9)
    return Outcome(plan, recorder, 80.0, True, {}, {}, [], readback=readback)


@pytest.mark.parametrize("width", [80, 100])
def test_the_table_fits_the_terminal_and_never_cuts_a_number(width: int) -> None:
    import io

    from rich.console import Console

    from messagevault.stress import report

    outcome = _big_outcome()
    out = io.StringIO()
    report.print_table(
        outcome,
        "messagevault stress: 16 producers, 4 streams",
        Console(file=out, width=width, color_system=None),
    )
    text = out.getvalue()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= width
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    write, read, e2e = rows["write"], rows["read"], rows["e2e"]
    # Whole numbers, three significant figures for latencies (as HDR holds them).
    assert write == ["12,500,000", "0", "1,375.0", "12.0", *["59,015"] * 4]
    assert read == ["14,285,714", "142,857", "1,571.4", *["0.050"] * 5]
    assert e2e == ["12,500,000", "0", "1,375.0", "24.0", *["118,030"] * 4]


def test_the_progress_line_keeps_within_the_width() -> None:
    from messagevault.stress.progress import progress_line
    from messagevault.stress.stats import Second

    outcome = _big_outcome()
    point = Second(3600.0, 12_500_000.0, 1375.0, 125_000.0, 0.9, 59_000.0, 12_500_000.0, 2.0, 1.0)
    full = progress_line(point, outcome.recorder, "/1,000,000,000")
    assert "e2e p99" in full and "MB/s" in full
    for width in (40, 60, 79):
        line = progress_line(point, outcome.recorder, "/1,000,000,000", width)
        assert len(line) <= width and line.startswith(" 3600 s  ")
        assert "write 12,500,000/s" in line  # what goes last


def test_idle_storage_consumers_back_off_and_reset_on_data() -> None:
    from messagevault.stress.driver import Backoff

    backoff = Backoff()
    waits = [backoff.next() for _ in range(9)]
    assert waits == [0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1, 0.1, 0.1]
    backoff.reset()
    assert backoff.next() == 0.002


async def test_the_ack_clock_starts_after_the_batch_is_built(tmp_path: Path) -> None:
    import asyncio

    from messagevault.stress import driver
    from messagevault.stress.embedded import EmbeddedServer
    from messagevault.stress.stats import Recorder

    class SlowToBuild:
        """Values that take (a made-up) ten seconds to build: none of it is ack latency."""

        def __init__(self) -> None:
            self.values = Values(40)
            self.skew = 0

        def clock(self) -> int:
            return real_clock() + self.skew

        def batch(self, producer: int, first: int, count: int, sent_ns: int) -> Any:
            self.skew += 10 * 10**9
            return self.values.batch(producer, first, count, sent_ns)

    real_clock = time.monotonic_ns
    source = SlowToBuild()
    plan = Plan(batch_size=10, value_size=40, duration=None, count=50, consumers=0).check()
    server = EmbeddedServer(folder=tmp_path, fsync="never")
    await asyncio.to_thread(server.wait_until_up)
    try:
        recorder = Recorder()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(driver.time, "monotonic_ns", source.clock)
            outcome = await driver.run(
                plan,
                Connection(server.url, server.user, server.password),
                recorder,
                threading.Event(),
                verify=False,
                messages=source,
            )
    finally:
        await asyncio.to_thread(server.stop)
    assert outcome.recorder.write.messages == 50
    assert recorder.write.latency.percentile_ms(100) < 10_000  # the ten seconds left out


def test_sigterm_is_still_handled_after_the_run(tmp_path: Path) -> None:
    # asyncio puts SIG_DFL back when the run's loop ends: a SIGTERM while the table
    # prints or the server stops would then kill the command without its cleanup.
    from messagevault import cli_stress
    from messagevault.stress.embedded import EmbeddedServer

    plan = Plan(duration=None, count=100, consumers=0).check()
    with (
        EmbeddedServer(folder=tmp_path, fsync="never") as server,
        cli_stress._signals_stop_at_once(),
    ):
        handler = signal.getsignal(signal.SIGTERM)
        connection = Connection(server.url, server.user, server.password)
        outcome = cli_stress._run(plan, connection, None, [])
        assert outcome.readback is not None and outcome.readback.ok
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGHUP) is handler
        with pytest.raises(KeyboardInterrupt):  # unwinds, so every finally runs
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
