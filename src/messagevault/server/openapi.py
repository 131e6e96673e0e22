"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any, Final

from messagevault.format import MAX_BATCH_COUNT, MAX_PRODUCER_SEQ
from messagevault.retention_policy import MAX_AGE_LIMIT, MAX_BYTES_LIMIT
from messagevault.times import MAX_EPOCH_MS
from messagevault.wire import RECORD_FIELDS

_STREAM = {
    "name": "stream",
    "in": "path",
    "required": True,
    "schema": {
        "type": "string",
        "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$",
        "minLength": 3,
        "maxLength": 60,
    },
}


# Keys are at most 255 bytes of UTF-8: 63 characters always fit (4 bytes each at most).
_KEY = {"type": "string", "maxLength": 63}
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# A key that is not UTF-8 text: 255 bytes are 340 base64 characters.
_BASE64_KEY = {"type": "string", "pattern": _BASE64, "maxLength": 340}


# Every error code the server answers with, by status: docs/HTTP.md has the
# same table, and a test checks both against the classes of ``errors``.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: (
        "invalid_stream_name",
        "invalid_batch",
        "invalid_position",
        "invalid_input",
        "corrupt_data",
        "unsupported_version",
    ),
    401: ("unauthenticated",),
    403: ("forbidden", "access_denied", "insecure_transport"),
    404: ("stream_not_found", "not_found"),
    405: ("method_not_allowed",),
    409: (
        "stale_writer",
        "stream_locked",
        "lease_held",
        "lease_lost",
        "writer_conflict",
        "sequence_gap",
        "stale_sequence",
        "sequence_reused",
    ),
    410: ("position_trimmed",),
    413: ("request_entity_too_large",),
    415: ("unsupported_media_type",),
    500: ("internal_error",),
    502: ("writer_unreachable",),
    503: (
        "storage_error",
        "not_ready",
        "overloaded",
        "committer_closed",
        "no_writer",
        "not_writer",
    ),
}


_TRIM_REQUEST: Final = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "before_position": {"type": "integer", "minimum": 0},
        "before_sequence": {"type": "integer", "minimum": 0},
        "before_time": {
            "description": "RFC 3339 with a zone, or ms since the Unix epoch",
            "type": ["string", "integer"],
        },
    },
}
_TRIM_ANSWER: Final = {
    "type": "object",
    "required": ["stream", "first_position", "first_sequence", "released_bytes", "trimmed"],
    "properties": {
        "stream": {"type": "string"},
        "first_position": {"type": "integer"},
        "first_sequence": {"type": "integer"},
        "released_bytes": {"type": "integer"},
        "trimmed": {"type": "boolean", "description": "false: nothing before that point was left"},
    },
}


_LIMITS: Final = {
    "max_age": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "maximum": MAX_AGE_LIMIT,
        "description": "seconds: older messages are trimmed",
    },
    "max_bytes": {
        "type": ["integer", "null"],
        "exclusiveMinimum": 0,
        "maximum": MAX_BYTES_LIMIT,
        "description": "readable bytes kept at most (whole frames are trimmed from the front)",
    },
}
_RETENTION_POLICY: Final = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": _LIMITS,
}
_RETENTION: Final = {
    "type": "object",
    "required": ["stream", "max_age", "max_bytes", "source"],
    "properties": {
        "stream": {"type": "string"},
        **_LIMITS,
        "source": {
            "enum": ["stream", "default", "none"],
            "description": "the stream's own policy, the server's default, or none (kept)",
        },
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _error_responses() -> dict[str, Any]:
    """One reusable response per error status, its ``error`` limited to that status's codes."""
    return {
        f"Error{status}": {
            "description": ", ".join(codes),
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["error", "detail"],
                        "properties": {
                            "error": {"enum": list(codes)},
                            "detail": {"type": "string"},
                        },
                    }
                }
            },
        }
        for status, codes in ERROR_CODES.items()
    }


