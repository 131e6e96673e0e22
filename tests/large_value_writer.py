"""Child process of the torn-large-value test: a 64 MiB value, killed part way through.

Run as ``python tests/large_value_writer.py FOLDER ROUND STOP``. It opens the
stream ``big`` of file storage FOLDER, appends ``small-ROUND`` and prints
``READY <committed length>``, then appends ``large-ROUND``, a 64 MiB value
(``pattern_value(64 MiB, ROUND)``: 17 storage writes of 4 MiB),
printing ``WROTE <n>`` after each storage write and ``ACK`` once committed.
With STOP > 0 it stops after write STOP and waits to be killed, so that the
SIGKILL lands exactly there, before the commit; it never runs more than a
minute. The test imports ``pattern_value`` from here: both sides make the
same value.
"""

from __future__ import annotations

import random
import sys
import time

from messagevault import FileStorage, Writer
from messagevault.storage.base import StreamStore

STREAM = "big"
MiB = 1024 * 1024
MAX_RUNTIME = 60.0
# A prime-length random pattern, tiled: cheap to make, and a piece cut or
# placed wrongly never lines up with a power of two to compare equal.
PATTERN = 65521


def pattern_value(size: int, seed: int) -> bytes:
    """``size`` bytes that depend on ``seed``, the same in every process."""
    pattern = random.Random(seed).randbytes(PATTERN)
    return (pattern * (size // PATTERN + 1))[:size]


class ReportingStore:
    """Says after each storage write how many were made; stops after ``stop`` of them."""

    def __init__(self, store: StreamStore, stop: int) -> None:
        self._store = store
        self._stop = stop
        self.writes = 0
        self.reporting = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._store.write(offset, data)
        if self.reporting:
            self.writes += 1
            print(f"WROTE {self.writes}", flush=True)
            if self.writes == self._stop:
                time.sleep(MAX_RUNTIME)  # killed here, mid-commit
                sys.exit(3)


def main(folder: str, round_number: int, stop: int) -> int:
    storage = FileStorage(folder)
    store = ReportingStore(storage.open_stream(STREAM, write=True, create=True), stop)
    with Writer(store, STREAM) as writer:  # type: ignore[arg-type]
        writer.append([(b"small-%d" % round_number, b"s")])
        print(f"READY {writer.checkpoint.length}", flush=True)
        value = pattern_value(64 * MiB, round_number)
        store.reporting = True
        writer.append([(b"large-%d" % round_number, value)])
        print("ACK", flush=True)
        time.sleep(MAX_RUNTIME)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
