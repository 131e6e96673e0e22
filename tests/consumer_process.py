"""Child process of the consumer crash test: consumes a stream until it is killed.

    python tests/consumer_process.py SOURCE STREAM POSITIONS LOG [options]

SOURCE is ``--url``'s server or a storage URL for ``open_storage``;
POSITIONS a folder for a ``FilePositionStore``. On start it loads its saved
position, appends ``START <position>`` to LOG (``-1`` if nothing was saved)
and prints ``READY`` on stdout. The handler appends
``<sequence> <position> <next_position>`` to LOG for every message, with one
``write`` each (no buffering in this process: a SIGKILL loses nothing that
was written), so LOG is the exact record of what was handled, in order.

``--until-end`` handles what the stream holds at start and exits 0 instead
of following. ``--batches`` uses a batch handler. ``--pause`` sleeps in the
handler before the log line, as work would: a consumer that saved a
position before its handler returned would be caught by a kill there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from messagevault.consumer import Consumer, Source
from messagevault.format import Message
from messagevault.positions import FilePositionStore

CONSUMER = "crash-consumer"
MAX_RUNTIME = 120.0  # a child the test forgot to kill must not run for ever


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", help="storage URL, or 'server' with --url")
    parser.add_argument("stream")
    parser.add_argument("positions")
    parser.add_argument("log")
    parser.add_argument("--url")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--save-interval", type=float, default=0.05)
    parser.add_argument("--batches", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--until-end", action="store_true")
    args = parser.parse_args()

    source: Source
    if args.url:
        from messagevault.client import Client

        source = Client(args.url)
    else:
        from messagevault.storage import open_storage

        source = open_storage(args.source)
    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    started = time.monotonic()
    consumer = Consumer(
        source,
        args.stream,
        CONSUMER,
        FilePositionStore(args.positions),
        save_every=args.save_every,
        save_interval=args.save_interval,
        poll_interval=0.01,
    )
    saved = consumer.load()
    os.write(log, b"START %d\n" % (saved.position if saved else -1))
    print("READY", flush=True)

    def handle(message: Message) -> None:
        if args.pause:
            time.sleep(args.pause)  # the work; the log line says it is done
        os.write(log, b"%d %d %d\n" % (message.sequence, message.position, message.next_position))
        if time.monotonic() - started > MAX_RUNTIME:
            consumer.stop()

    def handle_batch(batch: list[Message]) -> None:
        for message in batch:
            handle(message)

    if args.batches:
        consumer.run_batches(handle_batch, max_batch=50, follow=not args.until_end)
    else:
        consumer.run(handle, follow=not args.until_end)
    consumer.close()
    os.close(log)
    sys.exit(0)


if __name__ == "__main__":
    main()
