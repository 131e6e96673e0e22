"""Format v1 of a stream's checkpoint: its committed length and counters.

docs/FORMAT.md has the field table. A backend stores these 64 bytes (file,
memory) or the same fields in blob metadata (Azure).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from messagevault.errors import CorruptData, UnsupportedVersion
from messagevault.format import CHECKPOINT_VERSION

CHECKPOINT_MAGIC: Final = b"MVCP"
CHECKPOINT: Final = struct.Struct(
    "<"
    "4s"  # magic, b"MVCP"
    "B"  # format version, 1
    "3x"  # reserved, zero
    "Q"  # commit: number of commits so far; orders the two file slots
    "Q"  # length: committed bytes of stream data
    "Q"  # next sequence: number of committed messages
    "Q"  # last frame position: start of the last committed frame (0 if empty)
    "Q"  # last timestamp: timestamp of the last committed frame, ms (0 if empty)
    "12x"  # reserved, zero
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

    def encode(self) -> bytes:
        body = CHECKPOINT.pack(
            CHECKPOINT_MAGIC,
            CHECKPOINT_VERSION,
            self.commit,
            self.length,
            self.next_sequence,
            self.last_frame_position,
            self.last_timestamp,
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
        if version != CHECKPOINT_VERSION:
            raise UnsupportedVersion(f"checkpoint has format version {version}")
        return cls(*values)
