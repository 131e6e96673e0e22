"""JSON read benchmark: the server's JSON and NDJSON read routes, in process, server and client.

    python benchmarks/json_read.py                        # 100k x 100 B and 100k x 1,000 B, 5 runs
    python benchmarks/json_read.py --scale 0.1 --runs 1   # a quick look

One asyncio loop holds both an aiohttp server (``create_app`` over memory
storage, on a free 127.0.0.1 port) and its client, so a figure is the CPU
cost of a message through both sides, without the machine's other core
hiding either. The stream is written once; then every run reads it all back
in pages of ``limit=10000`` (the route's default largest), once per route and
client-side parser, in turns:

  json    ``Accept: application/json``, paged by ``next``
  ndjson  ``Accept: application/x-ndjson``, one record per line, paged by X-Next
each parsed with the standard library's ``json.loads`` and with msgspec (the
client library's parser), every key and value checked against what was
written. The table gives msgs per CPU second of this process (server and
client together; on a machine shared with other work, CPU time is steadier
than wall time), medians over ``--runs``; wall-clock msgs/s are saved too. Results go to
benchmarks/results/json_read-<time>.json. Only the server's public pieces are
used, so the same file measures an older checkout (``PYTHONPATH=<it>/src``).
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
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from benchmarks.report import benchmark_arguments, save_results
from rich.console import Console
from rich.table import Table

import messagevault
from messagevault import MemoryStorage, encode_batch
from messagevault.server import StreamHub, create_app

STREAM = "bench"
PAGE = 10_000
SIZES = (100, 1_000)  # value bytes
MESSAGES = 100_000
ROUTES = {"json": "application/json", "ndjson": "application/x-ndjson"}

Records = list[dict[str, Any]]
_msgspec_decoder = msgspec.json.Decoder()


def _json_lines(body: bytes) -> Records:
    return [json.loads(line) for line in body.splitlines()]


PARSERS: dict[str, tuple[Callable[[bytes], Any], Callable[[bytes], Records]]] = {
    # (the JSON answer, the NDJSON answer)
    "json.loads": (json.loads, _json_lines),
    "msgspec": (_msgspec_decoder.decode, _msgspec_decoder.decode_lines),
}


def make_pairs(count: int, size: int) -> list[tuple[bytes, bytes]]:
    filler = b"abcdefghijklmnopqrstuvwxyz0123456789" * (size // 36 + 1)
    return [(b"key-%012d" % i, (b"%012d" % i + filler)[:size]) for i in range(count)]


async def read_all(
    session: aiohttp.ClientSession, route: str, parser: str, keys: list[str], values: list[str]
) -> tuple[float, float]:
    """Read the stream from 0 to its end through ``route``: wall and CPU seconds. Checks each."""
    parse_document, parse_lines = PARSERS[parser]
    headers = {"Accept": ROUTES[route]}
    position, at = 0, 0
    started, cpu = time.perf_counter(), time.process_time()
    while True:
        async with session.get(
            f"/streams/{STREAM}/messages", params={"from": position, "limit": PAGE}, headers=headers
        ) as response:
            if response.status != 200:
                raise SystemExit(f"{route}: HTTP {response.status}: {await response.text()}")
            body = await response.read()
            next_header = response.headers.get("X-Next")
        if route == "json":
            document = parse_document(body)
            records, position = document["messages"], document["next"]
        else:
            records, position = parse_lines(body), int(next_header or "")
        if not records:
            break
        if [r["key"] for r in records] != keys[at : at + len(records)] or [
            r["value"] for r in records
        ] != values[at : at + len(records)]:
            raise SystemExit(f"{route} via {parser}: messages {at}.. differ from those written")
        at += len(records)
    seconds = time.perf_counter() - started, time.process_time() - cpu
    if at != len(keys):
        raise SystemExit(f"{route} via {parser}: read {at} messages, {len(keys)} written")
    return seconds


async def measure(size: int, count: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    pairs = make_pairs(count, size)
    app = create_app(StreamHub(MemoryStorage()))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seconds: dict[str, list[tuple[float, float]]] = {}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for at in range(0, count, 1_000):
                body = encode_batch(pairs[at : at + 1_000]).frame()
                async with session.post(
                    f"/streams/{STREAM}",
                    data=body,
                    headers={"Content-Type": "application/x-messagevault-batch"},
                ) as response:
                    if response.status != 200:
                        raise SystemExit(f"append: HTTP {response.status}")
            keys = [k.decode() for k, _ in pairs]
            values = [v.decode() for _, v in pairs]
            await read_all(session, "json", "msgspec", keys, values)  # warm-up, untimed
            for _ in range(runs):
                for route in ROUTES:
                    for parser in PARSERS:
                        taken = await read_all(session, route, parser, keys, values)
                        seconds.setdefault(f"{route} {parser}", []).append(taken)
    finally:
        await runner.cleanup()
    return seconds


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0])
    parser.set_defaults(runs=5)
    parser.add_argument("--label", default="", help="a word saved with the results (before, after)")
    args = parser.parse_args()
    if args.runs < 1 or not 0 < args.scale <= 1:
        parser.error("--runs must be at least 1 and --scale within (0, 1]")
    count = max(PAGE, round(MESSAGES * args.scale))
    cases = []
    table = Table(
        title=f"JSON read routes in process, {count:,} messages: msgs per CPU second, "
        f"median of {args.runs}"
    )
    table.add_column("case")
    for size in SIZES:
        table.add_column(f"{size:,} B", justify="right")
    rows: dict[str, list[str]] = {}
    for size in SIZES:
        seconds = asyncio.run(measure(size, count, args.runs))
        for case, taken in seconds.items():
            walls, cpus = [wall for wall, _ in taken], [cpu for _, cpu in taken]
            per_cpu_second = count / statistics.median(cpus)
            rows.setdefault(case, []).append(f"{per_cpu_second / 1e3:,.0f}k")
            cases.append(
                {"case": case, "value_size": size, "messages": count}
                | {"seconds": walls, "cpu_seconds": cpus, "msgs_per_cpu_s": per_cpu_second}
                | {"msgs_per_s": count / statistics.median(walls)}
            )
    for case, cells in rows.items():
        table.add_row(case, *cells)
    Console(width=100).print(table)
    path = save_results(
        args.output,
        "json_read",
        {"runs": args.runs, "scale": args.scale, "label": args.label, "page": PAGE},
        cases,
        {"messagevault": messagevault.__version__, "messagevault_path": messagevault.__file__},
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
