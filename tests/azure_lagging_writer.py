"""A writer whose checkpoint updates never land, for tests to SIGKILL.

    python -m tests.azure_lagging_writer CONNECTION_STRING STREAM COUNT

Appends COUNT one-message batches (values ``b"m0"``, ``b"m1"`` ...) to
STREAM on Azure with every checkpoint update held back
(``tests.azure_observed``): each append is acknowledged once its Put Page
returned, so the stored checkpoint stays where it was. Prints ``ACK <n>``
after each append and ``HELD <n>`` (checkpoint updates held) once done,
then waits to be killed (at most ``WAIT`` seconds).
"""

from __future__ import annotations

import sys
import time

from messagevault import Writer
from tests.azure_observed import observed_storage

WAIT = 60.0


def value(number: int) -> bytes:
    return b"m%d" % number


def main(argv: list[str]) -> int:
    connection_string, stream, count = argv[0], argv[1], int(argv[2])
    storage, transport = observed_storage(connection_string)
    transport.hold()
    writer = Writer.open(storage, stream)
    for number in range(count):
        writer.append([(b"k", value(number))])
        print(f"ACK {number}", flush=True)
    print(f"HELD {transport.held}", flush=True)
    time.sleep(WAIT)
    return 1  # never killed: the test failed to


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
