"""The ``messagevault`` command: thin wrappers over the library.

Commands that read or publish go through a server (``--url``, with the
client library) or straight to storage (``--storage``, default
``file:./data``); ``cli_config`` has the rules, docs/cli.md the manual.
Errors are one line on stderr: exit 1, or 2 for a usage mistake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from click.decorators import FC

from messagevault.cli_config import Target, remember_storage_file, resolve_target, storage_value
from messagevault.cli_input import DEFAULT_BATCH_BYTES, publish_input
from messagevault.cli_output import (
    FORMATS,
    default_format,
    human_bytes,
    message_printer,
    print_json,
    print_table,
    progress_bar,
    stdout_is_terminal,
)
from messagevault.cli_sources import (
    Source,
    StorageSource,
    TrimTarget,
    copy_source,
    open_source,
    sas_reader,
    sas_url_of,
    storage_from,
)
from messagevault.cli_stress import stress
from messagevault.committer import DEFAULT_MAX_QUEUED_BYTES
from messagevault.errors import (
    Forbidden,
    InvalidInput,
    LeaseHeld,
    MessageVaultError,
    RequestTooLarge,
    ServerUnreachable,
    StreamLocked,
    StreamNotFound,
    Unauthenticated,
)
from messagevault.format import MAX_FRAME_SIZE
from messagevault.names import validate_stream_name
from messagevault.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    PollBackoff,
    interval_problem,
)
from messagevault.producers import DEFAULT_MAX_PRODUCERS, DEFAULT_PRODUCER_MAX_AGE
from messagevault.profiles import config_path, save_profile
from messagevault.reader import Reader, VerifyReport
from messagevault.replicate import copy_stream
from messagevault.retention_policy import RetentionPolicy, parse_size
from messagevault.statsd import StatsD
from messagevault.storage import open_storage
from messagevault.storage.base import ServerLock, Storage, SystemFiles
from messagevault.storage.file import DEFAULT_CHECKPOINT_FLUSH_INTERVAL
from messagevault.storage.leases import DEFAULT_DURATION as DEFAULT_LEASE_DURATION
from messagevault.storage.leases import MAX_DURATION, MIN_FILE_DURATION
from messagevault.times import ago, parse_duration, parse_time
from messagevault.wire import DEFAULT_MAX_BODY
from messagevault.writer import AppendResult, Writer

if TYPE_CHECKING:
    from messagevault.server.cluster import Cluster
    from messagevault.server.hub import StreamHub
    from messagevault.server.retention_task import RetentionSettings


def storage_option(function: FC) -> FC:
    """``--storage`` and ``--storage-file``: the storage a command opens, as ``storage_url``."""
    function = _storage_file_option(function)
    return click.option(
        "--storage",
        "storage_url",
        envvar="MESSAGEVAULT_STORAGE",
        default="file:./data",
        show_default=True,
        callback=storage_value,
        help="Where streams live: file:PATH, azure:CONNECTION_STRING or memory: (for trying out). "
        "Env: MESSAGEVAULT_STORAGE.",
    )(function)


_storage_file_option = click.option(
    "--storage-file",
    envvar="MESSAGEVAULT_STORAGE_FILE",
    metavar="PATH",
    is_eager=True,  # read by --storage's callback
    expose_value=False,
    callback=remember_storage_file,
    help="Read the storage URL (e.g. azure:CONNECTION_STRING) from this file instead, so that "
    "no account key shows in `ps`. Env: MESSAGEVAULT_STORAGE_FILE.",
)


def _open(storage_url: str) -> Storage:
    try:
        return open_storage(storage_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage") from exc


class _Group(click.Group):
    """Every error as one line on stderr, never a traceback: exit 1, 2 for usage, 130 for Ctrl-C."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MessageVaultError as exc:
            click.echo(f"error: {_explain(exc, ctx)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            click.echo("; ".join(["interrupted", *getattr(exc, "__notes__", [])]), err=True)
            ctx.exit(130)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            help_hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{help_hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C or end of input at a prompt
            click.echo("interrupted", err=True)
            sys.exit(130)
        # (A reader that goes away, `| head`, is click's: a quiet exit 1.)
        sys.exit(code if isinstance(code, int) else 0)


def _explain(exc: MessageVaultError, ctx: click.Context) -> str:
    """The error, and what to do about it where this command can tell."""
    target: Target | None = ctx.meta.get(_TARGET)
    parts = [str(exc)]
    command = ctx.invoked_subcommand or "COMMAND"
    if isinstance(exc, StreamLocked) and command == "copy":
        parts.append("a server probably writes the copy's stream: copy into storage no server uses")
    elif isinstance(exc, StreamLocked) and (target is None or target.storage is not None):
        url = os.environ.get("MESSAGEVAULT_URL") or "http://127.0.0.1:8080"
        parts.append(
            "a server probably holds it: go through the server, e.g. "
            f"`messagevault {command} --url {url} ...` (or set MESSAGEVAULT_URL)"
        )
    elif isinstance(exc, ServerUnreachable) and target is not None:
        parts.append(
            f"is a server running at {target.shown} (from {target.origin})? "
            "Start one with `messagevault serve`, or give the right --url"
        )
    elif isinstance(exc, Unauthenticated) and target is not None:
        given = (
            f"the server at {target.shown} did not accept user {target.user!r} "
            f"(from {target.credentials_origin})"
            if target.password
            else f"no password was given for the server at {target.shown}"
        )
        parts.append(
            f"{given}; set MESSAGEVAULT_USER and MESSAGEVAULT_PASSWORD, "
            f"or choose a profile of {config_path()} with --profile NAME"
        )
    elif isinstance(exc, Forbidden) and target is not None and command in _ADMIN_COMMANDS:
        user = target.user or "USER"
        parts.append(f"it takes the admin claim: messagevault users grant {user} admin")
    elif isinstance(exc, Forbidden) and target is not None:
        claim = "write" if command == "publish" else "read"
        parts.append(
            f"an admin can grant it: messagevault users grant {target.user or 'USER'} "
            f"STREAM:{claim}"
        )
    elif isinstance(exc, StreamNotFound):
        parts.append("`messagevault streams` lists the streams there")
    parts.extend(getattr(exc, "__notes__", []))
    return "; ".join(parts)


# Commands whose requests take the admin claim (``retention`` only to set a policy).
_ADMIN_COMMANDS = frozenset({"delete", "retention", "trim"})


def _examples(*lines: str) -> str:
    """An epilog of examples; click keeps a ``\\b`` paragraph's lines as they are."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@click.group(
    cls=_Group,
    epilog=_examples(
        "messagevault serve                      # a server on ./data, port 8080",
        "messagevault publish orders hello --url http://127.0.0.1:8080",
        "messagevault tail orders --url http://127.0.0.1:8080",
    ),
)
@click.version_option(package_name="messagevault")
def main() -> None:
    """MessageVault: durable append-only message streams in blob storage."""


def _claims(ctx: click.Context, param: click.Parameter, claims: tuple[str, ...]) -> tuple[str, ...]:
    """``serve --allow-anonymous`` claims, checked before anything starts."""
    from messagevault.server.auth import validate_claim

    try:
        return tuple(validate_claim(claim) for claim in claims)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from None


def _serve_option(
    flag: str, kind: click.ParamType[Any], default: float, help_text: str
) -> Callable[[FC], FC]:
    """A ``serve`` limit, also set by MESSAGEVAULT_<FLAG> (``--max-body``: ``..._MAX_BODY``)."""
    return click.option(
        flag,
        envvar="MESSAGEVAULT_" + flag.removeprefix("--").replace("-", "_").upper(),
        type=kind,
        default=default,
        show_default=True,
        help=help_text,
    )


@main.command(
    epilog=_examples(
        "messagevault serve                       # ./data on 127.0.0.1:8080",
        "messagevault serve --save-profile default  # the first admin becomes your profile",
        "MESSAGEVAULT_STORAGE=azure:$CONNECTION_STRING messagevault serve  # no key in ps",
        "MESSAGEVAULT_FSYNC=batch messagevault serve --max-body 4194304",
    )
)
@click.option("--host", envvar="MESSAGEVAULT_HOST", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    envvar="MESSAGEVAULT_PORT",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0: any free port (the `listening` log line says which).",
)
@click.option(
    "--tls-cert",
    envvar="MESSAGEVAULT_TLS_CERT",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="Serve https with this certificate (chain, PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    envvar="MESSAGEVAULT_TLS_KEY",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="The private key of --tls-cert (PEM, unencrypted).",
)
@click.option(
    "--allow-plain-http",
    envvar="MESSAGEVAULT_ALLOW_PLAIN_HTTP",
    is_flag=True,
    help="Take passwords over plain HTTP from other machines: only behind a proxy that "
    "terminates TLS. Without it (and without --tls-cert) --host must be a loopback address.",
)
@storage_option
@click.option(
    "--fsync",
    envvar="MESSAGEVAULT_FSYNC",
    type=click.Choice(["always", "batch", "never"]),
    default="always",
    show_default=True,
    help="File storage: when commits are forced to disk.",
)
@_serve_option(
    "--checkpoint-flush-interval",
    click.FloatRange(0, 3600),
    DEFAULT_CHECKPOINT_FLUSH_INTERVAL,
    "File storage, --fsync always: most seconds a checkpoint stays unflushed (each commit "
    "flushes its data; a power cut may leave the checkpoint this far behind, and the next "
    "writer rolls the stream forward). 0: every commit flushes both.",
)
@_serve_option(
    "--max-body",
    click.IntRange(1024),
    DEFAULT_MAX_BODY,
    "Largest request body in bytes (413 beyond); it bounds the largest value one can publish.",
)
@_serve_option(
    "--max-read-messages", click.IntRange(1), 10_000, "Largest `limit` of one read request."
)
@_serve_option(
    "--max-read-bytes",
    click.IntRange(1024),
    8 * 1024 * 1024,
    "Most bytes of messages (stored frames) in one read answer.",
)
@_serve_option("--max-wait", click.IntRange(0), 60, "Longest long-poll `wait`, in seconds.")
@_serve_option(
    "--linger-ms",
    click.FloatRange(0, 1000),
    0.0,
    "Group commit: how long a commit waits for more appends before it starts.",
)
@_serve_option(
    "--max-queued-bytes",
    click.IntRange(1),
    DEFAULT_MAX_QUEUED_BYTES,
    "Bytes waiting for a commit, per stream, before appends wait for room.",
)
@_serve_option(
    "--max-queue-wait",
    click.FloatRange(0),
    10.0,
    "Seconds an append waits for room before 503 overloaded.",
)
@_serve_option(
    "--max-producers",
    click.IntRange(1),
    DEFAULT_MAX_PRODUCERS,
    "Producers remembered per stream for exactly-once appends; the least recently "
    "committed is forgotten first.",
)
@_serve_option(
    "--producer-max-age",
    click.FloatRange(0, min_open=True),
    DEFAULT_PRODUCER_MAX_AGE,
    "Seconds (of commit timestamps) a producer is remembered after its last commit.",
)
@click.option(
    "--statsd",
    "statsd_address",
    envvar="MESSAGEVAULT_STATSD",
    metavar="HOST:PORT",
    help="Also push metrics to this StatsD daemon over UDP ([::1]:8125 for IPv6); "
    "docs/OPERATIONS.md lists them.",
)
@click.option(
    "--statsd-prefix",
    envvar="MESSAGEVAULT_STATSD_PREFIX",
    default="",
    metavar="PREFIX",
    help="Put before every StatsD name (e.g. this server's name), so servers can share a daemon.",
)
@click.option(
    "--log-level",
    envvar="MESSAGEVAULT_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least important log lines shown; debug also shows each Azure SDK request.",
)
@click.option(
    "--access-log/--no-access-log",
    envvar="MESSAGEVAULT_ACCESS_LOG",
    default=True,
    show_default=True,
    help="A JSON line per request at info level (messagevault.access); "
    "a --log-level above info hides it too.",
)
@_serve_option(
    "--metrics-streams",
    click.IntRange(0),
    100,
    'Streams with series of their own in /metrics; the rest are counted as stream="_other".',
)
@click.option(
    "--admin-password-file",
    envvar="MESSAGEVAULT_ADMIN_PASSWORD_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="When this start creates the first admin, write its password to PATH (a new file, "
    "readable by its owner only) instead of stderr. PATH must not exist then.",
)
@click.option(
    "--save-profile",
    metavar="NAME",
    help="When this start creates the first admin, also save its url, user and password as "
    "profile NAME in your config file (mode 600), so that the CLI and the client library "
    "reach this server with no further set-up. An existing profile NAME is left alone. "
    "`make serve` uses `--save-profile default`.",
)
@click.option(
    "--node-id",
    envvar="MESSAGEVAULT_NODE_ID",
    metavar="ID",
    help="Run as one of several nodes sharing this storage, under this name (unique per node): "
    "each stream is written by the node holding its lease, and any node takes any request. "
    "Without it this server is the storage's only one.",
)
@click.option(
    "--advertise",
    envvar="MESSAGEVAULT_ADVERTISE",
    metavar="URL",
    help="With --node-id: the URL other nodes reach this one at (default http(s)://HOST:PORT).",
)
@_serve_option(
    "--lease-duration",
    click.FloatRange(MIN_FILE_DURATION, MAX_DURATION),
    DEFAULT_LEASE_DURATION,
    "With --node-id: seconds a stream's lease lasts unless renewed (renewed every third of "
    "it); a node that dies without a word loses its streams after this. Azure: 15-60.",
)
@_serve_option(
    "--retention-interval",
    click.FloatRange(0.01, 86400),
    60.0,
    "Seconds between two passes applying the streams' retention policies "
    "(`messagevault retention`); each node applies those of the streams it writes.",
)
@click.option(
    "--retention-max-age",
    envvar="MESSAGEVAULT_RETENTION_MAX_AGE",
    metavar="DURATION",
    help="Default retention of streams without a policy of their own: trim messages older "
    "than this (e.g. 7d, 12h). Default: kept for ever. Env: MESSAGEVAULT_RETENTION_MAX_AGE.",
)
@click.option(
    "--retention-max-bytes",
    envvar="MESSAGEVAULT_RETENTION_MAX_BYTES",
    metavar="SIZE",
    help="Default retention of streams without a policy of their own: keep at most this much "
    "readable (e.g. 10GiB, 500MB), trimming whole frames from the front. "
    "Env: MESSAGEVAULT_RETENTION_MAX_BYTES.",
)
@click.option(
    "--allow-anonymous",
    "anonymous_claims",
    envvar="MESSAGEVAULT_ALLOW_ANONYMOUS",
    multiple=True,
    metavar="CLAIM",
    callback=_claims,
    help="Give requests without an Authorization header this claim (repeatable: all:read, "
    "all:write, <stream>:read, admin...), for local development and the Durable Streams "
    "conformance run. Wrong credentials are still refused. Default: none, every request "
    "needs credentials.",
)
def serve(  # noqa: PLR0915 - one command, its options in a row; click passes them by name
    *,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    allow_plain_http: bool,
    storage_url: str,
    fsync: str,
    checkpoint_flush_interval: float,
    max_body: int,
    max_read_messages: int,
    max_read_bytes: int,
    max_wait: int,
    linger_ms: float,
    max_queued_bytes: int,
    max_queue_wait: float,
    max_producers: int,
    producer_max_age: float,
    statsd_address: str | None,
    statsd_prefix: str,
    log_level: str,
    access_log: bool,
    metrics_streams: int,
    admin_password_file: Path | None,
    save_profile: str | None,
    node_id: str | None,
    advertise: str | None,
    lease_duration: float,
    retention_interval: float,
    retention_max_age: str | None,
    retention_max_bytes: str | None,
    anonymous_claims: tuple[str, ...],
) -> None:
    """Run the HTTP server, the single writer of the storage's streams (or of its share of them)."""
    import asyncio
    import logging

    from messagevault.server import Limits, StreamHub, create_app
    from messagevault.server.app import ANONYMOUS, REQUEST_OBSERVERS
    from messagevault.server.auth import Authenticator, Principal
    from messagevault.server.logs import configure, shutdown
    from messagevault.server.runner import CannotListen, serve_until_stopped
    from messagevault.server.tls import PLAIN_HTTP_ALLOWED

    configure(logging.getLevelNamesMapping()[log_level.upper()])
    log = logging.getLogger("messagevault.server")
    tls = _tls(host, tls_cert, tls_key, allow_plain_http=allow_plain_http)  # before opening
    scheme = "https" if tls is not None else "http"
    statsd = _statsd(statsd_address, statsd_prefix)  # a bad address starts nothing
    if math.isnan(checkpoint_flush_interval):  # nan passes FloatRange
        raise click.BadParameter("not a number", param_hint="--checkpoint-flush-interval")
    try:
        storage = open_storage(
            storage_url, fsync=fsync, checkpoint_flush_interval=checkpoint_flush_interval
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage") from exc
    files = _system_files(storage)
    limits = Limits(
        max_body=max_body,
        max_read_messages=max_read_messages,
        max_read_bytes=max_read_bytes,
        max_wait=max_wait,
    )
    try:
        hub = StreamHub(
            storage,
            linger=linger_ms / 1000,
            max_queued_bytes=max_queued_bytes,
            max_queue_wait=max_queue_wait,
            max_producers=max_producers,
            producer_max_age=producer_max_age,
        )
    except ValueError as exc:  # what a range cannot say: nan, inf
        raise click.BadParameter(str(exc), param_hint="--producer-max-age") from exc
    cluster = None
    if node_id is not None:
        cluster = _cluster(
            storage,
            hub,
            files,
            node_id=node_id,
            address=_advertised(advertise, scheme, host, port),
            lease_duration=lease_duration,
        )
    retention = _retention_settings(retention_interval, retention_max_age, retention_max_bytes)
    app = create_app(
        hub,
        limits,
        Authenticator(files),
        max_stream_series=metrics_streams,
        cluster=cluster,
        retention=retention,
    )
    app[PLAIN_HTTP_ALLOWED] = allow_plain_http
    if anonymous_claims:
        app[ANONYMOUS] = Principal("anonymous", frozenset(anonymous_claims))
    if access_log:
        from messagevault.server.access_log import log_request

        app[REQUEST_OBSERVERS].append(log_request)
    if statsd is not None:
        from messagevault.server.statsd_metrics import install

        install(app, hub, statsd)
    settings = {
        "fsync": fsync,
        "checkpoint_flush_interval": checkpoint_flush_interval,
        **dataclasses.asdict(limits),
        "linger_ms": linger_ms,
        "max_queued_bytes": max_queued_bytes,
        "max_queue_wait": max_queue_wait,
        "max_producers": max_producers,
        "producer_max_age": producer_max_age,
        "statsd": statsd_address,
        "statsd_prefix": statsd_prefix,
        "access_log": access_log,
        "metrics_streams": metrics_streams,
        "retention_interval": retention_interval,
        "retention_default": retention.default.to_json() if retention.default else None,
    }

    def listening(bound_port: int) -> None:
        # Once the port is ours: a server that cannot listen creates nothing.
        password = _first_admin(files, admin_password_file)
        if password is not None and save_profile:
            _save_admin_profile(save_profile, _local_url(scheme, host, bound_port), password)
        log.info(
            "listening",
            extra={
                "host": host,
                "port": bound_port,
                "url": _local_url(scheme, host, bound_port),
                "viewer": _local_url(scheme, host, bound_port) + "/ui/",
                "storage": storage.describe(),
                **settings,
            },
        )
        if password is not None:  # a first start: someone new is reading this terminal
            viewer = _local_url(scheme, host, bound_port) + "/ui/"
            click.echo(f"Browse the streams at {viewer} (log in as admin).", err=True)

    # SIGINT/SIGTERM stop gracefully: no new requests, in-flight commits
    # finish (the hub drains its committers), exit 0.
    # Several nodes share their storage: the leases keep them apart.
    with _server_lock(storage) if cluster is None else contextlib.nullcontext():
        try:
            asyncio.run(
                serve_until_stopped(app, host, port, on_listening=listening, ssl_context=tls)
            )
        except LeaseHeld as exc:  # another live node has this --node-id
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except CannotListen as exc:
            hint = "stop what uses it, or choose another --port" if exc.in_use else "check --host"
            click.echo(f"error: {exc}; {hint}", err=True)
            sys.exit(1)
    log.info("stopped")
    shutdown()  # the last lines written out, "stopped" among them


def _retention_settings(
    interval: float, max_age: str | None, max_bytes: str | None
) -> RetentionSettings:
    """``serve``'s retention options, or a usage error naming the option."""
    from messagevault.server.retention_task import RetentionSettings
    from messagevault.times import parse_duration

    age = size = None
    try:
        if max_age is not None:
            age = parse_duration(max_age).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--retention-max-age") from None
    try:
        if max_bytes is not None:
            size = parse_size(max_bytes)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--retention-max-bytes") from None
    try:
        default = None if age is None and size is None else RetentionPolicy(age, size)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--retention-max-age") from None
    if math.isnan(interval):  # nan passes FloatRange
        raise click.BadParameter("not a number", param_hint="--retention-interval")
    return RetentionSettings(interval=interval, default=default)


def _cluster(
    storage: Storage,
    hub: StreamHub,
    files: SystemFiles,
    *,
    node_id: str,
    address: str,
    lease_duration: float,
) -> Cluster:
    """``serve --node-id``: this node's part in the cluster, or a usage error.

    It joins the cluster when the app starts, just before the socket is
    bound (its address is known by then), and leaves when the app stops.
    """
    from messagevault.server.cluster import Cluster, load_token, node_lease
    from messagevault.storage.leases import LeaseStorage, validate_lease_name

    try:
        validate_lease_name(node_lease(node_id))
    except ValueError:
        raise click.BadParameter(
            "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param_hint="--node-id",
        ) from None
    if not isinstance(storage, LeaseStorage):
        raise click.UsageError(f"{storage.describe()} cannot be shared by several nodes")
    if type(storage).__name__ == "AzureStorage" and not 15 <= lease_duration <= 60:
        raise click.BadParameter("Azure leases last 15-60 seconds", param_hint="--lease-duration")
    try:
        token = load_token(files)
    except MessageVaultError as exc:
        raise click.ClickException(f"cannot read or create the cluster token: {exc}") from exc
    cluster = Cluster(
        storage.leases(),
        node_id,
        token,
        run=hub.run,
        open_writer=hub.open_writer,
        close_writer=hub.stop_writing,
        lease_duration=lease_duration,
    )
    cluster.address = address
    return cluster


def _advertised(advertise: str | None, scheme: str, host: str, port: int) -> str:
    """The URL other nodes reach this one at: ``--advertise``, else SCHEME://HOST:PORT."""
    if advertise is None:
        if host in ("0.0.0.0", "::", "") or port == 0:  # noqa: S104 - recognising the any-address
            raise click.UsageError(
                "--node-id needs --advertise URL when --host is an any-address or --port is 0: "
                "other nodes must know where to reach this one"
            )
        return _local_url(scheme, host, port)
    parts = urllib.parse.urlsplit(advertise)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or parts.path not in ("", "/")
    ):
        raise click.BadParameter(
            f"{advertise!r} must be an http(s)://host:port URL with no path, user or query",
            param_hint="--advertise",
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise click.BadParameter(f"bad port in {advertise!r}", param_hint="--advertise") from None
    return advertise.rstrip("/")


def _statsd(address: str | None, prefix: str) -> StatsD | None:
    """``serve --statsd``: the client, or a usage error (exit 2) for a malformed address.

    A host that does not resolve (yet) is no error: the client warns and
    tries again, and the server serves meanwhile.
    """
    if not address:
        return None
    try:
        return StatsD.from_address(address, prefix=prefix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--statsd") from exc


def _tls(
    host: str, cert: Path | None, key: Path | None, *, allow_plain_http: bool
) -> ssl.SSLContext | None:
    """``serve --tls-cert/--tls-key``: the https context; no passwords in clear off this host."""
    from messagevault.server.tls import TLSSetupError, plain_http_refusal, server_context

    if (cert is None) != (key is None):
        raise click.UsageError("give --tls-cert and --tls-key together, or neither")
    refusal = plain_http_refusal(host, tls=cert is not None, allow_plain_http=allow_plain_http)
    if refusal is not None:
        raise click.UsageError(refusal)
    if cert is None or key is None:
        return None
    try:
        return server_context(cert, key)
    except TLSSetupError as exc:
        raise click.ClickException(f"cannot serve https: {exc}") from None


def _first_admin(files: SystemFiles, password_file: Path | None) -> str | None:
    """The first admin's password when this start creates the admin, else None.

    Shown once on stderr, or (``--admin-password-file``) written to a new
    file only its owner can read, before the admin is saved: a file that
    cannot be created leaves no admin behind whose password nobody knows.
    Never stored otherwise: only its argon2 hash is in users.json.
    """
    from messagevault.server.auth import USERS_FILE, ensure_admin

    if password_file is None:
        password = ensure_admin(files)
        if password is not None:
            click.echo(
                f"Created user 'admin' with password: {password}\n"
                "Keep it now; change it with `messagevault users passwd admin`.",
                err=True,
            )
        return password
    if files.read_system_file(USERS_FILE) is not None:
        click.echo(f"Users exist already: {password_file} not written.", err=True)
        return None
    password = secrets.token_urlsafe(18)
    nothing = "nothing was created"
    try:
        descriptor = os.open(
            password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
        )
    except FileExistsError:
        raise click.ClickException(
            f"--admin-password-file {password_file} exists already; {nothing} (remove it, "
            "or choose another path)"
        ) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot create --admin-password-file {password_file}: {exc.strerror}; {nothing}"
        ) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(password)
            file.flush()
            os.fsync(file.fileno())
        created = ensure_admin(files, password)
    except BaseException:
        password_file.unlink(missing_ok=True)
        raise
    if created is None:  # another node, or `users add`, was first
        password_file.unlink(missing_ok=True)
        click.echo(f"Users exist already: {password_file} not written.", err=True)
        return None
    click.echo(
        f"Created user 'admin'; its password is in {password_file} (readable by its owner "
        "only). Change it with `messagevault users passwd admin`.",
        err=True,
    )
    return password


def _local_url(scheme: str, host: str, port: int) -> str:
    """Where a client on this machine reaches the server (the any-address is not one)."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - recognising, not binding, the any-address
        host = "127.0.0.1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _save_admin_profile(name: str, url: str, password: str) -> None:
    """``serve --save-profile``: the new admin's credentials for the CLI and the client."""
    try:
        path = save_profile(name, url, "admin", password)
    except (MessageVaultError, OSError) as exc:  # the server runs on regardless
        click.echo(f"warning: profile {name!r} not saved: {exc}", err=True)
        return
    if path is None:
        click.echo(f"Profile {name!r} already exists; left unchanged.", err=True)
    else:
        click.echo(f"Saved as profile {name!r} in {path}.", err=True)


def _server_lock(storage: Storage) -> AbstractContextManager[None]:
    """One server per storage: a second one refuses to start (``WriterConflict``)."""
    if isinstance(storage, ServerLock):
        return storage.hold_server_lock()
    return contextlib.nullcontext()


def _system_files(storage: Storage) -> SystemFiles:
    if not hasattr(storage, "read_system_file"):
        raise click.UsageError(f"{storage.describe()} cannot hold users")
    return storage  # type: ignore[return-value]


@main.group(
    epilog=_examples(
        "messagevault users list",
        "messagevault users add alice --claim orders:write   # prompts for the password",
    )
)
def users() -> None:
    """Manage the server's users (works while the server runs)."""


def _read_password(prompt: str) -> str:
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\n")


@users.command(
    "add",
    epilog=_examples(
        "messagevault users add alice --claim orders:write --claim all:read",
        'echo "$PASSWORD" | messagevault users add ci --claim admin',
    ),
)
@storage_option
@click.argument("name")
@click.option("--claim", "claims", multiple=True, help="e.g. orders:write, all:read, admin")
def users_add(storage_url: str, name: str, claims: tuple[str, ...]) -> None:
    """Add user NAME; the password is read from stdin or prompted for."""
    from messagevault.server.auth import load_users, save_users

    files = _system_files(_open(storage_url))
    accounts = load_users(files)
    if name in accounts.entries:
        raise click.UsageError(f"user {name!r} exists; use passwd or grant")
    accounts.set_password(name, _read_password(f"Password for {name}"))
    accounts.grant(name, list(claims))
    save_users(files, accounts)
    click.echo(f"added {name}: {', '.join(sorted(claims)) or 'no claims'}")


@users.command("remove", epilog=_examples("messagevault users remove alice"))
@storage_option
@click.argument("name")
def users_remove(storage_url: str, name: str) -> None:
    """Remove user NAME."""
    from messagevault.server.auth import load_users, save_users

    files = _system_files(_open(storage_url))
    accounts = load_users(files)
    if accounts.entries.pop(name, None) is None:
        raise click.UsageError(f"no user {name!r}")
    save_users(files, accounts)
    click.echo(f"removed {name}")


@users.command(
    "list", epilog=_examples("messagevault users list --storage file:/var/lib/messagevault")
)
@storage_option
def users_list(storage_url: str) -> None:
    """List users and their claims."""
    from messagevault.server.auth import load_users

    for name, (_, claims) in sorted(load_users(_system_files(_open(storage_url))).entries.items()):
        click.echo(f"{name}\t{' '.join(claims)}")


@users.command(
    "passwd",
    epilog=_examples(
        "messagevault users passwd admin", 'echo "$NEW" | messagevault users passwd ci'
    ),
)
@storage_option
@click.argument("name")
def users_passwd(storage_url: str, name: str) -> None:
    """Set user NAME's password (stdin or prompt)."""
    from messagevault.server.auth import load_users, save_users

    files = _system_files(_open(storage_url))
    accounts = load_users(files)
    if name not in accounts.entries:
        raise click.UsageError(f"no user {name!r}")
    accounts.set_password(name, _read_password(f"New password for {name}"))
    save_users(files, accounts)
    click.echo(f"password of {name} changed")


@users.command(
    "grant", epilog=_examples("messagevault users grant alice orders:read payments:write")
)
@storage_option
@click.argument("name")
@click.argument("claims", nargs=-1, required=True)
def users_grant(storage_url: str, name: str, claims: tuple[str, ...]) -> None:
    """Give user NAME more CLAIMS."""
    from messagevault.server.auth import load_users, save_users

    files = _system_files(_open(storage_url))
    accounts = load_users(files)
    if name not in accounts.entries:
        raise click.UsageError(f"no user {name!r}")
    accounts.grant(name, list(claims))
    save_users(files, accounts)
    click.echo(f"{name}: {' '.join(accounts.entries[name][1])}")


# cors ---------------------------------------------------------------------------------


@main.command(
    "cors",
    epilog=_examples(
        "messagevault cors --storage-file azure.txt         # azure:CONNECTION_STRING in it",
        "messagevault cors allow https://viewer.example     # pages there may read",
        "messagevault cors allow http://localhost:8080      # a local viewer",
        "messagevault cors remove https://viewer.example",
        "(or MESSAGEVAULT_STORAGE=azure:CONNECTION_STRING instead of --storage-file)",
    ),
)
@storage_option
@click.argument("action", required=False, type=click.Choice(["allow", "remove"]))
@click.argument("origin", required=False)
@click.option(
    "--format",
    "output",
    type=click.Choice(["text", "ndjson"]),
    help="How the rules are shown: text (a few lines per rule) on a terminal, ndjson when piped.",
)
def cors(storage_url: str, action: str | None, origin: str | None, output: str | None) -> None:
    """Show, allow or remove the CORS rules that let web pages on ORIGIN read Azure storage.

    The browser viewer reads Azure streams straight from blob storage with
    the SAS URLs the server hands out; a browser allows that only for the
    origins (scheme://host[:port]) the account's Blob service has a CORS rule
    for. `allow` adds the rule the viewer needs (GET, HEAD and OPTIONS;
    Range; the blobs' metadata headers exposed), keeping the other rules;
    `remove` takes ORIGIN out of every rule. `*` allows any origin: for local
    development only. File storage needs no rule: there the viewer reads
    through the server.
    """
    if (action is None) != (origin is None):
        raise click.UsageError("give ACTION and ORIGIN together (allow/remove ORIGIN), or neither")
    if not storage_url.startswith("azure:"):
        raise click.UsageError(
            "CORS rules are for Azure storage (--storage azure:CONNECTION_STRING); "
            "on file storage the viewer reads through the server and needs none"
        )
    from messagevault.storage.azure import AzureStorage
    from messagevault.storage.azure_cors import (
        RulesFull,
        allow_origin,
        cors_rules,
        remove_origin,
        validate_origin,
    )

    try:
        origin = None if origin is None else validate_origin(origin)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ORIGIN") from None
    storage = _open(storage_url)
    assert isinstance(storage, AzureStorage)  # what open_storage makes of azure:
    try:
        if action == "allow" and origin is not None:
            done = allow_origin(storage.service, origin)
            click.echo(
                f"{origin} was already allowed: nothing changed"
                if done == "unchanged"
                else f"{done} the rule for {origin}: GET, HEAD, OPTIONS; pages there can read "
                "streams with the server's SAS URLs"
            )
            return
        if action == "remove" and origin is not None:
            if not remove_origin(storage.service, origin):
                raise click.ClickException(f"no CORS rule names {origin}: nothing changed")
            click.echo(f"removed {origin}")
            return
    except RulesFull as exc:  # nothing written
        raise click.ClickException(str(exc)) from None
    rules = cors_rules(storage.service)
    if default_format(output) == "ndjson":
        for rule in rules:
            click.echo(json.dumps(rule.as_json()))
        return
    if not rules:
        click.echo(f"no CORS rules on {storage.describe()}: pages on other origins cannot read it")
        return
    # Lines, not a table: the header lists are long, and a table would cut them.
    for number, rule in enumerate(rules, 1):
        click.echo(f"rule {number} of {len(rules)}: {' '.join(rule.origins)}")
        click.echo(f"  methods          {', '.join(rule.methods)}")
        click.echo(f"  allowed headers  {', '.join(rule.allowed_headers) or '-'}")
        click.echo(f"  exposed headers  {', '.join(rule.exposed_headers) or '-'}")
        click.echo(f"  max age          {rule.max_age_seconds} s")


def source_options(function: FC) -> FC:
    """``--url``, ``--storage(-file)``, ``--profile``: where a command goes (``cli_config``)."""
    options = [
        click.option(
            "--url",
            envvar="MESSAGEVAULT_URL",
            metavar="URL",
            help="Go through the server at URL (e.g. http://127.0.0.1:8080; several nodes "
            "of one server: URL,URL,...). Env: MESSAGEVAULT_URL.",
        ),
        click.option(
            "--storage",
            envvar="MESSAGEVAULT_STORAGE",
            metavar="STORAGE",
            callback=storage_value,
            help="Read and write storage directly: file:PATH or azure:CONNECTION_STRING "
            "(default file:./data). Env: MESSAGEVAULT_STORAGE.",
        ),
        _storage_file_option,
        click.option(
            "--profile",
            envvar="MESSAGEVAULT_PROFILE",
            metavar="NAME",
            help="Take url, user and password from this profile of the config file. "
            "Env: MESSAGEVAULT_PROFILE.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_TARGET = "messagevault.target"  # ctx.meta key: where the command went, for error hints


@contextlib.contextmanager
def _source(url: str | None, storage: str | None, profile: str | None) -> Iterator[Source]:
    ctx = click.get_current_context()
    target = resolve_target(ctx, url, storage, profile)
    ctx.meta[_TARGET] = target
    source = open_source(target)
    try:
        yield source
    finally:
        source.close()


_format_option = click.option(
    "--format",
    "output",
    type=click.Choice(FORMATS),
    help="ndjson (one JSON record per line, as the HTTP API), table, or value (raw values, "
    "one per line). Default: table on a terminal, ndjson when piped.",
)


# publish ----------------------------------------------------------------------------


@main.command(
    epilog=_examples(
        "messagevault publish orders '{\"id\": 1}' --key OrderPlaced",
        "seq 1 100000 | messagevault publish numbers --stdin",
        "messagevault publish images --file a.png --file b.png --key png",
        "messagevault read orders | messagevault publish orders-copy --ndjson -",
        "messagevault publish --url http://127.0.0.1:8080 orders hello",
    )
)
@source_options
@click.argument("stream")
@click.argument("values", nargs=-1)
@click.option("--key", default="", help="Key of every message from VALUES, --stdin or --file.")
@click.option("--stdin", "from_stdin", is_flag=True, help="One message per line of stdin.")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="One message holding the whole file; repeat for more.",
)
@click.option(
    "--ndjson",
    type=click.File("rb"),
    help='A file of JSON records, one per line, as `read` prints them ({"key", "value", '
    '"encoding", "key_encoding"}); - for stdin.',
)
@click.option(
    "--batch-bytes",
    type=click.IntRange(1024, MAX_FRAME_SIZE),
    default=DEFAULT_BATCH_BYTES,
    show_default=True,
    help="Largest batch (frame) to send at once; lower it for a server with a smaller --max-body.",
)
@click.option(
    "--compress",
    is_flag=True,
    help="zstd-compress each batch's values before sending (stored as sent; readers unpack "
    "them). Pays for text such as JSON; values that do not shrink are sent as they are.",
)
def publish(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str,
    values: tuple[str, ...],
    key: str,
    from_stdin: bool,
    files: tuple[Path, ...],
    ndjson: BinaryIO | None,
    batch_bytes: int,
    compress: bool,
) -> None:
    """Append messages to STREAM: VALUES, lines of stdin, whole files or NDJSON records.

    All input is read and checked before the first batch is sent, so bad
    input publishes nothing. Large input goes in several batches (each one
    atomic); a progress bar shows on a terminal. Prints a summary: JSON
    when piped.
    """
    validate_stream_name(stream)
    batches = publish_input(
        values,
        key,
        files,
        from_stdin=from_stdin,
        ndjson=ndjson,
        batch_bytes=batch_bytes,
        compress=compress,
    )
    if not batches:
        raise click.UsageError("nothing to publish: give VALUES, --stdin, --file or --ndjson")
    total = sum(batch.count for batch in batches)
    results: list[AppendResult] = []
    with (
        _source(url, storage, profile) as source,
        progress_bar(f"publishing to {stream}", total, unit="messages") as update,
    ):
        for batch in batches:
            try:
                results.append(source.publish(stream, batch))
            except (MessageVaultError, KeyboardInterrupt) as exc:
                if isinstance(exc, RequestTooLarge) and batch.count > 1:
                    exc.add_note(f"a lower --batch-bytes (now {batch_bytes:,}) makes them smaller")
                if results:
                    exc.add_note(_published_so_far(results, total))
                raise
            update(sum(result.message_count for result in results))
    _publish_summary(stream, results)


def _published_so_far(results: list[AppendResult], total: int) -> str:
    done = sum(result.message_count for result in results)
    return (
        f"{done:,} of {total:,} messages were published before this (sequences "
        f"{results[0].base_sequence}-{results[-1].sequences[-1]}); publishing the same input "
        "again would publish them twice"
    )


def _publish_summary(stream: str, results: list[AppendResult]) -> None:
    first, last = results[0], results[-1]
    count = sum(result.message_count for result in results)
    if not stdout_is_terminal():
        print_json(
            {
                "stream": stream,
                "count": count,
                "batches": len(results),
                "first_sequence": first.base_sequence,
                "first_position": first.frame_position,
                "position": last.committed_length,
            }
        )
        return
    batches = f"{len(results)} batches" if len(results) > 1 else "1 batch"
    sequences = (
        f"sequence {first.base_sequence}"
        if count == 1
        else f"sequences {first.base_sequence}-{last.sequences[-1]}"
    )
    click.echo(
        f"published {count:,} message{'s' if count > 1 else ''} to {stream} in {batches}: "
        f"{sequences}, from position {first.frame_position}; "
        f"the stream ends at {last.committed_length}"
    )


# read, tail ---------------------------------------------------------------------------


def _print_messages(
    source: Source,
    stream: str,
    position: int,
    *,
    follow: bool,
    limit: int | None,
    output: str | None,
    backoff: PollBackoff | None = None,
) -> None:
    """Print from ``position``: to the end, or following; flushed after each run.

    Ctrl-C ends a follow normally (exit 0) and anything else with 130.
    ``backoff`` paces a follow of storage (``--poll``, ``--max-poll``).
    """
    printer = message_printer(default_format(output))
    stop = threading.Event()
    remaining = limit
    try:
        runs = (
            source.follow(stream, position, stop, backoff)
            if follow
            else iter([source.read(stream, position)])
        )  # a bad stream or position fails here, even with --limit 0
        for run in runs if remaining != 0 else ():
            if remaining is None:
                printer.write(run)
            else:
                remaining -= printer.write(itertools.islice(run, remaining))
            printer.flush()
            if remaining == 0:
                break  # before waiting for another run
    except KeyboardInterrupt:
        stop.set()
        printer.flush()
        raise click.exceptions.Exit(0 if follow else 130) from None
    finally:
        stop.set()


def _start(
    source: Source,
    stream: str,
    *,
    position: int | None,
    sequence: int | None,
    since: timedelta | None,
    at: datetime | float | None,
    at_end: bool,
) -> int:
    """Where ``read`` starts: the one of its options given (none: the start)."""
    given = [
        option
        for option, value in (
            ("--from", position),
            ("--sequence", sequence),
            ("--since", since),
            ("--at", at),
            ("--end", at_end or None),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise click.UsageError(
            f"choose one place to start, not {' and '.join(given)}: "
            "--from, --sequence, --since, --at or --end"
        )
    if sequence is not None:
        return source.seek(stream, sequence=sequence)
    if since is not None:
        return source.seek(stream, time=ago(since))
    if at is not None:
        return source.seek(stream, time=at)
    if at_end:
        return source.info(stream).length
    return position or 0


def _poll_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and (problem := interval_problem(value)) is not None:
        raise click.BadParameter(f"{value:g} {problem}")  # nan and inf pass click.FLOAT
    return value


def _poll_options(function: FC) -> FC:
    """``--poll`` and ``--max-poll``: the pace of a follow that reads storage directly."""
    options = [
        click.option(
            "--poll",
            type=click.FLOAT,
            default=DEFAULT_POLL_INTERVAL,
            show_default=True,
            metavar="SECONDS",
            callback=_poll_seconds,
            help="Following storage (--storage): seconds before the first check for new "
            "messages at the tail; the wait doubles while the stream is idle, up to --max-poll, "
            "and comes back to this once messages come. Through a server (--url) the follow "
            "long-polls and these do not apply.",
        ),
        click.option(
            "--max-poll",
            type=click.FLOAT,
            metavar="SECONDS",
            callback=_poll_seconds,
            help=f"Following storage: the longest wait between checks (each one a storage "
            f"request) while the stream is idle; a new message shows within it. Default "
            f"{DEFAULT_MAX_POLL_INTERVAL:g}, or --poll if longer.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _follow_backoff(poll: float, max_poll: float | None) -> PollBackoff:
    """The pace of a follow of storage; a ceiling below the first wait is a usage error."""
    try:
        return PollBackoff(poll, max_poll, names=("--poll", "--max-poll"))
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from None


def _duration_value(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | None:
    try:
        return None if value is None else parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _time_value(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | float | None:
    try:
        return None if value is None else parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command(
    epilog=_examples(
        "messagevault read orders                      # all of it: a table, or NDJSON when piped",
        "messagevault read orders --from 1260 --limit 10",
        "messagevault read orders --sequence 3000 --format value",
        "messagevault read orders --since 10m          # what the last ten minutes brought",
        "messagevault read orders --at 2026-12-01T14:00Z --limit 100",
        "messagevault read orders --end --follow       # only new messages, as they come",
        "messagevault read --url http://127.0.0.1:8080 orders > orders.ndjson",
    )
)
@source_options
@click.argument("stream")
@click.option(
    "--from",
    "position",
    type=click.IntRange(0),
    help="Start at this position: 0, a message's position or next_position, or the length.",
)
@click.option(
    "--sequence",
    type=click.IntRange(0),
    help="Start at message number N (counting from 0; the message count: the end).",
)
@click.option(
    "--since",
    metavar="DURATION",
    callback=_duration_value,
    help="Start at the first message of the last DURATION: 90s, 10m, 1h30m, 2d, 1w.",
)
@click.option(
    "--at",
    metavar="TIME",
    callback=_time_value,
    help="Start at the first message at or after TIME: ISO 8601 with a zone "
    "(2026-12-01T14:00Z, 2026-12-01T15:00+01:00) or milliseconds since the Unix epoch.",
)
@click.option("--end", "at_end", is_flag=True, help="Start at the end (only new messages).")
@click.option("--limit", type=click.IntRange(0), help="Stop after this many messages.")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new messages (Ctrl-C ends).")
@_poll_options
@_format_option
def read(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str,
    position: int | None,
    sequence: int | None,
    since: timedelta | None,
    at: datetime | float | None,
    at_end: bool,
    limit: int | None,
    follow: bool,
    poll: float,
    max_poll: float | None,
    output: str | None,
) -> None:
    """Print STREAM's messages from a position, a sequence or a time (default: the start).

    --sequence, --since and --at find where to start without reading the
    messages before it (the stream's sparse index, then a short scan).

    NDJSON records are those of the HTTP API: {"position", "sequence", "id",
    "timestamp", "key", "next_position", "value", "encoding"}, with
    "encoding": "base64" for a value and "key_encoding": "base64" for a key
    that is not UTF-8.
    """
    backoff = _follow_backoff(poll, max_poll)  # a bad pace reads nothing
    with _source(url, storage, profile) as source:
        start = _start(
            source,
            stream,
            position=position,
            sequence=sequence,
            since=since,
            at=at,
            at_end=at_end,
        )
        _print_messages(
            source, stream, start, follow=follow, limit=limit, output=output, backoff=backoff
        )


@main.command(
    epilog=_examples(
        "messagevault tail orders",
        "messagevault tail orders -n 10 --format ndjson",
        "messagevault tail --url http://127.0.0.1:8080 orders",
    )
)
@source_options
@click.argument("stream")
@click.option(
    "-n",
    "--last",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Show the last N messages first.",
)
@_poll_options
@_format_option
def tail(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str,
    last: int,
    poll: float,
    max_poll: float | None,
    output: str | None,
) -> None:
    """Follow STREAM from its end, printing messages as they are committed; Ctrl-C ends."""
    backoff = _follow_backoff(poll, max_poll)  # a bad pace reads nothing
    with _source(url, storage, profile) as source:
        info = source.info(stream)
        # A trimmed stream has fewer than its message count to show.
        first = max(info.messages - last, info.first_sequence)
        start = source.seek(stream, sequence=first) if last else info.length
        _print_messages(
            source, stream, start, follow=True, limit=None, output=output, backoff=backoff
        )


# streams, info, verify -----------------------------------------------------------------


@main.command(
    epilog=_examples(
        "messagevault streams",
        "messagevault streams --storage file:/var/lib/messagevault --format ndjson",
        "messagevault streams --url http://127.0.0.1:8080",
    )
)
@source_options
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "ndjson"]),
    help="Default: table on a terminal, ndjson when piped.",
)
def streams(
    *, url: str | None, storage: str | None, profile: str | None, output: str | None
) -> None:
    """List the streams with their message count and length.

    Through a server: the streams your user may read.
    """
    with _source(url, storage, profile) as source:
        found = source.streams()
    if default_format(output) == "table":
        print_table(
            ["stream", "messages", "length"],
            [[s.stream, f"{s.messages:,}", human_bytes(s.length)] for s in found],
        )
        return
    for info in found:
        click.echo(
            json.dumps({"stream": info.stream, "messages": info.messages, "length": info.length})
        )


@main.command(
    epilog=_examples(
        "messagevault cluster --url http://n1:8080",
        "messagevault cluster --storage file:/var/lib/messagevault   # from the leases alone",
    )
)
@source_options
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    help="Default: table on a terminal, json when piped.",
)
def cluster(
    *, url: str | None, storage: str | None, profile: str | None, output: str | None
) -> None:
    """Show the server nodes sharing a storage and which node writes each stream.

    Through a server it asks GET /cluster; with --storage it reads the leases
    themselves, so it works with every node down.
    """
    with _source(url, storage, profile) as source:
        found = source.cluster()
    if output == "json" or (output is None and default_format(None) != "table"):
        print_json(found)
        return
    if not found.get("nodes"):
        click.echo(
            "No server nodes share this storage: it is served by one server without "
            "--node-id, or by none."
        )
        return
    now = time.time()

    def left(expires_at: float | None) -> str:
        return "" if expires_at is None else f"{max(0.0, expires_at - now):.1f} s"

    print_table(
        ["node", "address", "live", "lease left"],
        [
            [n["node"], n["address"] or "", "yes" if n["live"] else "no", left(n["expires_at"])]
            for n in found.get("nodes", [])
        ],
    )
    if not found.get("streams"):
        click.echo("No stream has had a writer yet.")
        return
    print_table(
        ["stream", "writer", "address", "generation", "lease left"],
        [
            [
                s["stream"],
                s["writer"] or "(none)",
                s["address"] or "",
                str(s["generation"]),
                left(s["expires_at"]),
            ]
            for s in found.get("streams", [])
        ],
    )


@main.command(
    epilog=_examples(
        "messagevault info orders",
        "messagevault info --url http://127.0.0.1:8080 orders   # with its read access",
    )
)
@source_options
@click.argument("stream")
def info(*, url: str | None, storage: str | None, profile: str | None, stream: str) -> None:
    """Show STREAM's committed state as JSON: length, messages, first and last write.

    Through a server it also gives read_access: the folder, or a read-only
    SAS URL on Azure, for reading without the server.
    """
    with _source(url, storage, profile) as source:
        print_json(source.info(stream).to_json())


@main.command(
    epilog=_examples(
        "messagevault verify orders",
        'messagevault verify --storage azure:"$CONNECTION_STRING" orders',
        "messagevault verify --sas 'https://account.blob.core.windows.net/mv-orders/data?sv=...'",
    )
)
@source_options
@click.argument("stream", required=False)
@click.option(
    "--sas",
    "sas_url",
    metavar="URL",
    help="Verify the stream a read-only SAS URL gives (from `info` through a server); "
    "MESSAGEVAULT_SAS_URL keeps its token out of the process list.",
)
def verify(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str | None,
    sas_url: str | None,
) -> None:
    """Walk STREAM and check every frame's CRCs; exit 1 at the first damage.

    STREAM may also be a SAS URL (sas:URL, or an https URL carrying sig=).
    Through a server, every frame is checked by the client as it arrives.
    """
    if stream is not None and (given := sas_url_of(stream)) is not None:
        stream, sas_url = None, given
    if stream is None and sas_url is None:
        sas_url = os.environ.get("MESSAGEVAULT_SAS_URL")  # a token is a credential: not in argv
    if (stream is None) == (sas_url is None):
        raise click.UsageError("give STREAM, or --sas URL")
    with contextlib.ExitStack() as stack:
        check: Callable[..., VerifyReport]
        if sas_url is not None:
            reader = stack.enter_context(sas_reader(sas_url))
            name, check = reader.name, reader.verify
        else:
            assert stream is not None
            source = stack.enter_context(_source(url, storage, profile))
            name, check = stream, functools.partial(source.verify, stream)
        with progress_bar(f"verifying {name}", 0, unit="bytes") as update:
            report = check(progress=update)
    click.echo(
        f"{name}: OK, {report.messages:,} messages in {report.frames:,} frames, "
        f"{human_bytes(report.bytes)}"
    )


# index --------------------------------------------------------------------------------


@main.command(
    "index",
    epilog=_examples(
        "messagevault index orders",
        "messagevault index orders --rebuild",
        'messagevault index --storage azure:"$CONNECTION_STRING" orders',
    ),
)
@storage_option
@click.argument("stream")
@click.option(
    "--rebuild", is_flag=True, help="Throw the index away and build it again from the frames."
)
def index_command(*, storage_url: str, stream: str, rebuild: bool) -> None:
    """Build STREAM's sparse index (what seeks by sequence and time use), or bring it up to date.

    A writer keeps the index as it appends and catches up when it opens, so
    streams a server writes need nothing from you; this is for a stream
    written before the index existed, or one whose index you want rebuilt.
    It opens the stream as its writer, straight on storage: refused while a
    server writes the stream (that server keeps its index).
    """
    storage = _open(storage_url)
    StorageSource(storage, Target(storage=storage_url, origin="--storage")).refuse_if_served(
        "the node that writes a stream keeps its index"
    )
    with Writer.open(storage, stream, create=False, rebuild_index=rebuild) as writer:
        indexer = writer.indexer
        if indexer is None:  # the index could not be read or written: the log said why
            raise click.ClickException(f"stream {stream!r} has no usable index (see above)")
        with progress_bar(f"indexing {stream}", 0, unit="bytes"):
            indexer.wait_built()
        indexer.flush()
        status, checkpoint = indexer.status(), writer.checkpoint
    click.echo(
        f"{stream}: index of {status.entries:,} {'entry' if status.entries == 1 else 'entries'}"
        " (one every "
        f"{human_bytes(indexer.policy.every_bytes)} or {indexer.policy.every_frames:,} frames) "
        f"covering {human_bytes(status.indexed_to - checkpoint.first_position)}, "
        f"{checkpoint.next_sequence:,} messages"
        + (f" (rebuilt: the old one was set aside: {indexer.problem})" if indexer.problem else "")
    )


# copy ---------------------------------------------------------------------------------


@main.command(
    epilog=_examples(
        "messagevault copy orders --from file:./data --to file:/backup/data",
        "messagevault copy orders --from http://127.0.0.1:8080 --to file:./replica",
        "messagevault copy orders --from 'sas:https://account.blob.core.windows.net/...' \\",
        "                         --to file:./cache",
        'messagevault copy orders --from file:./data --to azure:"$CONNECTION_STRING" \\',
        "                         --as orders-2026",
    )
)
@click.argument("stream")
@click.option(
    "--from",
    "origin",
    required=True,
    metavar="SRC",
    help="file:PATH or azure:CONNECTION_STRING (storage), http(s)://HOST:PORT (a server; "
    "credentials as for --url), or a SAS URL (sas:URL, or an https URL carrying sig=).",
)
@click.option(
    "--to",
    "destination",
    required=True,
    metavar="DST",
    help="Storage to copy into: file:PATH or azure:CONNECTION_STRING.",
)
@click.option("--as", "copy_name", metavar="NAME", help="Name of the copy (default: STREAM).")
@click.option(
    "--profile",
    envvar="MESSAGEVAULT_PROFILE",
    metavar="NAME",
    help="Credentials for a server SRC from this profile of the config file.",
)
def copy(
    *, stream: str, origin: str, destination: str, copy_name: str | None, profile: str | None
) -> None:
    """Copy STREAM from SRC into DST, frame for frame, and again later: only what is new.

    The copy has the same positions, sequences, ids and timestamps as the
    source. A second run appends what the source committed since, after
    checking that the copy's last frame is the source's; a copy that differs
    is refused and left alone. Every frame is checked (CRCs) on the way.
    Each step is committed, so an interrupted copy resumes where it stopped.
    """
    validate_stream_name(stream)
    name = validate_stream_name(copy_name or stream)
    if destination.startswith(("http://", "https://", "sas:")):
        raise click.UsageError(
            "DST must be storage (file:PATH or azure:CONNECTION_STRING): a server assigns "
            "positions itself, so a copy through it could not keep the source's"
        )
    with contextlib.ExitStack() as stack:
        frames, described, server = copy_source(stack, stream, origin, profile)
        if server is not None:
            click.get_current_context().meta[_TARGET] = server
        frames.length()  # a source that is missing or refuses us fails before the copy exists
        storage = storage_from(destination, "--to")
        if server is None and described == storage.describe() and name == stream:
            raise click.UsageError(
                f"--from and --to are the same stream ({described}): "
                "copy to other storage, or give the copy another name with --as"
            )
        writer = stack.enter_context(Writer.open(storage, name))
        copy_reader = stack.enter_context(Reader.open(storage, name))
        with progress_bar(f"copying {stream}", 0, unit="bytes") as update:
            try:
                report = copy_stream(frames, writer, copy_reader, progress=update)
            except KeyboardInterrupt:
                click.echo(
                    f"interrupted: the copy ends at position {writer.checkpoint.length:,}; "
                    "run the same command to carry on",
                    err=True,
                )
                raise click.exceptions.Exit(130) from None
        summary = {
            "stream": name,
            "from": described,
            "to": storage.describe(),
            "copied": report.messages,
            "position": report.end,
            "messages": writer.checkpoint.next_sequence,
        }
    if not stdout_is_terminal():
        print_json(summary)
        return
    click.echo(
        f"copied {report.messages:,} messages of {stream} from {described} to "
        f"{summary['to']}: the copy holds {summary['messages']:,} messages and ends at "
        f"position {report.end:,}"
    )


# delete, retention ------------------------------------------------------------------


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


@main.command(
    epilog=_examples(
        "messagevault delete orders --url http://127.0.0.1:8080   # asks: type 'orders'",
        "messagevault delete orders --yes --profile admin         # scripts: no question",
        "messagevault delete orders --storage file:./data --yes   # no server serving it",
    )
)
@source_options
@click.argument("stream")
@click.option(
    "--yes", is_flag=True, help="Delete without asking (needed where there is no terminal)."
)
def delete(
    *, url: str | None, storage: str | None, profile: str | None, stream: str, yes: bool
) -> None:
    """Delete STREAM, every message in it and its retention policy, for good.

    Asks you to type the stream's name first, unless --yes; without a
    terminal to ask on, it refuses unless --yes. Through a server it takes
    the admin claim; straight to --storage it is refused while a server
    serves that storage. A stream of that name published to afterwards
    starts empty.
    """
    validate_stream_name(stream)
    if not yes and not _stdin_is_terminal():
        raise click.UsageError(
            f"deleting stream {stream!r} asks you to type its name, and there is no terminal "
            "to ask on: give --yes to delete it without asking"
        )
    with _source(url, storage, profile) as source:
        if not yes:
            found = source.info(stream)  # StreamNotFound before any question
            click.echo(
                f"Stream {stream} holds {found.messages:,} messages "
                f"({human_bytes(found.length)}) in {source.describe()}; deleting it cannot "
                "be undone.",
                err=True,
            )
            typed = click.prompt(
                "Type the stream's name to delete it", default="", show_default=False, err=True
            )
            if typed.strip() != stream:
                raise click.ClickException(f"you typed {typed!r}, not {stream!r}: nothing deleted")
        source.delete_stream(stream)
    click.echo(f"deleted stream {stream}", err=True)


@main.command(
    epilog=_examples(
        "messagevault retention orders                          # show it",
        "messagevault retention orders --max-age 7d             # a week of messages",
        "messagevault retention orders --max-bytes 10GiB        # the last 10 GiB",
        "messagevault retention orders --max-age none           # drop the age limit",
        "messagevault retention orders --clear                  # back to the default",
    )
)
@source_options
@click.argument("stream")
@click.option(
    "--max-age",
    metavar="DURATION",
    help="Trim messages older than this: 90d, 12h, 1h30m, 45s; `none` drops the limit.",
)
@click.option(
    "--max-bytes",
    metavar="SIZE",
    help="Keep at most this much of the stream readable: 10GiB, 500MB, 4096; `none` drops it.",
)
@click.option("--clear", is_flag=True, help="Drop STREAM's own policy (the default applies).")
def retention(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str,
    max_age: str | None,
    max_bytes: str | None,
    clear: bool,
) -> None:
    """Show STREAM's retention policy, or set it (the admin claim, through a server).

    The server applies policies in the background, every
    --retention-interval seconds (60 by default), trimming whole frames
    from the front of the stream: positions never change, and reads below
    the first readable position get a clear error. A limit given alone
    keeps the other as it was.
    """
    validate_stream_name(stream)
    if clear and (max_age is not None or max_bytes is not None):
        raise click.UsageError("--clear drops the whole policy: give it alone")
    asked = _asked_limits(max_age, max_bytes)
    with _source(url, storage, profile) as source:
        if clear:
            source.clear_retention(stream)
            shown = source.retention(stream)
        elif max_age is None and max_bytes is None:
            shown = source.retention(stream)
        else:
            current = source.retention(stream)
            own = current if current.get("source") == "stream" else {}
            policy = _retention_policy(asked, own)
            shown = source.set_retention(stream, policy)
    if default_format(None) != "table":
        print_json(shown)
        return
    if shown["source"] == "none":
        click.echo(f"{stream}: kept for ever (no retention policy)")
        return
    policy = RetentionPolicy(shown["max_age"], shown["max_bytes"])
    whose = "its own policy" if shown["source"] == "stream" else "the server's default"
    click.echo(f"{stream}: {policy.describe()} ({whose})")


def _asked_limits(max_age: str | None, max_bytes: str | None) -> dict[str, float | int | None]:
    """The limits ``retention``'s options give ("none" drops one), checked before any request."""
    from messagevault.times import parse_duration

    asked: dict[str, float | int | None] = {}
    if max_age is not None:
        try:
            asked["max_age"] = (
                None if max_age == "none" else parse_duration(max_age).total_seconds()
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-age") from None
    if max_bytes is not None:
        try:
            asked["max_bytes"] = None if max_bytes == "none" else parse_size(max_bytes)
        except InvalidInput as exc:
            raise click.BadParameter(str(exc), param_hint="--max-bytes") from None
    return asked


def _retention_policy(
    asked: dict[str, float | int | None], current: dict[str, Any]
) -> RetentionPolicy:
    """The policy asked for, on top of the stream's own one."""
    limits = {"max_age": current.get("max_age"), "max_bytes": current.get("max_bytes"), **asked}
    try:
        return RetentionPolicy(limits["max_age"], limits["max_bytes"])  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise click.UsageError(f"{exc} (--clear drops the policy)") from None


@main.command(
    epilog=_examples(
        "messagevault trim orders --older-than 7d --url http://127.0.0.1:8080",
        "messagevault trim orders --before-sequence 1000000 --profile admin",
        "messagevault trim orders --before-time 2026-12-01T14:00Z",
        "messagevault trim orders --before-position 1260 --storage file:./data",
    )
)
@source_options
@click.argument("stream")
@click.option(
    "--before-position",
    type=click.IntRange(0),
    metavar="P",
    help="Trim the frames before the one holding the message at P (the length: all of them).",
)
@click.option(
    "--before-sequence",
    type=click.IntRange(0),
    metavar="N",
    help="Trim the messages before message number N (N stays; the message count: all).",
)
@click.option(
    "--before-time",
    metavar="TIME",
    callback=_time_value,
    help="Trim the messages older than TIME: ISO 8601 with a zone (2026-12-01T14:00Z) "
    "or milliseconds since the Unix epoch.",
)
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=_duration_value,
    help="Trim the messages older than DURATION ago: 90s, 10m, 12h, 7d, 2w.",
)
def trim(
    *,
    url: str | None,
    storage: str | None,
    profile: str | None,
    stream: str,
    before_position: int | None,
    before_sequence: int | None,
    before_time: datetime | float | None,
    older_than: timedelta | None,
) -> None:
    """Release STREAM's messages before a position, a sequence or a time, for good.

    Whole frames go from the front; positions never change, and reads
    below the new first readable position get a clear error (a read from
    the start begins there). Never backwards: a point already trimmed
    changes nothing. Through a server it takes the admin claim; straight to
    --storage it is refused while server nodes serve that storage. Prints
    where the stream now starts: JSON when piped.
    """
    validate_stream_name(stream)
    given = [
        option
        for option, value in (
            ("--before-position", before_position),
            ("--before-sequence", before_sequence),
            ("--before-time", before_time),
            ("--older-than", older_than),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise click.UsageError(
            "give one place to trim before"
            + (f", not {' and '.join(given)}" if given else "")
            + ": --before-position, --before-sequence, --before-time or --older-than"
        )
    target = TrimTarget(
        before_position,
        before_sequence,
        ago(older_than) if older_than is not None else before_time,
    )
    with _source(url, storage, profile) as source:
        result = source.trim(stream, target)
    if default_format(None) != "table":
        print_json(dataclasses.asdict(result))
        return
    starts = (
        f"{stream} starts at position {result.first_position:,} "
        f"(sequence {result.first_sequence:,})"
    )
    if not result.trimmed:
        click.echo(f"{starts}: nothing before that point was left to trim")
        return
    click.echo(f"trimmed {starts}; {human_bytes(result.released_bytes)} of storage released")


main.add_command(stress)

if __name__ == "__main__":
    main()
