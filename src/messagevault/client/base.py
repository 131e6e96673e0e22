"""What ``Client`` and ``AsyncClient`` share: settings, requests, retries, decoding answers.

Nothing here does I/O. Each client sends the ``Request`` this module builds
through its own HTTP library and hands the ``Answer`` back to be decoded, so
that both follow the same rules to the byte.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Any, Final
from urllib.parse import quote

from messagevault.client.nodes import Node, nodes_within, parse_urls
from messagevault.errors import (
    CommitterClosed,
    CorruptData,
    InternalError,
    InvalidBatch,
    InvalidInput,
    MessageVaultError,
    Overloaded,
    RequestTooLarge,
    ServerUnreachable,
    StaleWriter,
    StorageError,
    StreamLocked,
)
from messagevault.format import (
    FORMAT_V1,
    FRAME_HEADER_SIZE,
    FRAME_HEADER_V2_SIZE,
    NO_PRODUCER,
    SLOT_SIZE,
    EncodedBatch,
    FrameAssembler,
    Message,
    PieceCheck,
    encode_batch,
    read_header,
    verify_frame,
)
from messagevault.index import timestamp_ms
from messagevault.names import validate_stream_name
from messagevault.profiles import default_profile
from messagevault.storage.base import ReadAccess
from messagevault.wire import (
    BATCH_CONTENT_TYPE,
    DUPLICATE_HEADER,
    JSON,
    NDJSON,
    POSITION_HEADER,
    StreamInfo,
    append_result_from_minimal,
    error_from_body,
    parse_json,
    parse_json_lines,
)
from messagevault.writer import AppendResult

DEFAULT_URL: Final = "http://127.0.0.1:8080"
# Seconds an idempotent publish keeps retrying a batch before it gives up.
DEFAULT_RETRY_TIMEOUT: Final = 60.0
# A read asking for fewer messages than this passes ``limit`` on, so the
# server stops at the frames holding them; larger reads take the bulk path
# (up to 8 MiB of frames a page) and stop on their own.
SMALL_READ: Final = 1000
# How long one long poll of ``follow`` waits at the tail; a commit ends it at once.
FOLLOW_WAIT: Final = 30
# How often a waiting ``follow`` looks at its ``stop`` (sync client) while it waits.
STOP_CHECK_INTERVAL: Final = 0.1
# An empty long poll that comes back sooner than this was ended by the server
# (it is shutting down): ``follow`` pauses this long before asking again.
EARLY_EMPTY: Final = 0.5

Headers = Mapping[str, str]


def _credentials_in_env() -> bool:
    return bool(os.environ.get("MESSAGEVAULT_USER") or os.environ.get("MESSAGEVAULT_PASSWORD"))


@dataclass(frozen=True)
class Settings:
    """Where the server's nodes are and how to talk to them, from arguments or the environment."""

    nodes: tuple[Node, ...]  # one, or several sharing one storage (client/nodes.py)
    authorization: str | None = field(repr=False)  # a password, all but in name
    timeout: float
    retries: int
    # Seconds an idempotent publish keeps retrying; False: appends as before.
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    idempotent: bool = True

    @classmethod
    def resolve(
        cls,
        url: str | Sequence[str] | None,
        user: str | None,
        password: str | None,
        timeout: float,
        retries: int,
        *,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        idempotent: bool = True,
    ) -> Settings:
        """Arguments first, then MESSAGEVAULT_URL/_USER/_PASSWORD, then the URL's own user info.

        ``url`` may name several nodes of one server: a comma-separated list
        or a list of URLs (``nodes.parse_urls`` says what each must be).
        When neither names a server, or no credentials were found, the
        ``default`` profile of the user's config file (``profiles``) fills in,
        its credentials only for its own server's nodes.
        """
        if isinstance(url, str) or url is None:
            url = url or os.environ.get("MESSAGEVAULT_URL")
        profile: dict[str, str] = {}
        if url is None:
            profile = default_profile()  # the server must come from it: a broken file is an error
        elif user is None and password is None and not _credentials_in_env():
            with contextlib.suppress(InvalidInput):  # a server named outright needs no profile
                profile = default_profile()
            if not nodes_within(url, profile.get("url", "")):
                profile = {}  # another server's: never send its password elsewhere
        parsed = parse_urls(url if url is not None else profile.get("url") or DEFAULT_URL)
        if timeout <= 0:
            raise InvalidInput(f"timeout must be positive, not {timeout!r}")
        if retries < 0:
            raise InvalidInput(f"retries must be 0 or more, not {retries!r}")
        if not retry_timeout >= 0:  # NaN too
            raise InvalidInput(f"retry_timeout must be 0 or more seconds, not {retry_timeout!r}")
        user = user if user is not None else os.environ.get("MESSAGEVAULT_USER") or parsed.user
        if password is None:
            password = os.environ.get("MESSAGEVAULT_PASSWORD") or parsed.password
        if user is None and password is None:
            user, password = profile.get("user"), profile.get("password")
        authorization = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            authorization = f"Basic {token}"
        return cls(
            parsed.nodes,
            authorization,
            timeout,
            retries,
            retry_timeout,
            bool(idempotent),
        )

    @property
    def url(self) -> str:
        """The server's base URL, without credentials; its nodes' comma-separated."""
        return ",".join(node.url for node in self.nodes)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query, below the server's prefix
    headers: dict[str, str]
    body: bytes | None = None
    # Safe to send twice: reads, and appends of a batch with a producer id
    # (the server answers a repeat with the first one's receipts).
    idempotent: bool = True
    wait: int = 0  # seconds the server may hold the answer (long poll)
    append: bool = False
    stream: str | None = None  # an append's: its writer is learned from the answer


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Headers  # names as the server sent them; look them up with ``header``
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None


