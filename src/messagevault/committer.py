"""Group commit: many concurrent appends to one stream, few storage commits.

Each append joins a queue and gets a future; one committer thread takes as
many queued batches as fit one storage write (4 MiB on Azure, less the tail
page the writer rewrites), commits them with ``Writer.append_group`` and
resolves their futures with their own outcomes: receipts, the original
receipts of a producer's repeated batch, or the refusal of one out of
sequence. Order is arrival order.

While a commit is in flight (a device flush, a storage round trip), new
appends queue up behind it and share the next commit, so throughput grows
with load instead of being bounded by commits per second. This is the
per-stream write scheduler the server uses; producers in one process can use
it directly.

    committer = GroupCommitter(Writer.open(storage, "orders"))
    future = committer.submit(encode_batch(messages))   # returns at once
    receipt = future.result()                            # once committed

An append that finds the committer idle can also be committed by its own
thread (``commit_here``): no wake-up of the committer thread and none back,
which is most of an acknowledgement's latency when appends come one at a
time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

# CommitterClosed lived here; importing it from here still works.
from messagevault.errors import CommitterClosed as CommitterClosed  # noqa: PLC0414
from messagevault.errors import Overloaded, StaleWriter
from messagevault.format import EncodedBatch, encode_batch
from messagevault.writer import AppendResult, Writer

DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
T = TypeVar("T")

log = logging.getLogger("messagevault.committer")


@dataclass
class CommitStats:
    commits: int = 0
    batches: int = 0
    messages: int = 0
    bytes: int = 0  # frame bytes committed
    seconds: float = 0.0  # time spent in storage commits (write, flush, checkpoint)


@dataclass(frozen=True)
class Commit:
    """One storage commit, as told to ``on_commit`` observers (metrics, StatsD)."""

    stream: str
    batches: int  # append requests it carried
    messages: int
    bytes: int  # frame bytes written
    seconds: float  # write, flush and checkpoint
    length: int  # the stream's committed length after it


CommitObserver = Callable[[Commit], None]


class GroupCommitter:
    """Coalesces appends from any number of threads into group commits of one writer.

    ``linger`` (seconds) lets a commit wait briefly for more batches when the
    queue is short; 0 commits as soon as the previous commit is done, which
    already groups everything that arrived meanwhile. ``max_queued_bytes``
    bounds memory: ``submit`` blocks while more than that is waiting.
    ``after_group``, if given, is called in the committer thread once all
    futures of a commit (or of a failure) are resolved: an event loop can
    then take every result in one wake-up instead of one per future.
    ``room_changed``, if given, is called (from any thread, under the
    committer's lock) wherever a blocked ``submit`` would be woken: room
    was made, or the committer closed or failed. An event loop that keeps
    its waiting appends to itself learns of room there.
    ``on_commit``, if given, is called in the committing thread (the
    committer's, or ``commit_here``'s caller) after each successful commit,
    once its futures are resolved, so a slow observer delays the next commit
    but never an acknowledgement; it must be quick and thread-safe, and
    whatever it raises is ignored.
    """

    def __init__(
        self,
        writer: Writer,
        *,
        linger: float = 0.0,
        max_commit_bytes: int | None = None,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        after_group: Callable[[], None] | None = None,
        room_changed: Callable[[], None] | None = None,
        on_commit: CommitObserver | None = None,
    ) -> None:
        self.writer = writer
        self.on_commit = on_commit
        self.after_group = after_group
        self.room_changed = room_changed
        self.linger = linger
        self.max_commit_bytes = max_commit_bytes or writer.max_commit_bytes
        self.max_queued_bytes = max_queued_bytes
        self.stats = CommitStats()
        self._queue: deque[tuple[EncodedBatch, Future[AppendResult]]] = deque()
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._closing = False
        self._failure: BaseException | None = None
        # The writer is in use (a commit, in either thread): one at a time,
        # and queued batches wait for it to be over.
        self._committing = False
        self._exclusive_waiting = 0  # run_exclusive callers waiting for the writer
        # The idle thread is waiting with a timeout for index entries due: a
        # commit_here that noted more need not wake it.
        self._upkeep_waiting = False
        # How long the last commit took (seconds), None before the first;
        # and how many batches it carried.
        self.last_commit_seconds: float | None = None
        self.last_commit_batches = 0
        self._thread = threading.Thread(
            target=self._run, name=f"messagevault-commit-{writer.name}", daemon=True
        )
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def has_room(self) -> bool:
        """Whether ``submit`` would return at once rather than wait for the queue to drain."""
        return self._queued_bytes <= self.max_queued_bytes

    @property
    def accepting(self) -> bool:
        """False once closed or failed: ``submit`` then raises ``CommitterClosed``."""
        return not self._closing and self._failure is None

    def submit(
        self,
        batch: EncodedBatch,
        future: Future[AppendResult] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future[AppendResult]:
        """Queue an encoded batch; the future resolves once it is committed.

        Pass ``future`` to have callbacks on it before the committer can
        resolve it; otherwise a new one is returned. While the queue is full
        this waits for room, at most ``timeout`` seconds (None: as long as it
        takes), then raises ``Overloaded`` with nothing queued.
        """
        future = future if future is not None else Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._queued_bytes > self.max_queued_bytes and self.accepting:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self.overloaded()
                self._changed.wait(remaining)
            if not self.accepting:
                raise CommitterClosed(self._closed_reason())
            self._queue.append((batch, future))
            self._queued_bytes += batch.frame_size
            self._changed.notify_all()
        return future

    def overloaded(self) -> Overloaded:
        """The error for an append that found no room in time."""
        return Overloaded(
            f"stream {self.writer.name!r} has {self._queued_bytes} bytes waiting "
            f"to be committed; try again shortly"
        )

    def commit_here(self, batch: EncodedBatch) -> AppendResult | None:
        """Commit ``batch`` in the calling thread if the committer is idle; None if it is not.

        Idle: nothing queued, no commit in flight, not closed. The caller's
        thread then does what the committer thread would have (the commit, a
        producer snapshot when one is due, the ``on_commit`` observers) and
        is blocked meanwhile; batches submitted meanwhile queue behind this
        one, so order stays arrival order. It does not ``linger``. Raises
        what the commit raised, as ``submit``'s future would (``StaleWriter``
        closes the committer just the same). None: call ``submit``.
        """
        with self._changed:
            if self._queue or self._committing or not self.accepting:
                return None
            self._committing = True
        future: Future[AppendResult] = Future()
        self._tell(self._commit([(batch, future)], here=True))
        return future.result()

    def run_exclusive(self, work: Callable[[Writer], T]) -> T:
        """``work(writer)`` in the calling thread, with the writer to itself, between commits.

        Waits for the commit in flight (either thread's) to end; batches
        queued meanwhile wait for ``work`` and then commit as usual. For
        what changes the stream but is not an append (``Writer.trim``).
        Raises ``CommitterClosed`` once closed or failed, and what ``work``
        raises.
        """
        with self._changed:
            self._exclusive_waiting += 1
            try:
                while self._committing and self.accepting:
                    self._changed.wait()
            finally:
                self._exclusive_waiting -= 1
            if not self.accepting:
                raise CommitterClosed(self._closed_reason())
            self._committing = True
        try:
            return work(self.writer)
        finally:
            self._release()

    def append(self, messages: Iterable[tuple[bytes | str, bytes]]) -> AppendResult:
        """Encode, queue and wait: ``Writer.append`` for many threads at once."""
        return self.submit(encode_batch(messages)).result()

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"stream {self.writer.name!r} can no longer be written: {self._failure}"
        return f"the committer of stream {self.writer.name!r} is closed"

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            if group:
                self._tell(self._commit(group))
            else:  # idle, with index entries due: the writer was taken for them
                self._upkeep_and_release()

    def _release(self) -> None:
        """The writer is free for the next commit (in either thread)."""
        with self._changed:
            self._committing = False
            # Only the committer thread with batches queued, and close(),
            # wait for that: an idle thread woken after every commit_here
            # would cost the wake-up commit_here saves. Index entries a
            # commit_here noted are the idle thread's to write: it is woken
            # once for them (then it waits with a timeout until they are due).
            if (
                self._queue
                or self._closing
                or self._exclusive_waiting
                or (not self._upkeep_waiting and self.writer.index_due_in() is not None)
            ):
                self._changed.notify_all()

    def _commit(
        self, group: list[tuple[EncodedBatch, Future[AppendResult]]], *, here: bool = False
    ) -> Commit | None:
        """Commit ``group``, let go of the writer, resolve the futures; what to tell ``on_commit``.

        The writer is this thread's until then (``_committing``): it is let
        go of before the waiters hear, so that the next append, answered or
        new, finds the committer idle.
        """
        batches = [batch for batch, _ in group]
        self.last_commit_batches = len(batches)
        started = time.perf_counter()
        try:
            outcomes = self.writer.append_group(batches)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            self.last_commit_seconds = time.perf_counter() - started
            if isinstance(exc, StaleWriter):
                # Deposed: nothing queued can ever commit. Closed before any
                # waiter hears of it, so an append sent after that answer
                # finds the committer closed instead of joining its queue.
                self._fail_all(exc, group)
                self._release()
                return None
            self._release()
            for _, future in group:
                future.set_exception(exc)
            self._group_done()
            return None
        seconds = self.last_commit_seconds = time.perf_counter() - started
        # Repeated and refused batches were answered without being written.
        results = [r for r in outcomes if isinstance(r, AppendResult) and not r.duplicate]
        commit = None
        if results:
            commit = Commit(
                stream=self.writer.name,
                batches=len(results),
                messages=sum(result.message_count for result in results),
                bytes=sum(result.frame_size for result in results),
                seconds=seconds,
                length=self.writer.checkpoint.length,
            )
            self.stats.seconds += seconds
            self.stats.commits += 1
            self.stats.batches += commit.batches
            self.stats.messages += commit.messages
            self.stats.bytes += commit.bytes
        # A producer snapshot (due every 64 MiB of stream by default) and the
        # index entries (written at most every second) are written once the
        # waiters have their answers, never before; the writer stays this
        # thread's until they are written.
        # Index entries are never written on a commit_here caller's thread
        # (the server's event loop, say): the idle committer thread does it.
        upkeep_due = self.writer.snapshot_due or (not here and self.writer.index_due)
        if not upkeep_due:
            self._release()
        try:
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, AppendResult):
                    future.set_result(outcome)
                else:
                    future.set_exception(outcome)
            self._group_done()
        finally:
            if upkeep_due:
                self._upkeep_and_release(index=not here)
        return commit

    def _upkeep_and_release(self, *, index: bool = True) -> None:
        try:
            self.writer.snapshot_if_due()
            if index:
                self.writer.index_if_due()
        except Exception:  # both only save later readers and writers time: never stop for them
            log.exception("producer snapshot or index failed", extra={"stream": self.writer.name})
        finally:
            self._release()

    def _tell(self, commit: Commit | None) -> None:
        if self.on_commit is None or commit is None:
            return
        try:
            self.on_commit(commit)
        except Exception:  # metrics must never stop the commits
            log.exception("commit observer failed", extra={"stream": self.writer.name})

    def _group_done(self) -> None:
        if self.after_group is not None:
            self.after_group()

    def _next_group(self) -> list[tuple[EncodedBatch, Future[AppendResult]]] | None:
        """The next group to commit, the writer taken for it; None: stop.

        An empty group: nothing to commit, but index entries noted by the last
        commits are due (a stream gone quiet still gets its index written).
        """
        with self._changed:
            while self._committing or not self._queue:
                if self._failure is not None or (self._closing and not self._queue):
                    return None
                due_in = None if self._committing else self.writer.index_due_in()
                if due_in is not None and due_in <= 0:
                    self._committing = True
                    return []
                self._upkeep_waiting = due_in is not None
                self._changed.wait(due_in)
            if self._failure is not None:
                return None
            self._committing = True
            if self.linger > 0 and not self._closing:
                deadline = time.monotonic() + self.linger
                while self._queued_bytes < self.max_commit_bytes and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
            group = [self._queue.popleft()]
            size = group[0][0].frame_size
            while self._queue and size + self._queue[0][0].frame_size <= self.max_commit_bytes:
                size += self._queue[0][0].frame_size
                group.append(self._queue.popleft())
            self._queued_bytes -= size
            self._notify_room()
            return group

    def _notify_room(self) -> None:
        """Wake submitters waiting for room, or to learn that none will come. Lock held."""
        self._changed.notify_all()
        if self.room_changed is not None:
            self.room_changed()

    def _fail_all(
        self, exc: BaseException, failed: list[tuple[EncodedBatch, Future[AppendResult]]]
    ) -> None:
        """Stop for good: ``failed`` (the group that met ``exc``) and all queued fail."""
        with self._changed:
            self._failure = exc
            pending, self._queue = list(self._queue), deque()
            self._queued_bytes = 0
            self._notify_room()
        for _, future in failed:
            future.set_exception(exc)
        for _, future in pending:
            future.set_exception(CommitterClosed(self._closed_reason()))
        self._group_done()

    def close(self, *, close_writer: bool = True) -> None:
        """Commit what is queued, stop the committer thread, and close the writer."""
        with self._changed:
            self._closing = True
            self._notify_room()
        self._thread.join()
        with self._changed:
            while self._committing:  # a commit_here in another thread
                self._changed.wait()
        if close_writer:
            self.writer.close()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
