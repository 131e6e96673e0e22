"""Structured logs: one JSON object per line on stderr, each tagged with its request's id.

The error middleware gives every request an id (``request_id``: the
client's ``X-Request-Id`` when it is sane, else a new one) and sets
``REQUEST_ID`` while the request is handled; every line logged meanwhile,
by the server or the libraries it calls, carries it as ``request_id``.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import re
import secrets
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({})))

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "messagevault_request_id", default=None
)

# An id from a client is kept only if it cannot forge or garble a log line
# or a header: bounded, and of characters ids are made of (UUIDs, base64).
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Fresh ids: a random prefix per process (ids from restarts and other
# servers differ) and a counter (cheaper than a UUID per request).
_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(1)


def request_id(sent: str | None) -> str:
    """The id of a request: ``sent`` (its ``X-Request-Id``) if sane, else a new unique one."""
    if sent is not None and _SANE_ID.fullmatch(sent):
        return sent
    return f"{_PREFIX}-{next(_COUNTER):x}"


class JsonLines(logging.Formatter):
    """``{"time", "level", "logger", "message", ...extra fields}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _with_request_id(record: logging.LogRecord) -> bool:
    """Tag a record with the id of the request being handled, if any (a handler filter)."""
    if not hasattr(record, "request_id"):
        current = REQUEST_ID.get()
        if current is not None:
            record.request_id = current
    return True


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr from ``level`` up; the Azure SDK's only from WARNING unless debug.

    The SDK logs every request and response at INFO (azure.core's
    http_logging_policy), several lines per storage call: at the default
    level they would bury the server's own lines.
    """
    # A line per request (the access log) makes each record's cost count:
    # these are what the JSON lines leave out anyway (the caller's file and
    # line, the process, thread and task), and gathering them was half of
    # it. The logging HOWTO's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(_with_request_id)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("azure").setLevel(
        logging.NOTSET if level <= logging.DEBUG else logging.WARNING
    )
