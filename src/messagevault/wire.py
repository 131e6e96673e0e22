"""What the server and its clients say to each other over HTTP, in one place.

Both sides use these functions, so a shape changes here or nowhere: content
types, messages as JSON records (and back to key/value bytes), append answers
(and the exact ``AppendResult`` rebuilt from a short one), stream info, and
the error body. No HTTP library is imported here; docs/HTTP.md describes the
same shapes for other languages.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from messagevault.errors import (
    CorruptData,
    InvalidBatch,
    MessageVaultError,
    PositionTrimmed,
    for_code,
)
from messagevault.format import (
    CONTINUATION,
    HEAD,
    MAX_BATCH_COUNT,
    MAX_PRODUCER_SEQ,
    NO_PRODUCER,
    EncodedBatch,
    Message,
    encode_batch,
    frame_columns,
    hex_id_format,
    message_positions,
    read_header,
)
from messagevault.storage.base import ReadAccess
from messagevault.writer import AppendResult

BATCH_CONTENT_TYPE: Final = "application/x-messagevault-batch"
JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
EVENT_STREAM: Final = "text/event-stream"
# On the answer to an append that was a duplicate: its receipts are those of
# the batch committed earlier with the same producer id and sequence.
DUPLICATE_HEADER: Final = "X-Duplicate"
# On append answers of a server node (several nodes): the advertised URL of the
# stream's writer, for a client that sends the stream's next appends there.
WRITER_HEADER: Final = "X-MessageVault-Writer"
# On read answers: the position the answer starts at, where ``from``,
# ``from_sequence`` or ``from_time`` led (a client that seeks checks the
# frames it gets against it).
POSITION_HEADER: Final = "X-Position"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)


@functools.lru_cache(maxsize=256)  # every message of a batch shares its timestamp
def iso_time(timestamp_ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, e.g. 2026-11-26T13:34:05.433+00:00."""
    return _datetime(timestamp_ms).isoformat(timespec="milliseconds")


def _datetime(timestamp_ms: int) -> datetime:
    # Exact: dividing by 1000 in floating point lost a millisecond now and then.
    return _EPOCH + timestamp_ms * _MILLISECOND


def parse_time(text: str) -> int:
    """``iso_time`` backwards: milliseconds since the epoch, exactly."""
    return (datetime.fromisoformat(text) - _EPOCH) // _MILLISECOND


# Messages as JSON records ------------------------------------------------------------


def message_record(message: Message) -> dict[str, Any]:
    """The message's fields, losslessly: a key or value that is not UTF-8 comes as base64.

    ``encoding`` always says how ``value`` is written; ``key_encoding`` is
    there only for a key that is not UTF-8 (``"base64"``), so the records of
    text keys stay as they were.
    """
    record: dict[str, Any] = {
        "position": message.position,
        "sequence": message.sequence,
        "id": message.id.hex(),
        "timestamp": iso_time(message.timestamp),
    }
    try:
        record["key"] = message.key.decode("utf-8")
    except UnicodeDecodeError:
        record["key"] = base64.b64encode(message.key).decode("ascii")
        record["key_encoding"] = "base64"
    record["next_position"] = message.next_position
    try:
        record["value"] = message.value.decode("utf-8")
        record["encoding"] = "utf-8"
    except UnicodeDecodeError:
        record["value"] = base64.b64encode(message.value).decode("ascii")
        record["encoding"] = "base64"
    return record


class _Record(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):  # no cycles
    """``message_record`` as msgspec encodes it: the same fields, in the same order."""

    position: int
    sequence: int
    id: str
    timestamp: str
    key: str
    key_encoding: str | None = None  # only for a key that is not UTF-8: left out when None
    next_position: int
    value: str
    encoding: str


class _ReadAnswer(msgspec.Struct):
    """The JSON read answer: ``{"stream", "messages", "next"}``."""

    stream: str
    messages: list[_Record]
    next: int


# Records go out as msgspec Structs: about 2x faster than a text template per
# message and 1.2x faster than dicts through orjson at 100 B values, 2-3x
# faster than the template at 1,000 B (its escaping is the costly part).
_ENCODER: Final = msgspec.json.Encoder()


