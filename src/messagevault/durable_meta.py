"""Durable Streams on MessageVault: the per-stream metadata and the protocol's pure rules.

A Durable Streams stream at URL path P is the MessageVault stream
``stream_name(P)`` (``ds-`` + 20 hex digits of SHA-256(P)); what the
protocol knows about it beyond its messages (content type, TTL or expiry,
closure, the last ``Stream-Seq``, producer epochs) is the system file
``meta_file(stream)``, a small JSON document every node can read. The
stream exists for the protocol exactly when that file does.

Everything here is pure (no I/O): header parsing and validation, offsets,
JSON flattening, expiry, cursors. server/durable_streams.py does the I/O.
docs/DURABLE-STREAMS.md describes the mapping.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from messagevault.errors import InvalidInput

PREFIX: Final = "ds-"
META_PREFIX: Final = "durable-streams."
# The key of the message that closes a stream, in the same batch as the final
# append. No Durable Streams append ever has a key, so reads skip it safely.
CLOSED_KEY: Final = b"\x00ds:closed"
OFFSET_DIGITS: Final = 16
START: Final = "-1"
NOW: Final = "now"
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
JSON_TYPE: Final = "application/json"
MAX_SAFE_INTEGER: Final = 2**53 - 1
_OFFSET = re.compile(r"\d{16}")
# The reference server's offsets are <read sequence>_<byte offset>, 16 digits each;
# the conformance suite forks at its literal zero, 0000000000000000_0000000000000000.
_REFERENCE_OFFSET = re.compile(r"(\d{16})_(\d{16})")
_TTL = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")
_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
# Cursors (protocol section 10.1): 20 s intervals counted from this epoch.
CURSOR_EPOCH: Final = datetime(2024, 10, 9, tzinfo=UTC).timestamp()
CURSOR_INTERVAL: Final = 20
MAX_JITTER: Final = 3600


def stream_name(path: str) -> str:
    """The MessageVault stream holding the Durable Streams stream at ``path``."""
    return PREFIX + hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def meta_file(stream: str) -> str:
    return f"{META_PREFIX}{stream}.json"


def format_offset(position: int) -> str:
    """A MessageVault position as an opaque, lexicographically sortable offset."""
    return f"{position:0{OFFSET_DIGITS}d}"


def parse_offset(text: str) -> int:
    """The position an offset names; ``InvalidInput`` unless ``format_offset`` made it."""
    if not _OFFSET.fullmatch(text):
        raise InvalidInput(
            f"offset must be -1, now or an offset this server returned, not {text!r}"
        )
    return int(text)


def parse_fork_offset(text: str) -> int:
    """``Stream-Fork-Offset``: an offset this server returned, or the reference server's spelling.

    ``<16 digits>_<16 digits>`` reads as the number its 32 digits make: with
    a zero first half that is this server's offset of the second half
    (``0000000000000000_0000000000000000`` is the start); anything else lies
    beyond every stream, so the fork is refused as beyond the tail.
    """
    reference = _REFERENCE_OFFSET.fullmatch(text)
    if reference:
        return int(reference[1] + reference[2])
    if not _OFFSET.fullmatch(text):
        raise InvalidInput(
            f"Stream-Fork-Offset must be an offset this server returned, not {text!r:.60}"
        )
    return int(text)


def parse_sub_offset(raw: str | None) -> int:
    """``Stream-Fork-Sub-Offset``: a non-negative decimal integer (no sign, zeros or point)."""
    if raw is None:
        return 0
    if not _TTL.fullmatch(raw) or int(raw) > MAX_SAFE_INTEGER:
        raise InvalidInput(f"Stream-Fork-Sub-Offset must be a whole number from 0, not {raw!r:.40}")
    return int(raw)


def media_type(content_type: str | None) -> str:
    """The media type alone, lower case: ``application/json; charset=utf-8`` is JSON."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def creation_type(content_type: str | None) -> str:
    """The content type a PUT gives a stream: as sent, or the default when absent or malformed."""
    if not content_type or not _MEDIA_TYPE.match(content_type.strip()):
        return DEFAULT_CONTENT_TYPE
    return content_type.strip()


def is_json(content_type: str) -> bool:
    return media_type(content_type) == JSON_TYPE


def is_text(content_type: str) -> bool:
    """Whether SSE carries this type's data as text (else base64)."""
    kind = media_type(content_type)
    return kind.startswith("text/") or kind == JSON_TYPE


