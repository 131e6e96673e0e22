"""What idle followers cost storage, and how soon they see the first message after idling.

    make bench-follow                    # a minute idle, 100 followers, 3 runs, medians
    python benchmarks/follow.py --idle 15 --followers 20 --runs 1

On Azurite (started from node_modules), every storage request counted as it
leaves the Azure SDK (a transport that counts, one per group of followers):

  direct, fixed    --direct followers reading storage themselves, polling the checkpoint
                   every 0.1 s whatever happens (``Reader.follow`` before issue 17)
  direct, backoff  as many with the defaults: 0.1 s, doubling while idle, up to 2 s
  server, 1        one follower through a server (``Client.follow``: long polls), the
                   server in this process on its own storage client
  server, N        --followers followers through another such server

Both servers and every direct follower wait on one stream that neither server
writes (as when another node writes it). For --idle seconds nothing is
written; then one message is appended from elsewhere, and each follower's
delay from just before that append to its seeing the message is a sample.
Reported per case: storage requests over the idle time and, of them, those
after the first --warmup seconds (a server's first read of the stream also
rolls it forward, once, before any follower waits: not a following cost), the
rate per follower after the warmup (the issue's target: at most 1/s for a
direct follower),
that rate as requests a day, and the delay p50/p99/max (target: within the
ceiling). Medians over --runs. Results go to benchmarks/results/follow-<time>.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.box import SIMPLE
from rich.console import Console
from rich.table import Table

# Run as a script, this folder comes first on sys.path, where benchmarks/azure.py
# would shadow the Azure SDK's ``azure`` package: the repo root instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from aiohttp import web  # noqa: E402
from azure.core.pipeline.transport import HttpRequest, RequestsTransport  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402
from benchmarks.report import benchmark_arguments, save_results  # noqa: E402
from tests.azurite import Azurite, free_port  # noqa: E402

from messagevault import Reader, Writer  # noqa: E402
from messagevault.client import Client  # noqa: E402
from messagevault.server import StreamHub, create_app  # noqa: E402
from messagevault.storage.azure import AzureStorage, client_options  # noqa: E402

STREAM = "bench-follow"
SECONDS_A_DAY = 86_400


class CountingTransport(RequestsTransport):
    """The SDK's own HTTP transport, counting every request it sends."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self.sent = 0

    def send(self, request: HttpRequest, **kwargs: Any) -> Any:  # type: ignore[override]
        with self._lock:
            self.sent += 1
        return super().send(request, **kwargs)


def counted_storage(azurite: Azurite) -> tuple[AzureStorage, CountingTransport]:
    transport = CountingTransport()
    service = BlobServiceClient.from_connection_string(
        azurite.connection_string, transport=transport, **client_options()
    )
    return AzureStorage(service), transport


@dataclass
class Group:
    """Followers whose storage requests are counted together."""

    name: str
    followers: int
    transport: CountingTransport
    seen: list[float] = field(default_factory=list)  # when each saw the new message
    at_warmup: int = 0
    at_end: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self) -> None:
        with self.lock:
            self.seen.append(time.monotonic())


def _direct_follower(
    storage: AzureStorage, group: Group, start: int, stop: threading.Event, **poll: float
) -> None:
    reader = Reader.open(storage, STREAM)
    try:
        for _ in reader.follow(start, stop=stop, **poll):
            group.saw()
            return
    finally:
        reader.close()


def _server_follower(client: Client, group: Group, start: int, stop: threading.Event) -> None:
    for _ in client.follow(STREAM, start, stop=stop):
        group.saw()
        return


