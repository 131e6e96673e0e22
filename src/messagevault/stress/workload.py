"""What a stress run does (``Plan``) and the messages it sends, which can be checked byte for byte.

Each value starts with a 20-byte header, then filler::

    offset  size  field
    0       8     send time: time.monotonic_ns() as the producer built the batch
    8       4     producer id (0-based)
    12      8     the producer's own sequence number of the message (0-based)
    20      ...   filler: value_size - 20 bytes of a fixed pseudo-random pattern,
                  starting at an offset derived from producer and sequence

The key is ``p<producer>``. All of it but the send time follows from the
producer and its sequence, so the read-back can check every byte of every
message but those eight, and the order of each producer's messages; the
send time, the same for a whole batch, is checked for what can be known of
it (one per batch, never decreasing per producer, within the run) and gives
the end-to-end latency of whoever sees the message (the same process, so one
monotonic clock).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

from messagevault.format import MAX_BATCH_COUNT, MAX_FRAME_SIZE

HEADER: Final = struct.Struct("<QIQ")
MIN_VALUE_SIZE: Final = HEADER.size
MAX_VALUE_SIZE: Final = 1024 * 1024
MAX_PRODUCERS: Final = 256
MAX_STREAMS: Final = 64
MAX_CONSUMERS: Final = 64
MAX_DURATION: Final = 24 * 3600.0
MAX_COUNT: Final = 1_000_000_000
MAX_BATCH_SIZE: Final = MAX_BATCH_COUNT
_PATTERN_PERIOD: Final = 251  # a prime: neighbouring messages get different fillers
# Bytes a message adds to a frame beyond its key and value (lengths), and the frame's own.
_MESSAGE_OVERHEAD: Final = 8
_FRAME_OVERHEAD: Final = 128
READ_FROM: Final = ("storage", "server")
FSYNC: Final = ("always", "batch", "never")


class PlanError(ValueError):
    """An option out of range or options that do not go together (one line, for the user)."""


@dataclass(frozen=True)
class Plan:
    """The shape of a run; ``check()`` raises ``PlanError`` on anything out of bounds."""

    producers: int = 1
    streams: int = 1
    batch_size: int = 100
    value_size: int = 100
    duration: float | None = 10.0  # seconds; None when ``count`` bounds the run
    count: int | None = None  # messages in all
    consumers: int = 1
    read_from: str = "storage"
    stream_prefix: str = "stress"

    def check(self) -> Plan:
        bounds = (
            ("--producers", self.producers, 1, MAX_PRODUCERS),
            ("--streams", self.streams, 1, MAX_STREAMS),
            ("--batch-size", self.batch_size, 1, MAX_BATCH_SIZE),
            ("--value-size", self.value_size, MIN_VALUE_SIZE, MAX_VALUE_SIZE),
            ("--consumers", self.consumers, 0, MAX_CONSUMERS),
        )
        for flag, value, low, high in bounds:
            if not low <= value <= high:
                raise PlanError(f"{flag} must be {low}-{high:,}, not {value:,}")
        if (self.duration is None) == (self.count is None):
            raise PlanError("give --duration or --count, not both")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION:
            raise PlanError(f"--duration must be more than 0 and at most {MAX_DURATION:g} s")
        if self.count is not None and not 1 <= self.count <= MAX_COUNT:
            raise PlanError(f"--count must be 1-{MAX_COUNT:,}, not {self.count:,}")
        if self.streams > self.producers:
            raise PlanError(
                f"--streams {self.streams} needs at least as many --producers "
                f"(each stream gets its own; {self.producers} given)"
            )
        frame = self.batch_size * (self.value_size + self.key_size + _MESSAGE_OVERHEAD)
        if frame + _FRAME_OVERHEAD > MAX_FRAME_SIZE:
            raise PlanError(
                f"a batch of {self.batch_size:,} x {self.value_size:,} B is more than the "
                f"{MAX_FRAME_SIZE // (1024 * 1024)} MiB a batch may be: lower --batch-size "
                "or --value-size"
            )
        if self.read_from not in READ_FROM:
            raise PlanError(f"--read-from must be one of {', '.join(READ_FROM)}")
        return self

    @property
    def key_size(self) -> int:
        return len(key_of(self.producers - 1))

    def stream_of(self, producer: int) -> str:
        return self.stream_name(producer % self.streams)

    def stream_name(self, index: int) -> str:
        return f"{self.stream_prefix}-{index}"

    def quota(self, producer: int) -> int | None:
        """Messages producer ``producer`` sends in a ``count`` run (``None``: until time is up)."""
        if self.count is None:
            return None
        share, extra = divmod(self.count, self.producers)
        return share + (producer < extra)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def key_of(producer: int) -> bytes:
    return b"p%d" % producer


class MessageSource(Protocol):
    """What producers send: ``Values``, or a benchmark's messages held ready."""

    def batch(
        self, producer: int, first: int, count: int, sent_ns: int
    ) -> Sequence[tuple[bytes, bytes]]:
        """``count`` messages of ``producer`` from its sequence ``first``, sent at ``sent_ns``."""
        ...


class Values:
    """Builds and checks the values of a plan's messages (see the module's layout)."""

    def __init__(self, value_size: int) -> None:
        self.filler_size = value_size - HEADER.size
        pattern = random.Random(20261203).randbytes(  # noqa: S311 - filler, not secrets
            self.filler_size + _PATTERN_PERIOD
        )
        self._pattern = pattern

    def _filler(self, producer: int, sequence: int) -> bytes:
        start = (producer * 7919 + sequence) % _PATTERN_PERIOD
        return self._pattern[start : start + self.filler_size]

    def batch(
        self, producer: int, first: int, count: int, sent_ns: int
    ) -> list[tuple[bytes, bytes]]:
        """``count`` messages of ``producer`` from its sequence ``first``, stamped ``sent_ns``."""
        key, pack, filler = key_of(producer), HEADER.pack, self._filler
        return [
            (key, pack(sent_ns, producer, sequence) + filler(producer, sequence))
            for sequence in range(first, first + count)
        ]

    def problem(self, key: bytes, value: bytes) -> str | None:
        """What is wrong with one message's key and value, or ``None``; the header must parse."""
        if len(value) != HEADER.size + self.filler_size:
            return f"value of {len(value)} bytes, not {HEADER.size + self.filler_size}"
        _, producer, sequence = HEADER.unpack_from(value)
        if key != key_of(producer):
            return f"key {key[:40]!r}, not {key_of(producer)!r}"
        if value[HEADER.size :] != self._filler(producer, sequence):
            return "value bytes differ from what was sent"
        return None


def header_of(value: bytes) -> tuple[int, int, int] | None:
    """(send time ns, producer, sequence) of a value, or ``None`` if it is too short to be ours."""
    if len(value) < HEADER.size:
        return None
    sent_ns, producer, sequence = HEADER.unpack_from(value)
    return sent_ns, producer, sequence