def parse_ttl(raw: str | None) -> int | None:
    """``Stream-TTL``: a non-negative decimal integer, no sign, zeros, point or exponent."""
    if raw is None:
        return None
    if not _TTL.fullmatch(raw):
        raise InvalidInput(f"Stream-TTL must be a whole number of seconds, not {raw!r}")
    return int(raw)


def parse_expires_at(raw: str | None) -> float | None:
    """``Stream-Expires-At`` (RFC 3339) as seconds since the epoch."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidInput(f"Stream-Expires-At must be an RFC 3339 time with a zone, not {raw!r}")
    return moment.timestamp()


def closed_header(raw: str | None) -> bool:
    """``Stream-Closed``: only ``true`` (any case) counts; other values are as if absent."""
    return raw is not None and raw.strip().lower() == "true"


@dataclass(frozen=True)
class ProducerHeaders:
    """``Producer-Id``/``-Epoch``/``-Seq``, checked: all three or none."""

    id: str
    epoch: int
    seq: int


def parse_producer(id_: str | None, epoch: str | None, seq: str | None) -> ProducerHeaders | None:
    given = [value is not None for value in (id_, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise InvalidInput("Producer-Id, Producer-Epoch and Producer-Seq go together: all or none")
    assert id_ is not None and epoch is not None and seq is not None
    if not id_:
        raise InvalidInput("Producer-Id must not be empty")
    return ProducerHeaders(
        id_, _safe_integer("Producer-Epoch", epoch), _safe_integer("Producer-Seq", seq)
    )


def _safe_integer(name: str, raw: str) -> int:
    if not _DIGITS.fullmatch(raw) or int(raw) > MAX_SAFE_INTEGER:
        raise InvalidInput(f"{name} must be an integer from 0 to 2^53-1, not {raw!r:.40}")
    return int(raw)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number as a float, refused when a double cannot hold it (1e400 is no Infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is beyond what a double holds")
    return value


def json_messages(body: bytes, *, initial: bool) -> list[bytes]:
    """A JSON append's messages: an array flattened one level, anything else one message.

    Each value is stored compact. An empty array is refused for an append
    (a no-op that is likely a client bug) but creates an empty stream on PUT.
    """
    try:
        document = json.loads(
            body.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    values = document if isinstance(document, list) else [document]
    if not values and not initial:
        raise InvalidInput("an empty JSON array appends nothing: send at least one value")
    return [_compact(value) for value in values]


def _compact(value: Any) -> bytes:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800", which JavaScript's JSON.stringify writes): no UTF-8
        # holds it, so the value keeps its escapes, as it came.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


def json_array(values: list[bytes]) -> bytes:
    return b"[" + b",".join(values) + b"]"


def response_cursor(client: str | None, now: float) -> str:
    """``Stream-Cursor`` for a live answer: the interval number, never at or below the client's."""
    current = math.floor((now - CURSOR_EPOCH) / CURSOR_INTERVAL)
    if client is None or not client.isdigit() or int(client) < current:
        return str(current)
    jitter = 1 + random.randrange(MAX_JITTER)  # noqa: S311 - spreads caches, no secret
    return str(int(client) + max(1, math.ceil(jitter / CURSOR_INTERVAL)))


@dataclass
class ProducerState:
    epoch: int
    last_seq: int


