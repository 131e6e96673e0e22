"""Follow a stream through the server and print each message as it is committed.

    python examples/tail.py orders            # from the end: new messages only
    python examples/tail.py orders --from 0   # everything, then keep following

Ctrl-C stops it. The server and credentials come from MESSAGEVAULT_URL,
MESSAGEVAULT_USER and MESSAGEVAULT_PASSWORD (or --url).
"""

from __future__ import annotations

import argparse
import sys

from messagevault.client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream")
    parser.add_argument("--url", help="server URL (default: MESSAGEVAULT_URL)")
    parser.add_argument("--from", dest="position", type=int, help="start position (default: end)")
    parser.add_argument("--limit", type=int, help="stop after this many messages")
    args = parser.parse_args()

    with Client(args.url) as client:
        position = args.position if args.position is not None else client.info(args.stream).length
        try:
            for count, message in enumerate(client.follow(args.stream, position), 1):
                key = message.key.decode("utf-8", "backslashreplace")
                value = message.value.decode("utf-8", "backslashreplace")
                print(f"#{message.sequence} @{message.position} {key}: {value}", flush=True)
                if args.limit is not None and count >= args.limit:
                    break
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