def _record(message: Message) -> _Record:
    key_encoding = None
    try:
        key = message.key.decode("utf-8")
    except UnicodeDecodeError:
        key = base64.b64encode(message.key).decode("ascii")
        key_encoding = "base64"
    try:
        value, encoding = message.value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        value, encoding = base64.b64encode(message.value).decode("ascii"), "base64"
    return _Record(
        position=message.position,
        sequence=message.sequence,
        id=message.id.hex(),
        timestamp=iso_time(message.timestamp),
        key=key,
        key_encoding=key_encoding,
        next_position=message.next_position,
        value=value,
        encoding=encoding,
    )


def _records(rows: Sequence[tuple[int, int, int, bytes, bytes, int]]) -> list[_Record]:
    """The records of messages, or of rows of their fields in ``Message``'s order."""
    try:  # keys and values of text, the common case, without a call per message
        return [
            _Record(
                position=position,
                sequence=sequence,
                # message_id(...).hex() without its three to_bytes: ~0.3 us a message.
                id=f"{_hex_time(timestamp)}{position & _48_BITS:012x}{sequence & _32_BITS:08x}",
                timestamp=iso_time(timestamp),
                key=key.decode("utf-8"),
                next_position=next_position,
                value=value.decode("utf-8"),
                encoding="utf-8",
            )
            for position, sequence, timestamp, key, value, next_position in rows
        ]
    except UnicodeDecodeError:
        return [_record(Message(*row)) for row in rows]


_48_BITS: Final = 0xFFFF_FFFF_FFFF  # the id's timestamp and position fields (format.message_id)
_32_BITS: Final = 0xFFFF_FFFF  # its sequence field


@functools.lru_cache(maxsize=256)  # every message of a batch shares its timestamp
def _hex_time(timestamp_ms: int) -> str:
    return f"{timestamp_ms & _48_BITS:012x}"


# A page of records, as the read routes encode it.
Records = list[_Record]


def records_of_messages(messages: Sequence[Message]) -> Records:
    """The records of ``messages`` (``message_record`` of each), ready to encode."""
    return _records(messages)


def records_of_frames(frames: bytes, skip: int, limit: int) -> tuple[Records, int] | None:
    """The records of up to ``limit`` messages of stored frames, and the position after them.

    ``frames`` and ``skip`` are as ``Reader.read_frames`` returns them (the
    binary read route's page): the records are cut from each frame's columns
    (``frame_columns``), without a ``Message`` per message, about twice as
    fast as reading messages. None when the frames hold a value in pieces,
    which only a message reader joins.
    """
    records: Records = []
    offset = 0
    next_position = 0
    first = skip
    while offset < len(frames) and len(records) < limit:
        header = read_header(frames, offset, None)
        if header.flags & (HEAD | CONTINUATION):
            return None
        keys, values = frame_columns(frames, offset, header, first)
        count = min(len(keys), limit - len(records))
        positions = message_positions(
            header.base_position, first, first + count, header.header_size
        )
        if first + count < header.message_count:
            next_position = header.message_position(first + count)
        else:
            next_position = header.end
        nexts = [*positions[1:], next_position]
        sequences = range(header.base_sequence + first, header.base_sequence + first + count)
        timestamps = itertools.repeat(header.timestamp)
        records += _records(
            list(zip(positions, sequences, timestamps, keys, values, nexts, strict=False))
        )
        offset += header.frame_size
        first = 0
    return records, next_position


def records_ndjson_of(records: Records) -> bytes:
    """The NDJSON read answer of ``records``: a line each, each ending in a newline."""
    return _ENCODER.encode_lines(records)


def record_json(message: Message) -> bytes:
    """``message_record(message)`` as compact UTF-8 JSON: one NDJSON line (no newline), an event.

    The same fields and values as ``json.dumps(message_record(message))``,
    without its spaces and ``\\uXXXX`` escapes (text other than ASCII comes as
    UTF-8, as JSON allows).
    """
    return _ENCODER.encode(_record(message))


def records_ndjson(messages: Sequence[Message]) -> bytes:
    """The NDJSON read answer: one ``record_json`` line per message, each ending in a newline."""
    return _ENCODER.encode_lines(_records(messages))


def read_answer_json(stream: str, records: Records, next_position: int) -> bytes:
    """The JSON read answer: ``{"stream": ..., "messages": [record, ...], "next": ...}``."""
    return _ENCODER.encode(_ReadAnswer(stream, records, next_position))


_DECODER: Final = msgspec.json.Decoder()


