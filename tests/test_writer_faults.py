"""The writer when storage fails under it: nothing half-done, nothing twice.

A thin wrapper around a real store makes chosen calls fail, before or after
they reach storage (the ambiguous case a network timeout leaves behind).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from messagevault import MemoryStorage, Reader, StaleWriter, StorageError, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.storage.base import StreamStore


class FailingStore:
    """Delegates to a real store; ``fail[name] = (when, times)`` breaks a call ``times`` times.

    ``when`` is "before" (the call never reaches storage) or "after" (it
    takes effect but the caller sees an error, like a lost response).
    """

    def __init__(self, inner: StreamStore) -> None:
        self.inner = inner
        self.fail: dict[str, tuple[str, int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_fail(self, name: str, when: str) -> None:
        planned, times = self.fail.get(name, ("", 0))
        if planned == when and times > 0:
            self.fail[name] = (when, times - 1)
            raise StorageError(f"injected failure {when} {name}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._maybe_fail("write", "before")
        self.inner.write(offset, data)
        self._maybe_fail("write", "after")

    def advance_checkpoint(self, new: Checkpoint, *, expected: Checkpoint) -> None:
        self._maybe_fail("advance_checkpoint", "before")
        self.inner.advance_checkpoint(new, expected=expected)
        self._maybe_fail("advance_checkpoint", "after")

    def read_checkpoint(self) -> Checkpoint:
        self._maybe_fail("read_checkpoint", "before")
        return self.inner.read_checkpoint()


def _open(storage: MemoryStorage, commit_timeout: float = 5.0) -> tuple[Writer, FailingStore]:
    store = FailingStore(storage.open_stream("orders", write=True, create=True))
    return Writer(store, "orders", commit_timeout=commit_timeout), store  # type: ignore[arg-type]


def _values(storage: MemoryStorage) -> list[bytes]:
    return [m.value for m in Reader.open(storage, "orders").read()]


CALLS = [
    ("write", "before"),
    ("write", "after"),
    ("advance_checkpoint", "before"),
    ("advance_checkpoint", "after"),  # landed, but the writer saw an error
]


@pytest.mark.parametrize("page_size", [1, 512])
@pytest.mark.parametrize(("call", "when"), CALLS)
def test_transient_fault_is_ridden_out_without_duplicates(
    page_size: int, call: str, when: str
) -> None:
    storage = MemoryStorage(page_size=page_size)
    writer, store = _open(storage)
    writer.append([(b"k", b"first" * 30)])
    store.fail[call] = (when, 2)
    store.fail["read_checkpoint"] = ("before", 1)  # and the first look fails too
    result = writer.append([(b"k", b"second" * 7)])
    assert result.base_sequence == 1
    assert _values(storage) == [b"first" * 30, b"second" * 7]  # exactly once
    writer.append([(b"k", b"third")])
    writer.close()
    with Writer.open(storage, "orders") as again:  # tail page and checkpoint agree
        again.append([(b"k", b"fourth")])
    assert _values(storage) == [b"first" * 30, b"second" * 7, b"third", b"fourth"]


@pytest.mark.parametrize("page_size", [1, 512])
@pytest.mark.parametrize(("call", "when"), CALLS)
def test_lasting_fault_fails_the_append_then_the_writer_recovers(
    page_size: int, call: str, when: str
) -> None:
    storage = MemoryStorage(page_size=page_size)
    writer, store = _open(storage, commit_timeout=0.3)
    writer.append([(b"k", b"first" * 30)])
    store.fail[call] = (when, 1000)
    store.fail["read_checkpoint"] = ("before", 1000)  # storage is unreachable
    with pytest.raises(StorageError, match=r"not confirmed within 0\.3 s"):
        writer.append([(b"k", b"second" * 7)])
    landed = call == "advance_checkpoint" and when == "after"
    expected = [b"first" * 30] + ([b"second" * 7] if landed else [])
    assert _values(storage) == expected
    store.fail.clear()  # storage is back: the writer learns what happened and goes on
    result = writer.append([(b"k", b"third")])
    assert result.base_sequence == len(expected)
    assert _values(storage) == [*expected, b"third"]
    writer.close()
    with Writer.open(storage, "orders") as again:
        again.append([(b"k", b"fourth")])
    assert _values(storage)[-2:] == [b"third", b"fourth"]


def test_recent_checkpoint_is_withheld_while_a_commit_is_in_doubt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = MemoryStorage()
    writer, store = _open(storage, commit_timeout=0.2)
    first = writer.append([(b"k", b"first")])
    assert writer.recent_checkpoint(60) == writer.checkpoint
    assert writer.recent_checkpoint(60).length == first.end  # type: ignore[union-attr]
    store.fail["advance_checkpoint"] = ("after", 1000)  # lands, but the writer never hears
    store.fail["read_checkpoint"] = ("before", 1000)
    with pytest.raises(StorageError):
        writer.append([(b"k", b"second")])
    assert writer.recent_checkpoint(60) is None  # storage may hold more than the writer knows
    store.fail.clear()
    writer.append([(b"k", b"third")])  # resyncs, then commits
    assert writer.recent_checkpoint(60) == writer.checkpoint
    # Quiet for longer than max_age: another writer may have taken over meanwhile.
    later = time.monotonic() + 5
    monkeypatch.setattr("messagevault.writer.time.monotonic", lambda: later)
    assert writer.recent_checkpoint(1) is None
    assert writer.recent_checkpoint(60) == writer.checkpoint


def test_takeover_fences_the_old_writer() -> None:
    storage = MemoryStorage(page_size=512)
    old = Writer.open(storage, "orders")
    old.append([(b"k", b"old-1")])
    new = Writer.open(storage, "orders", takeover=True)
    new.append([(b"k", b"new-1")])
    with pytest.raises(StaleWriter):
        old.append([(b"k", b"old-2")])
    assert _values(storage) == [b"old-1", b"new-1"]
    new.close()
    old.close()
