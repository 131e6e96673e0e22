"""Times and durations as users write them: where a read starts by time.

One parser for every surface that takes a time (the HTTP read route's
``from_time``, the CLI's ``--at`` and ``--since``), so that they accept and
refuse the same text with the same words. A time must say its zone: a
stream's timestamps are UTC, and a time without a zone would be read in
whatever zone the server or the shell happens to run in.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

# The last millisecond a ``datetime`` can hold (9999-12-31T23:59:59.999Z): a
# larger number is a mistake (microseconds or nanoseconds given as ms).
MAX_EPOCH_MS: Final = 253_402_300_799_999
ZONE_HINT: Final = "add Z (UTC) or an offset such as +01:00"
TIME_FORMS: Final = (
    "ISO 8601 with a zone (2026-12-01T14:00Z, 2026-12-01T14:00:00.250+01:00) "
    "or milliseconds since the Unix epoch"
)

_INTEGER = re.compile(r"[+-]?\d+")
# A "+01:00" offset sent unencoded in a URL's query arrives as " 01:00".
_OFFSET_AS_SPACE = re.compile(r"(.*\d:\d\d(?::\d\d(?:[.,]\d+)?)?) (\d\d(?::?\d\d)?)")
_DURATION_PART = re.compile(r"(\d+)([wdhms])")
_UNITS: Final = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_time(text: str) -> datetime | float:
    """``text`` as a time ``Reader.seek`` takes: an aware datetime, or Unix seconds.

    ISO 8601 with a zone, or an integer of milliseconds since the Unix
    epoch. Raises ``ValueError`` saying what was wrong: no zone, a negative
    or too large number, or neither form.
    """
    text = text.strip()
    if _INTEGER.fullmatch(text):
        milliseconds = int(text)
        if not 0 <= milliseconds <= MAX_EPOCH_MS:
            raise ValueError(
                f"{text} is not a time: milliseconds since the Unix epoch run from 0 "
                f"to {MAX_EPOCH_MS} (the year 9999)"
            )
        return milliseconds / 1000
    offset_lost = _OFFSET_AS_SPACE.fullmatch(text)
    if offset_lost:
        text = f"{offset_lost[1]}+{offset_lost[2]}"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give {TIME_FORMS}") from None
    if when.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone: {ZONE_HINT}")
    return when


def parse_duration(text: str) -> timedelta:
    """``text`` such as ``10m``, ``1h30m`` or ``2w`` as a ``timedelta``.

    Units: ``w``eeks, ``d``ays, ``h``ours, ``m``inutes, ``s``econds, each
    at most once, largest first. Raises ``ValueError`` naming the forms.
    """
    forms = "a duration such as 90s, 10m, 1h30m, 2d or 1w (units w, d, h, m, s)"
    parts = _DURATION_PART.findall(text.strip())
    units = [unit for _, unit in parts]
    if (
        not parts
        or "".join(f"{number}{unit}" for number, unit in parts) != text.strip()
        or units != sorted(set(units), key="wdhms".index)
    ):
        raise ValueError(f"{text!r} is not {forms}")
    try:
        return timedelta(**{_UNITS[unit]: int(number) for number, unit in parts})
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any stream's history") from None


def ago(duration: timedelta, now: datetime | None = None) -> datetime:
    """The aware UTC time ``duration`` before ``now`` (default: the clock's now).

    A duration reaching back before the year 1 means "from the start": the
    Unix epoch, before every message.
    """
    now = now or datetime.now(UTC)
    try:
        return now - duration
    except OverflowError:
        return datetime.fromtimestamp(0, UTC)
