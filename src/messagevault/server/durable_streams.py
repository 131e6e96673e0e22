"""The Durable Streams protocol under ``/v1/stream/{path}``: PUT, POST, GET, HEAD, DELETE.

Each Durable Streams stream is a MessageVault stream (durable_meta.py says
which, and where its metadata lives); docs/DURABLE-STREAMS.md describes the
mapping and what is not supported. Errors here answer in the protocol's
way (its status codes and headers, a one-line text body), not in the
native API's JSON shape: Durable Streams clients read the status and the
headers.

Every change to one stream (create, append, close, delete) runs under that
stream's lock on this node, so that checking the metadata (closed?
``Stream-Seq``? producer epoch?) and appending are one step. The
metadata is cached in memory per node, with when the stream was last read
or written (for a sliding ``Stream-TTL``): one server, or a cluster where
one node serves the Durable Streams routes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from messagevault.durable_meta import (
    CLOSED_KEY,
    NOW,
    START,
    DurableMeta,
    ProducerHeaders,
    ProducerState,
    closed_header,
    creation_type,
    format_offset,
    is_json,
    is_text,
    json_array,
    json_messages,
    media_type,
    meta_file,
    parse_expires_at,
    parse_fork_offset,
    parse_offset,
    parse_producer,
    parse_sub_offset,
    parse_ttl,
    producer_id_bytes,
    response_cursor,
    stream_name,
)
from messagevault.errors import (
    InvalidInput,
    InvalidPosition,
    MessageVaultError,
    PositionTrimmed,
    SequenceGap,
    StaleSequence,
    StreamNotFound,
)
from messagevault.format import Message, encode_batch, read_header
from messagevault.reader import Reader
from messagevault.retention_policy import system_files
from messagevault.server.app import HUB, LIMITS, _body, _gone, _require
from messagevault.server.hub import StreamHub
from messagevault.writer import Writer

log = logging.getLogger("messagevault.server.durable_streams")

ROOT: Final = "/v1/stream/"
FORK_COPY_BYTES: Final = 8 * 1024 * 1024  # a fork's inherited frames, copied this much at a time
LONG_POLL_SECONDS: Final = 30.0  # the reference server's; shortened by serve --max-wait
SSE_SECONDS: Final = 60.0  # an SSE answer ends after this, for CDN collapsing (section 10.2)
SAVE_DELAY: Final = 1.0  # seconds a deferred metadata save waits for more changes
NEXT_OFFSET: Final = "Stream-Next-Offset"
UP_TO_DATE: Final = "Stream-Up-To-Date"
CLOSED: Final = "Stream-Closed"
CURSOR: Final = "Stream-Cursor"
ALLOWED_HEADERS: Final = (
    "content-type, authorization, Stream-Seq, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Producer-Id, Producer-Epoch, Producer-Seq, Stream-Forked-From, Stream-Fork-Offset, "
    "Stream-Fork-Sub-Offset, If-None-Match"
)
EXPOSED_HEADERS: Final = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Producer-Epoch, "
    "Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, etag, content-type, "
    "content-encoding, vary, Stream-TTL, Stream-Expires-At, Stream-SSE-Data-Encoding"
)
COMMON_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": EXPOSED_HEADERS,
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "cross-origin",
}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Refused(Exception):
    """A protocol answer other than success: status, one line of text, headers."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}


@dataclass
class _Stream:
    meta: DurableMeta
    last_access: float  # wall clock of the last read or write (sliding TTL), this node only


