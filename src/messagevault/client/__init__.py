"""The client library: publish to and read from a MessageVault server, sync or asyncio.

    from messagevault.client import Client

    with Client("http://127.0.0.1:8080", user="app", password="...") as client:
        result = client.publish("orders", [("OrderPlaced", b'{"id": 7}')])
        for message in client.read("orders", result[0].position):
            ...
        for message in client.follow("orders", saved_position):  # for ever
            ...

``Client`` (blocking, thread-safe) and ``AsyncClient`` (asyncio) offer the
same methods: ``publish``/``publish_batch``, ``streams``, ``info``, ``read``,
``follow`` (from a position, ``from_sequence=`` or ``from_time=``), ``seek``
and ``open_reader`` (a ``Reader`` straight on the storage).

HTTP libraries, chosen by measurement: each candidate published 400 batches
of 1,000 x 100 B, one after the other, to ``messagevault serve --fsync
always`` on the same 2-core machine, three runs each, medians (msgs/s; the
raw aiohttp loop of benchmarks/http.py with pre-encoded batches did
652-662 k in the same runs):

    library              batches pre-encoded   encoded per request (as publish does)
    http.client (stdlib)       711 k                  633 k
    aiohttp                    634 k                  574 k
    urllib3                    625 k                  557 k
    httpx, sync                562 k                  488 k
    httpx, async               432 k                  383 k

So ``Client`` used the standard library's ``http.client`` with a small
connection pool of its own (no dependency, the fastest), and ``AsyncClient``
uses aiohttp, which the server already depends on; httpx would have given
both from one library at 15-40% of the throughput. For small batches
``http.client`` itself then weighed most: it sends a request's head and body
in two packets and parses each answer's headers with the ``email`` package.
``Client`` now speaks HTTP/1.1 itself (``client/http1.py``, one send per
request, answers split by hand): sequential batches of 10 x 100 B to the same
server were acknowledged in 1.05 -> 0.76 ms p50 without fsync. ``AsyncClient``
followed (``http1.AsyncConnection`` over asyncio streams instead of aiohttp's
client): 16 producers of batches of 100 x 100 B spent 350-425 -> 255-295 us
of client CPU a batch, and published 59-83 k -> 68-110 k msgs/s on a busy
machine (pairs of runs, fsync per commit).
"""

from __future__ import annotations

from messagevault.client.aio import AsyncClient
from messagevault.client.sync import Client
from messagevault.wire import StreamInfo

__all__ = ["AsyncClient", "Client", "StreamInfo"]
