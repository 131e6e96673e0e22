"""Where a consumer stands, and when it saves: shared by ``Consumer`` and ``AsyncConsumer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from messagevault.errors import InvalidInput, InvalidPosition, PositionTrimmed
from messagevault.names import validate_stream_name
from messagevault.positions import JsonValue, PositionStore, SavedPosition, validate_consumer_name

Start = Literal["beginning", "end"]
MAX_SAVE_EVERY = 1_000_000_000
MAX_SAVE_INTERVAL = 24 * 3600.0
MIN_SAVE_INTERVAL = 0.001
# The handling loop wakes at least this often (seconds) to notice a stop
# event it cannot be notified of (one the caller sets) and due timed saves.
IDLE_WAKE = 0.1


class Progress:
    """Where a consumer stands and when it saves: shared by ``Consumer`` and ``AsyncConsumer``."""

    def __init__(
        self,
        stream: str,
        name: str,
        positions: PositionStore,
        *,
        save_every: int | None,
        save_interval: float | None,
        state: Callable[[], JsonValue] | None,
        start: int | Start,
        clock: Callable[[], float],
    ) -> None:
        self.stream = validate_stream_name(stream)
        self.name = validate_consumer_name(name)
        if not isinstance(positions, PositionStore):
            raise TypeError(f"positions must be a PositionStore, not {type(positions).__name__}")
        self.positions = positions
        if save_every is None and save_interval is None:
            raise InvalidInput("give save_every, save_interval or both: when to save the position")
        if save_every is not None and (
            type(save_every) is not int or not 1 <= save_every <= MAX_SAVE_EVERY
        ):
            raise InvalidInput(
                f"save_every must be a whole number 1-{MAX_SAVE_EVERY}, not {save_every!r}"
            )
        if save_interval is not None and (
            isinstance(save_interval, bool)
            or not isinstance(save_interval, int | float)
            or not MIN_SAVE_INTERVAL <= save_interval <= MAX_SAVE_INTERVAL
        ):
            raise InvalidInput(
                f"save_interval must be {MIN_SAVE_INTERVAL}-{MAX_SAVE_INTERVAL:.0f} seconds, "
                f"not {save_interval!r}"
            )
        if state is not None and not callable(state):
            raise TypeError("state must be a function returning the state to save, or None")
        if start not in ("beginning", "end") and (type(start) is not int or start < 0):
            raise InvalidInput(
                f"start must be 'beginning', 'end' or a position (>= 0), not {start!r}"
            )
        self.save_every = save_every if save_every is not None else MAX_SAVE_EVERY + 1
        self.save_interval = save_interval
        self._state = state
        self.start = start
        self.clock = clock
        self.loaded = False
        self.saved: SavedPosition | None = None
        self.position: int | None = None  # the next message to handle
        self.unsaved = 0  # messages handled since the last save
        self.last_save = 0.0

    def accept(self, saved: SavedPosition | None) -> SavedPosition | None:
        if saved is not None and saved.stream != self.stream:
            raise InvalidInput(
                f"consumer {self.name!r} in {self.positions.describe()} follows stream "
                f"{saved.stream!r}, not {self.stream!r}: use another consumer name"
            )
        self.saved = saved
        self.loaded = True
        return saved

    def initial(self, end: Callable[[], int]) -> SavedPosition | None:
        """Where to begin: the saved position, else ``start`` (to be saved at once)."""
        if self.saved is not None:
            self.position = self.saved.position
            self.last_save = self.clock()  # the interval counts from the start of this run
            return None
        if self.start == "beginning":
            self.position = 0
        elif self.start == "end":
            self.position = end()
        else:
            self.position = self.start
        # Saved before anything is handled: a restart must not pick a new "end".
        return self.snapshot()

    def handled(self, next_position: int, count: int) -> bool:
        """Note handled messages; ``True`` if a save is due."""
        self.position = next_position
        self.unsaved += count
        return self.due()

    def due(self) -> bool:
        if not self.unsaved:
            return False
        if self.unsaved >= self.save_every:
            return True
        interval = self.save_interval
        return interval is not None and self.clock() - self.last_save >= interval

    def wait_time(self) -> float:
        """How long the loop may wait for messages before a timed save is due."""
        if not self.unsaved or self.save_interval is None:
            return IDLE_WAKE
        left = self.last_save + self.save_interval - self.clock()
        return min(max(left, 0.0), IDLE_WAKE)

    def snapshot(self) -> SavedPosition:
        assert self.position is not None
        state = self._state() if self._state is not None else None
        return SavedPosition(self.name, self.stream, self.position, state)

    def stored(self, saved: SavedPosition) -> None:
        self.saved = saved
        self.unsaved = 0
        self.last_save = self.clock()

    def resume_error(self, exc: InvalidPosition) -> InvalidPosition:
        message = (
            f"consumer {self.name!r} cannot resume at position {self.position} "
            f"(from {self.positions.describe()}): {exc}"
        )
        if isinstance(exc, PositionTrimmed):
            # Its messages are gone: only the operator can say whether to
            # skip them (save first_position as the consumer's position).
            return PositionTrimmed(message, first_position=exc.first_position)
        return InvalidPosition(message)
