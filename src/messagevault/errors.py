"""Every error MessageVault raises on purpose, rooted in one class.

    MessageVaultError
    ├── InvalidInput                 the caller asked for something impossible; nothing changed
    │   ├── InvalidStreamName
    │   ├── InvalidBatch             empty, too many messages, key/value/batch too large, bad types
    │   └── InvalidPosition          not a message boundary, or beyond the committed end
    ├── StreamNotFound
    ├── CorruptData                  bytes in storage (or on the wire) fail their checks
    │   └── UnsupportedVersion       a frame or checkpoint from a newer format
    ├── AccessDenied                 read-only access (a SAS URL, a reader) asked to write
    ├── WriterConflict               single-writer rule
    │   ├── StreamLocked             another writer holds the stream now
    │   ├── StaleWriter              another writer committed or took over since we last looked
    │   ├── LeaseHeld                a lease is held by someone else
    │   └── LeaseLost                our lease expired, was broken or taken over
    ├── Overloaded                   too much waits to be committed; try again shortly
    └── StorageError                 the storage itself failed (I/O, network); may be retriable

Each class carries a stable ``code`` (used on the wire by the server) and a
``retriable`` flag that tells clients whether trying again can help.
"""

from __future__ import annotations

from typing import ClassVar


class MessageVaultError(Exception):
    """Root of every error raised by MessageVault on purpose."""

    code: ClassVar[str] = "error"
    retriable: ClassVar[bool] = False


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


class StreamNotFound(MessageVaultError):
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


class WriterConflict(MessageVaultError):
    """The single-writer rule was about to be broken; nothing was written."""

    code = "writer_conflict"


class StreamLocked(WriterConflict):
    """Another writer (process, or lease holder) has the stream open for writing."""

    code = "stream_locked"


class StaleWriter(WriterConflict):
    """The checkpoint moved under us: another writer committed. This writer is done."""

    code = "stale_writer"


class LeaseHeld(WriterConflict):
    """Someone else holds the lease; ``lease.break_()`` takes it by force."""

    code = "lease_held"


class LeaseLost(WriterConflict):
    """Our lease is gone (expired, broken, or replaced): stop acting as its holder."""

    code = "lease_lost"


class Overloaded(MessageVaultError):
    """More appends wait for a commit than the queue holds, for longer than the caller waits."""

    code = "overloaded"
    retriable = True


class StorageError(MessageVaultError):
    """The storage failed underneath us (disk full, I/O error, network)."""

    code = "storage_error"
    retriable = True
