"""Child process of the exactly-once restart test: appends producer batches until killed.

Run as ``python tests/idempotent_writer.py ROOT PRODUCERS SNAPSHOT_BYTES``.
It opens stream ``exactly-once`` in the data folder ROOT with a producer
table snapshot every SNAPSHOT_BYTES bytes, prints ``READY``, then appends
batches round robin for PRODUCERS producers, each carrying on from the
sequence the stream's producer table says it reached, and prints
``ACK <producer> <sequence> <frame_position> <base_sequence> <count>`` once
each append has returned. A batch's content is a pure function of (producer,
sequence), ``batch_for``, so the test can send the very same batch again.
"""

from __future__ import annotations

import sys

from messagevault import Writer
from messagevault.format import EncodedBatch, encode_batch
from messagevault.storage import FileStorage

STREAM = "exactly-once"


def producer_id(index: int) -> bytes:
    return bytes([index + 1]) * 16


def batch_for(index: int, sequence: int) -> EncodedBatch:
    """Batch ``sequence`` of producer ``index``: 1-5 messages naming both, of varied sizes."""
    count = 1 + (index + sequence) % 5
    messages = [
        (f"p{index}", f"{index}:{sequence}:{n}:".encode() + b"x" * ((sequence * 37 + n) % 300))
        for n in range(count)
    ]
    return encode_batch(messages).with_producer(producer_id(index), sequence)


def main(root: str, producers: int, snapshot_bytes: int) -> None:
    writer = Writer.open(FileStorage(root, fsync="never"), STREAM, snapshot_interval=snapshot_bytes)
    following = []
    for index in range(producers):
        last = writer.producers.get(producer_id(index))
        following.append(0 if last is None else last.sequence + 1)
    print("READY", flush=True)
    turn = 0
    while True:
        index = turn % producers
        sequence = following[index]
        result = writer.append_batches([batch_for(index, sequence)])[0]
        following[index] += 1
        turn += 1
        print(
            f"ACK {index} {sequence} {result.frame_position} {result.base_sequence} "
            f"{result.message_count}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
