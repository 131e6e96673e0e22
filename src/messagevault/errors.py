"""Every error MessageVault raises on purpose, rooted in one class.

    MessageVaultError
    ├── InvalidInput                 the caller asked for something impossible; nothing changed
    │   ├── InvalidStreamName
    │   ├── InvalidBatch             empty, too many messages, key/value/batch too large, bad types
    │   ├── InvalidPosition          not a message boundary, or beyond the committed end
    │   │   └── PositionTrimmed      below the stream's first readable position (trimmed)
    │   ├── UnsupportedMediaType     a body in a content type the route does not take (HTTP 415)
    │   ├── RequestTooLarge          a body over the server's limit (HTTP 413)
    │   └── MethodNotAllowed         an HTTP method the route does not have (HTTP 405)
    ├── NotFound                     no such route (HTTP 404)
    │   └── StreamNotFound
    ├── CorruptData                  bytes in storage (or on the wire) fail their checks
    │   └── UnsupportedVersion       a frame or checkpoint from a newer format
    ├── AccessDenied                 read-only access (a SAS URL, a reader) asked to write
    ├── Unauthenticated              no credentials, or wrong ones (HTTP 401)
    ├── Forbidden                    credentials without the claim a request needs (HTTP 403)
    │   └── InsecureTransport        a password over plain HTTP from another machine (HTTP 403)
    ├── WriterConflict               single-writer rule, and a producer's batch sequence
    │   ├── StreamLocked             another writer holds the stream now
    │   ├── StaleWriter              another writer committed or took over since we last looked
    │   ├── LeaseHeld                a lease is held by someone else
    │   ├── LeaseLost                our lease expired, was broken or taken over
    │   ├── SequenceGap              a producer's batch skips sequences (HTTP 409)
    │   └── StaleSequence            a producer's batch is older than its last committed one (409)
    ├── CommitterClosed              an append reached a committer that had stopped; nothing written
    ├── Overloaded                   too much waits to be committed; try again shortly
    ├── NoWriter                     (nodes) no node could write the stream yet; try again
    ├── NotWriter                    (nodes) a forwarded append reached a node that is no writer
    ├── WriterUnreachable            (nodes) the connection to the writer broke mid-append
    ├── StorageError                 the storage itself failed (I/O, network); may be retriable
    │   └── NotReady                 the server cannot reach its storage yet (HTTP 503 on /ready)
    ├── InternalError                the server failed (a bug; its log says more) (HTTP 500)
    ├── ServerUnreachable            (client) no connection to the server, or it broke mid-request
    ├── ProducerClosed               (client) a message sent to a closed Producer
    ├── ClientClosed                 (client) a request on a closed Client
    └── UnknownError                 (client) a code this version does not know (a newer server's)

Each class carries a stable ``code`` (used on the wire by the server) and a
``retriable`` flag that tells clients whether trying again can help.
``for_code`` maps a code back to its class, so that a client raises the very
class the server raised; an error rebuilt from an HTTP answer also carries
the answer's ``status``. docs/HTTP.md lists every code with its status.
"""

from __future__ import annotations

import functools
from typing import ClassVar


class MessageVaultError(Exception):
    """Root of every error raised by MessageVault on purpose."""

    code: ClassVar[str] = "error"
    retriable: ClassVar[bool] = False
    status: int | None = None  # the HTTP status, for an error received from a server


class InvalidInput(MessageVaultError):
    """The request cannot be satisfied as given; storage was left unchanged."""

    code = "invalid_input"


class InvalidStreamName(InvalidInput):
    """A stream name breaks the naming rule (see ``names.validate_stream_name``)."""

    code = "invalid_stream_name"


class InvalidBatch(InvalidInput):
    """A batch is empty, too large, holds too many messages, or has a bad key/value."""

    code = "invalid_batch"


class InvalidPosition(InvalidInput):
    """A read position is not a message boundary or lies beyond the committed end."""

    code = "invalid_position"


class PositionTrimmed(InvalidPosition):
    """A read or seek asked for messages below the stream's first readable position.

    Trimming (retention) released them. ``first_position`` is where the
    stream's messages now start (the checkpoint's ``first_position``), or
    ``None`` when rebuilt from an answer that did not say.
    """

    code = "position_trimmed"

    def __init__(self, message: str, *, first_position: int | None = None) -> None:
        super().__init__(message)
        self.first_position = first_position


class UnsupportedMediaType(InvalidInput):
    """A request body in a content type the route does not take."""

    code = "unsupported_media_type"


class RequestTooLarge(InvalidInput):
    """A request body over the server's size limit; it was not read."""

    code = "request_entity_too_large"


class MethodNotAllowed(InvalidInput):
    """An HTTP method the route does not offer."""

    code = "method_not_allowed"


class NotFound(MessageVaultError):
    """Nothing is at the requested path."""

    code = "not_found"


class StreamNotFound(NotFound):
    """The stream does not exist in this storage."""

    code = "stream_not_found"


class CorruptData(MessageVaultError):
    """Bytes fail their magic, length or CRC checks; ``position`` says where."""

    code = "corrupt_data"

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class UnsupportedVersion(CorruptData):
    """Data written by a newer format version than this code understands."""

    code = "unsupported_version"


class AccessDenied(MessageVaultError, PermissionError):
    """The credentials in use may read but not write (also a ``PermissionError``)."""

    code = "access_denied"


class Unauthenticated(MessageVaultError):
    """No credentials, or wrong ones (HTTP 401)."""

    code = "unauthenticated"


class Forbidden(MessageVaultError):
    """Valid credentials without the claim this request needs (HTTP 403)."""

    code = "forbidden"


