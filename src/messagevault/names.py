"""Stream names: the one rule every layer agrees on.

A name is 3-60 characters of lowercase ASCII letters and digits, with single
hyphens allowed between them. That keeps ``mv-<name>`` a valid Azure container
name (3-63 characters, no leading/trailing/double hyphen) and a safe folder
name on every file system.
"""

from __future__ import annotations

import re

from messagevault.errors import InvalidStreamName

MIN_NAME_LENGTH = 3
MAX_NAME_LENGTH = 60

_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def validate_stream_name(name: object) -> str:
    """Return ``name`` if it is a valid stream name, else raise ``InvalidStreamName``.

    >>> validate_stream_name("orders-2024")
    'orders-2024'
    """
    if not isinstance(name, str):
        raise InvalidStreamName(f"stream name must be a string, not {type(name).__name__}")
    if not MIN_NAME_LENGTH <= len(name) <= MAX_NAME_LENGTH:
        raise InvalidStreamName(
            f"stream name {name[:80]!r} has {len(name)} characters; "
            f"it must have {MIN_NAME_LENGTH}-{MAX_NAME_LENGTH}"
        )
    if not _NAME.fullmatch(name):
        raise InvalidStreamName(
            f"stream name {name!r} may hold only lowercase letters a-z, digits 0-9 "
            "and single hyphens between them"
        )
    return name
