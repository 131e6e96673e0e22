"""Child process of the trim crash test: appends, then dies inside a trim.

Run as ``python tests/trim_crash_writer.py STORAGE``. It appends ``BATCHES``
batches to the stream ``trim-crash`` (``ACK <frame_position> <base_sequence>
<count>`` after each), then trims below batch ``CUT``. The trim's checkpoint
commit goes through; its release does not: the store's ``release`` prints
``COMMITTED <first_position>`` and waits to be killed, which is what a crash
between the two leaves behind.
"""

from __future__ import annotations

import os
import sys
import time

from messagevault import Writer
from messagevault.storage import open_storage

STREAM = "trim-crash"
BATCHES = 24
CUT = 16
VALUE_SIZE = 48 * 1024  # a few filesystem blocks per batch: a hole is measurable


def value(batch: int, index: int) -> bytes:
    return bytes([batch % 251]) * VALUE_SIZE + b"%d/%d" % (batch, index)


def main() -> None:
    storage = open_storage(sys.argv[1])
    writer = Writer.open(storage, STREAM)
    for batch in range(BATCHES):
        result = writer.append([(b"k", value(batch, index)) for index in range(batch % 3 + 1)])
        print(f"ACK {result.frame_position} {result.base_sequence} {result.message_count}")
        sys.stdout.flush()
    store = writer._store  # the seam this test kills the process in
    settle = store.read_checkpoint  # as a release does first: the trim's checkpoint lands

    def die_before_release(below: int) -> int:
        assert settle().first_position == below
        print(f"COMMITTED {below}")
        sys.stdout.flush()
        time.sleep(60)  # killed long before this ends
        os._exit(3)

    store.release = die_before_release  # type: ignore[method-assign]
    writer.trim_below(sequence=writer_sequence_of_cut(writer))


def writer_sequence_of_cut(writer: Writer) -> int:
    return sum(batch % 3 + 1 for batch in range(CUT))


if __name__ == "__main__":
    main()