def parse_json(body: bytes) -> Any:
    """``json.loads(body)``, the same values and the same errors, mostly at msgspec's speed.

    msgspec refuses a few documents that ``json.loads`` takes (NaN and
    Infinity, lone surrogates, a byte order mark, UTF-16 and UTF-32, numbers
    beyond a double) and words its errors its own way: those go on to
    ``json.loads``, so that what is accepted and every message stay as they
    were. Raises ``ValueError`` (``json.JSONDecodeError`` and
    ``UnicodeDecodeError`` among them), also for what ``json.loads`` cannot
    take without a ``RecursionError`` or a bare ``ValueError``.
    """
    try:
        return _DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # Python's bound on the digits of an integer
        raise ValueError("a number with too many digits") from None


def parse_json_lines(body: bytes) -> list[Any]:
    """NDJSON: a JSON value a line (blank lines skipped), each read as ``parse_json`` does."""
    try:
        return _DECODER.decode_lines(body)
    except (msgspec.DecodeError, RecursionError):
        return [parse_json(line) for line in body.splitlines() if line.strip()]


# What a record may hold: what an append takes, and what a read adds (ignored).
RECORD_FIELDS = frozenset(
    {"key", "key_encoding", "value", "encoding"}
    | {"position", "sequence", "id", "timestamp", "next_position"}
)


def record_pairs(records: object) -> list[tuple[bytes, bytes]]:
    """JSON records (``{"key", "value", "encoding", "key_encoding"}``) as (key, value) bytes.

    ``key`` defaults to ``""``; ``encoding`` and ``key_encoding`` to
    ``"utf-8"``, or ``"base64"``. Fields of ``message_record`` that an
    append does not take (position, id...) are ignored, so a record read can
    be appended again unchanged. ``InvalidBatch`` names the first bad record.
    """
    if not isinstance(records, list):
        raise InvalidBatch('messages must be a list: [{"key": ..., "value": ...}, ...]')
    if len(records) > MAX_BATCH_COUNT:
        raise InvalidBatch(f"a batch holds at most {MAX_BATCH_COUNT} messages")
    pairs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidBatch(f"message {index} must be an object")
        if not RECORD_FIELDS.issuperset(record):
            unknown = ", ".join(sorted(set(record) - RECORD_FIELDS))
            raise InvalidBatch(f"message {index} has unknown fields: {unknown}")
        key = _field_bytes(index, record, "key", "key_encoding", "")
        value = _field_bytes(index, record, "value", "encoding", None)
        pairs.append((key, value))
    return pairs


def _field_bytes(
    index: int, record: dict[str, Any], name: str, encoding_name: str, default: str | None
) -> bytes:
    text = record.get(name, default)
    encoding = record.get(encoding_name, "utf-8")
    if not isinstance(text, str):
        raise InvalidBatch(f"message {index}: {name} must be a string")
    if encoding == "utf-8":
        # JSON may carry lone surrogates; keep them rather than fail on them.
        return text.encode("utf-8", "surrogatepass")
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidBatch(f"message {index}: {name} is not valid base64") from None
    raise InvalidBatch(f"message {index}: {encoding_name} must be 'utf-8' or 'base64'")


# What a JSON append body may hold.
APPEND_FIELDS: Final = ("messages", "producer", "sequence")


def json_batch(body: bytes) -> list[tuple[bytes, bytes]]:
    """An append body ``{"messages": [record, ...]}`` as (key, value) bytes."""
    return record_pairs(_append_document(body)["messages"])


def json_append(body: bytes) -> EncodedBatch:
    """An append body as the batch to commit, with its producer id and sequence if it has them.

    ``{"producer": "<UUID or 32 hex digits>", "sequence": N, "messages": [...]}``:
    ``producer`` and ``sequence`` come together or not at all (``null`` is
    the same as absent). ``InvalidBatch`` names the bad field.
    """
    document = _append_document(body)
    batch = encode_batch(record_pairs(document["messages"]))
    producer = document.get("producer")
    sequence = document.get("sequence")
    if producer is None and sequence is None:
        return batch
    if producer is None:
        raise InvalidBatch('"sequence" was given without "producer": send both or neither')
    if sequence is None:
        raise InvalidBatch('"producer" was given without "sequence": send both or neither')
    return batch.with_producer(producer_id(producer), _producer_sequence(sequence))