def _json_or_frames(schema: dict[str, Any]) -> dict[str, Any]:
    response = _json(schema, "messages (JSON), or whole stored frames by Accept")
    response["content"]["application/x-messagevault-batch"] = {
        "schema": {"type": "string", "format": "binary"}
    }
    response["content"]["application/x-ndjson"] = {"schema": {"type": "string"}}
    response["headers"] = {
        "X-Position": {
            "description": "where the answer starts: the position from, from_sequence or "
            "from_time led to",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    return response


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _appended() -> dict[str, Any]:
    response = _json(
        {"$ref": "#/components/schemas/Appended"},
        "Committed; or, for a batch repeating its producer's last one, that batch's "
        "original receipts (nothing appended)",
    )
    response["headers"] = {
        "X-Duplicate": {
            "description": "true when the batch repeated its producer's last committed one: "
            "the receipts are that batch's, and nothing was appended",
            "schema": {"const": "true"},
        }
    }
    return response


# A producer id as JSON: a UUID (8-4-4-4-12 hex digits) or 32 hex digits.
_HEX: Final = "[0-9a-fA-F]"
_PRODUCER_ID: Final = (
    f"^({_HEX}{{32}}|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}})$"
)


def openapi_document(*, max_read_messages: int = 10_000, max_wait: int = 60) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with this server's read limits as the bounds."""
    message_out = {
        "type": "object",
        "required": ["position", "sequence", "id", "timestamp", "key", "value", "next_position"],
        "properties": {
            "position": {"type": "integer", "minimum": 0},
            "sequence": {"type": "integer", "minimum": 0},
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "timestamp": {"type": "string", "format": "date-time"},
            "key": {"type": "string"},
            # Only for a key that is not UTF-8 text: then it is base64.
            "key_encoding": {"enum": ["utf-8", "base64"]},
            "value": {"type": "string"},
            "encoding": {"enum": ["utf-8", "base64"]},
            "next_position": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "MessageVault", "version": "1"},
        "paths": {
            "/streams/{stream}": {
                "parameters": [_STREAM],
                "post": {
                    "summary": "Append a batch; answered once it is committed",
                    "parameters": [
                        {
                            "name": "Prefer",
                            "in": "header",
                            "required": False,
                            "description": "return=minimal answers with the batch's first and "
                            "last receipts instead of one per message (RFC 7240)",
                            "schema": {"enum": ["return=minimal", "return=representation"]},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Batch"}},
                            "application/x-messagevault-batch": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    "responses": {
                        "200": _appended(),
                        **_errors(400, 401, 403, 404, 409, 413, 415, 503),
                    },
                },
                "get": {
                    "summary": "Stream info and direct read access",
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/StreamInfo"}),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
                "delete": {
                    "summary": "Admin: delete the stream, its messages and its retention policy",
                    "responses": {
                        "204": {"description": "Deleted"},
                        **_errors(400, 401, 403, 404, 409, 502, 503),
                    },
                },
            },
            "/streams/{stream}/retention": {
                "parameters": [_STREAM],
                "get": {
                    "summary": "The retention that applies: the stream's own policy, or the "
                    "server's default",
                    "responses": {
                        "200": _json(_RETENTION),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
                "put": {
                    "summary": "Admin: set the stream's own retention policy",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _RETENTION_POLICY}},
                    },
                    "responses": {
                        "200": _json(_RETENTION),
                        **_errors(400, 401, 403, 404, 415, 503),
                    },
                },
                "delete": {
                    "summary": "Admin: drop the stream's own policy (the default applies)",
                    "responses": {
                        "204": {"description": "Dropped (or there was none)"},
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
            },
            "/streams": {
                "get": {
                    "summary": "List streams",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["streams"],
                                "properties": {
                                    "streams": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["stream", "length", "messages"],
                                            "properties": {
                                                "stream": {"type": "string"},
                                                "length": {"type": "integer"},
                                                "messages": {"type": "integer"},
                                                "last_write": {"type": ["string", "null"]},
                                            },
                                        },
                                    }
                                },
                            }
                        ),
                        **_errors(401, 503),
                    },
                }
            },
            "/streams/{stream}/messages": {
                "parameters": [_STREAM],
                "get": {
                    "summary": (
                        "Messages from a position, a sequence or a time; long-poll with wait; "
                        "Server-Sent Events with Accept: text/event-stream"
                    ),
                    "description": (
                        "Give at most one of from, from_sequence and from_time (none: from 0). "
                        "limit=0 reads no messages: next (X-Next) is where the read would start"
                    ),
                    "parameters": [
                        {
                            "name": "from",
                            "in": "query",
                            "description": "A message position, or end (the committed length)",
                            "schema": {
                                "oneOf": [
                                    {"type": "integer", "minimum": 0},
                                    {"const": "end"},
                                ]
                            },
                        },
                        {
                            "name": "from_sequence",
                            "in": "query",
                            "description": "Start at message number N (counting from 0)",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "from_time",
                            "in": "query",
                            "description": (
                                "Start at the first message at or after this time: RFC 3339 with "
                                "a zone (2026-12-01T14:00Z) or milliseconds since the Unix epoch"
                            ),
                            # anyOf: in a query every value is text, and digits are text too.
                            "schema": {
                                "anyOf": [
                                    {"type": "string", "format": "date-time"},
                                    {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS},
                                ]
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": max_read_messages,
                            },
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "description": (
                                "Seconds an empty read waits for the next commit; "
                                f"this server waits at most {max_wait} (longer asks are shortened)"
                            ),
                            "schema": {"type": "integer", "minimum": 0, "maximum": 3600},
                        },
                    ],
                    "responses": {
                        "200": _json_or_frames(
                            {
                                "type": "object",
                                "required": ["stream", "messages", "next"],
                                "properties": {
                                    "stream": {"type": "string"},
                                    "messages": {"type": "array", "items": message_out},
                                    "next": {"type": "integer"},
                                },
                            }
                        ),
                        **_errors(400, 401, 403, 404, 410, 503),
                    },
                },
            },
            "/streams/{stream}/trim": {
                "parameters": [_STREAM],
                "post": {
                    "summary": "Admin: release the messages before a position, a sequence or a "
                    "time (whole frames; positions never move)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _TRIM_REQUEST}},
                    },
                    "responses": {
                        "200": _json(_TRIM_ANSWER),
                        **_errors(400, 401, 403, 404, 415, 502, 503),
                    },
                },
            },
            "/health": {
                "get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"})}}
            },
            "/ready": {
                "get": {
                    "summary": "Readiness: storage reachable",
                    "responses": {"200": _json({"type": "object"}), **_errors(503)},
                }
            },
            "/cluster": {
                "get": {
                    "summary": "Several nodes: the live nodes and which node writes each stream",
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 403, 503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}
            },
        },
        "components": {
            "responses": _error_responses(),
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"enum": [c for codes in ERROR_CODES.values() for c in codes]},
                        "detail": {"type": "string"},
                    },
                },
                "Batch": {
                    "type": "object",
                    "required": ["messages"],
                    # A misspelt "producer" is refused, not ignored.
                    "additionalProperties": False,
                    # An idempotent append names both, a plain one neither.
                    "dependentRequired": {"producer": ["sequence"], "sequence": ["producer"]},
                    "properties": {
                        "producer": {
                            "description": "the producer's id: a UUID or 32 hex digits, not all "
                            "zeros (null: no producer)",
                            "oneOf": [
                                {"type": "null"},
                                {
                                    "type": "string",
                                    "pattern": _PRODUCER_ID,
                                    "not": {"pattern": "^[0-]+$"},
                                },
                            ],
                        },
                        "sequence": {
                            "description": "the producer's batch sequence: its last committed "
                            "batch again is a duplicate (answered with its receipts), the next "
                            "one is appended, any other is 409 (docs/HTTP.md)",
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "maximum": MAX_PRODUCER_SEQ,
                        },
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_COUNT,
                            "items": {
                                "type": "object",
                                "required": ["value"],
                                # A typo such as "value_encoding" is refused, not ignored.
                                "propertyNames": {"enum": sorted(RECORD_FIELDS)},
                                # How the value is written, and (apart) how the key is.
                                "allOf": [
                                    {
                                        "oneOf": [
                                            {
                                                "properties": {
                                                    "value": {"type": "string"},
                                                    "encoding": {"const": "utf-8"},
                                                }
                                            },
                                            {
                                                "required": ["encoding"],
                                                "properties": {
                                                    "value": {"type": "string", "pattern": _BASE64},
                                                    "encoding": {"const": "base64"},
                                                },
                                            },
                                        ]
                                    },
                                    {
                                        "oneOf": [
                                            {
                                                "properties": {
                                                    "key": _KEY,
                                                    "key_encoding": {"const": "utf-8"},
                                                }
                                            },
                                            {
                                                "required": ["key", "key_encoding"],
                                                "properties": {
                                                    "key": _BASE64_KEY,
                                                    "key_encoding": {"const": "base64"},
                                                },
                                            },
                                        ]
                                    },
                                ],
                            },
                        },
                    },
                },
                "Receipt": {
                    "type": "object",
                    "required": ["position", "sequence", "id"],
                    "properties": {
                        "position": {"type": "integer", "minimum": 0},
                        "sequence": {"type": "integer", "minimum": 0},
                        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    },
                },
                "Appended": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["stream", "position", "messages"],
                            "properties": {
                                "stream": {"type": "string"},
                                "position": {"type": "integer"},
                                "messages": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"$ref": "#/components/schemas/Receipt"},
                                },
                            },
                        },
                        {
                            "type": "object",
                            "required": ["stream", "position", "count", "first", "last"],
                            "properties": {
                                "stream": {"type": "string"},
                                "position": {"type": "integer"},
                                "count": {"type": "integer", "minimum": 1},
                                "timestamp": {"type": "string", "format": "date-time"},
                                "first": {"$ref": "#/components/schemas/Receipt"},
                                "last": {"$ref": "#/components/schemas/Receipt"},
                            },
                        },
                    ]
                },
                "StreamInfo": {
                    "type": "object",
                    "required": ["stream", "length", "messages", "read_access"],
                    "properties": {
                        "stream": {"type": "string"},
                        "length": {"type": "integer"},
                        "messages": {"type": "integer"},
                        "first_position": {
                            "type": "integer",
                            "description": "the first readable position: 0 unless trimmed",
                        },
                        "first_sequence": {"type": "integer"},
                        "first_write": {"type": ["string", "null"]},
                        "last_write": {"type": ["string", "null"]},
                        "read_access": {"type": "object"},
                    },
                },
            },
        },
    }
