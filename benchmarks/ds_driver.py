"""benchmarks/peers.py's driver for a Durable Streams server: the protocol over HTTP/1.1.

The same driver races the protocol's Node reference server and MessageVault's
``/v1/stream/`` endpoint, so the two differ only in the server. It is a plain
Python client, as a Durable Streams user without an official Python client
library would write one with the standard library:

  * one stream per case (every case has a fresh server), created with
    ``Content-Type: application/json``;
  * each batch is one POST of a JSON array of ``{"key": ..., "value": ...}``
    objects (the protocol stores each array element as a message), from an
    idempotent producer: each lane (one producer thread, a persistent
    connection of its own) sends ``Producer-Id`` / ``Producer-Epoch: 0`` /
    ``Producer-Seq`` 0, 1, 2..., as MessageVault's own client sends a
    producer id with every publish; its answer must be 200 echoing that seq;
  * the read is catch-up GETs from offset ``-1``, each at the previous
    answer's ``Stream-Next-Offset``, until one says ``Stream-Up-To-Date``;
    every element is decoded (msgspec) to its key and value;
  * the protocol counts no messages: ``stored`` is what the read found once a
    HEAD confirms that the stream ends where the read ended.
Keys and values must be ASCII, which the workloads' are: JSON carries them as text.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import msgspec

Batch = list[tuple[bytes, bytes]]
ROOT = "/v1/stream/"
JSON = "application/json"
WARMUP = "warmup"
# A connection the server closed while idle (Node closes keep-alive ones after
# 5 s): the request is sent once more on a new connection. Safe for appends
# too, which carry producer headers: a repeat the server already has is a 204.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """One message as the benchmark writes it: an element of a POSTed array."""

    key: str
    value: str


_encode = msgspec.json.Encoder().encode
_decode_page = msgspec.json.Decoder(list[Record]).decode


class ProtocolError(SystemExit):
    """The server answered outside the protocol (or the benchmark's expectations)."""


class Connection:
    """One persistent HTTP/1.1 connection to the server, used by one thread at a time."""

    def __init__(self, base_url: str, name: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(
                f"{name}: a Durable Streams URL must be http://HOST:PORT, not {base_url}"
            )
        self.host, self.port = parts.hostname, parts.port or 80
        self.name = name
        self.http = http.client.HTTPConnection(self.host, self.port, timeout=300)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes, bool]:
        """Status, headers, body; and whether it went twice (the first connection was stale)."""
        for attempt in range(2):
            try:
                self.http.request(method, path, body=body, headers=headers or {})
                answer = self.http.getresponse()
                return answer.status, answer.headers, answer.read(), attempt > 0
            except STALE_CONNECTION:
                self.http.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def _refused(name: str, what: str, status: int, body: bytes) -> ProtocolError:
    text = body.decode(errors="replace").strip().splitlines()[:1] or [""]
    return ProtocolError(f"{name}: {what} answered {status} {text[0][:200]}")


class Producer:
    """An idempotent producer on its own connection: epoch 0, seq 0, 1, 2... per batch."""

    def __init__(self, base_url: str, path: str, name: str) -> None:
        self.connection = Connection(base_url, name)
        self.path = path
        self.name = name
        self.id = f"bench-{uuid.uuid4()}"
        self.seq = 0

    def send(self, batch: Batch) -> None:
        body = _encode([Record(k.decode("ascii"), v.decode("ascii")) for k, v in batch])
        headers = {
            "Content-Type": JSON,
            "Producer-Id": self.id,
            "Producer-Epoch": "0",
            "Producer-Seq": str(self.seq),
        }
        status, answer, text, repeated = self.connection.request("POST", self.path, body, headers)
        # 204: a duplicate, which only a repeat on a fresh connection may be.
        if not (status == 200 or (status == 204 and repeated)):
            raise _refused(self.name, f"POST of producer seq {self.seq}", status, text)
        if answer.get("Producer-Epoch") != "0" or answer.get("Producer-Seq") != str(self.seq):
            raise ProtocolError(
                f"{self.name}: the append of seq {self.seq} was acknowledged as epoch "
                f"{answer.get('Producer-Epoch')} seq {answer.get('Producer-Seq')}"
            )
        self.seq += 1

    def close(self) -> None:
        self.connection.close()


class DurableStreamsDriver:
    """peer_systems.Driver over the Durable Streams protocol at ``base_url``."""

    def __init__(self, base_url: str, name: str, stream: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.path = ROOT + stream
        self.reader = Connection(self.base_url, name)
        self.stopping = threading.Event()
        self.read_offset: str | None = None  # where the last read ended
        self.read_count = 0

    async def open(self) -> None:
        def warm_up() -> None:
            self._create(self.path)
            self._create(ROOT + WARMUP)
            warmup = Producer(self.base_url, ROOT + WARMUP, self.name)
            try:
                warmup.send([(b"k", b"v")])
            finally:
                warmup.close()

        await asyncio.to_thread(warm_up)

    def _create(self, path: str) -> None:
        status, _, text, _ = self.reader.request("PUT", path, headers={"Content-Type": JSON})
        if status != 201:  # each case has a fresh server: the stream is new
            raise _refused(self.name, f"PUT {path}", status, text)

    async def write(self, lanes: list[list[Batch]], latencies: list[float] | None) -> None:
        """A thread per lane, each one producer; on Ctrl-C they stop after their current batch."""
        producers = [Producer(self.base_url, self.path, self.name) for _ in lanes]

        def write_all() -> None:
            with ThreadPoolExecutor(len(lanes)) as pool:
                sent = [
                    pool.submit(self.lane, producer, lane, latencies)
                    for producer, lane in zip(producers, lanes, strict=True)
                ]
                for each in sent:
                    each.result()

        try:
            await asyncio.to_thread(write_all)
        except asyncio.CancelledError:
            self.stopping.set()
            raise
        finally:
            for producer in producers:
                producer.close()

    def lane(self, producer: Producer, lane: list[Batch], latencies: list[float] | None) -> None:
        for batch in lane:
            if self.stopping.is_set():
                return
            started = time.perf_counter()
            try:
                producer.send(batch)
            except BaseException:
                self.stopping.set()  # the other lanes stop too: the case has failed
                raise
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    async def read(self, expected: int) -> tuple[list[bytes], list[bytes]]:
        return await asyncio.to_thread(self._read_all)

    def _read_all(self) -> tuple[list[bytes], list[bytes]]:
        keys: list[bytes] = []
        values: list[bytes] = []
        offset = "-1"
        while True:
            status, answer, body, _ = self.reader.request("GET", f"{self.path}?offset={offset}")
            if status != 200:
                raise _refused(self.name, f"GET at offset {offset}", status, body)
            try:
                page = _decode_page(body)
            except msgspec.ValidationError as error:
                raise ProtocolError(f"{self.name}: the read at offset {offset}: {error}") from None
            keys += [record.key.encode() for record in page]
            values += [record.value.encode() for record in page]
            following = answer.get("Stream-Next-Offset")
            if following is None:
                raise ProtocolError(f"{self.name}: a read without Stream-Next-Offset")
            if answer.get("Stream-Up-To-Date") == "true":
                self.read_offset, self.read_count = following, len(keys)
                return keys, values
            if following == offset or not page:
                raise ProtocolError(
                    f"{self.name}: the read at offset {offset} brought nothing and is not "
                    "up to date"
                )
            offset = following

    async def read_json(self, expected: int) -> tuple[list[bytes], list[bytes]] | None:
        return None  # the read above is the JSON read; the table sets it against both

    async def stored(self) -> int:
        def tail() -> str | None:
            status, answer, body, _ = self.reader.request("HEAD", self.path)
            if status != 200:
                raise _refused(self.name, "HEAD", status, body)
            return answer.get("Stream-Next-Offset")

        end = await asyncio.to_thread(tail)
        if end != self.read_offset:
            raise ProtocolError(
                f"{self.name}: HEAD says the stream ends at offset {end}, the read ended at "
                f"{self.read_offset}"
            )
        return self.read_count

    async def close(self) -> None:
        self.reader.close()
