"""``messagevault stress``: the click command over ``messagevault.stress``.

Where it sends its load: ``--url`` (or ``MESSAGEVAULT_URL``), or the url of
``--profile`` (or ``MESSAGEVAULT_PROFILE``), with credentials as for the
other commands; with none of these, or with ``--embedded`` (which outranks
the two variables), it starts its own server on a temporary folder. The
``default`` profile is never picked up on its own: a load test reaches a
real server only when asked to; the variables are such a request (as for
every command), so the first line printed names the server and whether
``--url``/``--profile`` or a variable chose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from messagevault.cli_config import resolve_target
from messagevault.errors import InvalidInput
from messagevault.names import validate_stream_name
from messagevault.stress.workload import FSYNC, READ_FROM, Plan, PlanError

if TYPE_CHECKING:
    from messagevault.statsd import StatsD
    from messagevault.stress.driver import Connection, Outcome
    from messagevault.stress.embedded import EmbeddedServer
    from messagevault.stress.stats import MetricsSink

DEFAULT_DURATION = 10.0
TARGET_KEY = "messagevault.target"  # cli._TARGET (cli imports this module, not the reverse)
EXAMPLES = """\b
Examples:
  messagevault stress                                  # 10 s, 1 producer, embedded server
  messagevault stress --producers 4 --duration 30 --consumers 2 --json run.json
  messagevault stress --fsync never --json never.json --report fsync.png \\
                      --compare always.json
  messagevault stress --url http://127.0.0.1:8080 --count 100000 --read-from server
