"""How often a follower reading storage directly looks for new commits.

Each look is a checkpoint read: on Azure a billed request. Polling every
0.1 s for ever costs ~860,000 requests a day per idle follower, so while a
stream stays idle the wait doubles, up to a ceiling, and drops back to the
first interval as soon as a look finds new data. With the defaults an idle
follower makes at most one request every 2 s after its first ~3 s of
quiet, and a message after a long silence is seen within 2 s.

Every surface that polls (``Reader.follow``, the consumers' storage feed,
the CLI's ``--poll``/``--max-poll``) validates its options here.
"""

from __future__ import annotations

from messagevault.errors import InvalidInput

DEFAULT_POLL_INTERVAL = 0.1
DEFAULT_MAX_POLL_INTERVAL = 2.0
# Longer than this and "following" is no longer what the caller gets.
MAX_POLL_INTERVAL = 60.0


def interval_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a polling interval in seconds, or ``None``."""
    # bool is an int, but True seconds is a mistake; NaN fails the comparison.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number of seconds, not {type(value).__name__}"
    if not 0 < value <= MAX_POLL_INTERVAL:
        return f"must be more than 0 and at most {MAX_POLL_INTERVAL:.0f} seconds"
    return None


def ceiling_of(poll_interval: float, max_poll_interval: float | None) -> float:
    """The ceiling that applies: the one given, else the default (or the first interval, if longer).

    A caller who asked only for a slow first interval (say 5 s) keeps
    polling at it rather than being refused for exceeding a default.
    """
    if max_poll_interval is not None:
        return max_poll_interval
    return max(DEFAULT_MAX_POLL_INTERVAL, poll_interval)


def check_poll_options(
    poll_interval: object,
    max_poll_interval: object,
    *,
    names: tuple[str, str] = ("poll_interval", "max_poll_interval"),
) -> tuple[float, float]:
    """The validated (first interval, ceiling); ``InvalidInput`` naming the option otherwise.

    ``max_poll_interval`` ``None`` means the default ceiling (see ``ceiling_of``).
    """
    first_name, ceiling_name = names
    problem = interval_problem(poll_interval)
    if problem is not None:
        raise InvalidInput(f"{first_name} {problem}, not {poll_interval!r}")
    assert isinstance(poll_interval, int | float)
    if max_poll_interval is not None:
        problem = interval_problem(max_poll_interval)
        if problem is not None:
            raise InvalidInput(f"{ceiling_name} {problem}, not {max_poll_interval!r}")
        assert isinstance(max_poll_interval, int | float)
        if max_poll_interval < poll_interval:
            raise InvalidInput(
                f"{ceiling_name} ({max_poll_interval!r}) must be at least "
                f"{first_name} ({poll_interval!r}): it is the longest wait between polls"
            )
    first = float(poll_interval)
    ceiling = ceiling_of(first, None if max_poll_interval is None else float(max_poll_interval))
    return first, ceiling


class PollBackoff:
    """The wait before each poll of a follower: doubled after every empty poll, up to a ceiling.

    >>> backoff = PollBackoff(0.1, 2.0)
    >>> [backoff.idle() for _ in range(7)]
    [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    >>> backoff.found()
    >>> backoff.idle()
    0.1

    Pure: it never reads a clock or sleeps, so the follower decides how to
    wait and tests can replay the sequence exactly.
    """

    def __init__(
        self,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = None,
        *,
        names: tuple[str, str] = ("poll_interval", "max_poll_interval"),
    ) -> None:
        self.poll_interval, self.max_poll_interval = check_poll_options(
            poll_interval, max_poll_interval, names=names
        )
        self._next = self.poll_interval

    def idle(self) -> float:
        """A poll found nothing new: how long to wait before the next one."""
        wait = self._next
        self._next = min(wait * 2, self.max_poll_interval)
        return wait

    def found(self) -> None:
        """A poll found new data: polls are frequent again while data flows."""
        self._next = self.poll_interval
