"""A stream's retention policy: how old, or how large, its readable part may grow.

The policy is kept in storage, one system file per stream
(``retention.<stream>.json``), so that every server node sharing the
storage sees the same one and a restart forgets nothing; the server applies
it in the background (``server/retention_task.py``). Either limit may be
unset; a stream without a policy follows the server's default, if any.

    {"max_age": 604800, "max_bytes": 10737418240}

``max_age``: seconds; messages older than that are trimmed. ``max_bytes``:
the readable bytes (``length - first_position``) kept at most; whole frames
are trimmed from the front until the rest fits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, cast

from messagevault.errors import InvalidInput, StorageError
from messagevault.names import validate_stream_name
from messagevault.storage.base import Storage, SystemFiles

# A limit beyond these is a typo, not a wish (ms timestamps reach far further).
MAX_AGE_LIMIT: Final = 100 * 365 * 86400  # seconds: a century
MAX_BYTES_LIMIT: Final = 2**62
POLICY_FIELDS: Final = ("max_age", "max_bytes")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """At most ``max_age`` seconds and/or ``max_bytes`` readable bytes; None: no such limit."""

    max_age: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_age(self.max_age)
        _check_bytes(self.max_bytes)
        if self.max_age is None and self.max_bytes is None:
            raise InvalidInput(
                "a retention policy needs max_age or max_bytes (or both); "
                "to drop a stream's policy, delete it"
            )

    def to_json(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "max_bytes": self.max_bytes}

    @classmethod
    def from_json(cls, document: object) -> RetentionPolicy:
        """The policy a JSON object describes; ``InvalidInput`` naming what is wrong."""
        if not isinstance(document, dict):
            raise InvalidInput(
                'a retention policy is a JSON object: {"max_age": seconds|null, '
                '"max_bytes": bytes|null}'
            )
        unknown = sorted(set(document) - set(POLICY_FIELDS))
        if unknown:
            raise InvalidInput(
                f"unknown retention field(s) {', '.join(map(repr, unknown))}; "
                f"a policy has {' and '.join(POLICY_FIELDS)}"
            )
        max_age = document.get("max_age")
        if isinstance(max_age, int) and not isinstance(max_age, bool):
            max_age = float(max_age)
        return cls(max_age=max_age, max_bytes=document.get("max_bytes"))

    def describe(self) -> str:
        """``max age 7d, max bytes 10 GiB``: for logs and the CLI."""
        parts = []
        if self.max_age is not None:
            parts.append(f"max age {format_duration(self.max_age)}")
        if self.max_bytes is not None:
            parts.append(f"max bytes {format_size(self.max_bytes)}")
        return ", ".join(parts)


def _check_age(max_age: object) -> None:
    if max_age is None:
        return
    if (
        not isinstance(max_age, int | float)
        or isinstance(max_age, bool)
        or not math.isfinite(max_age)
        or not 0 < max_age <= MAX_AGE_LIMIT
    ):
        raise InvalidInput(
            f"max_age must be a number of seconds above 0 and at most {MAX_AGE_LIMIT} "
            f"(a century), or null; not {max_age!r}"
        )


def _check_bytes(max_bytes: object) -> None:
    if max_bytes is None:
        return
    if (
        not isinstance(max_bytes, int)
        or isinstance(max_bytes, bool)
        or not 0 < max_bytes <= MAX_BYTES_LIMIT
    ):
        raise InvalidInput(
            f"max_bytes must be a whole number of bytes above 0 and at most {MAX_BYTES_LIMIT}, "
            f"or null; not {max_bytes!r}"
        )


# Where policies are kept -----------------------------------------------------------------


def system_files(storage: Storage) -> SystemFiles:
    """``storage`` as the keeper of system files, where policies live."""
    if not hasattr(storage, "read_system_file") or not hasattr(storage, "delete_system_file"):
        raise StorageError(f"{storage.describe()} keeps no system files: no retention policies")
    return cast(SystemFiles, storage)


def policy_file(stream: str) -> str:
    """The system file holding ``stream``'s policy: flat (no folders), on every backend."""
    return f"retention.{validate_stream_name(stream)}.json"


def load_policy(files: SystemFiles, stream: str) -> RetentionPolicy | None:
    """``stream``'s policy, or None when it has none."""
    raw = files.read_system_file(policy_file(stream))
    if not raw:  # an empty file is no policy
        return None
    try:
        return RetentionPolicy.from_json(json.loads(raw))
    except (ValueError, InvalidInput) as exc:
        raise InvalidInput(
            f"stream {stream!r}'s stored retention policy ({policy_file(stream)}) is damaged: "
            f"{exc}; set it again, or delete it"
        ) from None


def save_policy(files: SystemFiles, stream: str, policy: RetentionPolicy) -> None:
    files.write_system_file(policy_file(stream), json.dumps(policy.to_json()).encode())


def delete_policy(files: SystemFiles, stream: str) -> bool:
    """Drop ``stream``'s policy; whether it had one."""
    name = policy_file(stream)
    if files.read_system_file(name) is None:
        return False
    files.delete_system_file(name)
    return True


# Sizes as people write them (durations: ``times.parse_duration``) ---------------------

_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_AMOUNT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """``10GiB``, ``500MB``, ``64KiB`` (or plain bytes) as whole bytes above 0."""
    match = _AMOUNT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise InvalidInput(
            f"{text!r} is not a size: give a number and a unit, such as 10GiB, 500MB or 64KiB"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if not 0 < size <= MAX_BYTES_LIMIT:
        raise InvalidInput(f"{text!r} is not a size above 0 bytes and at most {MAX_BYTES_LIMIT}")
    return size


def format_duration(seconds: float) -> str:
    """Seconds in the largest unit that divides them: ``7d``, ``90m``, ``1.5s``."""
    for unit, size in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that divides them: ``10GiB``, ``1500B``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
