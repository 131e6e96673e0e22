"""Client-library benchmark: `Producer.send` of single messages against `Client.publish` of batches.

    make bench-client
    python benchmarks/client.py --scale 0.1 --runs 1

One `messagevault serve --fsync always` subprocess on file storage; this
process is one producer. In every run the cases alternate on fresh streams,
so that machine noise hits them alike, and the table gives medians:

  publish   ``Client.publish`` of ready-made batches of 1,000 x 100 B, one after the other
  send      ``Producer.send`` of the same messages one at a time (default options:
            batches of up to 1,000 messages / 1 MiB, linger 5 ms), then ``flush``
  async publish / async send   the same with ``AsyncClient`` and ``AsyncProducer``

The issue's target: ``send`` reaches at least 60% of ``publish``'s msgs/s in
the same run. Every message is read back and checked (count, order, content)
after the clock stops. Results go to benchmarks/results/client-<time>.json.
"""

# ruff: noqa: E402 - the imports must follow the sys.path fix below

from __future__ import annotations

import sys
from pathlib import Path

# As a script, this folder would come first on sys.path, where benchmarks/http.py
# shadows the standard library's ``http``; the repo root goes there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.report import benchmark_arguments, save_results
from benchmarks.serving import PASSWORD, USER, Server
from rich.console import Console
from rich.table import Table

from messagevault.client import AsyncClient, Client
from messagevault.producer import AsyncProducer, MessageFuture, Producer

MESSAGES = 400_000
BATCH = 1000
KEY = b"key-0123456789ab"


@dataclass
class Case:
    name: str
    messages: int
    seconds: list[float] = field(default_factory=list)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / statistics.median(self.seconds)


def values(count: int) -> list[bytes]:
    return [b"%08d" % i + b"v" * 92 for i in range(count)]


def publish(client: Client, stream: str, data: list[bytes]) -> None:
    for start in range(0, len(data), BATCH):
        client.publish(stream, [(KEY, value) for value in data[start : start + BATCH]])


def send(client: Client, stream: str, data: list[bytes]) -> None:
    futures: list[MessageFuture] = []
    with Producer(client) as producer:
        futures.extend(producer.send(stream, value, KEY) for value in data)
        producer.flush()
    futures[-1].result()  # a failed batch fails loudly here; read-back checks the rest


async def publish_async(client: AsyncClient, stream: str, data: list[bytes]) -> None:
    for start in range(0, len(data), BATCH):
        await client.publish(stream, [(KEY, value) for value in data[start : start + BATCH]])


async def send_async(client: AsyncClient, stream: str, data: list[bytes]) -> None:
    async with AsyncProducer(client) as producer:
        futures = [await producer.send(stream, value, KEY) for value in data]
        await producer.flush()
    await futures[-1]


def check(client: Client, stream: str, data: list[bytes]) -> None:
    got = [(m.sequence, m.key, m.value) for m in client.read(stream)]
    expected = [(i, KEY, value) for i, value in enumerate(data)]
    if got != expected:
        raise SystemExit(f"read-back of {stream} differs: {len(got)} of {len(data)} messages")


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    count = max(BATCH, int(MESSAGES * args.scale) // BATCH * BATCH)
    data = values(count)
    cases = {name: Case(name, count) for name in ("publish", "send", "async publish", "async send")}
    folder = Path(tempfile.mkdtemp(prefix="mv-bench-client-"))
    server = Server(folder)
    try:
        server.wait_until_up()
        with Client(server.base, user=USER, password=PASSWORD) as client:
            client.streams()  # the server verifies the password once, before any clock runs
            for run in range(args.runs):
                for name, case in cases.items():
                    stream = f"{name.replace(' ', '-')}-{run}"
                    if name == "publish":
                        seconds = timed(lambda s=stream: publish(client, s, data))
                    elif name == "send":
                        seconds = timed(lambda s=stream: send(client, s, data))
                    else:
                        seconds = asyncio.run(_async_case(server.base, name, stream, data))
                    check(client, stream, data)
                    case.seconds.append(seconds)
                    print(
                        f"{name} run {run + 1}/{args.runs}: {count / seconds:,.0f} msgs/s",
                        flush=True,
                    )
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print_table(list(cases.values()), count, args.runs)
    path = save_results(
        args.output,
        "client",
        {"runs": args.runs, "scale": args.scale, "messages": count, "value_bytes": 100},
        [
            {"case": c.name, "seconds": c.seconds, "msgs_per_s": c.msgs_per_s}
            for c in cases.values()
        ],
    )
    print(f"saved {path}")


async def _async_case(url: str, name: str, stream: str, data: list[bytes]) -> float:
    async with AsyncClient(url, user=USER, password=PASSWORD) as client:
        await client.streams()
        started = time.perf_counter()
        if name == "async publish":
            await publish_async(client, stream, data)
        else:
            await send_async(client, stream, data)
        return time.perf_counter() - started


def print_table(cases: list[Case], count: int, runs: int) -> None:
    by_name = {c.name: c for c in cases}
    table = Table(title=f"client library: {count:,} x 100 B, one producer, median of {runs}")
    for column in ("case", "msgs/s", "vs publish", "target"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for case in cases:
        baseline = by_name["async publish" if case.name.startswith("async") else "publish"]
        ratio = case.msgs_per_s / baseline.msgs_per_s
        target = ""
        if case.name.endswith("send"):
            target = "met (>= 60%)" if ratio >= 0.6 else "missed (< 60%)"
        table.add_row(case.name, f"{case.msgs_per_s:,.0f}", f"{ratio:.0%}", target)
    Console().print(table)


if __name__ == "__main__":
    main()
