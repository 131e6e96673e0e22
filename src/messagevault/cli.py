"""The ``messagevault`` command: thin wrappers over the library.

Storage is named by ``--storage`` (or ``MESSAGEVAULT_STORAGE``), default
``file:./data``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import click
from click.decorators import FC
from rich.console import Console
from rich.table import Table

from messagevault.committer import DEFAULT_MAX_QUEUED_BYTES
from messagevault.errors import MessageVaultError
from messagevault.format import MAX_FRAME_SIZE, Message
from messagevault.reader import Reader
from messagevault.records import iso_time, message_record
from messagevault.storage import open_storage
from messagevault.storage.base import ServerLock, Storage, SystemFiles
from messagevault.writer import Writer

storage_option = click.option(
    "--storage",
    "storage_url",
    envvar="MESSAGEVAULT_STORAGE",
    default="file:./data",
    show_default=True,
    help="Where streams live: file:PATH, azure:CONNECTION_STRING or memory: (for trying out).",
)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _open(storage_url: str) -> Storage:
    try:
        return open_storage(storage_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage") from exc


class _Group(click.Group):
    """Turns our own errors into one clear line and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MessageVaultError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="messagevault")
def main() -> None:
    """MessageVault: durable append-only message streams in blob storage."""


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


@main.command()
@click.option("--host", envvar="MESSAGEVAULT_HOST", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    envvar="MESSAGEVAULT_PORT",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0: any free port (the `listening` log line says which).",
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
    "--max-body",
    click.IntRange(1024),
    MAX_FRAME_SIZE,
    "Largest request body in bytes (413 beyond).",
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
@click.option(
    "--log-level",
    envvar="MESSAGEVAULT_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least important log lines shown; debug also shows each Azure SDK request.",
)
def serve(  # click passes options by name
    *,
    host: str,
    port: int,
    storage_url: str,
    fsync: str,
    max_body: int,
    max_read_messages: int,
    max_read_bytes: int,
    max_wait: int,
    linger_ms: float,
    max_queued_bytes: int,
    max_queue_wait: float,
    log_level: str,
) -> None:
    """Run the HTTP server, the single writer of the storage's streams."""
    import asyncio
    import logging

    from messagevault.server import Limits, StreamHub, create_app
    from messagevault.server.auth import Authenticator, ensure_admin
    from messagevault.server.logs import configure
    from messagevault.server.runner import CannotListen, serve_until_stopped

    configure(logging.getLevelNamesMapping()[log_level.upper()])
    log = logging.getLogger("messagevault.server")
    try:
        storage = open_storage(storage_url, fsync=fsync)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--storage") from exc
    files = _system_files(storage)
    limits = Limits(
        max_body=max_body,
        max_read_messages=max_read_messages,
        max_read_bytes=max_read_bytes,
        max_wait=max_wait,
    )
    hub = StreamHub(
        storage,
        linger=linger_ms / 1000,
        max_queued_bytes=max_queued_bytes,
        max_queue_wait=max_queue_wait,
    )
    app = create_app(hub, limits, Authenticator(files))
    settings = {
        "fsync": fsync,
        **dataclasses.asdict(limits),
        "linger_ms": linger_ms,
        "max_queued_bytes": max_queued_bytes,
        "max_queue_wait": max_queue_wait,
    }

    def listening(bound_port: int) -> None:
        # Once the port is ours: a server that cannot listen creates nothing.
        password = ensure_admin(files)
        if password is not None:
            # Shown once, never stored: only its argon2 hash is in users.json.
            click.echo(
                f"Created user 'admin' with password: {password}\n"
                "Keep it now; change it with `messagevault users passwd admin`.",
                err=True,
            )
        log.info(
            "listening",
            extra={"host": host, "port": bound_port, "storage": storage.describe(), **settings},
        )

    # SIGINT/SIGTERM stop gracefully: no new requests, in-flight commits
    # finish (the hub drains its committers), exit 0.
    with _server_lock(storage):
        try:
            asyncio.run(serve_until_stopped(app, host, port, on_listening=listening))
        except CannotListen as exc:
            hint = "stop what uses it, or choose another --port" if exc.in_use else "check --host"
            click.echo(f"error: {exc}; {hint}", err=True)
            sys.exit(1)
    log.info("stopped")


def _server_lock(storage: Storage) -> AbstractContextManager[None]:
    """One server per storage: a second one refuses to start (``WriterConflict``)."""
    if isinstance(storage, ServerLock):
        return storage.hold_server_lock()
    return contextlib.nullcontext()


def _system_files(storage: Storage) -> SystemFiles:
    if not hasattr(storage, "read_system_file"):
        raise click.UsageError(f"{storage.describe()} cannot hold users")
    return storage  # type: ignore[return-value]


@main.group()
def users() -> None:
    """Manage the server's users (works while the server runs)."""


def _read_password(prompt: str) -> str:
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\n")


@users.command("add")
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


@users.command("remove")
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


@users.command("list")
@storage_option
def users_list(storage_url: str) -> None:
    """List users and their claims."""
    from messagevault.server.auth import load_users

    for name, (_, claims) in sorted(load_users(_system_files(_open(storage_url))).entries.items()):
        click.echo(f"{name}\t{' '.join(claims)}")


@users.command("passwd")
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


@users.command("grant")
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


@main.command()
@storage_option
def streams(storage_url: str) -> None:
    """List streams with their length and message count."""
    storage = _open(storage_url)
    table = Table("stream", "messages", "length")
    for name in storage.list_streams():
        with Reader.open(storage, name) as reader:
            checkpoint = reader.checkpoint()
        table.add_row(name, f"{checkpoint.next_sequence:,}", _human_bytes(checkpoint.length))
    Console().print(table)


@main.command()
@storage_option
@click.argument("stream")
def info(storage_url: str, stream: str) -> None:
    """Show a stream's committed state as JSON."""
    with Reader.open(_open(storage_url), stream) as reader:
        checkpoint = reader.checkpoint()
        first = next(reader.read(), None)  # decodes only the first frame
    last_write = checkpoint.last_timestamp if checkpoint.length else None
    click.echo(
        json.dumps(
            {
                "stream": stream,
                "length": checkpoint.length,
                "messages": checkpoint.next_sequence,
                "first_write": iso_time(first.timestamp) if first else None,
                "last_write": iso_time(last_write) if last_write is not None else None,
            },
            indent=2,
        )
    )


@main.command()
@storage_option
@click.argument("stream")
@click.argument("values", nargs=-1)
@click.option("--key", default="", help="Key for every message.")
@click.option("--stdin", "from_stdin", is_flag=True, help="One message per line of stdin.")
def publish(
    storage_url: str, stream: str, values: tuple[str, ...], key: str, from_stdin: bool
) -> None:
    """Append VALUES (or stdin lines) to STREAM as one batch."""
    payload = [value.encode() for value in values]
    if from_stdin:
        payload += [line.rstrip(b"\n") for line in sys.stdin.buffer]
    if not payload:
        raise click.UsageError("nothing to publish: give VALUES or --stdin")
    with Writer.open(_open(storage_url), stream) as writer:
        result = writer.append([(key, value) for value in payload])
    click.echo(
        json.dumps(
            {
                "stream": stream,
                "position": result.committed_length,
                "first_sequence": result.base_sequence,
                "count": result.message_count,
            }
        )
    )


@main.command()
@storage_option
@click.argument("stream")
@click.option("--from", "position", default=0, show_default=True, help="Start position.")
@click.option("--follow", is_flag=True, help="Keep waiting for new messages.")
@click.option("--limit", type=int, default=None, help="Stop after this many messages.")
def read(storage_url: str, stream: str, position: int, follow: bool, limit: int | None) -> None:
    """Print messages as NDJSON (value as UTF-8 text, or base64 if it is not text)."""
    reader = Reader.open(_open(storage_url), stream)
    messages: Iterator[Message] = reader.follow(position) if follow else reader.read(position)
    try:
        for count, message in enumerate(messages, 1):
            click.echo(json.dumps(message_record(message)))
            if limit is not None and count >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()


@main.command()
@storage_option
@click.argument("stream")
def verify(storage_url: str, stream: str) -> None:
    """Walk STREAM and check every frame's CRCs; exit 1 at the first damage."""
    with Reader.open(_open(storage_url), stream) as reader:
        report = reader.verify()
    click.echo(
        f"{stream}: OK, {report.messages:,} messages in {report.frames:,} frames, "
        f"{_human_bytes(report.bytes)}"
    )


if __name__ == "__main__":
    main()
