"""Where a ``messagevault`` command goes, and with which credentials.

A command talks to a server (``--url``, through the client library) or reads
storage directly (``--storage``). The first rule that applies decides:

1. ``--url`` or ``--storage`` on the command line (both at once: an error);
2. the url of the profile named by ``--profile`` or ``MESSAGEVAULT_PROFILE``;
3. ``MESSAGEVAULT_URL`` or ``MESSAGEVAULT_STORAGE`` (both set: an error);
4. the url of the config file's ``default`` profile;
5. ``file:./data``, the folder ``messagevault serve`` uses by default.

Credentials never need to be on the command line. For a server, the user
and password come from the named profile, else ``MESSAGEVAULT_USER`` /
``MESSAGEVAULT_PASSWORD``, else the ``default`` profile, else a prompt on a
terminal. The config file is ``MESSAGEVAULT_CONFIG``, else
``~/.config/messagevault/config.toml``::

    [profiles.default]
    url = "http://127.0.0.1:8080"
    user = "admin"
    password = "..."
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from messagevault.client.nodes import nodes_within
from messagevault.errors import InvalidInput
from messagevault.profiles import DEFAULT_PROFILE, PROFILE_KEYS, config_path, read_profiles

DEFAULT_STORAGE = "file:./data"


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    url: str | None = None
    user: str | None = None
    password: str | None = None


def load_profile(name: str, *, required: bool) -> Profile | None:
    """Profile ``name`` from the config file; ``None`` if absent and not ``required``."""
    path = config_path()
    if required and not path.exists():
        raise click.UsageError(
            f"profile {name!r} asked for, but there is no config file {path} "
            "(or set MESSAGEVAULT_CONFIG)"
        )
    try:
        profiles = read_profiles(path)
    except InvalidInput as exc:
        raise click.ClickException(str(exc)) from None
    entry = profiles.get(name)
    if entry is None:
        if required:
            known = ", ".join(sorted(profiles)) or "none"
            raise click.UsageError(f"no profile {name!r} in {path} (profiles there: {known})")
        return None
    return _profile(name, path, entry)


def _profile(name: str, path: Path, entry: Any) -> Profile:
    if not isinstance(entry, dict):
        raise click.ClickException(f"config file {path}: [profiles.{name}] must be a table")
    unknown = sorted(set(entry) - set(PROFILE_KEYS))
    if unknown:
        raise click.ClickException(
            f"config file {path}: profile {name!r} has unknown keys {', '.join(unknown)} "
            f"(known: {', '.join(PROFILE_KEYS)})"
        )
    for key, value in entry.items():
        if not isinstance(value, str):
            raise click.ClickException(
                f"config file {path}: {key} of profile {name!r} must be a string"
            )
    if "password" in entry and _readable_by_others(path):
        click.echo(
            f"warning: {path} holds a password and other users can read it; run: chmod 600 {path}",
            err=True,
        )
    return Profile(name, path, entry.get("url"), entry.get("user"), entry.get("password"))


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


@dataclass(frozen=True)
class Target:
    """The resolved place: a server ``url`` with credentials, or a ``storage`` URL."""

    url: str | None = None
    storage: str | None = None
    origin: str = "default"  # which rule chose it, for error messages
    user: str | None = None
    password: str | None = None
    credentials_origin: str = ""

    @property
    def shown(self) -> str:
        """The server's URL without any password in it, for messages."""
        return shown_url(self.url)


def _given(ctx: click.Context, name: str) -> click.core.ParameterSource | None:
    return ctx.get_parameter_source(name)


def resolve_target(
    ctx: click.Context, url: str | None, storage: str | None, profile_name: str | None
) -> Target:
    """Apply the rules of this module's docstring to the ``--url/--storage/--profile`` values."""
    command_line = click.core.ParameterSource.COMMANDLINE
    url_flag = url if _given(ctx, "url") == command_line else None
    storage_flag = storage if _given(ctx, "storage") == command_line else None
    if url_flag and storage_flag:
        raise click.UsageError(
            "give --url (a server) or --storage/--storage-file (direct access), not both"
        )
    if storage_flag:  # decided: no config file to read (nor to fail on)
        return Target(storage=storage_flag, origin="--storage")
    named = load_profile(profile_name, required=True) if profile_name else None
    default = None if named else load_profile(DEFAULT_PROFILE, required=False)
    env_url = url if url_flag is None and url else None
    env_storage = storage if storage_flag is None and storage else None
    choices: list[tuple[str | None, str | None, str]] = [  # (server, storage, origin)
        (None, storage_flag, "--storage"),
        (url_flag, None, "--url"),
        (named.url if named else None, None, f"profile {profile_name!r}"),
        (env_url, env_storage, "MESSAGEVAULT_URL and MESSAGEVAULT_STORAGE"),
        (default.url if default else None, None, "profile 'default'"),
        (None, DEFAULT_STORAGE, "the default"),
    ]
    server, place, origin = next(choice for choice in choices if choice[0] or choice[1])
    if server and place:
        raise click.UsageError(
            "MESSAGEVAULT_URL and MESSAGEVAULT_STORAGE are both set: unset one, "
            "or choose with --url or --storage"
        )
    if place:
        return Target(storage=place, origin=origin.split(" and ")[-1])
    assert server is not None
    return _with_credentials(Target(url=server, origin=origin.split(" and ")[0]), named, default)