"""


@click.command(epilog=EXAMPLES)
@click.option(
    "--url",
    envvar="MESSAGEVAULT_URL",
    metavar="URL",
    help="Load the server at URL (credentials as for the other commands). Env: "
    "MESSAGEVAULT_URL; the first line names the server loaded and where it came from.",
)
@click.option(
    "--profile",
    envvar="MESSAGEVAULT_PROFILE",
    metavar="NAME",
    help="Load the server of this profile of the config file. Env: MESSAGEVAULT_PROFILE.",
)
@click.option(
    "--embedded",
    is_flag=True,
    help="Start a server of its own on a temporary folder (the default when no URL "
    "or profile is given); stopped and removed at the end.",
)
@click.option(
    "--fsync", type=click.Choice(FSYNC), help="The embedded server's --fsync.  [default: always]"
)
@click.option(
    "--producers",
    type=int,
    default=1,
    show_default=True,
    help="Concurrent producers; each waits for its batch's ack before the next.",
)
@click.option(
    "--streams",
    type=int,
    default=1,
    show_default=True,
    help="Streams written (producer i writes to stream i mod STREAMS).",
)
@click.option("--batch-size", type=int, default=100, show_default=True, help="Messages per batch.")
@click.option(
    "--value-size",
    type=int,
    default=100,
    show_default=True,
    help="Bytes per value (at least 20: send time, producer, sequence).",
)
@click.option(
    "--duration",
    type=float,
    help=f"Seconds to send for.  [default: {DEFAULT_DURATION:g}, unless --count]",
)
@click.option("--count", type=int, help="Messages to send in all, instead of --duration.")
@click.option(
    "--consumers",
    type=int,
    default=1,
    show_default=True,
    help="Consumers reading while the producers write (consumer i reads stream i "
    "mod STREAMS); they measure end-to-end latency.",
)
@click.option(
    "--read-from",
    type=click.Choice(READ_FROM),
    default="storage",
    show_default=True,
    help="How consumers and the read-back read: the storage itself, or the server.",
)
@click.option(
    "--stream-prefix",
    default="stress",
    show_default=True,
    help="Streams are PREFIX-0, PREFIX-1, ...",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the run (options, machine, per-second series, table, verification).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw throughput and latency per second as FILE.html or FILE.png "
    "(needs matplotlib: pip install 'messagevault[report]').",
)
@click.option(
    "--compare",
    "compare_paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="An earlier run's --json to draw beside this one; repeatable.",
)
@click.option("--label", help="This run's name in reports (default: its options).")
@click.option(
    "--statsd",
    "statsd_address",
    metavar="HOST:PORT",
    help="Also push the figures to a StatsD daemon (counters and timers).",
)
@click.option(
    "--statsd-prefix",
    default="messagevault.stress",
    show_default=True,
    help="Prefix of the StatsD names.",
)
def stress(
    *,
    url: str | None,
    profile: str | None,
    embedded: bool,
    fsync: str | None,
    producers: int,
    streams: int,
    batch_size: int,
    value_size: int,
    duration: float | None,
    count: int | None,
    consumers: int,
    read_from: str,
    stream_prefix: str,
    json_path: Path | None,
    report_path: Path | None,
    compare_paths: tuple[Path, ...],
    label: str | None,
    statsd_address: str | None,
    statsd_prefix: str,
) -> None:
    """Load a server with producers and consumers; print rates and latencies; check it all.

    Producers send batches of checkable messages for --duration seconds or
    --count messages while consumers read them; at the end one table gives
    msgs/s, batches/s, MB/s and latency percentiles (HDR histograms) for
    writes (ack), reads (the read-back) and end to end (built to seen), and
    every message written is read back and checked: count, order per
    producer, content, send times. A mismatch exits 1. Ctrl-C (or SIGTERM,
    SIGHUP) stops the producers after their batches in flight and prints a
    partial table (exit 128 + the signal: 130, 143, 129).
    """
    # The engine (HTTP client, histograms) loads only when this command runs.
    from messagevault.stress import report

    ctx = click.get_current_context()
    if duration is None and count is None:
        duration = DEFAULT_DURATION
    plan = Plan(
        producers,
        streams,
        batch_size,
        value_size,
        duration,
        count,
        consumers,
        read_from,
        stream_prefix,
    )
    try:
        plan.check()
        validate_stream_name(plan.stream_name(streams - 1))
    except (PlanError, InvalidInput) as exc:
        raise click.UsageError(str(exc)) from None
    command_line = click.core.ParameterSource.COMMANDLINE
    if embedded and command_line in (
        ctx.get_parameter_source("url"),
        ctx.get_parameter_source("profile"),
    ):
        raise click.UsageError("give --embedded or a server (--url, --profile), not both")
    remote = not embedded and bool(url or profile)  # --embedded outranks the environment
    if remote and fsync is not None:
        raise click.UsageError("--fsync is for the embedded server; a running server has its own")
    compared = _check_outputs(json_path, report_path, compare_paths)
    sink = _statsd(statsd_address, statsd_prefix)
    stop_signal: list[int] = []  # the signal that stopped the run early, if one did
    finish = functools.partial(_finish, label=label, json_path=json_path)
    try:
        with _signals_stop_at_once():
            if remote:
                outcome, run_document = _against_server(
                    ctx, plan, url=url, profile=profile, sink=sink, stop=stop_signal, finish=finish
                )
            else:
                outcome, run_document = _against_embedded(
                    plan, fsync or "always", sink=sink, stop=stop_signal, finish=finish
                )
            if report_path is not None:
                report.draw(report_path, [run_document, *compared])
                click.echo(f"drew {report_path}")
    except _Signalled as stopped:
        click.echo(f"interrupted by {signal.Signals(stopped.signum).name}", err=True)
        raise click.exceptions.Exit(128 + stopped.signum) from None
    finally:
        if sink is not None:
            sink.close()
    _exit(outcome, stop_signal)


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the run, or a second signal during it: stop now."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_stop_at_once() -> Iterator[None]:
    """SIGTERM and SIGHUP (a timeout, a CI kill, a closed terminal) unwind like Ctrl-C.

    Python's default for them ends the process without running ``finally``:
    the embedded server and its folder would stay. During the run itself
    ``_run`` handles all three signals as a request to stop gracefully.
    """

    def stop(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS[1:]}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _source(ctx: click.Context, url: str | None) -> str:
    """Where the target came from, for the first line: a variable must not load a server unseen."""
    name, variable = ("url", "MESSAGEVAULT_URL") if url else ("profile", "MESSAGEVAULT_PROFILE")
    if ctx.get_parameter_source(name) == click.core.ParameterSource.ENVIRONMENT:
        return f"from {variable}"
    return f"from --{name}"


Finish = Callable[["Outcome", dict[str, Any], str], dict[str, Any]]


def _against_server(
    ctx: click.Context,
    plan: Plan,
    *,
    url: str | None,
    profile: str | None,
    sink: MetricsSink | None,
    stop: list[int],
    finish: Finish,
) -> tuple[Outcome, dict[str, Any]]:
    from messagevault.stress.driver import Connection

    target = resolve_target(ctx, url, None, profile)
    ctx.meta[TARGET_KEY] = target  # for the hints of cli's error handler
    assert target.url is not None
    click.echo(f"loading {target.shown} ({_source(ctx, url)})", err=True)
    connection = Connection(target.url, target.user, target.password)
    outcome = _run(plan, connection, sink, stop)
    return outcome, finish(outcome, {"server": target.shown}, f"the server at {target.shown}")


def _against_embedded(
    plan: Plan, fsync: str, *, sink: MetricsSink | None, stop: list[int], finish: Finish
) -> tuple[Outcome, dict[str, Any]]:
    from messagevault.stress.driver import Connection

    with _embedded(fsync) as server:
        connection = Connection(server.url, server.user, server.password)
        outcome = _run(plan, connection, sink, stop, server.cpu_seconds)
        # Table and JSON before the server stops: an interrupted stop loses neither.
        settings = {"server": "embedded", "fsync": fsync}
        return outcome, finish(outcome, settings, f"an embedded server (--fsync {fsync})")


def _finish(
    outcome: Outcome,
    settings: dict[str, Any],
    where: str,
    *,
    label: str | None,
    json_path: Path | None,
) -> dict[str, Any]:
    """Print the table and summary, save the JSON; the run's document."""
    from messagevault.stress import report

    label = label or _label(outcome.plan, settings)
    _print(outcome, label, where)
    run_document = report.document(outcome, label, settings)
    if json_path is not None:
        report.save_json(json_path, run_document)
        click.echo(f"saved {json_path}")
    return run_document