def headers(settings: Settings, **extra: str) -> dict[str, str]:
    base = {"User-Agent": "messagevault-client"}
    if settings.authorization is not None:
        base["Authorization"] = settings.authorization
    return base | {name.replace("_", "-"): value for name, value in extra.items()}


def stream_path(stream: str, suffix: str = "") -> str:
    return f"/streams/{quote(validate_stream_name(stream))}{suffix}"


# Requests ----------------------------------------------------------------------------


def idempotent_batch(settings: Settings, batch: EncodedBatch) -> EncodedBatch:
    """``batch`` as ``publish`` sends it: under a fresh random producer id, as its batch 0.

    A new id per call needs no coordination between threads or processes,
    and a new id is always accepted, so the only repeat the server can see
    is this call's own retry. A batch that has a producer id already (a
    ``Producer``'s) keeps it; so does every batch of a non-idempotent client.
    """
    if not settings.idempotent or batch.producer != NO_PRODUCER:
        return batch
    return batch.with_producer(uuid.uuid4().bytes, 0)


def publish_request(settings: Settings, stream: str, batch: EncodedBatch) -> Request:
    return Request(
        "POST",
        stream_path(stream),
        headers(settings, Content_Type=BATCH_CONTENT_TYPE, Prefer="return=minimal", Accept=JSON),
        batch.frame(),
        idempotent=batch.producer != NO_PRODUCER,
        append=True,
        stream=stream,
    )


def info_request(settings: Settings, stream: str) -> Request:
    return Request("GET", stream_path(stream), headers(settings, Accept=JSON))


def streams_request(settings: Settings) -> Request:
    return Request("GET", "/streams", headers(settings, Accept=JSON))


def cluster_request(settings: Settings) -> Request:
    return Request("GET", "/cluster", headers(settings, Accept=JSON))


def delete_request(settings: Settings, stream: str) -> Request:
    # Not sent again after a lost connection: a repeat of a delete that was
    # done would say 404, or delete a stream re-created meanwhile.
    return Request("DELETE", stream_path(stream), headers(settings, Accept=JSON), idempotent=False)


def retention_request(
    settings: Settings, stream: str, policy: Mapping[str, float | int | None] | None = None
) -> Request:
    """``GET`` the stream's retention policy, or ``PUT`` ``policy`` (``max_age``, ``max_bytes``)."""
    path = stream_path(stream, "/retention")
    if policy is None:
        return Request("GET", path, headers(settings, Accept=JSON))
    body = json.dumps(dict(policy)).encode()
    return Request("PUT", path, headers(settings, Accept=JSON, Content_Type=JSON), body)