def _same_server(profile_url: str | None, url: str | None) -> bool:
    """Whether ``url`` names the profile's server: its node, or some of its several nodes."""
    return bool(profile_url and url) and nodes_within(url or "", profile_url or "")


def shown_url(url: str | None) -> str:
    """``url`` without user info (a password may be in it) or a trailing slash: safe to print.

    A comma-separated list of a server's nodes is shown node by node.
    """
    if url is None:
        return ""
    if "," in url:
        return ",".join(shown_url(entry.strip()) for entry in url.split(","))
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.rstrip("/")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)).rstrip("/")


def server_target(url: str, profile_name: str | None) -> Target:
    """A server given outright (``copy --from URL``), with credentials by the usual rules."""
    named = load_profile(profile_name, required=True) if profile_name else None
    default = None if named else load_profile(DEFAULT_PROFILE, required=False)
    return _with_credentials(Target(url=url, origin="--from"), named, default)


def _with_credentials(target: Target, named: Profile | None, default: Profile | None) -> Target:
    layers: list[tuple[str | None, str | None, str]] = []
    if named is not None:
        layers.append((named.user, named.password, f"profile {named.name!r} in {named.path}"))
    layers.append(
        (
            os.environ.get("MESSAGEVAULT_USER"),
            os.environ.get("MESSAGEVAULT_PASSWORD"),
            "MESSAGEVAULT_USER/MESSAGEVAULT_PASSWORD",
        )
    )
    if default is not None and _same_server(default.url, target.url):
        # Only for its own server: never send the default profile's password elsewhere.
        layers.append((default.user, default.password, f"profile 'default' in {default.path}"))
    user = password = None
    origins: list[str] = []
    for found_user, found_password, where in layers:
        if user is None and found_user:
            user = found_user
            origins.append(where)
        if password is None and found_password:
            password = found_password
            if where not in origins:
                origins.append(where)
    if password is None and sys.stdin.isatty():
        if user is None:
            user = str(click.prompt(f"User for {target.shown}", default="admin", err=True))
        password = str(click.prompt(f"Password of {user}", hide_input=True, err=True))
        origins.append("the prompt")
    return Target(
        url=target.url,
        origin=target.origin,
        user=user,
        password=password,
        credentials_origin=" and ".join(origins),
    )


# --storage-file: the storage URL in a file, so that an account key is in
# neither the command line (`ps` shows it to every user) nor the environment.
_STORAGE_FILE = "messagevault.storage_file"  # ctx.meta: (path, where it was given)
_KEY_FIELDS = ("accountkey=", "sharedaccesssignature=")


def remember_storage_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--storage-file``'s callback (an eager option): ``--storage``'s callback reads it."""
    if value is not None and param.name is not None:
        ctx.meta[_STORAGE_FILE] = (value, ctx.get_parameter_source(param.name))


def storage_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--storage``'s callback: its value, or the storage URL read from ``--storage-file``.

    The command line beats the environment; ``--storage`` and
    ``--storage-file`` both on the command line (or both their variables
    set) is a usage error. A storage read from a file counts as given where
    the file was (``resolve_target`` ranks it so).
    """
    assert param.name is not None
    source = ctx.get_parameter_source(param.name)
    command_line = click.core.ParameterSource.COMMANDLINE
    environment = click.core.ParameterSource.ENVIRONMENT
    path, path_source = ctx.meta.pop(_STORAGE_FILE, (None, None))
    if path is not None and source in (command_line, environment):
        if path_source == source:
            given = "on the command line" if source == command_line else "set"
            raise click.UsageError(
                f"--storage and --storage-file are both {given} "
                "(MESSAGEVAULT_STORAGE, MESSAGEVAULT_STORAGE_FILE): give one"
            )
        if source == command_line:
            path = None  # the command line beats the environment variable
    if path is not None:
        value = read_storage_file(path)
        ctx.set_parameter_source(param.name, path_source)
        source = path_source
    elif value and source == command_line and _has_key(value):
        click.echo(
            "warning: --storage shows the account key to anyone who runs `ps` (and keeps it "
            "in shell history); use --storage-file PATH or MESSAGEVAULT_STORAGE instead",
            err=True,
        )
    if value and _has_key(value) and not value.startswith("azure:"):
        # Taken for a path (or a scheme) it would be echoed, key and all, by
        # the errors and log lines that name the storage.
        raise click.BadParameter(
            "an Azure connection string goes after azure: (azure:DefaultEndpointsProtocol=...)",
            ctx=ctx,
            param_hint="--storage-file" if path is not None else "--storage",
        )
    return value


def read_storage_file(path: str) -> str:
    """The storage URL in file ``path``, surrounding whitespace stripped; never echoed."""
    try:
        with open(path, encoding="utf-8") as file:
            value = file.read().strip()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint="--storage-file"
        ) from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="--storage-file") from None
    if not value:
        raise click.BadParameter(
            f"{path} is empty: it should hold a storage URL such as azure:CONNECTION_STRING",
            param_hint="--storage-file",
        )
    return value


def _has_key(value: str) -> bool:
    lowered = value.lower()
    return any(field in lowered for field in _KEY_FIELDS)
