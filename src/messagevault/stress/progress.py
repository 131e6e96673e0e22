"""Live progress of a stress run: a rich status line on a terminal, plain lines otherwise.

On a terminal the line is redrawn every second (rates of the last second,
ack and end-to-end p99 so far); when stdout is not a terminal (a log, CI) a
plain line goes to stderr every ``PLAIN_EVERY`` seconds, so that a long run
is never silent and the table on stdout stays clean.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Final

from rich.console import Console
from rich.live import Live
from rich.text import Text

from messagevault.stress.stats import Recorder, Second

PLAIN_EVERY: Final = 5.0  # seconds between plain progress lines (the first after one second)


def progress_line(point: Second, recorder: Recorder, total: str, width: int = 200) -> str:
    """Rates of the last second, ack p99 so far, end-to-end p99 of the last second (the lag).

    Within ``width`` characters: the least telling fields go first when narrow.
    """
    ack = recorder.write.latency
    parts = [  # (rank: lower is dropped later, text)
        (0, f"{point.t:5.0f} s"),
        (1, f"sent {recorder.write.messages:,}{total}"),
        (0, f"write {point.write_msgs_per_s:,.0f}/s"),
        (4, f"{point.write_mb_per_s:,.1f} MB/s"),
        (2, f"ack p99 {ack.percentile_ms(99):.1f} ms" if ack.count else "ack p99 -"),
    ]
    if recorder.seen.messages:
        lag = "-" if point.e2e_p99_ms is None else f"{point.e2e_p99_ms:.1f} ms"
        parts += [(5, f"read {point.read_msgs_per_s:,.0f}/s"), (3, f"e2e p99 {lag}")]
    line = "  ".join(text for _, text in parts)
    while len(line) > width and len(parts) > 1:
        parts.remove(max(parts, key=lambda part: part[0]))
        line = "  ".join(text for _, text in parts)
    return line[:width]


class LiveProgress:
    """A context manager; call ``update(point)`` once a second from the event loop."""

    def __init__(
        self, recorder: Recorder, total: int | None, *, terminal: bool | None = None
    ) -> None:
        self._recorder = recorder
        self._total = f"/{total:,}" if total else ""
        self._terminal = sys.stdout.isatty() if terminal is None else terminal
        self._live: Live | None = None
        self._last_plain = -PLAIN_EVERY  # the first second gets a line

    def __enter__(self) -> LiveProgress:
        if self._terminal:
            self._live = Live(
                Text("starting..."), console=Console(), refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        return self

    def update(self, point: Second) -> None:
        if self._live is not None:
            # One line less than the width: a full-width line wraps on some terminals.
            width = self._live.console.width - 1
            line = progress_line(point, self._recorder, self._total, width)
            self._live.update(Text(line))
        elif point.t - self._last_plain >= PLAIN_EVERY:
            self._last_plain = point.t
            print(progress_line(point, self._recorder, self._total), file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line about a phase (draining, read-back), shown either way."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