@contextmanager
def served(storage: AzureStorage) -> Iterator[str]:
    """The app on a loopback port, in a thread of its own; its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(StreamHub(storage)))
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def one_run(
    azurite: Azurite, idle: float, warmup: float, direct: int, followers: int
) -> list[dict[str, Any]]:
    writer_storage, _ = counted_storage(azurite)
    with Writer.open(writer_storage, STREAM) as writer:
        writer.append([(b"k", b"before")])
        start = writer.checkpoint.length
    stop = threading.Event()
    threads: list[threading.Thread] = []
    groups: list[Group] = []

    def follow(target: Any, *args: Any, **kwargs: Any) -> None:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
        thread.start()
        threads.append(thread)

    for name, poll in (
        ("direct, fixed 0.1 s", {"poll_interval": 0.1, "max_poll_interval": 0.1}),
        ("direct, backoff 0.1-2 s", {}),
    ):
        storage, transport = counted_storage(azurite)
        group = Group(name, direct, transport)
        groups.append(group)
        for _ in range(direct):
            follow(_direct_follower, storage, group, start, stop, **poll)
    with contextlib.ExitStack() as stack:
        for count in (1, followers):
            storage, transport = counted_storage(azurite)
            group = Group(f"server, {count} follower{'s' if count > 1 else ''}", count, transport)
            groups.append(group)
            url = stack.enter_context(served(storage))
            client = stack.enter_context(Client(url))
            for _ in range(count):
                follow(_server_follower, client, group, start, stop)
        began = time.monotonic()
        time.sleep(warmup)
        for group in groups:
            group.at_warmup = group.transport.sent
        time.sleep(max(0.0, idle - (time.monotonic() - began)))
        for group in groups:
            group.at_end = group.transport.sent
        appended = time.monotonic()
        with Writer.open(writer_storage, STREAM) as writer:
            writer.append([(b"k", b"after the idle time")])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(len(g.seen) < g.followers for g in groups):
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    rows = []
    for group in groups:
        delays = sorted(seen - appended for seen in group.seen)
        rate = (group.at_end - group.at_warmup) / (idle - warmup) / group.followers
        rows.append(
            {
                "case": group.name,
                "followers": group.followers,
                "idle_s": idle,
                "warmup_s": warmup,
                "requests_idle": group.at_end,
                "requests_after_warmup": group.at_end - group.at_warmup,
                "per_follower_per_s_after_warmup": rate,
                "missed": group.followers - len(delays),
                "delay_p50_s": _quantile(delays, 0.5),
                "delay_p99_s": _quantile(delays, 0.99),
                "delay_max_s": delays[-1] if delays else None,
            }
        )
    return rows


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(
    console: Console, runs: list[list[dict[str, Any]]], idle: float, warmup: float
) -> list[dict[str, Any]]:
    cases = []
    for i, first in enumerate(runs[0]):
        per_run = [run[i] for run in runs]
        case = {
            "case": first["case"],
            "followers": first["followers"],
            "runs": per_run,
            **{
                key: _median([r[key] for r in per_run])
                for key in (
                    "requests_idle",
                    "requests_after_warmup",
                    "per_follower_per_s_after_warmup",
                    "delay_p50_s",
                    "delay_p99_s",
                    "delay_max_s",
                )
            },
            "missed": sum(r["missed"] for r in per_run),
        }
        cases.append(case)
    table = Table(
        title=f"Idle followers on Azurite: {idle:.0f} s idle, then one message "
        f"(median of {len(runs)} run{'s' if len(runs) > 1 else ''})",
        box=SIMPLE,
    )
    for heading in (
        "case",
        "followers",
        "storage requests while idle",
        f"of them after {warmup:g} s",
        "per follower /s",
        "a day, per follower",
        "first message seen: p50 / p99 / max",
    ):
        # A case or a delay cut over two lines misreads; the other headings may wrap.
        table.add_column(
            heading,
            justify="left" if heading == "case" else "right",
            no_wrap=heading == "case" or heading.startswith("first"),
        )
    for case in cases:
        rate = case["per_follower_per_s_after_warmup"]
        delays = " / ".join(
            "-" if case[key] is None else f"{case[key]:.2f} s"
            for key in ("delay_p50_s", "delay_p99_s", "delay_max_s")
        )
        table.add_row(
            case["case"],
            str(case["followers"]),
            f"{case['requests_idle']:,.0f}",
            f"{case['requests_after_warmup']:,.0f}",
            f"{rate:.3f}",
            f"{rate * SECONDS_A_DAY:,.0f}",
            delays + (f" ({case['missed']} missed)" if case["missed"] else ""),
        )
    console.print(table)
    server = {c["case"]: c for c in cases if c["case"].startswith("server")}
    one, many = (
        server["server, 1 follower"],
        next(c for name, c in server.items() if name != "server, 1 follower"),
    )
    # After the warmup: each server's first read rolls the stream forward (or
    # finds it locked by the other server's doing so), a one-off cost that
    # falls on whichever server comes first, whatever its followers.
    console.print(
        f"{many['followers']} followers through a server cost storage "
        f"{many['requests_after_warmup'] / max(1, one['requests_after_warmup']):.2f}x "
        f"what one does, once started ({idle - warmup:g} s)."
    )
    return cases


def main() -> None:
    parser = benchmark_arguments(__doc__ or "")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds idle")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="idle seconds before the rate is counted"
    )
    parser.add_argument("--followers", type=int, default=100, help="through the second server")
    parser.add_argument("--direct", type=int, default=20, help="direct followers per case")
    args = parser.parse_args()
    if not 0 < args.warmup < args.idle:
        parser.error("--warmup must be more than 0 and less than --idle")
    for option in ("followers", "direct"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, not {getattr(args, option)}")
    # Wide enough for the table's seven columns wherever it is printed (a log, a pipe).
    console = Console(width=132)
    runs = []
    azurite = Azurite()
    azurite.start()
    try:
        for run in range(args.runs):
            console.print(f"run {run + 1} of {args.runs}: {args.idle:.0f} s idle ...")
            runs.append(one_run(azurite, args.idle, args.warmup, args.direct, args.followers))
            for container in azurite_containers(azurite):
                container.delete_container()
    finally:
        azurite.close()
    cases = report(console, runs, args.idle, args.warmup)
    path = save_results(
        args.output,
        "follow",
        {
            "runs": args.runs,
            "idle_s": args.idle,
            "warmup_s": args.warmup,
            "followers": args.followers,
            "direct": args.direct,
        },
        cases,
    )
    console.print(f"saved {path}")


def azurite_containers(azurite: Azurite) -> list[Any]:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    return [service.get_container_client(c.name) for c in service.list_containers() if c.name]


if __name__ == "__main__":
    main()