@dataclass(frozen=True)
class Trimmed:
    """What a trim answers (``Client.trim``): where the stream's readable messages now start."""

    stream: str
    first_position: int
    first_sequence: int  # the next sequence to be written when every message was trimmed
    released_bytes: int  # storage this trim gave back
    trimmed: bool  # False: the stream already started at or past that point

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Trimmed:
        return cls(
            document["stream"],
            document["first_position"],
            document["first_sequence"],
            document["released_bytes"],
            document["trimmed"],
        )


def trim_request(
    settings: Settings,
    stream: str,
    *,
    before_position: int | None = None,
    before_sequence: int | None = None,
    before_time: datetime | float | None = None,
) -> Request:
    """``POST /streams/{stream}/trim`` below one of the three (the server checks them)."""
    given = {
        name: value
        for name, value in (
            ("before_position", before_position),
            ("before_sequence", before_sequence),
            ("before_time", before_time),
        )
        if value is not None
    }
    if len(given) != 1:
        raise InvalidInput(
            "a trim needs exactly one of before_position, before_sequence and before_time"
        )
    if before_time is not None:
        try:  # whole ms, rounded up: the first message at or after it stays
            given["before_time"] = timestamp_ms(before_time)
        except ValueError as exc:
            raise InvalidInput(f"before_time: {exc}") from None
    body = json.dumps(given).encode()
    # Sent again after a lost answer: a trim repeated changes nothing more.
    path = stream_path(stream, "/trim")
    return Request("POST", path, headers(settings, Accept=JSON, Content_Type=JSON), body)


def clear_retention_request(settings: Settings, stream: str) -> Request:
    return Request("DELETE", stream_path(stream, "/retention"), headers(settings, Accept=JSON))


def no_content(answer: Answer) -> None:
    """A 204's answer: nothing, or the error it holds."""
    raise_for_error(answer)


@dataclass(frozen=True)
class Seek:
    """A read's start that the server finds: message ``sequence``, or the first at ``time_ms``."""

    sequence: int | None = None
    time_ms: int | None = None

    @property
    def query(self) -> str:
        if self.sequence is not None:
            return f"from_sequence={self.sequence}"
        return f"from_time={self.time_ms}"


