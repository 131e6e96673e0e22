"""Child process of the crash test: appends deterministic batches until it is killed.

Run as ``python tests/crash_writer.py STORAGE SEED FSYNC SIZES``. STORAGE is a
storage URL for ``open_storage`` (``file:/path`` or ``azure:<connection
string>``); FSYNC is the file backend's fsync policy (ignored elsewhere);
SIZES names an entry of ``SIZES`` (how large the batches are). It opens the
stream ``crash-test`` with ``takeover=True``, works out from the committed
data which batch comes next, prints ``READY <next_batch> <committed_length>``,
then appends batch after batch and prints ``ACK <batch> <frame_position>
<base_sequence> <count> <committed_length>`` once each ``append`` has
returned. The content of a batch is a pure function of (SEED, SIZES, batch
number), so the test can regenerate it and compare byte for byte without the
child ever telling it what it wrote.

The test imports ``batch_messages``, ``batch_number`` and ``SIZES`` from
here, so the two sides cannot disagree about the content.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

from messagevault import Reader, Writer
from messagevault.storage import open_storage
from messagevault.storage.base import Storage

STREAM = "crash-test"

MiB = 1024 * 1024


@dataclass(frozen=True)
class BatchSizes:
    """How large the batches of one crash test are."""

    large_share: float  # probability that a batch is large
    large_total: tuple[int, int]  # bytes of values in a large batch
    large_count: tuple[int, int]  # messages in a large batch
    small_count: tuple[int, int]
    small_value: tuple[int, int]


SIZES = {
    # Every ~5th batch is large enough (5-7 MiB) to need two 4 MiB storage
    # writes, which opens a window where a kill leaves a torn frame past the
    # checkpoint. Each value stays below the 4 MiB value limit.
    "file": BatchSizes(0.2, (5 * MiB, 7 * MiB), (2, 8), (1, 200), (10, 2000)),
    # Azurite writes a few hundred MB/s at best, so large batches are rarer and
    # only just over 4 MiB: still two Put Page calls, so a kill can land between
    # them, but a whole crash round stays around a second.
    "azure": BatchSizes(0.1, (4 * MiB + 256 * 1024, 5 * MiB), (2, 4), (1, 100), (10, 2000)),
}
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


def batch_messages(
    seed: int, batch_no: int, sizes: BatchSizes = SIZES["file"]
) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of batch ``batch_no``: the same in every process."""
    # A str seed is hashed with SHA-512, independent of PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{batch_no}")
    if rng.random() < sizes.large_share:
        total = rng.randint(*sizes.large_total)
        count = rng.randint(*sizes.large_count)
        values = [total // count] * count
        values[-1] += total - sum(values)
        pattern = rng.randbytes(LARGE_PATTERN)
    else:
        count = rng.randint(*sizes.small_count)
        values = [rng.randint(*sizes.small_value) for _ in range(count)]
        pattern = rng.randbytes(SMALL_PATTERN)
    source = pattern * (max(values) // len(pattern) + 2)
    messages = []
    for index, size in enumerate(values):
        start = rng.randrange(len(pattern))
        messages.append((batch_key(batch_no, index), source[start : start + size]))
    return messages


def next_batch_number(storage: Storage, writer: Writer) -> int:
    """One past the batch of the last committed frame (0 for an empty stream)."""
    checkpoint = writer.checkpoint
    if checkpoint.length == 0:
        return 0
    with Reader.open(storage, STREAM) as reader:
        last = next(iter(reader.read(checkpoint.last_frame_position)))
    return batch_number(last.key) + 1


def main(argv: list[str]) -> int:
    url, seed_text, fsync, sizes_name = argv
    seed = int(seed_text)
    sizes = SIZES[sizes_name]
    storage = open_storage(url, fsync=fsync)
    deadline = time.monotonic() + MAX_RUNTIME
    # takeover: the previous child was SIGKILLed, and on Azure its infinite
    # lease outlives it until broken. (On file storage the kernel already
    # dropped the dead process's lock; takeover changes nothing there.)
    with Writer.open(storage, STREAM, takeover=True) as writer:
        batch_no = next_batch_number(storage, writer)
        print(f"READY {batch_no} {writer.checkpoint.length}", flush=True)
        while time.monotonic() < deadline:
            result = writer.append(batch_messages(seed, batch_no, sizes))
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
