"""Messages as JSON-ready records: one shape for the CLI's NDJSON and the HTTP API."""

from __future__ import annotations

import base64
import functools
from datetime import UTC, datetime
from typing import Any

from messagevault.format import Message


@functools.lru_cache(maxsize=256)  # every message of a batch shares its timestamp
def iso_time(timestamp_ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, e.g. 2026-11-26T13:34:05.433+00:00."""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds")


def message_record(message: Message) -> dict[str, Any]:
    """The message's fields; a value that is not UTF-8 text comes as base64."""
    record: dict[str, Any] = {
        "position": message.position,
        "sequence": message.sequence,
        "id": message.id.hex(),
        "timestamp": iso_time(message.timestamp),
        "key": message.key.decode("utf-8", "replace"),
        "next_position": message.next_position,
    }
    try:
        record["value"] = message.value.decode("utf-8")
        record["encoding"] = "utf-8"
    except UnicodeDecodeError:
        record["value"] = base64.b64encode(message.value).decode("ascii")
        record["encoding"] = "base64"
    return record