def _check_outputs(
    json_path: Path | None, report_path: Path | None, compare_paths: tuple[Path, ...]
) -> list[dict[str, Any]]:
    """Everything about the outputs that can be wrong, found before the run."""
    from messagevault.stress import report

    for flag, path in (("--json", json_path), ("--report", report_path)):
        if path is not None and not path.resolve().parent.is_dir():
            raise click.UsageError(f"{flag} {path}: there is no folder {path.resolve().parent}")
    if compare_paths and report_path is None:
        raise click.UsageError("--compare adds runs to a --report: give --report FILE too")
    try:
        if report_path is not None:
            report.check_report_path(report_path)
        return [report.load_run(path) for path in compare_paths]
    except report.ReportError as exc:
        raise click.UsageError(str(exc)) from None


def _statsd(address: str | None, prefix: str) -> StatsD | None:
    if address is None:
        return None
    from messagevault.statsd import StatsD

    try:
        return StatsD.from_address(address, prefix=prefix)
    except ValueError as exc:
        raise click.UsageError(f"--statsd: {exc}") from None


@contextlib.contextmanager
def _embedded(fsync: str) -> Iterator[EmbeddedServer]:
    from messagevault.stress.embedded import EmbeddedServer, ServerFailed

    click.echo(f"starting an embedded server (--fsync {fsync})...", err=True)
    server = EmbeddedServer(fsync=fsync)
    try:
        server.wait_until_up()
    except ServerFailed as exc:
        server.stop()
        raise click.ClickException(str(exc)) from None
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        code = server.stop()
        if code not in (0, None):
            click.echo(f"warning: the embedded server exited with {code}", err=True)


