"""The writer when storage fails under it: nothing half-done is ever visible.

A thin wrapper around a real store makes chosen calls fail, before or after
they reach storage (the ambiguous case a network timeout leaves behind).
"""

from __future__ import annotations

from typing import Any

import pytest

from messagevault import MemoryStorage, Reader, StorageError, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.storage.base import StreamStore


class FailingStore:
    """Delegates to a real store; ``fail[name] = "before" | "after"`` breaks one call."""

    def __init__(self, inner: StreamStore) -> None:
        self.inner = inner
        self.fail: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_fail(self, name: str, when: str) -> None:
        if self.fail.get(name) == when:
            del self.fail[name]
            raise StorageError(f"injected failure {when} {name}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._maybe_fail("write", "before")
        self.inner.write(offset, data)
        self._maybe_fail("write", "after")

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        self._maybe_fail("advance_checkpoint", "before")
        self.inner.advance_checkpoint(new, expected=expected)
        self._maybe_fail("advance_checkpoint", "after")


def _open(storage: MemoryStorage) -> tuple[Writer, FailingStore]:
    store = FailingStore(storage.open_stream("orders", write=True, create=True))
    return Writer(store, "orders"), store  # type: ignore[arg-type]


def _values(storage: MemoryStorage) -> list[bytes]:
    return [m.value for m in Reader.open(storage, "orders").read()]


@pytest.mark.parametrize("page_size", [1, 512])
@pytest.mark.parametrize(
    ("call", "when", "committed"),
    [
        ("write", "before", False),
        ("write", "after", False),
        ("advance_checkpoint", "before", False),
        ("advance_checkpoint", "after", True),  # committed, but the caller saw an error
    ],
)
def test_failed_commit_then_recovery(page_size: int, call: str, when: str, committed: bool) -> None:
    storage = MemoryStorage(page_size=page_size)
    writer, store = _open(storage)
    writer.append([(b"k", b"first" * 30)])
    store.fail[call] = when
    with pytest.raises(StorageError, match="injected"):
        writer.append([(b"k", b"second" * 7)])
    expected = [b"first" * 30] + ([b"second" * 7] if committed else [])
    assert _values(storage) == expected
    # The writer learns from storage whether the failed commit happened and goes on.
    result = writer.append([(b"k", b"third")])
    assert result.base_sequence == len(expected)
    assert _values(storage) == [*expected, b"third"]
    writer.close()
    # A fresh writer agrees (its tail page and checkpoint match what is stored).
    with Writer.open(storage, "orders") as again:
        again.append([(b"k", b"fourth")])
    assert _values(storage)[-2:] == [b"third", b"fourth"]