def read_start(
    position: int | None, from_sequence: int | None, from_time: datetime | float | None
) -> int | Seek:
    """Where a read starts: ``position`` (default 0), or a ``Seek``; at most one of the three.

    ``from_time`` is an aware ``datetime`` or Unix seconds; it travels as
    whole milliseconds, rounded up (the first message at or after it).
    """
    given = [
        name
        for name, value in (
            ("position", position),
            ("from_sequence", from_sequence),
            ("from_time", from_time),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise InvalidInput(f"give one place to start a read, not {' and '.join(given)}")
    if from_sequence is not None:
        if type(from_sequence) is not int or from_sequence < 0:
            raise InvalidInput(
                f"from_sequence must be a non-negative integer, not {from_sequence!r}"
            )
        return Seek(sequence=from_sequence)
    if from_time is not None:
        try:
            return Seek(time_ms=timestamp_ms(from_time))
        except ValueError as exc:
            raise InvalidInput(f"from_time: {exc}") from None
    return 0 if position is None else position


def seek_start(sequence: int | None, time: datetime | float | None) -> Seek:
    """``seek``'s arguments as a ``Seek``: exactly one of them."""
    if sequence is None and time is None:
        raise InvalidInput("seek needs sequence= or time=")
    start = read_start(None, sequence, time)
    assert isinstance(start, Seek)
    return start


def _start_query(position: int | Seek) -> str:
    if isinstance(position, Seek):
        return f"?{position.query}"
    if not isinstance(position, int) or position < 0:
        raise InvalidInput(f"position must be a non-negative integer, not {position!r}")
    return f"?from={position}"


def page_request(
    settings: Settings, stream: str, position: int | Seek, limit: int | None, wait: int = 0
) -> Request:
    """One page of stored frames from ``position``, or where a ``Seek`` leads (binary route).

    ``limit=0`` asks for no messages: the answer says where the read starts
    (``sought``).
    """
    query = _start_query(position)
    if limit is not None and limit <= SMALL_READ:
        query += f"&limit={limit}"
    if wait:
        query += f"&wait={wait}"
    return Request(
        "GET",
        stream_path(stream, "/messages") + query,
        headers(settings, Accept=BATCH_CONTENT_TYPE),
        wait=wait,
    )


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InvalidInput(f"limit must be a non-negative integer or None, not {limit!r}")


# Answers -----------------------------------------------------------------------------


def raise_for_error(answer: Answer) -> None:
    if answer.status >= 300:
        raise error_from_body(answer.status, answer.body)


def json_of(answer: Answer) -> Any:
    raise_for_error(answer)
    try:
        return parse_json(answer.body)
    except ValueError as exc:
        raise CorruptData(f"the server's answer is not JSON: {exc}") from None


def published(answer: Answer, batch: EncodedBatch) -> AppendResult:
    """The exact result of an append from the server's short answer.

    ``duplicate`` is set when the server says the batch had been committed
    already (a retry whose first answer was lost): the receipts are the
    first commit's.
    """
    result = append_result_from_minimal(json_of(answer), batch)
    if answer.header(DUPLICATE_HEADER) == "true":
        result = dataclasses.replace(result, duplicate=True)
    return result


def too_large(error: RequestTooLarge, batch: EncodedBatch) -> RequestTooLarge:
    """``error``, the server's 413 for ``batch``, saying what was too large and what bounds it.

    The server only knows that the body was over its limit; the caller needs
    to hear whether smaller batches would do, or whether one value is the
    problem, which no batching can split.
    """
    limit = f"over the server's request limit ({str(error).rstrip('.')})"
    if batch.count == 1:
        what = (
            f"the batch, a single value, is {batch.frame_size:,} bytes, {limit}; one value "
            "cannot be split across batches: the server's --max-body bounds the largest value"
        )
    else:
        what = (
            f"the batch of {batch.count:,} messages is {batch.frame_size:,} bytes, {limit}; "
            "send fewer messages a batch (one value cannot be split: the server's --max-body "
            "bounds the largest value)"
        )
    explained = RequestTooLarge(what)
    explained.status = error.status
    return explained


def stream_infos(answer: Answer) -> list[StreamInfo]:
    return [StreamInfo.from_json(entry) for entry in json_of(answer)["streams"]]


def read_access_of(info: StreamInfo) -> ReadAccess:
    if info.read_access is None:
        raise InvalidInput(f"the server gives no direct read access to stream {info.stream!r}")
    return info.read_access


@dataclass
class Page:
    """The messages of one binary read answer, every frame checked, and where to go on."""

    messages: Iterator[Message]
    count: int
    next_position: int


def started_at(answer: Answer, position: int | Seek) -> int:
    """Where a read answer starts: ``position``, or for a ``Seek`` the server's ``X-Position``.

    A server that does not know ``from_sequence``/``from_time`` (one older
    than this client) ignores them and reads from 0: its answer lacks the
    header, and is refused rather than taken for the messages asked for.
    """
    if not isinstance(position, Seek):
        if position == 0 and answer.header(POSITION_HEADER):  # a trimmed stream starts past 0
            return int(answer.header(POSITION_HEADER) or "0")
        return position
    raise_for_error(answer)
    try:
        return int(answer.header(POSITION_HEADER) or "")
    except ValueError:
        raise InvalidInput(
            f"the server cannot start a read at {position.query.replace('=', ' ')} "
            f"(its answer has no {POSITION_HEADER}): it is older than this client"
        ) from None


def sought(answer: Answer, position: Seek) -> int:
    """The position a ``limit=0`` read of ``position`` found (``seek``)."""
    return started_at(answer, position)


def _page_bounds(answer: Answer) -> tuple[int, int]:
    """A binary read answer's ``X-Skip`` and ``X-Next``, once it is known not to be an error."""
    raise_for_error(answer)
    try:
        return int(answer.header("X-Skip") or "0"), int(answer.header("X-Next") or "")
    except ValueError:
        raise CorruptData("a read answer lacks its X-Skip/X-Next headers") from None


def _check_page_end(position: int, at: int, next_position: int) -> None:
    if at != next_position:
        raise CorruptData(
            f"read answer from position {position} ends at {at}, but X-Next says {next_position}",
            position=position,
        )


def page_of(answer: Answer, start: int | Seek) -> Page:
    """Decode a binary read answer from ``start``: whole frames, ``X-Skip``, ``X-Next``.

    Every frame's header and body CRCs, its position and sequence layout are
    checked before any message is handed out; bytes changed in transit raise
    ``CorruptData``.
    """
    body = answer.body
    skip, next_position = _page_bounds(answer)
    position = started_at(answer, start)
    frames: list[Iterator[Message]] = []
    count = 0
    offset = 0
    # The first frame starts at ``position``, or before it when ``position``
    # is message ``skip`` of that frame (docs/FORMAT.md: slots; a v2 header
    # is longer, so its version byte says where the frame starts).
    at = position if skip == 0 else _frame_start(body, position, skip)
    first = skip
    assembler = FrameAssembler(skip)
    while offset < len(body):
        header = read_header(body, offset, at)
        if first and first >= header.message_count:
            raise CorruptData(
                f"read answer skips {first} of the {header.message_count} messages "
                f"of the frame at {at}",
                position=at,
            )
        frames.append(assembler.feed(body, offset, header))  # checks the body now
        if header.is_head or header.is_continuation:
            count += not assembler.pending  # a value in pieces, once whole, is one message
        else:
            count += header.message_count - first
        offset += header.frame_size
        at, first = header.end, 0
    if assembler.pending:
        raise CorruptData(
            f"read answer from position {position} ends inside a value in pieces",
            position=position,
        )
    _check_page_end(position, at, next_position)
    return Page(chain.from_iterable(frames), count, next_position)


def frames_page_of(answer: Answer, position: int) -> tuple[bytes, int]:
    """The stored frames of a binary read answer from ``position``, checked, and ``X-Next``.

    For copying a stream through a server: the frames come back byte for
    byte as stored (producer ids, compression and values in pieces
    included), each checked here, and a value in pieces whole.
    """
    body = answer.body
    skip, next_position = _page_bounds(answer)
    if skip:
        raise InvalidInput(f"position {position} is not the start of a frame")
    pieces = PieceCheck()
    offset, at = 0, started_at(answer, position)  # from 0: where a trimmed stream starts
    while offset < len(body):
        header = verify_frame(body, offset, at)
        pieces.take(header, offset)
        offset += header.frame_size
        at = header.end
    pieces.finish()
    _check_page_end(position, at, next_position)
    return body, next_position


def _frame_start(body: bytes, position: int, skip: int) -> int:
    """Where the answer's first frame starts, when ``position`` is its message ``skip``."""
    version = body[4] if len(body) > 4 else FORMAT_V1
    header_size = FRAME_HEADER_SIZE if version == FORMAT_V1 else FRAME_HEADER_V2_SIZE
    return position - header_size - SLOT_SIZE * skip


# JSON records ------------------------------------------------------------------------

# The most records a JSON read asks for at a time: the read route's default
# largest page (``serve --max-read-messages``, which a larger ``limit`` exceeds).
RECORDS_PAGE: Final = 10_000


def records_request(
    settings: Settings,
    stream: str,
    position: int | Seek,
    limit: int | None,
    *,
    sized: bool = True,
) -> Request:
    """One page of JSON records from ``position``, or a ``Seek`` (the NDJSON read route).

    ``sized=False`` leaves the page's size to the server (its default page,
    within its ``--max-read-messages``), for a server that refused ours.
    """
    query = _start_query(position)
    if sized:
        query += f"&limit={RECORDS_PAGE if limit is None else min(limit, RECORDS_PAGE)}"
    return Request(
        "GET", stream_path(stream, "/messages") + query, headers(settings, Accept=NDJSON)
    )


def records_ahead(answer: Answer) -> tuple[int, int]:
    """An NDJSON read answer's record count and ``X-Next``, without decoding its records.

    Enough to ask for the next page before this one is decoded: a record's
    JSON never holds a raw newline, so each line ends in one.
    """
    raise_for_error(answer)
    try:
        next_position = int(answer.header("X-Next") or "")
    except ValueError:
        raise CorruptData("a read answer lacks its X-Next header") from None
    return answer.body.count(b"\n"), next_position


def records_of(answer: Answer) -> list[dict[str, Any]]:
    """The records of an NDJSON read answer, as dicts (docs/HTTP.md: Reading)."""
    try:
        records = parse_json_lines(answer.body)
    except ValueError as exc:
        raise CorruptData(f"the server's NDJSON answer is not JSON: {exc}") from None
    if not all(type(record) is dict for record in records):
        raise CorruptData("the server's NDJSON answer holds a line that is not a record")
    return records


# Messages to publish -----------------------------------------------------------------


def batch_of(messages: Iterable[object], *, compress: bool = False) -> EncodedBatch:
    """Encode ``messages`` for ``publish``: pairs, bare values, or objects with key and value.

    Keys and values may be ``bytes`` or ``str`` (UTF-8). Lists of
    ``(bytes, bytes)`` pairs, the common case, go straight to the encoder.
    ``compress`` zstd-compresses the values where that makes them smaller.
    """
    rows = messages if isinstance(messages, list | tuple) else list(messages)
    if rows and type(rows[0]) is tuple:
        try:
            return encode_batch(rows, compress=compress)  # type: ignore[arg-type]
        except InvalidBatch:
            pass  # str values, or another shape among the pairs: normalise, then say which
    pairs = [_pair(index, message) for index, message in enumerate(rows)]
    return encode_batch(pairs, compress=compress)


def _pair(index: int, message: object) -> tuple[bytes | str, bytes]:
    if isinstance(message, bytes | bytearray | memoryview | str):
        key: object = b""
        value: object = message
    elif isinstance(message, tuple | list) and len(message) == 2:
        key, value = message
    elif hasattr(message, "key") and hasattr(message, "value"):
        key, value = message.key, message.value
    else:
        raise InvalidBatch(
            f"message {index} must be a value, a (key, value) pair or have .key and .value, "
            f"not {type(message).__name__}"
        )
    if isinstance(value, str):
        value = value.encode("utf-8")
    return key, value  # type: ignore[return-value]  # encode_batch names a bad type


# Retries -----------------------------------------------------------------------------


class NotSent(Exception):
    """The request never left: connecting failed. Any request may be tried again."""


class Lost(Exception):
    """The connection failed after the request may have left: the server may have acted."""


# Errors after which an append certainly did nothing, so it is safe to send again.
_APPEND_NOT_TRIED: Final = (Overloaded, CommitterClosed)
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# Answers to an append that another try can put right when the batch has a
# producer id: the server failed mid-commit (500), or its writer was deposed
# or is being taken over (409). The server then opens a writer afresh, which
# rebuilds the producer table from storage, so a batch that did land is
# answered with its first receipts rather than appended again.
_APPEND_RETRY: Final = (InternalError, StaleWriter, StreamLocked)
# Errors after which an append may or may not have been committed: the
# storage's answer was lost, the server failed, or another writer took over
# as the commit went in (a gateway's 502/504 too: the server may have acted).
_APPEND_IN_DOUBT: Final = (StorageError, InternalError, StaleWriter)
_DOUBT_STATUSES: Final = frozenset({500, 502, 504})
DOUBT: Final = "the append may or may not have been committed"


@dataclass
class Retries:
    """Exponential backoff with jitter, bounded by a count of retries and/or a deadline.

    ``delay(n)`` is drawn from [d/2, d] with d = ``base * 2**n`` capped at
    ``cap``, so clients that failed together do not come back together; a
    ``Retry-After`` from the server is a floor (itself capped).
    """

    retries: int
    deadline: float | None = None  # time.monotonic() after which no retry starts
    base: float = 0.1
    cap: float = 2.0
    retry_after_cap: float = 10.0
    # An idempotent append retries until its deadline once it may have
    # reached the server (its outcome may be in doubt); while every try was
    # refused before anything was sent, nothing is in doubt and it gives up
    # after this many, as other requests do: a server that is not running
    # is reported at once, not after ``retry_timeout``.
    unsent_retries: int | None = None
    attempt: int = field(default=0, init=False)
    reached: bool = field(default=False, init=False)

    def delay(self, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay

    def next_delay(self, failure: BaseException, request: Request) -> float | None:
        """Seconds to wait before trying ``request`` again after ``failure``, or None to give up."""
        self.reached = self.reached or not isinstance(failure, NotSent)
        limit = self.retries if self.reached or self.unsent_retries is None else self.unsent_retries
        if self.attempt >= limit or not retriable(failure, request):
            return None
        retry_after = failure.retry_after if isinstance(failure, _AnsweredError) else None
        delay = self.delay(retry_after)
        if self.deadline is not None and time.monotonic() + delay > self.deadline:
            return None
        self.attempt += 1
        return delay

    @classmethod
    def for_request(cls, settings: Settings, request: Request) -> Retries:
        """Count-bounded retries; an idempotent append's are bounded by ``retry_timeout``."""
        if request.append and request.idempotent:
            return cls(
                sys.maxsize,
                deadline=time.monotonic() + settings.retry_timeout,
                unsent_retries=settings.retries,
            )
        return cls(settings.retries)


class _AnsweredError(Exception):
    """Carries a server's error answer through the retry loop."""

    def __init__(self, error: MessageVaultError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def answered_error(answer: Answer) -> _AnsweredError | None:
    """The error an answer holds, ready for ``Retries``; None for a success."""
    if answer.status < 300:
        return None
    retry_after = answer.header("Retry-After")
    try:
        seconds = float(retry_after) if retry_after is not None else None
    except ValueError:
        seconds = None  # an HTTP date: the backoff alone will do
    return _AnsweredError(error_from_body(answer.status, answer.body), seconds)


def retriable(failure: BaseException, request: Request) -> bool:
    """Whether ``request`` may be sent again after ``failure``.

    Reads, and appends of a batch with a producer id, are sent again after
    any connection failure or retriable answer: the server answers a repeat
    of a committed batch with its first receipts. Such an append is also
    sent again after a 500 or a 409 ``stale_writer``/``stream_locked`` (the
    stream changing writers): the answer to its retry comes from a writer
    that knows what storage holds. An append without one (a
    client made with ``idempotent=False``) is sent again only when it surely
    did nothing, i.e. it never left (``NotSent``) or the server refused it
    before trying (``overloaded``, ``committer_closed``); a lost connection
    or a ``storage_error`` leaves it in doubt, so it is not repeated.
    """
    if isinstance(failure, NotSent):
        return True
    if isinstance(failure, Lost):
        return request.idempotent
    if isinstance(failure, _AnsweredError):
        error = failure.error
        if not request.idempotent:
            return isinstance(error, _APPEND_NOT_TRIED)
        if request.append and (isinstance(error, _APPEND_RETRY) or error.status == 500):
            return True
        return error.retriable or error.status in _RETRY_STATUSES
    return False


def in_doubt(error: MessageVaultError) -> bool:
    """Whether an append answered with ``error`` may have been committed all the same."""
    return isinstance(error, _APPEND_IN_DOUBT) or error.status in _DOUBT_STATUSES


def unreachable(refusals: Sequence[tuple[Node, BaseException]]) -> NotSent:
    """The failure of a round in which every node refused: each node's reason.

    With one node, its own failure, as before there were several.
    """
    if len(refusals) == 1 and isinstance(refusals[0][1], NotSent):
        return refusals[0][1]
    return NotSent("; ".join(f"{node.url}: {failure}" for node, failure in refusals))


def give_up(
    failure: BaseException, request: Request, settings: Settings, node: Node
) -> BaseException:
    """The exception to raise once ``failure``, ``request``'s last on ``node``, is not retried.

    An append's error that leaves its commit in doubt says so (a note), as a
    lost connection does: after ``retry_timeout`` of ``storage_error``, say.
    A server none of whose nodes could be reached is named by all of them.
    """
    if isinstance(failure, _AnsweredError):
        error = failure.error
        if request.append and in_doubt(error):
            error.add_note(DOUBT)
        return error
    path = request.path.split("?")[0]
    where = f"{request.method} {node.url}{path}"
    if isinstance(failure, NotSent):
        if len(settings.nodes) > 1:
            where = f"{request.method} {path} at any of its {len(settings.nodes)} nodes"
        return ServerUnreachable(f"cannot reach the server for {where}: {failure}")
    doubt = f"; {DOUBT}" if request.append else ""
    return ServerUnreachable(f"connection lost during {where}: {failure}{doubt}")