def _run(
    plan: Plan,
    connection: Connection,
    sink: MetricsSink | None,
    stop_signal: list[int],
    server_cpu: Callable[[], float] | None = None,
) -> Outcome:
    """The run, with Ctrl-C, SIGTERM and SIGHUP as a request to stop (noted in ``stop_signal``)."""
    from messagevault.stress.driver import run
    from messagevault.stress.progress import LiveProgress
    from messagevault.stress.stats import Recorder

    recorder = Recorder(sink)
    interrupted = threading.Event()
    with LiveProgress(recorder, plan.count) as progress:

        async def main() -> Outcome:
            loop = asyncio.get_running_loop()

            def on_signal(signum: int) -> None:
                if interrupted.is_set():  # a second signal: stop at once
                    raise _Signalled(signum)
                stop_signal.append(signum)
                interrupted.set()
                progress.note(
                    f"interrupted ({signal.Signals(signum).name}): the producers stop after "
                    "their batches in flight (Ctrl-C again to quit at once)"
                )

            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, on_signal, signum)
            try:
                return await run(
                    plan,
                    connection,
                    recorder,
                    interrupted,
                    on_tick=progress.update,
                    on_note=progress.note,
                    server_cpu=server_cpu,
                )
            finally:
                for signum in STOP_SIGNALS:
                    loop.remove_signal_handler(signum)

        # asyncio puts SIG_DFL back when it removes its handlers: ours must outlive the run.
        handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        try:
            return asyncio.run(main())
        finally:
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)


def _label(plan: Plan, settings: dict[str, Any]) -> str:
    producers, streams = _many(plan.producers, "producer"), _many(plan.streams, "stream")
    place = f"fsync {settings['fsync']}" if "fsync" in settings else settings["server"]
    return f"{producers}, {streams}, {plan.batch_size} x {plan.value_size} B, {place}"


def _print(outcome: Outcome, label: str, where: str) -> None:
    from messagevault.stress import report

    width = report.output_width()

    def say(text: str, *, err: bool = False) -> None:
        click.echo(textwrap.fill(text, width, subsequent_indent="  "), err=err)

    plan = outcome.plan
    report.print_table(outcome, f"messagevault stress: {label}")
    say(
        f"{outcome.recorder.write.messages:,} messages written to {where} in "
        f"{outcome.write_seconds:.1f} s by {_many(plan.producers, 'producer')} on "
        f"{_many(plan.streams, 'stream')}; {_many(plan.consumers, 'consumer')} reading "
        f"from {plan.read_from}"
    )
    server = (
        "" if outcome.server_cpu_share is None else f", the server {outcome.server_cpu_share:.0%}"
    )
    say(f"CPU while writing, in shares of one core: this process {outcome.cpu_share:.0%}{server}")
    if plan.consumers and not outcome.consumers_done and not outcome.partial:
        say(
            f"consumers: saw {outcome.recorder.seen.messages:,} messages, not all of them, "
            "before they were stopped"
        )
    for error in outcome.consumer_errors:
        say(f"consumer error: {error}", err=True)
    readback = outcome.readback
    if outcome.error is not None:
        say(f"read-back: skipped (the run stopped early: {outcome.error})")
    elif readback is None:
        say("read-back: skipped (interrupted)")
    elif readback.ok:
        say(
            f"read-back: OK, {readback.messages:,} messages checked (count, order per "
            "producer, every byte of content, send times)"
        )
    else:
        say(f"read-back: {readback.problem_count:,} problem(s):", err=True)
        for problem in readback.problems:
            click.echo(f"  {problem}", err=True)


def _many(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def _exit(outcome: Outcome, stop_signal: list[int]) -> None:
    if outcome.error is not None:
        raise click.ClickException(f"the run stopped early: {outcome.error}")
    if outcome.partial:
        raise click.exceptions.Exit(128 + (stop_signal[0] if stop_signal else signal.SIGINT))
    if outcome.readback is not None and not outcome.readback.ok:
        raise click.ClickException(
            f"the read-back found {outcome.readback.problem_count:,} problem(s) (listed above)"
        )
    if outcome.consumer_errors:
        raise click.ClickException("a consumer failed (see above)")
