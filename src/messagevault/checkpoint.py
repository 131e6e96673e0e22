"""A stream's checkpoint: its committed length and counters (format v1 and v2).

docs/FORMAT.md has the field table. A backend stores these 64 bytes (file,
memory) or the same fields in blob metadata (Azure). Version 2 is version 1
plus ``first_position``, written only once a stream has been trimmed: a
reader that predates trimming refuses such a checkpoint (``UnsupportedVersion``)
rather than reading released bytes as if they were frames.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from messagevault.errors import CorruptData, UnsupportedVersion
from messagevault.format import CHECKPOINT_V1, CHECKPOINT_VERSION

CHECKPOINT_MAGIC: Final = b"MVCP"
CHECKPOINT: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVCP"
    "B"  # format version: 1, or 2 once trimmed
    "3x"  # reserved, zero
    "Q"  # commit: number of commits so far; orders the two file slots
    "Q"  # length: committed bytes of stream data
    "Q"  # next sequence: number of committed messages
    "Q"  # last frame position: start of the last committed frame (0 if empty)
    "Q"  # last timestamp: timestamp of the last committed frame, ms (0 if empty)
    "Q"  # first position: the first readable byte (v2; 0 in v1, which has zero here)
    "4x"  # reserved, zero
)
CHECKPOINT_CRC: Final = struct.Struct("<I")  # CRC-32 of bytes [0, 60)
CHECKPOINT_SIZE: Final = CHECKPOINT.size + CHECKPOINT_CRC.size

assert CHECKPOINT_SIZE == 64


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The committed state of a stream. Readers never read past ``length``."""

    commit: int = 0
    length: int = 0
    next_sequence: int = 0
    last_frame_position: int = 0
    last_timestamp: int = 0
    # Bytes below this were trimmed (released): reads there are refused. A
    # frame boundary at or below ``length``; 0 for a stream never trimmed.
    first_position: int = 0

    @property
    def version(self) -> int:
        """The format version this checkpoint is stored as: 2 only once trimmed."""
        return CHECKPOINT_VERSION if self.first_position else CHECKPOINT_V1

    def encode(self) -> bytes:
        body = CHECKPOINT.pack(
            CHECKPOINT_MAGIC,
            self.version,
            self.commit,
            self.length,
            self.next_sequence,
            self.last_frame_position,
            self.last_timestamp,
            self.first_position,
        )
        return body + CHECKPOINT_CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Checkpoint:
        if len(raw) != CHECKPOINT_SIZE:
            raise CorruptData(f"checkpoint is {len(raw)} bytes, expected {CHECKPOINT_SIZE}")
        magic, version, *values = CHECKPOINT.unpack_from(raw)
        (stored_crc,) = CHECKPOINT_CRC.unpack_from(raw, CHECKPOINT.size)
        if magic != CHECKPOINT_MAGIC:
            raise CorruptData(f"not a checkpoint (magic {magic!r})")
        if zlib.crc32(memoryview(raw)[: CHECKPOINT.size]) != stored_crc:
            raise CorruptData("checkpoint CRC mismatch")
        if version not in (CHECKPOINT_V1, CHECKPOINT_VERSION):
            raise UnsupportedVersion(
                f"checkpoint has format version {version}; this MessageVault reads "
                f"{CHECKPOINT_V1}-{CHECKPOINT_VERSION}"
            )
        checkpoint = cls(*values)
        if version == CHECKPOINT_V1 and checkpoint.first_position:
            raise CorruptData("a version 1 checkpoint has a first position")
        if checkpoint.first_position > checkpoint.length:
            raise CorruptData(
                f"checkpoint's first position {checkpoint.first_position} is past its "
                f"length {checkpoint.length}"
            )
        return checkpoint