class InsecureTransport(Forbidden):
    """Basic credentials came over plain HTTP from another machine (HTTP 403); never checked.

    Use https, or a TLS-terminating proxy with ``serve --allow-plain-http``.
    """

    code = "insecure_transport"


class WriterConflict(MessageVaultError):
    """The single-writer rule, or a producer's batch order, was about to break; nothing written."""

    code = "writer_conflict"


class StreamLocked(WriterConflict):
    """Another writer (process, or lease holder) has the stream open for writing."""

    code = "stream_locked"


class StaleWriter(WriterConflict):
    """The checkpoint moved under us: another writer committed. This writer is done."""

    code = "stale_writer"


class LeaseHeld(WriterConflict):
    """Someone else holds the lease; ``lease.break_()`` takes it by force.

    ``record``: what storage said about the lease (a
    ``storage.leases.LeaseRecord``: holder, address, generation, expiry), when
    known; typed loosely because errors sit below storage.
    """

    code = "lease_held"

    def __init__(self, message: str = "", *, record: object | None = None) -> None:
        super().__init__(message)
        self.record = record


class LeaseLost(WriterConflict):
    """Our lease is gone (expired, broken, or replaced): stop acting as its holder."""

    code = "lease_lost"


class SequenceGap(WriterConflict):
    """A producer's batch sequence skips ahead of its last committed batch's; nothing appended.

    A batch in between was never committed: the producer must send it first.
    """

    code = "sequence_gap"


class StaleSequence(WriterConflict):
    """A producer's batch sequence is below its last committed one; nothing appended.

    That batch was committed long ago (or never): its receipts are no longer
    remembered, only the last batch's are.
    """

    code = "stale_sequence"


class SequenceReused(StaleSequence):
    """A producer's batch sequence repeats its last committed batch with other content.

    A retry sends the same bytes; different ones under the same producer id
    and sequence are a producer's bug, and answering them with the first
    batch's receipts would drop them silently. Nothing appended.
    """

    code = "sequence_reused"


class CommitterClosed(MessageVaultError):
    """The committer was closed (or its writer lost the stream) before this append ran."""

    code = "committer_closed"
    retriable = True


class Overloaded(MessageVaultError):
    """More appends wait for a commit than the queue holds, for longer than the caller waits."""

    code = "overloaded"
    retriable = True


class NoWriter(MessageVaultError):
    """No node could be found or made the stream's writer within the wait (HTTP 503).

    The stream's writer is failing over, or storage is unreachable; nothing
    was appended.
    """

    code = "no_writer"
    retriable = True


class NotWriter(MessageVaultError):
    """A forwarded append reached a node that does not write the stream (HTTP 503).

    The writer moved while the append was on its way; nothing was appended.
    The forwarding node looks again.
    """

    code = "not_writer"
    retriable = True


class WriterUnreachable(MessageVaultError):
    """The connection to the stream's writer broke after the append was sent (HTTP 502).

    The writer may have committed it: an append with a producer id is safe
    to send again; one without may be in the stream already.
    """

    code = "writer_unreachable"
    retriable = True


class StorageError(MessageVaultError):
    """The storage failed underneath us (disk full, I/O error, network)."""

    code = "storage_error"
    retriable = True


class NotReady(StorageError):
    """The server is up but cannot reach its storage (yet)."""

    code = "not_ready"


class InternalError(MessageVaultError):
    """The server failed on a request: a bug, described in the server's log."""

    code = "internal_error"


class ServerUnreachable(MessageVaultError, ConnectionError):
    """The client could not reach the server, or lost the connection before the answer.

    Raised by the client once its retries are spent (also a ``ConnectionError``);
    never sent by a server.
    """

    code = "server_unreachable"
    retriable = True


class ProducerClosed(MessageVaultError):
    """A message was sent to a ``Producer`` after ``close()``; never sent by a server."""

    code = "producer_closed"


class ClientClosed(MessageVaultError):
    """A request was made on a ``Client`` after ``close()``; never sent by a server."""

    code = "client_closed"


class UnknownError(MessageVaultError):
    """An error whose code this version does not know, e.g. from a newer server.

    ``for_code`` makes one subclass per such code, so ``code`` is the code that
    came; ``status`` is the HTTP status it came with.
    """

    code = "unknown"


def for_code(code: str) -> type[MessageVaultError]:
    """The class whose ``code`` is ``code``; a subclass of ``UnknownError`` for a new one.

    >>> for_code("stream_not_found").__name__
    'StreamNotFound'
    >>> issubclass(for_code("teapot"), UnknownError), for_code("teapot").code
    (True, 'teapot')
    """
    known = _codes().get(code)
    return known if known is not None else _unknown(code)


def error_classes() -> list[type[MessageVaultError]]:
    """Every class of the tree below the root (not ``for_code``'s ones for unknown codes)."""
    found: list[type[MessageVaultError]] = []
    pending = [MessageVaultError]
    while pending:
        for subclass in pending.pop(0).__subclasses__():
            made_for_a_code = issubclass(subclass, UnknownError) and subclass is not UnknownError
            if subclass.__module__ == __name__ and subclass not in found and not made_for_a_code:
                found.append(subclass)
                pending.append(subclass)
    return found


@functools.cache
def _codes() -> dict[str, type[MessageVaultError]]:
    return {cls.code: cls for cls in error_classes() if cls is not UnknownError}


@functools.cache
def _unknown(code: str) -> type[UnknownError]:
    return type("UnknownError", (UnknownError,), {"code": code, "__module__": __name__})
