"""Publish order events: a batch with `publish`, then single messages through a `Producer`.

    python examples/publisher.py --stream orders --count 1000

The server and credentials come from MESSAGEVAULT_URL, MESSAGEVAULT_USER and
MESSAGEVAULT_PASSWORD (or --url).
"""

from __future__ import annotations

import argparse
import json

from messagevault.client import Client
from messagevault.producer import Producer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server URL (default: MESSAGEVAULT_URL)")
    parser.add_argument("--stream", default="orders")
    parser.add_argument("--count", type=int, default=1000, help="orders to place")
    args = parser.parse_args()

    with Client(args.url) as client:
        # A ready-made batch: one request, committed all together.
        receipts = client.publish(
            args.stream, [("ShopOpened", json.dumps({"shop": "main"}).encode())]
        )
        print(f"batch: sequence {receipts[0].sequence} at position {receipts[0].position}")

        # One message at a time: the producer batches them in the background.
        with Producer(client) as producer:
            futures = [
                producer.send(
                    args.stream,
                    json.dumps({"order": n, "amount": n % 50 + 1}).encode(),
                    key="OrderPlaced",
                )
                for n in range(args.count)
            ]
        last = futures[-1].result()
        print(f"{args.count} orders: last at sequence {last.sequence}, id {last.id.hex()}")


if __name__ == "__main__":
    main()