class _StreamLock:
    """Shared or exclusive, exclusive first: a waiting close goes before later appends."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and not self._sharing)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class DurableStreams:
    """The protocol's state on this node: each stream's metadata and lock."""

    def __init__(self, hub: StreamHub, long_poll: float, sse_seconds: float = SSE_SECONDS) -> None:
        self.hub = hub
        # Storage without system files (memory storage) fails here, at the first request.
        self.files = system_files(hub.storage)
        self.long_poll = long_poll
        self.sse_seconds = sse_seconds
        self._streams: dict[str, _Stream] = {}
        self._locks: dict[str, _StreamLock] = {}
        # (stream, Producer-Id) -> the lock a producer's judged append holds: the
        # protocol serialises validation and append per producer, not per stream.
        self._producer_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._save_locks: dict[str, asyncio.Lock] = {}
        # Deferred metadata saves: a producer's next sequence in the same epoch is
        # saved with the next ones, within SAVE_DELAY (see ``save_soon``).
        self._saving: dict[str, tuple[_Stream, asyncio.Task[None]]] = {}

    def lock(self, stream: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The stream to oneself: creation, closing, Stream-Seq, deletion, forks, saves."""
        return self._locks.setdefault(stream, _StreamLock()).exclusive()

    def shared(self, stream: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Beside other plain and producer appends, which then share group commits."""
        return self._locks.setdefault(stream, _StreamLock()).shared()

    @contextlib.asynccontextmanager
    async def producer_lock(self, stream: str, producer: str) -> AsyncIterator[None]:
        key = (stream, producer)
        lock = self._producer_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._producer_locks.get(key) is lock:
                del self._producer_locks[key]

    def cached(self, stream: str) -> _Stream | None:
        """The stream's state if this node holds it, live and unexpired; else None."""
        state = self._streams.get(stream)
        if state is None or state.meta.soft_deleted:
            return None
        if state.meta.expired(time.time(), state.last_access):
            return None
        return state

    async def find(self, stream: str) -> _Stream | None:
        """The stream's state (from memory, else storage); None if the protocol has no such stream.

        An expired stream is deleted here, on first access after its expiry.
        """
        state = self._streams.get(stream)
        if state is None:
            state = await self._load(stream)
            if state is None:
                return None
        if not state.meta.soft_deleted and state.meta.expired(time.time(), state.last_access):
            # With forks alive it is soft-deleted (410), as by a DELETE.
            await self.delete(stream, state)
            return state if state.meta.soft_deleted else None
        return state

    async def _load(self, stream: str) -> _Stream | None:
        raw = await self.hub.run(self.files.read_system_file, meta_file(stream))
        if raw is None:
            return None
        meta = DurableMeta.from_json(raw)
        if not meta.closed:
            # A crash between a closing append and the metadata's update:
            # the log has the closing message, and the log wins.
            closed_at = await self._closing_position(stream)
            if closed_at is not None:
                meta.closed, meta.closed_at = True, closed_at
        if meta.producers and not meta.soft_deleted:
            await self._catch_up_producers(stream, meta)
        state = _Stream(meta, time.time())
        self._streams[stream] = state
        return state

    async def _catch_up_producers(self, stream: str, meta: DurableMeta) -> None:
        """Take each producer's last sequence from the log where the metadata is behind it.

        A producer's sequences within an epoch are saved in the metadata
        only now and then (``save_soon``); its batches are in the log as
        MessageVault producer batches, whose table the writer rebuilds from
        the log. So after a crash the log says how far each producer got.
        """
        names = list(meta.producers)
        records = await self.hub.producer_records(
            stream,
            [producer_id_bytes(meta.path, name, meta.producers[name].epoch) for name in names],
        )
        for name, record in zip(names, records, strict=True):
            known = meta.producers[name]
            if record is not None and record.sequence > known.last_seq:
                meta.producers[name] = ProducerState(known.epoch, record.sequence)

    async def _closing_position(self, stream: str) -> int | None:
        """The position of the closing message, if the stream's last message is one."""
        try:
            checkpoint = await self.hub.checkpoint(stream)
        except StreamNotFound:
            return None
        if not checkpoint.length:
            return None
        messages, _ = await self.hub.read(stream, checkpoint.last_frame_position, 1 << 30, 1 << 30)
        if messages and messages[-1].key == CLOSED_KEY:
            return messages[-1].position
        return None

    async def create(
        self, stream: str, meta: DurableMeta, fork: _ForkCopy | None = None
    ) -> _Stream:
        """A new stream: its metadata first (then it exists), then an empty MessageVault stream.

        A fork's log is written first (its copy of the source's frames), then
        its metadata: a reader never sees a fork half copied.
        """
        try:
            checkpoint = await self.hub.checkpoint(stream)
        except StreamNotFound:
            checkpoint = None
        if checkpoint is not None and checkpoint.length:
            # Left by a delete that stopped between the metadata and the log
            # (or a fork's copy that stopped before its metadata).
            await self.hub.delete_stream(stream)
        if fork is not None:
            meta.own_from = await self.hub.run(fork.copy, self.hub, stream)
        created = await self.hub.run(
            self.files.create_system_file, meta_file(stream), meta.to_json()
        )
        if not created:
            raise Refused(409, "another request created this stream at the same moment")
        await self.hub.open_writer(stream)
        state = _Stream(meta, time.time())
        self._streams[stream] = state
        return state

    async def save(self, stream: str, state: _Stream) -> None:
        # One save at a time per stream, each taking the metadata as it is once its
        # turn comes: appends beside each other (shared lock) may save at once, and
        # an older copy must never land after a newer one.
        async with self._save_locks.setdefault(stream, asyncio.Lock()):
            document = state.meta.to_json()
            await self.hub.run(self.files.write_system_file, meta_file(stream), document)

    def save_soon(self, stream: str, state: _Stream) -> None:
        """Save the metadata within ``SAVE_DELAY``, with whatever else changed meanwhile.

        For what the log can tell again (a producer's sequence in its epoch,
        ``_catch_up_producers``): a rewrite of the metadata per append cost
        three fsyncs besides the commit's one.
        """
        if stream not in self._saving:
            self._saving[stream] = (state, asyncio.ensure_future(self._save_later(stream, state)))

    async def _save_later(self, stream: str, state: _Stream) -> None:
        await asyncio.sleep(SAVE_DELAY)
        self._saving.pop(stream, None)
        await self._save_if_alive(stream, state)

    async def _save_if_alive(self, stream: str, state: _Stream) -> None:
        async with self.lock(stream):  # never after a delete: that would bring it back
            if self.alive(stream, state):
                try:
                    await self.save(stream, state)
                except MessageVaultError:
                    log.warning(
                        "a deferred save of a Durable Streams stream's metadata failed "
                        "(the log still has what it would have said)",
                        exc_info=True,
                        extra={"stream": stream},
                    )

    async def flush(self) -> None:
        """The deferred saves, now (the server is stopping)."""
        pending, self._saving = self._saving, {}
        for stream, (state, task) in pending.items():
            task.cancel()
            await self._save_if_alive(stream, state)

    async def delete(self, stream: str, state: _Stream) -> None:
        """Delete the stream; a soft delete while it has forks; then release its source.

        A hard delete removes the metadata first (the stream is gone for the
        protocol), then the messages. A soft delete keeps the metadata as a
        tombstone (410, its path blocked) and deletes the messages at once:
        each fork holds its own copy. The source of a deleted fork forgets
        it; a soft-deleted source with no fork left goes too, and so on up
        the chain. Callers hold the stream's lock; this takes its source's
        (locks go from fork to source, never back).
        """
        meta = state.meta
        if meta.soft_deleted:
            return
        if meta.forks:
            meta.soft_deleted = True
            await self.save(stream, state)
            with contextlib.suppress(StreamNotFound):
                await self.hub.delete_stream(stream)
            return
        await self._delete_now(stream)
        child, parent = meta.path, meta.forked_from
        while parent is not None:
            source = stream_name(parent)
            async with self.lock(source):
                found = self._streams.get(source) or await self._load(source)
                if found is None:
                    return
                if child in found.meta.forks:
                    found.meta.forks.remove(child)
                if not (found.meta.soft_deleted and not found.meta.forks):
                    await self.save(source, found)
                    return
                await self._delete_now(source)
            child, parent = parent, found.meta.forked_from

    async def _delete_now(self, stream: str) -> None:
        self._streams.pop(stream, None)
        await self.hub.run(self.files.delete_system_file, meta_file(stream))
        with contextlib.suppress(StreamNotFound):
            await self.hub.delete_stream(stream)

    def alive(self, stream: str, state: _Stream) -> bool:
        """Whether ``state`` is still the stream's (not deleted, or replaced, meanwhile)."""
        return self._streams.get(stream) is state

    async def tail(self, stream: str, state: _Stream) -> int:
        """The stream's tail offset: its final offset once closed, else its length."""
        if state.meta.closed and state.meta.closed_at is not None:
            return state.meta.closed_at
        try:
            return (await self.hub.checkpoint(stream)).length
        except StreamNotFound:
            return 0

    async def append(
        self,
        stream: str,
        state: _Stream,
        values: list[bytes],
        *,
        close: bool,
        producer: bytes | None = None,
        producer_seq: int = 0,
    ) -> tuple[int, bool]:
        """Append ``values`` as one batch (with the closing message when ``close``).

        One batch is one atomic commit: the final append and the closure
        land together or not at all. Returns the new tail, and whether the
        log found the batch a duplicate of one it holds (a producer's).
        """
        rows: list[tuple[bytes, bytes]] = [(b"", value) for value in values]
        if close:
            rows.append((CLOSED_KEY, b""))
        batch = encode_batch(rows)
        if producer is not None:
            batch = batch.with_producer(producer, producer_seq)
        result = await self.hub.append(stream, batch)
        state.last_access = time.time()
        if result.duplicate:
            return await self.tail(stream, state), True
        if not close:
            return result.frame_position + result.frame_size, False
        closed_at = result[-1].position
        state.meta.closed, state.meta.closed_at = True, closed_at
        await self.save(stream, state)
        return closed_at, False

    async def read(
        self, stream: str, position: int, app: web.Application
    ) -> tuple[list[bytes], int]:
        """Values from ``position`` on, as many as one answer holds; and the offset after them."""
        limits = app[LIMITS]
        try:
            messages, _ = await self.hub.read(
                stream, position, limits.max_read_messages, limits.max_read_bytes
            )
        except StreamNotFound:
            return [], position
        values: list[bytes] = []
        after = position
        for message in messages:
            if message.key == CLOSED_KEY:
                break
            values.append(message.value)
            after = message.next_position
        return values, after


@dataclass(frozen=True)
class _ForkCopy:
    """What a fork inherits: its source's frames below the fork offset, copied as stored.

    Copied frames keep their positions, sequences, timestamps and ids
    (``Writer.append_frames``), so every inherited offset is the source's.
    The frame holding the fork offset, if it is inside one, is re-encoded
    at the same position with its messages before the offset (and, with a
    sub-offset, the part past it that the fork inherits): those keep their
    positions too, as long as the new frame's header is as long as the old
    one's (a message's position is its frame's plus the header plus 4 per
    message before it).
    """

    source: str  # the source's MessageVault stream
    offset: int  # a message position of the source, or its tail
    sub_offset: int
    json: bool
    # The source's committed length and first position as its writer knows
    # them: the stored checkpoint may lag commits (Azure's flush interval).
    length: int
    first_position: int

    def copy(self, hub: StreamHub, fork: str) -> int:
        """Write the fork's log (in the I/O pool); returns where the fork's own appends begin."""
        reader = Reader.open(hub.storage, self.source)
        try:
            cut, prefix = self._cut(reader)
            writer = Writer.open(
                hub.storage,
                fork,
                max_producers=hub.max_producers,
                producer_max_age=hub.producer_max_age,
            )
            try:
                position = 0
                while position < cut:
                    raw = reader.read_frames(
                        position,
                        max_bytes=FORK_COPY_BYTES,
                        committed=self.length,
                        first_position=self.first_position,
                    )
                    frames = _frames_below(raw.data, cut)
                    writer.append_frames(frames)
                    position = min(raw.next_position, cut)
                if prefix:
                    writer.append_frames(prefix)
            finally:
                writer.close()
        finally:
            reader.close()
        return cut + len(prefix)

    def _cut(self, reader: Reader) -> tuple[int, bytes]:
        """Where the copy of whole frames stops, and the re-encoded frame that follows (if any)."""
        if self.first_position > 0:
            # A fork's log starts at position 0, like the source's: the
            # frames below the trim are gone, so no copy can keep positions.
            raise Refused(409, "the source stream has been trimmed; it cannot be forked")
        if self.offset >= self.length:
            if self.sub_offset:
                raise InvalidInput("Stream-Fork-Sub-Offset: there is no data past the fork offset")
            return self.length, b""
        raw = reader.read_frames(
            self.offset, max_bytes=1, max_messages=1, committed=self.length, first_position=0
        )
        header = read_header(raw.data, 0, None)
        messages = list(
            itertools.islice(
                reader.read(header.base_position, committed=self.length, first_position=0),
                header.message_count,
            )
        )
        kept = messages[: raw.skip]
        rows = [(message.key, message.value) for message in kept]
        rows += self._sub_rows(messages[raw.skip :])
        if not rows:
            return header.base_position, b""
        batch = encode_batch(rows)
        if header.has_producer:
            # Keeps the frame's header size (so its messages' positions);
            # the id names the source's path, so it never meets the fork's producers.
            batch = batch.with_producer(header.producer, header.producer_seq)
        frame = batch.frame(
            header.base_position, header.base_sequence, header.timestamp, batch_ends=True
        )
        return header.base_position, frame

    def _sub_rows(self, rest: list[Message]) -> list[tuple[bytes, bytes]]:
        """The part past the fork offset that a sub-offset inherits, as messages."""
        if not self.sub_offset:
            return []
        data = [message for message in rest if message.key != CLOSED_KEY]
        if self.json:
            if self.sub_offset > len(data):
                raise InvalidInput(
                    f"Stream-Fork-Sub-Offset {self.sub_offset} is past the {len(data)} "
                    "messages of the append at the fork offset"
                )
            return [(b"", message.value) for message in data[: self.sub_offset]]
        if not data or self.sub_offset > len(data[0].value):
            size = len(data[0].value) if data else 0
            raise InvalidInput(
                f"Stream-Fork-Sub-Offset {self.sub_offset} is past the {size} bytes "
                "of the append at the fork offset"
            )
        return [(b"", data[0].value[: self.sub_offset])]


async def _fork_copy(
    ds: DurableStreams, source: str, offset: int, sub_offset: int, json_: bool
) -> _ForkCopy:
    try:
        committed = await ds.hub.checkpoint(source)
    except StreamNotFound:
        return _ForkCopy(source, offset, sub_offset, json_, 0, 0)
    return _ForkCopy(source, offset, sub_offset, json_, committed.length, committed.first_position)


def _frames_below(data: bytes, position: int) -> bytes:
    """The leading whole frames of ``data`` that start below ``position``."""
    offset = 0
    while offset < len(data):
        header = read_header(data, offset, None)
        if header.base_position >= position:
            break
        offset += header.frame_size
    return data[:offset]


DURABLE = web.AppKey("durable_streams", DurableStreams)


def add_durable_stream_routes(app: web.Application) -> None:
    """Mount the protocol under ``/v1/stream/``."""
    long_poll = min(LONG_POLL_SECONDS, app[LIMITS].max_wait)
    app[DURABLE] = DurableStreams(app[HUB], long_poll)

    async def flush(app: web.Application) -> None:
        await app[DURABLE].flush()

    app.on_shutdown.append(flush)
    route = ROOT + "{path:.+}"
    app.router.add_put(route, _answered(create_stream))
    app.router.add_post(route, _answered(append_stream))
    app.router.add_get(route, _answered(read_stream), allow_head=False)
    app.router.add_head(route, _answered(head_stream))
    app.router.add_delete(route, _answered(delete_stream))
    app.router.add_route("OPTIONS", route, _answered(preflight))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answered(handler: Handler) -> Handler:
    """The handler's answer, or the protocol's answer to what it refused; common headers on it."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Refused as refused:
            response = _text(refused.status, refused.text, refused.headers)
        except PositionTrimmed as exc:
            response = _text(410, str(exc))
        except (InvalidInput, InvalidPosition) as exc:
            response = _text(400, str(exc))
        except StreamNotFound:
            response = _text(404, "stream not found")
        if not response.prepared:
            response.headers.update(COMMON_HEADERS)
        return response

    return answer


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(status=status, text=text + "\n", headers=headers)
    if status in (204, 304):
        response.body = None
    return response


def _path(request: web.Request) -> str:
    """The stream's URL path as sent (percent-encoding kept): the stream's identity."""
    return request.rel_url.raw_path


def _ds(request: web.Request) -> DurableStreams:
    return request.app[DURABLE]


def _single(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    return values[0] if values else None


async def preflight(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        },
    )


async def _found(request: web.Request, stream: str) -> _Stream:
    state = await _ds(request).find(stream)
    if state is None:
        raise Refused(404, "stream not found")
    if state.meta.soft_deleted:
        raise Refused(410, "the stream was deleted; its forks still hold its data")
    return state


# PUT: create ------------------------------------------------------------------------------


async def create_stream(request: web.Request) -> web.StreamResponse:
    path = _path(request)
    stream = stream_name(path)
    _require(request, "write", stream)
    headers = request.headers
    forked_from = headers.get("Stream-Forked-From")
    if forked_from is None and (
        "Stream-Fork-Offset" in headers or "Stream-Fork-Sub-Offset" in headers
    ):
        raise Refused(400, "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From")
    ttl_raw = headers.get("Stream-TTL")
    expires_raw = headers.get("Stream-Expires-At")
    if ttl_raw is not None and expires_raw is not None:
        raise Refused(400, "give Stream-TTL or Stream-Expires-At, not both")
    ttl = parse_ttl(ttl_raw)
    parse_expires_at(expires_raw)
    if forked_from is not None:
        return await _create_fork(request, forked_from, ttl, expires_raw)
    content_type = creation_type(headers.get("Content-Type"))
    close = closed_header(headers.get(CLOSED))
    body = await _body(request)
    values = _values(content_type, body, initial=True) if body else []
    ds = _ds(request)
    async with ds.lock(stream):
        state = await ds.find(stream)
        if state is not None:
            if state.meta.soft_deleted:
                raise Refused(409, "a deleted stream's forks still use this path")
            if not state.meta.same_config(content_type, ttl, expires_raw, close):
                raise Refused(409, "the stream exists with a different configuration")
            return await _created(ds, stream, state, 200, "")
        meta = DurableMeta(path, content_type, time.time(), ttl=ttl, expires_at=expires_raw)
        state = await ds.create(stream, meta)
        if values or close:
            await ds.append(stream, state, values, close=close)
    return await _created(ds, stream, state, 201, str(request.url.with_query(None)))


async def _create_fork(
    request: web.Request, forked_from: str, ttl: int | None, expires_raw: str | None
) -> web.Response:
    """PUT with ``Stream-Forked-From``: a new stream holding a copy of the source's data."""
    path = _path(request)
    stream = stream_name(path)
    source = stream_name(forked_from)
    _require(request, "read", source)
    headers = request.headers
    offset_raw = headers.get("Stream-Fork-Offset")
    offset = parse_fork_offset(offset_raw) if offset_raw is not None else None
    sub_offset = parse_sub_offset(headers.get("Stream-Fork-Sub-Offset"))
    raw_type = headers.get("Content-Type")
    asked_type = creation_type(raw_type) if raw_type and raw_type.strip() else None
    close = closed_header(headers.get(CLOSED))
    body = await _body(request)
    asked_expiry = None if ttl is None and expires_raw is None else (ttl, expires_raw)
    ds = _ds(request)
    async with ds.lock(stream):
        state = await ds.find(stream)
        if state is not None:
            if state.meta.soft_deleted:
                raise Refused(409, "a deleted stream's forks still use this path")
            if not state.meta.same_fork(
                content_type=asked_type,
                expiry=asked_expiry,
                forked_from=forked_from,
                fork_offset=offset,
                sub_offset=sub_offset,
                closed=close,
            ):
                raise Refused(409, "the stream exists with a different configuration")
            return await _created(ds, stream, state, 200, "")
        if source == stream:
            raise Refused(404, "the stream to fork from does not exist")
        async with ds.lock(source):
            found = await ds.find(source)
            if found is None:
                raise Refused(404, "the stream to fork from does not exist")
            origin = found.meta
            if origin.soft_deleted:
                raise Refused(409, "the stream to fork from was deleted")
            if asked_type is not None and media_type(asked_type) != media_type(origin.content_type):
                raise Refused(409, f"the stream to fork from is {origin.content_type}")
            tail = await ds.tail(source, found)
            at = tail if offset is None else offset
            if at > tail:
                raise Refused(400, f"Stream-Fork-Offset {offset_raw} is beyond the source's tail")
            content_type = origin.content_type
            values = _values(content_type, body, initial=True) if body else []
            fork_ttl, fork_expires = origin.fork_expiry(ttl, expires_raw)
            meta = DurableMeta(
                path,
                content_type,
                time.time(),
                ttl=fork_ttl,
                expires_at=fork_expires,
                forked_from=forked_from,
                fork_offset=at,
                sub_offset=sub_offset,
            )
            copy = await _fork_copy(ds, source, at, sub_offset, is_json(content_type))
            state = await ds.create(stream, meta, copy)
            origin.forks.append(path)
            await ds.save(source, found)
        if values or close:
            await ds.append(stream, state, values, close=close)
    return await _created(ds, stream, state, 201, str(request.url.with_query(None)))


async def _created(
    ds: DurableStreams, stream: str, state: _Stream, status: int, location: str
) -> web.Response:
    headers = {
        "Content-Type": state.meta.content_type,
        NEXT_OFFSET: format_offset(await ds.tail(stream, state)),
    }
    if status == 201:
        headers["Location"] = location
    if state.meta.closed:
        headers[CLOSED] = "true"
    return web.Response(status=status, headers=headers)


def _values(content_type: str, body: bytes, *, initial: bool) -> list[bytes]:
    """The messages one body appends: JSON values (flattened), or the body itself."""
    if is_json(content_type):
        return json_messages(body, initial=initial)
    return [body]


# POST: append, close ----------------------------------------------------------------------


async def append_stream(request: web.Request) -> web.StreamResponse:
    path = _path(request)
    stream = stream_name(path)
    _require(request, "write", stream)
    headers = request.headers
    close = closed_header(headers.get(CLOSED))
    producer = parse_producer(
        _single(request, "Producer-Id"),
        _single(request, "Producer-Epoch"),
        _single(request, "Producer-Seq"),
    )
    body = await _body(request)
    content_type = headers.get("Content-Type")
    if not body and not close:
        raise Refused(400, "an append needs a body (or Stream-Closed: true to close)")
    if body and not content_type:
        raise Refused(400, "an append needs a Content-Type")
    ds = _ds(request)
    seq = headers.get("Stream-Seq")
    held = ds.cached(stream)
    if close or seq is not None or held is None:
        # Closing and Stream-Seq check and change the whole stream; so may a
        # first access (a load, an expiry): the stream to this request alone.
        async with ds.lock(stream):
            return await _append_locked(request, ds, stream, body, close, producer, seq)
    async with (
        ds.shared(stream),
        ds.producer_lock(stream, producer.id) if producer is not None else _nothing(),
    ):
        if not ds.alive(stream, held):  # deleted or replaced while this one waited
            raise Refused(404, "no such stream")
        return await _append_locked(request, ds, stream, body, close, producer, seq)


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


async def _append_locked(  # noqa: PLR0917 - the append's parts, as parsed
    request: web.Request,
    ds: DurableStreams,
    stream: str,
    body: bytes,
    close: bool,
    producer: ProducerHeaders | None,
    seq: str | None,
) -> web.Response:
    """The checks and the append, under the lock ``append_stream`` chose."""
    headers = request.headers
    content_type = headers.get("Content-Type")
    state = await _found(request, stream)
    meta = state.meta
    if meta.closed:
        return await _append_to_closed(ds, stream, state, producer, bool(body))
    if body and media_type(content_type) != media_type(meta.content_type):
        raise Refused(409, f"this stream's content type is {meta.content_type}")
    if producer is not None and (refusal := _judge_producer(meta, producer)) is not None:
        return refusal
    if (
        seq is not None
        and meta.stream_seq is not None
        and _seq_key(seq) <= _seq_key(meta.stream_seq)
    ):
        raise Refused(409, f"Stream-Seq {seq!r} is not above the last one, {meta.stream_seq!r}")
    values = _values(meta.content_type, body, initial=False) if body else []
    return await _append_checked(ds, request, stream, state, values, close, producer, seq)


async def _append_checked(  # noqa: PLR0917 - the append's parts, checked by the caller
    ds: DurableStreams,
    request: web.Request,
    stream: str,
    state: _Stream,
    values: list[bytes],
    close: bool,
    producer: ProducerHeaders | None,
    seq: str | None,
) -> web.Response:
    """Append what ``append_stream`` has checked; record Stream-Seq and the producer's state."""
    meta = state.meta
    headers: dict[str, str] = {}
    mv_producer = None
    before = meta.producers.get(producer.id) if producer is not None else None
    if producer is not None:
        mv_producer = producer_id_bytes(meta.path, producer.id, producer.epoch)
        headers.update(_producer_headers(producer.epoch, producer.seq))
    try:
        tail, duplicate = await ds.append(
            stream,
            state,
            values,
            close=close,
            producer=mv_producer,
            producer_seq=producer.seq if producer is not None else 0,
        )
    except (SequenceGap, StaleSequence) as exc:  # memory and log disagree: the log wins
        raise Refused(409, f"producer sequence refused by the log: {exc}") from exc
    if seq is not None:
        meta.stream_seq = seq
    if producer is not None:
        meta.producers[producer.id] = ProducerState(producer.epoch, producer.seq)
        if close:
            meta.closed_by = (producer.id, producer.epoch, producer.seq)
    # A new producer or epoch is saved now: the log cannot tell those (its
    # producer ids are hashes). A sequence within an epoch it can tell: saved soon.
    if (
        seq is not None
        or close
        or (producer is not None and (before is None or before.epoch != producer.epoch))
    ):
        await ds.save(stream, state)
    elif producer is not None:
        ds.save_soon(stream, state)
    if duplicate:
        # The log had this batch (the metadata had not heard of it: a crash
        # between the two): the protocol's answer to a retry.
        return web.Response(status=204, headers=headers)
    headers[NEXT_OFFSET] = format_offset(tail)
    if close:
        headers[CLOSED] = "true"
    # 200 for a producer's append, 204 for others and for any close.
    status = 200 if producer is not None and values else 204
    return web.Response(status=status, headers=headers)


def _seq_key(seq: str) -> bytes:
    return seq.encode("utf-8", "surrogatepass")


async def _append_to_closed(
    ds: DurableStreams,
    stream: str,
    state: _Stream,
    producer: ProducerHeaders | None,
    has_body: bool,
) -> web.Response:
    """A POST to a closed stream: a repeated close succeeds, anything else is 409."""
    meta = state.meta
    final = format_offset(await ds.tail(stream, state))
    same_closer = producer is not None and meta.closed_by == (
        producer.id,
        producer.epoch,
        producer.seq,
    )
    if same_closer and producer is not None:
        return web.Response(
            status=204,
            headers={
                NEXT_OFFSET: final,
                CLOSED: "true",
                **_producer_headers(producer.epoch, producer.seq),
            },
        )
    if not has_body and producer is None:
        return web.Response(status=204, headers={NEXT_OFFSET: final, CLOSED: "true"})
    raise Refused(409, "the stream is closed", {CLOSED: "true", NEXT_OFFSET: final})


def _producer_headers(epoch: int, seq: int) -> dict[str, str]:
    return {"Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


def _judge_producer(  # noqa: PLR0911 - the protocol's decision table, one answer a line
    meta: DurableMeta, producer: ProducerHeaders
) -> web.Response | None:
    """The protocol's answer to a producer's batch that is not appended; None: append it.

    The producer's epoch and last sequence are the metadata's (kept in
    memory, saved after each accepted batch); the batch is also sent as
    MessageVault producer batch ``seq`` of the producer id of this epoch,
    so that the log itself refuses a batch committed twice.
    """
    known = meta.producers.get(producer.id)
    if known is None:
        if producer.seq != 0:
            return _gap(0, producer.seq)
        return None
    if producer.epoch < known.epoch:
        return web.Response(
            status=403,
            text="stale producer epoch\n",
            headers={"Producer-Epoch": str(known.epoch)},
        )
    if producer.epoch > known.epoch:
        if producer.seq != 0:
            return web.Response(status=400, text="a new producer epoch must start at sequence 0\n")
        return None
    if producer.seq <= known.last_seq:
        return web.Response(status=204, headers=_producer_headers(known.epoch, known.last_seq))
    if producer.seq == known.last_seq + 1:
        return None
    return _gap(known.last_seq + 1, producer.seq)


def _gap(expected: int, received: int) -> web.Response:
    return web.Response(
        status=409,
        text="producer sequence gap\n",
        headers={"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
    )


# DELETE, HEAD -----------------------------------------------------------------------------


async def delete_stream(request: web.Request) -> web.StreamResponse:
    stream = stream_name(_path(request))
    _require(request, "write", stream)
    ds = _ds(request)
    async with ds.lock(stream):
        state = await _found(request, stream)
        await ds.delete(stream, state)
    return web.Response(status=204)


async def head_stream(request: web.Request) -> web.StreamResponse:
    stream = stream_name(_path(request))
    _require(request, "read", stream)
    ds = _ds(request)
    state = await _found(request, stream)
    meta = state.meta
    tail = format_offset(await ds.tail(stream, state))
    headers = {
        "Content-Type": meta.content_type,
        NEXT_OFFSET: tail,
        "Cache-Control": "no-store",
        "ETag": f'"{stream}:-1:{tail}{":c" if meta.closed else ""}"',
    }
    if meta.closed:
        headers[CLOSED] = "true"
    if meta.ttl is not None:
        headers["Stream-TTL"] = str(meta.ttl)
    if meta.expires_at is not None:
        headers["Stream-Expires-At"] = meta.expires_at
    return web.Response(status=200, headers=headers)


# GET: catch-up, long-poll, SSE ------------------------------------------------------------


async def read_stream(request: web.Request) -> web.StreamResponse:
    stream = stream_name(_path(request))
    _require(request, "read", stream)
    ds = _ds(request)
    query = request.query
    offset = _offset_param(request)
    live = query.get("live")
    cursor = query.get("cursor")
    state = await _found(request, stream)
    if live in ("long-poll", "sse") and offset is None:
        raise Refused(400, f"live={live} needs an offset")
    tail = await ds.tail(stream, state)
    start = state.meta.fork_start(_start(offset, tail))
    state.last_access = time.time()
    if live == "sse":
        return await _server_sent_events(
            request, ds, stream=stream, state=state, start=start, cursor=cursor
        )
    meta = state.meta
    if offset == NOW and live != "long-poll":
        headers = {
            "Content-Type": meta.content_type,
            NEXT_OFFSET: format_offset(tail),
            UP_TO_DATE: "true",
            "Cache-Control": "no-store",
        }
        if meta.closed:
            headers[CLOSED] = "true"
        return web.Response(body=b"[]" if is_json(meta.content_type) else b"", headers=headers)
    values, after = await ds.read(stream, start, request.app)
    if live == "long-poll" and not values and start >= tail:
        if meta.closed:
            return _no_content(start, closed=True)
        values, after = await _long_poll(request, ds, stream, state, start)
        if not values:
            return _no_content(
                start, closed=meta.closed, cursor=response_cursor(cursor, time.time())
            )
    tail = await ds.tail(stream, state)
    up_to_date = after >= tail
    final = meta.closed and up_to_date
    headers = {"Content-Type": meta.content_type, NEXT_OFFSET: format_offset(after)}
    if up_to_date:
        headers[UP_TO_DATE] = "true"
    if final:
        headers[CLOSED] = "true"
    if live == "long-poll":
        headers[CURSOR] = response_cursor(cursor, time.time())
    etag = f'"{stream}:{offset or START}:{format_offset(after)}{":c" if final else ""}"'
    headers["ETag"] = etag
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    body = json_array(values) if is_json(meta.content_type) else b"".join(values)
    return web.Response(body=body, headers=headers)


def _offset_param(request: web.Request) -> str | None:
    offsets = request.query.getall("offset", [])
    if len(offsets) > 1:
        raise Refused(400, "give one offset")
    if offsets == [""]:
        raise Refused(400, "the offset is empty")
    return offsets[0] if offsets else None


def _start(offset: str | None, tail: int) -> int:
    """The position a read starts at: ``now`` is the tail, ``-1`` (or none) the start."""
    if offset == NOW:
        return tail
    if offset is None or offset == START:
        return 0
    start = parse_offset(offset)
    if start > tail:
        raise Refused(400, f"offset {offset} is beyond the stream's end")
    return start


async def _long_poll(
    request: web.Request, ds: DurableStreams, stream: str, state: _Stream, start: int
) -> tuple[list[bytes], int]:
    """What arrives at ``start`` within the long-poll timeout (nothing, at its end)."""
    await ds.hub.wait_for_commit(stream, start, ds.long_poll, gone=_gone(request))
    if not ds.alive(stream, state):
        raise Refused(404, "stream not found")
    state.last_access = time.time()
    return await ds.read(stream, start, request.app)


def _no_content(offset: int, *, closed: bool, cursor: str | None = None) -> web.Response:
    headers = {NEXT_OFFSET: format_offset(offset), UP_TO_DATE: "true"}
    if closed:
        headers[CLOSED] = "true"
    elif cursor is not None:
        headers[CURSOR] = cursor
    return web.Response(status=204, headers=headers)


def _sse_event(kind: str, payload: str) -> bytes:
    # Every line break in the payload starts a new data: line, so a payload
    # can never end the event early or inject one (no space after data:, as
    # a reader strips exactly one).
    lines = _LINE_BREAK.split(payload)
    return (f"event: {kind}\n" + "".join(f"data:{line}\n" for line in lines) + "\n").encode()


def _sse_payload(content_type: str, values: list[bytes]) -> str:
    if is_json(content_type):
        return json_array(values).decode()
    data = b"".join(values)
    if is_text(content_type):
        return data.decode("utf-8", "replace")
    return base64.b64encode(data).decode()


async def _server_sent_events(
    request: web.Request,
    ds: DurableStreams,
    *,
    stream: str,
    state: _Stream,
    start: int,
    cursor: str | None,
) -> web.StreamResponse:
    """Data and control events from ``start``; ends when closed at the tail, or after a minute."""
    meta = state.meta
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **COMMON_HEADERS}
    if not is_text(meta.content_type):
        headers["Stream-SSE-Data-Encoding"] = "base64"
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ds.sse_seconds
    gone = _gone(request)
    position = start
    try:
        while not ds.hub.stopping and not gone() and ds.alive(stream, state):
            values, after = await ds.read(stream, position, request.app)
            tail = await ds.tail(stream, state)
            at_tail = after >= tail
            # A data event and its control event go out in one write: a reader that
            # stops at the first chunk holding both (as the suite's does) gets the pair,
            # however long finding the tail took (a storage round trip on Azure).
            data = _sse_event("data", _sse_payload(meta.content_type, values)) if values else b""
            control: dict[str, object] = {"streamNextOffset": format_offset(after)}
            if meta.closed and at_tail:
                control["streamClosed"] = True
                await response.write(data + _sse_event("control", json.dumps(control)))
                break
            control["streamCursor"] = response_cursor(cursor, time.time())
            if at_tail:
                control["upToDate"] = True
            await response.write(data + _sse_event("control", json.dumps(control)))
            position = after
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if at_tail:
                await ds.hub.wait_for_commit(
                    stream, position, min(remaining, ds.long_poll), gone=gone
                )
                state.last_access = time.time()
        await response.write_eof()
    except (ConnectionError, StreamNotFound):
        log.debug("durable streams SSE reader gone", extra={"stream": stream})
    return response
