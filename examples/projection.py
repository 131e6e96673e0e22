"""Count a stream's messages by key, keeping the counts and the position together.

    python examples/projection.py orders                  # through the server, for ever
    python examples/projection.py orders --until-end      # catch up, print, exit
    python examples/projection.py orders --storage ./data # straight from a data folder

A projection replays a stream into some state (here: how many messages each
key has) and keeps following it. Its counts are saved in the same document
as its position, in one atomic write (``Consumer(state=...)``), so a restart,
even after a kill -9, resumes with counts that match the position exactly:
no message counted twice, none missed.

The counts are printed as JSON when it stops (Ctrl-C, or --until-end).
The server and credentials come from MESSAGEVAULT_URL, MESSAGEVAULT_USER and
MESSAGEVAULT_PASSWORD (or --url); positions are kept in ./positions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from messagevault import Message, MessageVaultError
from messagevault.consumer import Consumer, Source
from messagevault.positions import FilePositionStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream")
    parser.add_argument("--url", help="server URL (default: MESSAGEVAULT_URL)")
    parser.add_argument("--storage", help="read storage directly instead (file:PATH, azure:...)")
    parser.add_argument("--positions", default="positions", help="folder for saved positions")
    parser.add_argument("--name", help="consumer name (default: count-by-key-STREAM)")
    parser.add_argument("--save-every", type=int, default=1000, help="messages between saves")
    parser.add_argument("--save-interval", type=float, default=5.0, help="seconds between saves")
    parser.add_argument("--until-end", action="store_true", help="stop at the end of the stream")
    args = parser.parse_args()
    try:
        counts = project(args)
    except MessageVaultError as exc:
        sys.exit(f"error: {exc}")
    json.dump(dict(sorted(counts.items())), sys.stdout, indent=1)
    print()


def project(args: argparse.Namespace) -> Counter[str]:
    if args.storage:
        from messagevault.storage import open_storage

        return count_by_key(open_storage(args.storage), args)
    from messagevault.client import Client

    with Client(args.url) as client:
        return count_by_key(client, args)


def count_by_key(source: Source, args: argparse.Namespace) -> Counter[str]:
    counts: Counter[str] = Counter()
    with Consumer(
        source,
        args.stream,
        args.name or f"count-by-key-{args.stream}",
        FilePositionStore(args.positions),
        save_every=args.save_every,
        save_interval=args.save_interval,
        state=lambda: counts,  # saved with every position, in the same write
    ) as consumer:
        saved = consumer.load()
        if saved is not None:
            counts.update(saved.state)
        where = saved.position if saved else "the beginning"
        print(f"projection: resuming at {where}", file=sys.stderr, flush=True)

        def count(message: Message) -> None:
            # Not UTF-8? Escaped, so that the key can be a JSON object key.
            counts[message.key.decode("utf-8", "backslashreplace")] += 1

        consumer.run(count, follow=not args.until_end)
    return counts


if __name__ == "__main__":
    main()
