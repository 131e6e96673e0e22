"""Structured logs: one JSON object per line on stderr, each tagged with its request's id.

The error middleware gives every request an id (``request_id``: the
client's ``X-Request-Id`` when it is sane, else a new one) and sets
``REQUEST_ID`` while the request is handled; every line logged meanwhile,
by the server or the libraries it calls, carries it as ``request_id``.

The lines are formatted and written by a thread of their own (``LogPipe``)
through a bounded queue: a stderr that is slow or not read at all (a full
pipe) never holds up the event loop; lines it cannot take are dropped and
counted, and the last ones are written out at shutdown.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import itertools
import json
import logging
import logging.handlers
import queue
import re
import secrets
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

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


# Records waiting for the writer thread; beyond, new ones are dropped (and
# counted): a stderr nobody reads must not hold up requests.
MAX_QUEUED_RECORDS = 10_000
# Say how many lines were dropped at most this often, in seconds.
DROPS_REPORTED_EVERY = 10.0
# At shutdown, how long to wait for the writer to get the last lines out.
DRAIN_TIMEOUT = 5.0
# Seconds the writer sleeps when it finds the queue empty. It polls rather
# than waits on the queue: a waiting writer would be woken by every line, a
# context switch and two GIL handoffs per request, which cost the server
# more CPU than formatting the line on the event loop did (measured: 52
# against 24 us a request). Lines reach stderr this much later at most.
POLL_INTERVAL = 0.05
# Lines formatted before the writer writes them out, in one write.
WRITE_LINES = 256


class _Enqueuer(logging.handlers.QueueHandler):
    """The root's handler: hands records to the writer thread, never waits for it.

    Runs in the thread that logs (the event loop, a committer thread): the
    request id is read here (a handler filter, ``_with_request_id``), as
    contextvars do not cross to the writer thread, and the message is made
    from its arguments here, as they may change after the call returns.
    Formatting the JSON line is left to the writer.
    """

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | None], pipe: LogPipe, max_queued: int
    ) -> None:
        super().__init__(records)
        self.records = records
        self.pipe = pipe
        self.max_queued = max_queued

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # A SimpleQueue (in C) with the bound checked here: cheaper on the
        # event loop than queue.Queue, whose put takes a lock and notifies a
        # condition in Python. Threads logging at once may overshoot the
        # bound by a record each.
        if self.records.qsize() >= self.max_queued:
            self.pipe.count_dropped()
        else:
            self.records.put_nowait(record)


class _Writer(logging.StreamHandler):  # type: ignore[type-arg]
    """The writer thread's handler: JSON lines to the stream, and now and then the drops.

    Lines are written in batches (``flush()``: when the queue is empty, or
    ``WRITE_LINES`` are waiting): a write per batch, not per line.
    """

    def __init__(self, stream: TextIO, pipe: LogPipe) -> None:
        super().__init__(stream)
        self.pipe = pipe
        self.setFormatter(JsonLines())
        self._lines: list[str] = []

    def handle(self, record: logging.LogRecord) -> bool:
        self.pipe.report_drops(self)
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a bad record: handleError says so, as logging does
            self.handleError(record)
            return
        if len(self._lines) >= WRITE_LINES:
            self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: nowhere to say so
            pass


class _Listener(logging.handlers.QueueListener):
    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | None], writer: _Writer
    ) -> None:
        super().__init__(records, writer)
        self.records = records
        self.writer = writer

    def dequeue(self, block: bool) -> logging.LogRecord:
        """The next record; when there is none yet, what is formatted is written, then a nap."""
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                self.writer.flush()
                time.sleep(POLL_INTERVAL)
                continue
            if record is _SENTINEL:
                self.writer.flush()  # the last lines, before the thread ends
            return record  # type: ignore[return-value]  # (or the sentinel, which ends it)

    def stop(self) -> bool:  # type: ignore[override]
        """Let the writer finish what is queued, waiting ``DRAIN_TIMEOUT`` at most; if it did.

        Bounded: a stderr whose reader is gone for good must not keep the
        server from exiting (what is still queued then is lost).
        """
        thread = self._thread
        if thread is None:
            return True
        self._thread = None
        self.records.put_nowait(_SENTINEL)  # unbounded: never refused
        thread.join(DRAIN_TIMEOUT)
        return not thread.is_alive()


_SENTINEL = getattr(logging.handlers.QueueListener, "_sentinel", None)


class LogPipe:
    """The server's log output: a bounded queue, and a thread writing it to ``stream``.

    Logging never blocks on the stream: when it cannot keep up (a pipe
    whose reader stalls), records beyond ``max_queued`` are dropped and
    counted in ``dropped``, and a warning line says how many, at most every
    ``DROPS_REPORTED_EVERY`` seconds, once the stream takes lines again.
    """

    def __init__(self, stream: TextIO, *, max_queued: int = MAX_QUEUED_RECORDS) -> None:
        records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self.dropped = 0
        self._reported = 0
        self._reported_at = -DROPS_REPORTED_EVERY
        self._counting = threading.Lock()
        self.handler = _Enqueuer(records, self, max_queued)
        self.handler.addFilter(_with_request_id)
        self.writer = _Writer(stream, self)
        self._listener = _Listener(records, self.writer)
        self._listener.start()

    def count_dropped(self) -> None:
        with self._counting:
            self.dropped += 1

    def report_drops(self, writer: logging.Handler) -> None:
        """In the writer thread: a warning line for the records dropped since the last one."""
        dropped = self.dropped
        now = time.monotonic()
        if dropped == self._reported or now - self._reported_at < DROPS_REPORTED_EVERY:
            return
        self._reported_at = now
        warning = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines dropped: stderr was not read fast enough",
                "args": (dropped - self._reported,),
                "dropped_total": dropped,
            }
        )
        self._reported = dropped
        writer.emit(warning)

    def stop(self) -> None:
        """Write out what is queued (bounded: ``DRAIN_TIMEOUT``) and stop the writer thread."""
        # A writer still stuck in a write would block this one too.
        if self._listener.stop() and self.dropped != self._reported:
            self._reported_at = -DROPS_REPORTED_EVERY
            with contextlib.suppress(Exception):  # the stream may be gone by now
                self.report_drops(self.writer)
                self.writer.flush()


# The pipe ``configure`` set up, for ``shutdown``: at most one.
_configured: list[LogPipe] = []


def configure(level: int = logging.INFO, *, max_queued: int = MAX_QUEUED_RECORDS) -> LogPipe:
    """JSON lines on stderr from ``level`` up; the Azure SDK's only from WARNING unless debug.

    The lines are written by a thread of their own (``LogPipe``), so no
    request waits for stderr; ``shutdown()`` (also run at exit) writes the
    last ones. The SDK logs every request and response at INFO (azure.core's
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
    shutdown()
    pipe = LogPipe(sys.stderr, max_queued=max_queued)
    _configured.append(pipe)
    atexit.unregister(shutdown)  # once is enough, however often configured
    atexit.register(shutdown)
    root = logging.getLogger()
    root.handlers[:] = [pipe.handler]
    root.setLevel(level)
    logging.getLogger("azure").setLevel(
        logging.NOTSET if level <= logging.DEBUG else logging.WARNING
    )
    return pipe


def shutdown() -> None:
    """Write out the lines still queued and stop the writer thread (idempotent)."""
    while _configured:
        pipe = _configured.pop()
        root = logging.getLogger()
        if pipe.handler in root.handlers:
            root.removeHandler(pipe.handler)
        pipe.stop()