def _append_document(body: bytes) -> dict[str, Any]:
    try:
        document = parse_json(body)
    except ValueError as exc:
        raise InvalidBatch(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
        raise InvalidBatch('body must be {"messages": [{"key": ..., "value": ...}, ...]}')
    unknown = set(document).difference(APPEND_FIELDS)
    if unknown:
        # A misspelt "producer" would otherwise turn deduplication off unseen.
        raise InvalidBatch(
            f"body has unknown fields: {', '.join(sorted(unknown))} "
            f"(it takes {', '.join(APPEND_FIELDS)})"
        )
    return document


_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
# The UUID text form: 8-4-4-4-12 hex digits (uuid.UUID also takes braces,
# "urn:uuid:" and more; the wire takes only the two forms documented).
_UUID_GROUPS: Final = (8, 4, 4, 4, 12)


def producer_id(text: object) -> bytes:
    """A producer id from its JSON form: a UUID (``"8-4-4-4-12"`` hex) or 32 hex digits."""
    if isinstance(text, str) and len(text) <= 36:
        groups = text.split("-")
        digits = "".join(groups)
        plain = len(groups) == 1 and len(digits) == 32
        dashed = tuple(len(group) for group in groups) == _UUID_GROUPS
        if (plain or dashed) and _HEX_DIGITS.issuperset(digits):
            producer = bytes.fromhex(digits)
            if producer == NO_PRODUCER:
                raise InvalidBatch('"producer" must not be all zeros (that means no producer)')
            return producer
    raise InvalidBatch(
        '"producer" must be a UUID such as "0f8e5c1a-3b2d-4c6e-9a7f-1e2d3c4b5a69" '
        f"or 32 hex digits, not {text!r:.60}"
    )


def _producer_sequence(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRODUCER_SEQ:
        raise InvalidBatch(
            f'"sequence" must be an integer 0..{MAX_PRODUCER_SEQ}, not {value!r:.40}'
        )
    return value


# Append answers ------------------------------------------------------------------------


def appended_json(stream: str, result: AppendResult) -> bytes:
    """The append answer, one receipt per message, formatted straight to bytes.

    Building a dict per message and ``json.dumps``-ing them cost ~3.4 us a
    message, most of the server's time on large batches. Here one ``%``
    over a template repeated per message does it in ~0.3 us, the ids
    included (``format.hex_id_format``).
    """
    count = result.message_count
    positions = result.positions
    sequences = result.sequences
    id_format, id_positions, id_sequences = hex_id_format(result.timestamp, positions, sequences)
    arguments: list[int] = [0] * (4 * count)
    arguments[0::4] = positions
    arguments[1::4] = sequences
    arguments[2::4] = id_positions
    arguments[3::4] = id_sequences
    receipt = b'{"position": %d, "sequence": %d, "id": "' + id_format + b'"},'
    receipts = (receipt * count) % tuple(arguments)
    return (
        b'{"stream": "%b", "position": %d, "messages": [%b]}'
        % (
            stream.encode(),  # a valid stream name needs no JSON escaping
            result.committed_length,
            receipts[:-1],
        )
    )


def appended_minimal(stream: str, result: AppendResult) -> bytes:
    """The ``Prefer: return=minimal`` answer: the batch's first and last receipts and its count.

    A batch is stored as one frame, so the receipts in between follow from
    these (docs/HTTP.md; ``append_result_from_minimal``). Formatted straight
    to bytes, like ``appended_json``: ISO times need no JSON escaping either.
    """
    first, last = result[0], result[-1]
    return _MINIMAL % (
        stream.encode(),
        result.committed_length,
        result.message_count,
        iso_time(result.timestamp).encode(),
        first.position,
        first.sequence,
        first.id.hex().encode(),
        last.position,
        last.sequence,
        last.id.hex().encode(),
    )


_MINIMAL: Final = (
    b'{"stream": "%b", "position": %d, "count": %d, "timestamp": "%b", '
    b'"first": {"position": %d, "sequence": %d, "id": "%b"}, '
    b'"last": {"position": %d, "sequence": %d, "id": "%b"}}'
)


def append_result_from_minimal(answer: Mapping[str, Any], batch: EncodedBatch) -> AppendResult:
    """The exact ``AppendResult`` of ``batch`` from its minimal answer.

    The answer's last receipt and ids are checked against the result: a
    mismatch (a batch other than the one sent, a server speaking another
    format) raises ``CorruptData`` rather than hand out wrong receipts.
    """
    try:
        first = answer["first"]
        result = AppendResult.of_batch(
            batch,
            int(first["position"]),
            int(first["sequence"]),
            parse_time(answer["timestamp"]),
            int(answer["position"]),
        )
        expected = [answer["first"], answer["last"], int(answer["count"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"append answer lacks {exc}: {dict(answer)!r:.300}") from None
    got: list[object] = [
        {"position": r.position, "sequence": r.sequence, "id": r.id.hex()}
        for r in (result[0], result[-1])
    ]
    got.append(result.message_count)
    if got != expected:
        raise CorruptData(
            f"append answer {dict(answer)!r:.300} does not describe a batch of "
            f"{result.message_count} messages in {result.frame_size} bytes"
        )
    return result


# Stream info ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """A stream's committed state as the server describes it (``GET /streams/{stream}``).

    ``first_write`` and ``last_write`` are ``None`` for an empty stream;
    ``GET /streams`` gives only name, length and message count, and
    ``read_access`` only comes with a single stream's info.
    ``first_position`` and ``first_sequence`` are where the readable
    messages start: 0 and 0 unless the stream was trimmed, the length and
    ``messages`` when it was trimmed of all of them. ``first_write`` is the
    first *readable* message's time.
    """

    stream: str
    length: int
    messages: int
    first_write: datetime | None = None
    last_write: datetime | None = None
    read_access: ReadAccess | None = None
    first_position: int = 0
    first_sequence: int = 0

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> StreamInfo:
        access = document.get("read_access")
        return cls(
            stream=document["stream"],
            length=document["length"],
            messages=document["messages"],
            first_write=_optional_time(document.get("first_write")),
            last_write=_optional_time(document.get("last_write")),
            read_access=(
                None
                if access is None
                else ReadAccess(access["kind"], access["location"], access.get("expires_at"))
            ),
            # Absent from servers that predate trimming: nothing was trimmed there.
            first_position=document.get("first_position", 0),
            first_sequence=document.get("first_sequence", 0),
        )

    @classmethod
    def from_timestamps(
        cls,
        stream: str,
        length: int,
        messages: int,
        *,
        first_write: int | None,
        last_write: int | None,
        read_access: ReadAccess | None = None,
        first_position: int = 0,
        first_sequence: int = 0,
    ) -> StreamInfo:
        """From the milliseconds a checkpoint and a frame hold (the server's side)."""
        return cls(
            stream,
            length,
            messages,
            None if first_write is None else _datetime(first_write),
            None if last_write is None else _datetime(last_write),
            read_access,
            first_position,
            first_sequence,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of a single stream's info (``from_json`` reads it back)."""
        access = self.read_access
        return {
            "stream": self.stream,
            "length": self.length,
            "messages": self.messages,
            "first_position": self.first_position,
            "first_sequence": self.first_sequence,
            "first_write": _optional_iso(self.first_write),
            "last_write": _optional_iso(self.last_write),
            "read_access": None if access is None else dataclasses.asdict(access),
        }


def _optional_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _optional_iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


# Limits --------------------------------------------------------------------------------

# The server's default largest request body (``serve --max-body``): room for a
# 256 MiB value sent as binary frames, or as base64 in a JSON body.
DEFAULT_MAX_BODY: Final = 512 * 1024 * 1024


# Errors --------------------------------------------------------------------------------


def error_body(code: str, detail: str, fields: Mapping[str, object] | None = None) -> bytes:
    """The one error shape: ``{"error": code, "detail": text}``, plus ``fields`` of some codes.

    ``position_trimmed`` carries ``first_position``, where the stream now starts.
    """
    return json.dumps({"error": code, "detail": detail, **(fields or {})}).encode()


def error_from_body(status: int, body: bytes) -> MessageVaultError:
    """The error an answer carries, as the class the server raised (``errors.for_code``).

    An answer not in the error shape (a proxy's page, say) becomes an
    ``UnknownError`` with code ``http_<status>``. ``status`` is kept on the error.
    """
    try:
        document = json.loads(body)
        code, detail = document["error"], document["detail"]
        if not isinstance(code, str) or not isinstance(detail, str):
            raise TypeError("not strings")
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        code, detail = f"http_{status}", f"HTTP {status}" + (f": {text}" if text else "")
    error = for_code(code)(detail)
    error.status = status
    if isinstance(error, PositionTrimmed):
        first = document.get("first_position") if isinstance(document, dict) else None
        error.first_position = first if isinstance(first, int) else None
    return error
