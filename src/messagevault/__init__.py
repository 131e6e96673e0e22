"""MessageVault: a durable, append-only message log kept in blob storage.

>>> from messagevault import MemoryStorage, Reader, Writer
>>> storage = MemoryStorage()
>>> with Writer.open(storage, "orders") as writer:
...     receipt = writer.append([(b"OrderPlaced", b'{"id": 7}')])[0]
>>> next(Reader.open(storage, "orders").read()).value
b'{"id": 7}'
"""

from __future__ import annotations

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    AccessDenied,
    CorruptData,
    InvalidBatch,
    InvalidInput,
    InvalidPosition,
    InvalidStreamName,
    LeaseHeld,
    LeaseLost,
    MessageVaultError,
    Overloaded,
    SequenceGap,
    SequenceReused,
    StaleSequence,
    StaleWriter,
    StorageError,
    StreamLocked,
    StreamNotFound,
    UnsupportedVersion,
    WriterConflict,
)
from messagevault.format import (
    MAX_BATCH_COUNT,
    MAX_FRAME_SIZE,
    MAX_KEY_SIZE,
    MAX_VALUE_SIZE,
    EncodedBatch,
    Message,
    encode_batch,
    message_id,
)
from messagevault.names import validate_stream_name
from messagevault.reader import Reader
from messagevault.storage import (
    FileStorage,
    FsyncPolicy,
    MemoryStorage,
    ReadAccess,
    open_read_access,
    open_storage,
)
from messagevault.writer import AppendResult, Receipt, Writer

__version__ = "0.1.0"  # the only place it is written: pyproject.toml reads it (hatch)

__all__ = [
    "MAX_BATCH_COUNT",
    "MAX_FRAME_SIZE",
    "MAX_KEY_SIZE",
    "MAX_VALUE_SIZE",
    "AccessDenied",
    "AppendResult",
    "Checkpoint",
    "CorruptData",
    "EncodedBatch",
    "FileStorage",
    "FsyncPolicy",
    "InvalidBatch",
    "InvalidInput",
    "InvalidPosition",
    "InvalidStreamName",
    "LeaseHeld",
    "LeaseLost",
    "MemoryStorage",
    "Message",
    "MessageVaultError",
    "Overloaded",
    "ReadAccess",
    "Reader",
    "Receipt",
    "SequenceGap",
    "SequenceReused",
    "StaleSequence",
    "StaleWriter",
    "StorageError",
    "StreamLocked",
    "StreamNotFound",
    "UnsupportedVersion",
    "Writer",
    "WriterConflict",
    "__version__",
    "encode_batch",
    "message_id",
    "open_read_access",
    "open_storage",
    "validate_stream_name",
]
