"""Saved connection profiles: a server's url, user and password in a config file of the user's.

The file is ``MESSAGEVAULT_CONFIG``, else ``$XDG_CONFIG_HOME/messagevault/config.toml``
(``~/.config/...``), one table per profile::

    [profiles.default]
    url = "http://127.0.0.1:8080"
    user = "admin"
    password = "..."

The CLI reads any profile (``--profile``); the client library falls back on
the ``default`` profile when neither its arguments nor the environment name
a server. ``messagevault serve --save-profile NAME`` writes one, readable by
its owner only, when it creates the first admin.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from messagevault.errors import InvalidInput

DEFAULT_PROFILE = "default"
PROFILE_KEYS = ("url", "user", "password")


def config_path() -> Path:
    configured = os.environ.get("MESSAGEVAULT_CONFIG")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "messagevault" / "config.toml"


def read_profiles(path: Path) -> dict[str, object]:
    """The ``[profiles]`` table of the config file at ``path`` ({} if there is no file)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidInput(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"config file {path} is not valid TOML: {exc}") from None
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise InvalidInput(f"config file {path}: [profiles] must be a table")
    return profiles


def default_profile() -> dict[str, str]:
    """The ``default`` profile's url, user and password (those it has; {} without one)."""
    path = config_path()
    entry = read_profiles(path).get(DEFAULT_PROFILE)
    if entry is None:
        return {}
    if not isinstance(entry, dict) or not all(
        key in PROFILE_KEYS and isinstance(value, str) for key, value in entry.items()
    ):
        raise InvalidInput(
            f"config file {path}: [profiles.{DEFAULT_PROFILE}] must hold only "
            f"string {', '.join(PROFILE_KEYS)}"
        )
    return entry


def save_profile(name: str, url: str, user: str, password: str) -> Path | None:
    """Add profile ``name`` to the config file (created 0600); None if it already has one.

    An existing profile is left as it is: it may be the user's own, and the
    new password was shown on the terminal anyway. The profile is appended,
    so the rest of the file (comments included) stays as it was.
    """
    path = config_path()
    if name in read_profiles(path):
        return None
    if path.exists() and path.stat().st_mode & 0o077:
        raise InvalidInput(
            f"{path} can be read by other users: not writing a password there "
            f"(chmod 600 {path} first)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON strings are valid TOML basic strings (the same escapes).
    table = f"\n[profiles.{json.dumps(name)}]\n" + "".join(
        f"{key} = {json.dumps(value)}\n"
        for key, value in (("url", url), ("user", user), ("password", password))
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as file:
        file.write(table)
    return path