@dataclass
class DurableMeta:
    """One Durable Streams stream's metadata (the system file ``meta_file``)."""

    path: str
    content_type: str
    created: float  # seconds since the epoch
    ttl: int | None = None
    expires_at: str | None = None  # as the creator sent it: HEAD echoes it
    closed: bool = False
    # The offset (MessageVault position) of the closing message: the stream's final offset.
    closed_at: int | None = None
    closed_by: tuple[str, int, int] | None = None  # the producer (id, epoch, seq) that closed it
    stream_seq: str | None = None  # the last Stream-Seq accepted
    producers: dict[str, ProducerState] = field(default_factory=dict)
    # A fork: its source's URL path, the source offset it forked at (a
    # position, which every inherited message keeps), the sub-offset, and
    # the position where the fork's own appends begin (see fork_start).
    forked_from: str | None = None
    fork_offset: int | None = None
    sub_offset: int = 0
    own_from: int | None = None
    # The URL paths of this stream's live forks: its reference count.
    forks: list[str] = field(default_factory=list)
    # Deleted while forks lived: a tombstone (410, its path blocked) until the last goes.
    soft_deleted: bool = False

    def expiry(self, last_access: float) -> float | None:
        """When the stream expires, given when it was last read or written; None: never."""
        deadlines = []
        if self.expires_at is not None:
            deadlines.append(parse_expires_at(self.expires_at) or 0.0)
        if self.ttl is not None:
            deadlines.append(last_access + self.ttl)
        return min(deadlines) if deadlines else None

    def expired(self, now: float, last_access: float) -> bool:
        deadline = self.expiry(last_access)
        return deadline is not None and now >= deadline

    def same_config(
        self, content_type: str, ttl: int | None, expires_at: str | None, closed: bool
    ) -> bool:
        """Whether a PUT asks for this stream as it is (then 200, else 409)."""
        return (
            media_type(content_type) == media_type(self.content_type)
            and ttl == self.ttl
            and expires_at == self.expires_at
            and closed == self.closed
            and self.forked_from is None
        )

    def same_fork(
        self,
        *,
        content_type: str | None,
        expiry: tuple[int | None, str | None] | None,
        forked_from: str,
        fork_offset: int | None,
        sub_offset: int,
        closed: bool,
    ) -> bool:
        """Whether a fork PUT asks for this stream as it is (then 200, else 409).

        An absent content type, expiry or fork offset asks for what the fork
        inherited or defaulted to, so it matches.
        """
        return (
            self.forked_from == forked_from
            and (content_type is None or media_type(content_type) == media_type(self.content_type))
            and (expiry is None or expiry == (self.ttl, self.expires_at))
            and (fork_offset is None or fork_offset == self.fork_offset)
            and sub_offset == self.sub_offset
            and closed == self.closed
        )

    def to_json(self) -> bytes:
        document: dict[str, Any] = {
            "version": 1,
            "path": self.path,
            "content_type": self.content_type,
            "created": self.created,
            "ttl": self.ttl,
            "expires_at": self.expires_at,
            "closed": self.closed,
            "closed_at": self.closed_at,
            "closed_by": list(self.closed_by) if self.closed_by else None,
            "stream_seq": self.stream_seq,
            "producers": {k: [v.epoch, v.last_seq] for k, v in self.producers.items()},
            "forked_from": self.forked_from,
            "fork_offset": self.fork_offset,
            "sub_offset": self.sub_offset,
            "own_from": self.own_from,
            "forks": self.forks,
            "soft_deleted": self.soft_deleted,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DurableMeta:
        document = json.loads(raw)
        closed_by = document.get("closed_by")
        return cls(
            path=document["path"],
            content_type=document["content_type"],
            created=float(document["created"]),
            ttl=document.get("ttl"),
            expires_at=document.get("expires_at"),
            closed=bool(document.get("closed")),
            closed_at=document.get("closed_at"),
            closed_by=(str(closed_by[0]), int(closed_by[1]), int(closed_by[2]))
            if closed_by
            else None,
            stream_seq=document.get("stream_seq"),
            producers={
                k: ProducerState(int(v[0]), int(v[1]))
                for k, v in (document.get("producers") or {}).items()
            },
            forked_from=document.get("forked_from"),
            fork_offset=document.get("fork_offset"),
            sub_offset=int(document.get("sub_offset") or 0),
            own_from=document.get("own_from"),
            forks=list(document.get("forks") or []),
            soft_deleted=bool(document.get("soft_deleted")),
        )

    def fork_start(self, start: int) -> int:
        """Where a read of this fork from ``start`` begins.

        A fork offset inside a source frame is copied as that frame's
        messages before it, re-encoded: they keep their positions, but the
        shorter frame ends past the fork offset (a frame's header and
        per-message columns come before its values). The fork offset, which
        a reader of the source may hold, then names where the fork's own
        messages begin. With a sub-offset the fork offset is a message of
        the fork, read as such.
        """
        if (
            self.fork_offset is not None
            and self.own_from is not None
            and start == self.fork_offset
            and not self.sub_offset
        ):
            return self.own_from
        return start

    def fork_expiry(self, ttl: int | None, expires_at: str | None) -> tuple[int | None, str | None]:
        """A fork's TTL and expiry, this being its source: its own if asked, else the source's."""
        if ttl is not None or expires_at is not None:
            return ttl, expires_at
        return self.ttl, self.expires_at


def producer_id_bytes(path: str, producer: str, epoch: int) -> bytes:
    """The MessageVault producer id of a Durable Streams producer's epoch on ``path``."""
    digest = hashlib.sha256(f"{path}\0{producer}".encode("utf-8", "surrogatepass")).digest()
    return digest[:8] + epoch.to_bytes(8, "big")
