"""Child process of the crash test: appends deterministic batches until it is killed.

Run as ``python tests/crash_writer.py ROOT SEED FSYNC``. It opens the stream
``crash-test`` under ROOT, works out from the committed data which batch comes
next, prints ``READY <next_batch> <committed_length>``, then appends batch after
batch and prints ``ACK <batch> <frame_position> <base_sequence> <count>
<committed_length>`` once each ``append`` has returned. The content of a batch
is a pure function of (SEED, batch number), so the test can regenerate it and
compare byte for byte without the child ever telling it what it wrote.

The test imports ``batch_messages`` and ``batch_number`` from here, so the two
sides cannot disagree about the content.
"""

from __future__ import annotations

import random
import sys
import time

from messagevault import FileStorage, Reader, Writer

STREAM = "crash-test"

# Every ~5th batch is large enough (5-7 MiB) to need two 4 MiB storage writes,
# which opens a window where a kill leaves a torn frame past the checkpoint.
LARGE_SHARE = 0.2
LARGE_TOTAL = (5 * 1024 * 1024, 7 * 1024 * 1024)
LARGE_COUNT = (2, 8)  # each value stays below the 4 MiB value limit
SMALL_COUNT = (1, 200)
SMALL_VALUE = (10, 2000)
# Prime pattern lengths: values are tiled from a random pattern (cheap), and a
# prime period never lines up with the 4 MiB write split or any other power of
# two, so a misplaced chunk of a large value would still compare unequal.
LARGE_PATTERN = 65521
SMALL_PATTERN = 4093

KEY_PREFIX = b"batch-"

# A child the test forgot to kill must not write forever.
MAX_RUNTIME = 120.0
EXIT_NOT_KILLED = 3


def batch_key(batch_no: int, index: int) -> bytes:
    return b"%s%08d-%06d" % (KEY_PREFIX, batch_no, index)


def batch_number(key: bytes) -> int:
    """The batch number a key was made for (see ``batch_key``)."""
    if not key.startswith(KEY_PREFIX):
        raise ValueError(f"not a crash-test key: {key!r}")
    return int(key[len(KEY_PREFIX) : len(KEY_PREFIX) + 8])


def batch_messages(seed: int, batch_no: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of batch ``batch_no``: the same in every process."""
    # A str seed is hashed with SHA-512, independent of PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{batch_no}")
    if rng.random() < LARGE_SHARE:
        total = rng.randint(*LARGE_TOTAL)
        count = rng.randint(*LARGE_COUNT)
        sizes = [total // count] * count
        sizes[-1] += total - sum(sizes)
        pattern = rng.randbytes(LARGE_PATTERN)
    else:
        count = rng.randint(*SMALL_COUNT)
        sizes = [rng.randint(*SMALL_VALUE) for _ in range(count)]
        pattern = rng.randbytes(SMALL_PATTERN)
    source = pattern * (max(sizes) // len(pattern) + 2)
    messages = []
    for index, size in enumerate(sizes):
        start = rng.randrange(len(pattern))
        messages.append((batch_key(batch_no, index), source[start : start + size]))
    return messages


def next_batch_number(storage: FileStorage, writer: Writer) -> int:
    """One past the batch of the last committed frame (0 for an empty stream)."""
    checkpoint = writer.checkpoint
    if checkpoint.length == 0:
        return 0
    with Reader.open(storage, STREAM) as reader:
        last = next(iter(reader.read(checkpoint.last_frame_position)))
    return batch_number(last.key) + 1


def main(argv: list[str]) -> int:
    root, seed_text, fsync = argv
    seed = int(seed_text)
    storage = FileStorage(root, fsync=fsync)
    deadline = time.monotonic() + MAX_RUNTIME
    with Writer.open(storage, STREAM) as writer:
        batch_no = next_batch_number(storage, writer)
        print(f"READY {batch_no} {writer.checkpoint.length}", flush=True)
        while time.monotonic() < deadline:
            result = writer.append(batch_messages(seed, batch_no))
            # Only a flushed line counts as acknowledged: the test treats a
            # batch whose line it never received as in flight at the kill.
            print(
                f"ACK {batch_no} {result.frame_position} {result.base_sequence} "
                f"{result.message_count} {result.committed_length}",
                flush=True,
            )
            batch_no += 1
    return EXIT_NOT_KILLED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
