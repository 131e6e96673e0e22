"""The server's hold on storage: one writer and group committer per stream.

Storage calls block (files, the Azure SDK), so they run in a thread pool;
appends go through each stream's ``GroupCommitter``, whose thread turns the
requests waiting at any moment into one storage commit.

An append that comes alone (no other append in flight, the committer idle,
the stream's last commit quick and of one append too) to file storage is
committed on the event loop itself, as Redis does its ``appendfsync
always``: the two thread wake-ups it saves were a fifth of such an append's
latency on a busy machine, and no other append waits meanwhile. The price:
whatever else arrives waits for that commit (a few milliseconds at most),
and a disk that stalls holds the loop for the first commit it stalls; the
commits after a slow one go through the thread.

Long-polling readers wait on a per-stream condition that commits notify
while anyone waits. Reads reuse idle readers and, for the streams this
server writes, take the committed length from the writer rather than from
storage. For the others (another node writes them, or nobody has for a
while) the readers waiting at a stream's tail share one storage read of its
checkpoint per ``recheck_interval``: any number of idle followers cost
storage one request per stream per second on each node, as one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

from messagevault.checkpoint import Checkpoint
from messagevault.committer import (
    DEFAULT_MAX_QUEUED_BYTES,
    Commit,
    CommitObserver,
    GroupCommitter,
)
from messagevault.errors import (
    CommitterClosed,
    CorruptData,
    MessageVaultError,
    NotWriter,
    StreamLocked,
    StreamNotFound,
)
from messagevault.format import EncodedBatch, FrameHeader, Message
from messagevault.names import validate_stream_name
from messagevault.producers import (
    DEFAULT_MAX_PRODUCERS,
    DEFAULT_PRODUCER_MAX_AGE,
    ProducerRecord,
    ProducerTable,
)
from messagevault.reader import RawFrames, Reader
from messagevault.recovery import recover
from messagevault.storage.base import ReadAccess, Storage
from messagevault.storage.file import FileStorage
from messagevault.storage.leases import HeldLease
from messagevault.writer import AppendResult, TrimResult, Writer

T = TypeVar("T")

log = logging.getLogger("messagevault.server")

# How long after its last confirmed commit a writer's checkpoint is taken
# as the committed state (see StreamHub._known_checkpoint), in seconds.
WRITER_TRUST = 1.0

# Server reads are pages (1,000 messages by default): read storage in steps
# of this size, without read-ahead, rather than the reader's 4-8 MiB chunks
# fetched ahead, which suit scans but would make a page of ten messages on
# Azure download two whole chunks.
READ_CHUNK_SIZE = 1024 * 1024

# An append is committed on the event loop only while the stream's last
# commit took at most this long (seconds): a disk that stalls, or storage
# failing (whose retries would hold the loop), sends commits back to the
# committer thread until one is quick again. A local fsync takes 0.3-5 ms.
LOOP_COMMIT_LIMIT = 0.005
# Nor a batch bigger than this (bytes of frames): its write alone would hold
# the loop, and a big batch gains little from saving two thread wake-ups.
LOOP_COMMIT_MAX_BYTES = 1024 * 1024


class _IdleReaders:
    """Readers not in use, kept per stream for the next read request (event loop only).

    Bounded in all (each holds open files): the most recently used are kept,
    the rest closed. Once closed, readers given back are closed at once.
    """

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._idle: OrderedDict[str, list[Reader]] = OrderedDict()
        self._count = 0
        self._closed = False
        self._forgotten: dict[str, int] = {}

    def take(self, stream: str) -> Reader | None:
        idle = self._idle.get(stream)
        if not idle:
            return None
        self._count -= 1
        return idle.pop()

    def give(self, stream: str, reader: Reader, era: int = 0) -> None:
        if self._closed or era != self.era(stream):
            reader.close()
            return
        self._idle.setdefault(stream, []).append(reader)
        self._idle.move_to_end(stream)
        self._count += 1
        while self._count > self._limit:
            oldest = next(iter(self._idle))
            readers = self._idle[oldest]
            readers.pop(0).close()
            self._count -= 1
            if not readers:
                del self._idle[oldest]

    def forget(self, stream: str) -> None:
        """Close ``stream``'s idle readers (it was deleted); those in use, when given back."""
        self._forgotten[stream] = self._forgotten.get(stream, 0) + 1
        for reader in self._idle.pop(stream, []):
            reader.close()
            self._count -= 1

    def era(self, stream: str) -> int:
        """Changes when ``stream`` is forgotten: a reader taken before then is not kept."""
        return self._forgotten.get(stream, 0)

    def close(self) -> None:
        self._closed = True
        idle, self._idle, self._count = self._idle, OrderedDict(), 0
        for readers in idle.values():
            for reader in readers:
                reader.close()


class _Handoff:
    """Carries commit results from committer threads to the event loop, a group per wake-up.

    Waking the loop from another thread costs a system call and, while the
    loop is busy, a wait for the GIL; a commit of 16 batches would pay it 16
    times. Resolved futures are parked here instead, and the committer calls
    ``wake`` once per group.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: deque[tuple[Future[AppendResult], asyncio.Future[AppendResult]]] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False

    def park(self, waiter: asyncio.Future[AppendResult], future: Future[AppendResult]) -> None:
        self._ready.append((future, waiter))  # deque.append is atomic

    def wake(self) -> None:
        with self._lock:
            if self._wake_pending or not self._ready:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False
        while self._ready:
            future, waiter = self._ready.popleft()
            if waiter.done():  # the request was cancelled (client gone)
                continue
            exception = future.exception()
            if exception is not None:
                waiter.set_exception(exception)
            else:
                waiter.set_result(future.result())


class StreamHub:
    """Writers, committers and commit notifications for the streams of one storage."""

    def __init__(
        self,
        storage: Storage,
        *,
        io_threads: int = 16,
        linger: float = 0.0,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_queue_wait: float = 10.0,
        max_producers: int = DEFAULT_MAX_PRODUCERS,
        producer_max_age: float = DEFAULT_PRODUCER_MAX_AGE,
        commit_on_loop: bool | None = None,
    ) -> None:
        # Bad bounds fail here, at start-up, not at a stream's first append.
        ProducerTable(max_producers=max_producers, max_age=producer_max_age)
        self.storage = storage
        # Each stream's producer table (Writer.open): how many producers, for
        # how many seconds of commit timestamps.
        self.max_producers = max_producers
        self.producer_max_age = producer_max_age
        self.linger = linger  # seconds a commit waits for more appends (GroupCommitter)
        self.max_queued_bytes = max_queued_bytes
        # How long an append waits for room in a full commit queue before it
        # is refused with Overloaded (503).
        self.max_queue_wait = max_queue_wait
        # Whether a lone append may be committed on the event loop (see the
        # module's docstring). By default for file storage only: a remote
        # commit is a round trip, retried with sleeps when it fails (and
        # memory storage is for trying out, and for tests that stall it).
        self.commit_on_loop = (
            isinstance(storage, FileStorage) if commit_on_loop is None else commit_on_loop
        )
        self.loop_commit_limit = LOOP_COMMIT_LIMIT
        self._appending = 0  # appends between their arrival here and their result
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="mv-io")
        self._committers: dict[str, GroupCommitter] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        # Streams rolled forward since this server started (see _recover).
        self._recovered: set[str] = set()
        self._commits: dict[str, asyncio.Condition] = {}
        self._tailing: dict[str, int] = {}  # long-polls waiting per stream: who to notify
        # Commits by another node do not notify; a long poll re-reads the
        # checkpoint this often (seconds) to see them. At most WRITER_TRUST:
        # a shared read is then never older than a writer's own word.
        self.recheck_interval = 1.0
        # The checkpoint read shared by the readers at each stream's tail:
        # when it was asked for, and the read (in flight or done).
        self._watched: dict[str, tuple[float, asyncio.Future[Checkpoint]]] = {}
        # Per stream with readers waiting at its tail: the task that reads its
        # checkpoint every recheck_interval and wakes them when it grew.
        self._watchers: dict[str, asyncio.Task[None]] = {}
        # Reads in flight, by stream and everything that decides their answer:
        # the readers a commit wakes together ask for the same bytes, and share
        # one storage read of them (see _shared_read).
        self._reads_in_flight: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        self.stopping = False  # set by stop_waiting() when the server shuts down
        self._handoff: _Handoff | None = None
        self._idle_readers = _IdleReaders()
        self._room = asyncio.Event()  # set (and replaced) when a committer makes room
        self._awaiting_room = 0
        self._turnstiles: dict[str, asyncio.Lock] = {}  # appends waiting for room, in order
        self._deleting: set[str] = set()  # streams whose delete is under way
        self._closed = False
        # Told of every commit of every stream, in the committer threads:
        # metrics (Prometheus histograms, StatsD) hang off this.
        self.commit_observers: list[CommitObserver] = []
        # One of several nodes (server/cluster.py): the leases of the streams
        # this node writes; a writer is opened only under one. None: this
        # server is the only one and writes every stream.
        self.leases: dict[str, HeldLease] | None = None
        # Several nodes: told when a stream's writer was found deposed, so
        # that the node stops counting itself its writer.
        self.writer_deposed: Callable[[str], Awaitable[None]] | None = None

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """Run a blocking storage call in the I/O pool.

        In the caller's context: the storage's log lines (the Azure SDK's
        requests, at debug) carry the id of the request they serve.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return await loop.run_in_executor(self._pool, call)

    async def append(self, stream: str, batch: EncodedBatch) -> AppendResult:
        committer = await self._committer(stream)
        self._appending += 1
        try:
            result = None
            if self._alone(stream, committer, batch):
                # Appends already read but not yet here (a burst of them)
                # come in first: then none is alone, and they share a commit.
                await asyncio.sleep(0)
                if self._alone(stream, committer, batch):
                    result = committer.commit_here(batch)
            if result is None:
                result = await self._commit_in_thread(stream, committer, batch)
        finally:
            self._appending -= 1
        if self._tailing.get(stream):
            condition = self._condition(stream)
            async with condition:
                condition.notify_all()
        return result

    def _alone(self, stream: str, committer: GroupCommitter, batch: EncodedBatch) -> bool:
        """Whether this append may be committed on the event loop: see the module's docstring.

        Alone: no other append in flight, and the stream's last commit was of
        one batch too (appends come one at a time, not in bursts) and quick;
        and the batch is small (``LOOP_COMMIT_MAX_BYTES``).
        """
        took = committer.last_commit_seconds
        turnstile = self._turnstiles.get(stream)
        return (
            self.commit_on_loop
            and not self.linger  # asked for: commits wait for company, never alone
            and self._appending == 1
            and batch.frame_size <= LOOP_COMMIT_MAX_BYTES
            and committer.last_commit_batches == 1
            and took is not None
            and took <= self.loop_commit_limit
            and (turnstile is None or not turnstile.locked())
        )

    async def _commit_in_thread(
        self, stream: str, committer: GroupCommitter, batch: EncodedBatch
    ) -> AppendResult:
        waiter: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        future: Future[AppendResult] = Future()
        future.add_done_callback(functools.partial(self._get_handoff().park, waiter))
        turnstile = self._turnstiles.get(stream)
        if committer.has_room and (turnstile is None or not turnstile.locked()):
            # Only this loop submits, so the queue can only have shrunk since
            # the check: submit returns at once.
            committer.submit(batch, future)
        else:
            await self._submit_in_turn(stream, committer, batch, future)
        return await waiter

    async def _submit_in_turn(
        self,
        stream: str,
        committer: GroupCommitter,
        batch: EncodedBatch,
        future: Future[AppendResult],
    ) -> None:
        """Submit once the queue has room, after appends that found none before this one.

        Waiting holds no thread and does not block the event loop, so a slow
        storage (an Azure outage being ridden out) with appends piling up
        never stalls health checks, reads or other streams. The turnstile
        (an asyncio lock: first come, first served) keeps new appends from
        taking the room the earlier ones wait for; the committer wakes the
        head of the line when it makes room (``_room_changed``). After
        ``max_queue_wait`` seconds in all: ``Overloaded``.
        """
        turnstile = self._turnstiles.setdefault(stream, asyncio.Lock())
        self._awaiting_room += 1
        try:
            async with asyncio.timeout(self.max_queue_wait), turnstile:
                while not committer.has_room and committer.accepting:
                    await self._room.wait()
                committer.submit(batch, future)
        except TimeoutError:
            raise committer.overloaded() from None
        finally:
            self._awaiting_room -= 1

    def _room_changed(self, loop: asyncio.AbstractEventLoop) -> None:
        """From a committer (any thread): wake appends waiting for room, if any wait.

        The count is raised before a waiter looks at the room, so either the
        waiter sees the room made or this sees the waiter.
        """
        if self._awaiting_room:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._wake_room_waiters)

    def _wake_room_waiters(self) -> None:
        # Every waiter wakes; each re-checks its own stream's room.
        self._room.set()
        self._room = asyncio.Event()

    async def _committer(self, stream: str) -> GroupCommitter:
        committer = self._committers.get(stream)
        if committer is not None and committer.accepting:
            return committer
        if self._closed:
            raise CommitterClosed("the server is shutting down; try again shortly")
        lock = self._opening.setdefault(stream, asyncio.Lock())
        self._refuse_if_deleting(stream)  # not waiting for the delete's lock
        async with lock:
            self._refuse_if_deleting(stream)
            committer = self._committers.get(stream)
            if committer is not None and not committer.accepting:
                # The stream's metrics carry on: they are counted by stream
                # (the commit observers), not by committer.
                await self._let_go(stream, committer)
                committer = None
                if self.writer_deposed is not None:
                    await self.writer_deposed(stream)
            if committer is None:
                # A fresh writer starts from what storage holds now: after a
                # takeover, from the other writer's last commit. StreamLocked
                # (409) while the other writer still holds the stream.
                lease = None
                if self.leases is not None:
                    lease = self.leases.get(stream)
                    if lease is None:
                        raise NotWriter(f"this node does not write stream {stream!r} (any more)")
                open_writer = functools.partial(
                    Writer.open,
                    max_producers=self.max_producers,
                    producer_max_age=self.producer_max_age,
                    lease=lease,
                )
                writer = await self.run(open_writer, self.storage, stream)
                committer = self._committers[stream] = GroupCommitter(
                    writer,
                    linger=self.linger,
                    max_queued_bytes=self.max_queued_bytes,
                    after_group=self._get_handoff().wake,
                    room_changed=functools.partial(self._room_changed, asyncio.get_running_loop()),
                    on_commit=self._committed,
                )
        return committer

    async def _recover(self, stream: str) -> None:
        """Roll ``stream`` forward once, before this server first reads it.

        After a power cut its durable checkpoint may lag acknowledged
        messages (docs/FORMAT.md, "Recovery"); until a writer rolls it
        forward, readers would not see them. A server is the stream's
        writer, so it does that at its first touch rather than at the
        stream's next append. Where another process holds the writer lock,
        that writer has rolled it forward already.
        """
        if stream in self._recovered or stream in self._committers or self.leases is not None:
            # One of several nodes: only a stream's writer may roll it
            # forward, and it does so when it takes the stream's lease.
            return
        async with self._opening.setdefault(stream, asyncio.Lock()):
            if stream in self._recovered or stream in self._committers:
                return
            try:
                await self.run(recover, self.storage, validate_stream_name(stream))
            except StreamNotFound:
                return  # nothing to recover; its first writer starts it afresh
            except StreamLocked:
                pass
            self._recovered.add(stream)

    def _committed(self, commit: Commit) -> None:
        for observer in self.commit_observers:
            try:
                observer(commit)
            except Exception:  # one broken observer must not starve the others
                log.exception("commit observer failed", extra={"stream": commit.stream})

    async def open_writer(self, stream: str) -> None:
        """Open ``stream``'s writer now (several nodes: once this node has taken its lease)."""
        await self._committer(stream)

    async def producer_records(
        self, stream: str, producers: list[bytes]
    ) -> list[ProducerRecord | None]:
        """Each producer's last committed batch in ``stream``, from its writer's table.

        The writer is opened if need be (its table is rebuilt from the log),
        and asked between two commits.
        """
        committer = await self._committer(stream)

        def look(writer: Writer) -> list[ProducerRecord | None]:
            return [writer.producers.get(producer) for producer in producers]

        return await self.run(functools.partial(committer.run_exclusive, look))

    def _refuse_if_deleting(self, stream: str) -> None:
        if stream in self._deleting:
            raise CommitterClosed(
                f"stream {stream!r} is being deleted; an append sent after the delete "
                "starts it afresh"
            )

    async def delete_stream(self, stream: str) -> None:
        """Delete ``stream`` from storage, after the appends already queued for it.

        Appends this server accepted before the delete are committed, then
        deleted with the stream (that is what deleting means); those that
        arrive while it runs are refused (``CommitterClosed``, retriable: a
        retry after the delete starts the stream afresh). Idle readers go,
        so that reads see the stream gone (``StreamNotFound``). Several
        nodes: the caller holds the stream's lease, and releases it after.
        """
        validate_stream_name(stream)
        async with self._opening.setdefault(stream, asyncio.Lock()):
            self._deleting.add(stream)
            try:
                committer = self._committers.pop(stream, None)
                if committer is not None:
                    await self.run(committer.close)  # commits what is queued first
                await self.run(self.storage.delete_stream, stream)
            finally:
                self._deleting.discard(stream)
                self._idle_readers.forget(stream)
                self._recovered.discard(stream)
                self._watched.pop(stream, None)
                for key in [key for key in self._reads_in_flight if key[0] == stream]:
                    del self._reads_in_flight[key]  # later reads start afresh
        log.info("deleted stream", extra={"stream": stream})
        if self._tailing.get(stream):  # long polls look again, and find it gone
            condition = self._condition(stream)
            async with condition:
                condition.notify_all()

    async def stop_writing(self, stream: str) -> None:
        """Stop writing ``stream``: its lease is gone. Appends queued fail, retriably.

        The writer may have lost the stream already (its commits then fail
        on the fence); the close runs in the background so that a storage
        riding out an outage does not hold the caller up.
        """
        # Not under the stream's opening lock: this is called while that
        # lock is held too (a deposed writer found by ``_committer``). A
        # writer being opened meanwhile finds no lease and is refused.
        committer = self._committers.pop(stream, None)
        if committer is not None:
            task = asyncio.ensure_future(self.run(committer.close))
            task.add_done_callback(_log_failed_close)

    async def _let_go(self, stream: str, committer: GroupCommitter) -> None:
        """Drop a committer whose writer was deposed, releasing its lock or lease.

        Its writer lost the stream to another (``StaleWriter``): it can never
        commit again, and on file storage it still holds the writer lock
        that a fresh writer needs.
        """
        del self._committers[stream]
        await self.run(committer.close)

    def waiting_reads(self) -> dict[str, int]:
        """Long polls and tails waiting for a commit, per stream (for metrics)."""
        return {stream: count for stream, count in self._tailing.items() if count}

    def committers(self) -> dict[str, GroupCommitter]:
        """The streams this server writes, each with its committer (for metrics)."""
        return dict(self._committers)

    def _get_handoff(self) -> _Handoff:
        if self._handoff is None:
            self._handoff = _Handoff(asyncio.get_running_loop())
        return self._handoff

    def _condition(self, stream: str) -> asyncio.Condition:
        return self._commits.setdefault(stream, asyncio.Condition())

    async def wait_for_commit(
        self,
        stream: str,
        beyond: int,
        timeout: float,
        *,
        gone: Callable[[], bool] | None = None,
    ) -> None:
        """Return once the stream is longer than ``beyond``, or after ``timeout`` seconds.

        Also once ``gone()`` says that nobody waits any more (the client
        left), asked at least every ``recheck_interval`` seconds.
        """
        condition = self._condition(stream)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._tailing[stream] = self._tailing.get(stream, 0) + 1
        if stream not in self._watchers:
            self._watchers[stream] = asyncio.ensure_future(self._watch(stream))
        try:
            while (
                not self.stopping
                and not (gone is not None and gone())
                and (await self._watched_checkpoint(stream)).length <= beyond
            ):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                async with condition:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            condition.wait(), min(remaining, self.recheck_interval)
                        )
        finally:
            self._tailing[stream] -= 1
            if not self._tailing[stream]:
                self._watched.pop(stream, None)

    async def _watch(self, stream: str) -> None:
        """While readers wait at ``stream``'s tail: a fresh shared read every ``recheck_interval``.

        The readers themselves read nothing while the watch keeps the shared
        read fresh: the stream costs storage one read per interval, however
        many wait, and a commit made elsewhere wakes them all within one.
        """
        try:
            while self._tailing.get(stream) and not self.stopping:
                with contextlib.suppress(MessageVaultError):  # the readers get it themselves
                    await self._watched_checkpoint(stream, fresh=True)
                await asyncio.sleep(self.recheck_interval)
        finally:
            self._watchers.pop(stream, None)

    async def _watched_checkpoint(self, stream: str, *, fresh: bool = False) -> Checkpoint:
        """The checkpoint for readers at the tail: the writer's, else one shared storage read.

        A storage read serves every reader of the stream until the watch
        (``_watch``) reads again, a little over ``recheck_interval`` later,
        and those who ask while it is in flight: followers cost storage per
        stream, not per follower. A read that finds the stream longer wakes
        the waiting readers at once. ``fresh``: read now (the watch).
        """
        known = self._known_checkpoint(stream)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        entry = self._watched.get(stream)
        if entry is not None:
            asked_at, shared = entry
            # While a watch runs, its next read is due before twice the interval.
            kept = self.recheck_interval * (2 if stream in self._watchers else 1)
            if not shared.done() or (not fresh and loop.time() - asked_at < kept):
                return await asyncio.shield(shared)
        before = entry[1].result().length if entry and _succeeded(entry[1]) else None
        shared = asyncio.ensure_future(self._with_reader(stream, Reader.checkpoint))
        shared.add_done_callback(_retrieved)
        self._watched[stream] = (loop.time(), shared)
        checkpoint = await asyncio.shield(shared)
        if before is not None and checkpoint.length > before:
            condition = self._condition(stream)
            async with condition:
                condition.notify_all()
        return checkpoint

    async def _at_watched_tail(self, stream: str, position: int) -> bool:
        """Whether a read from ``position`` finds nothing, by the shared checkpoint read.

        Only for streams this server does not write (no writer open here), and only for the
        exact length: anything else is read from storage as always (a shared
        read may be up to ``recheck_interval`` old, and a trim meanwhile
        must not send a reader into released bytes).
        """
        if stream in self._committers:
            # This node writes it: its writer knows the length, and on Azure the
            # stored checkpoint may trail what that writer acknowledged.
            return False
        checkpoint = await self._watched_checkpoint(stream)
        return position == checkpoint.length and position >= checkpoint.first_position

    async def stop_waiting(self) -> None:
        """End every long poll and tail now: the server is shutting down.

        They would otherwise hold the shutdown for as long as they wait (a
        tail, for ever) while nothing is left for them to see.
        """
        self.stopping = True
        for watcher in list(self._watchers.values()):
            watcher.cancel()
        for condition in list(self._commits.values()):
            async with condition:
                condition.notify_all()

    async def checkpoint(self, stream: str) -> Checkpoint:
        known = self._known_checkpoint(stream)
        if known is not None:
            return known
        return await self._with_reader(stream, Reader.checkpoint)

    def _known_checkpoint(self, stream: str) -> Checkpoint | None:
        """The committed checkpoint without asking storage, when this server knows it.

        That is when this server writes the stream and its writer's state was
        confirmed by storage in the last ``WRITER_TRUST`` seconds: no failed
        commit in doubt, and too recent for another writer to have taken over
        unnoticed for long.
        """
        committer = self._committers.get(stream)
        if committer is None or not committer.accepting:
            return None
        return committer.writer.recent_checkpoint(WRITER_TRUST)

    async def read(
        self, stream: str, position: int, limit: int, max_bytes: int
    ) -> tuple[list[Message], int]:
        """Up to ``limit`` messages from ``position``; (messages, next position)."""
        if await self._at_watched_tail(stream, position):
            return [], position
        known = self._known_checkpoint(stream)
        key = (stream, "messages", position, limit, max_bytes, known)
        messages, next_position = await self._shared_read(
            key,
            functools.partial(
                self._with_reader, stream, _read_messages, known, position, limit, max_bytes
            ),
        )
        return list(messages), next_position  # the list is each caller's own

    async def first_header(self, stream: str, checkpoint: Checkpoint) -> FrameHeader | None:
        """The header of the stream's first readable frame; None when no message is left.

        That is at the checkpoint's first position (0 unless trimmed). From
        the header alone: the first message may be a value of any size.
        """
        if checkpoint.first_position >= checkpoint.length:
            return None
        return await self._with_reader(stream, _first_header, checkpoint)

    async def trim(
        self,
        stream: str,
        position: int | None = None,
        *,
        sequence: int | None = None,
        time: datetime | float | None = None,
    ) -> TrimResult:
        """Trim ``stream`` below a position, a sequence or a time (``Writer.trim_below``).

        The stream's writer does it, taking the writer from its committer
        between two commits (``run_exclusive``); it is opened first if need
        be, as for an append. ``StreamNotFound`` for a stream that does not
        exist (none is created).
        """
        if stream not in self._committers:
            await self.checkpoint(stream)  # StreamNotFound rather than a new empty stream
        committer = await self._committer(stream)
        trim_below = functools.partial(
            Writer.trim_below, position=position, sequence=sequence, time=time
        )
        result = await self.run(functools.partial(committer.run_exclusive, trim_below))
        if result.trimmed:
            log.info(
                "trimmed stream below position %d (sequence %d): %d bytes released",
                result.first_position,
                result.first_sequence,
                result.released_bytes,
                extra={"stream": stream},
            )
        return result

    async def read_frames(
        self, stream: str, position: int, max_bytes: int, max_messages: int | None = None
    ) -> RawFrames:
        """Whole stored frames from ``position`` (see ``Reader.read_frames``)."""
        if await self._at_watched_tail(stream, position):
            return RawFrames(b"", 0, position)
        committed = self._known_length(stream)
        first_position = self._known_first_position(stream)
        read_frames = functools.partial(
            Reader.read_frames,
            position=position,
            max_bytes=max_bytes,
            max_messages=max_messages,
            committed=committed,
            first_position=first_position,
        )
        key = (stream, "frames", position, max_bytes, max_messages, committed, first_position)
        return await self._shared_read(
            key, functools.partial(self._with_reader, stream, read_frames)
        )

    async def _shared_read(self, key: tuple[object, ...], read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or the answer of the same read already in flight.

        A commit wakes every reader waiting at a stream's tail at once, and
        they all ask for the same bytes: one storage read answers them all,
        so a hundred followers through a server cost storage per commit what
        one does. The key holds what this server knows of the stream (the
        writer's length here), so a read asked after a commit never joins
        one begun before it; without a writer here, a read may join one begun
        a moment earlier, as fresh as the shared tail read already is
        (``_at_watched_tail``).
        """
        in_flight = self._reads_in_flight.get(key)
        if in_flight is None:
            in_flight = asyncio.ensure_future(read())
            self._reads_in_flight[key] = in_flight

            def forget(done: asyncio.Future[Any]) -> None:
                if self._reads_in_flight.get(key) is done:
                    del self._reads_in_flight[key]

            in_flight.add_done_callback(forget)
            in_flight.add_done_callback(_retrieved)
        # shield: a reader that goes away leaves the read to the others.
        result: T = await asyncio.shield(in_flight)
        return result

    async def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        """Where message ``sequence``, or the first message at or after ``time``, is.

        ``Reader.seek`` in the I/O pool: its answers, its errors.
        """
        seek = functools.partial(Reader.seek, sequence=sequence, time=time)
        return await self._with_reader(stream, seek)

    async def check_position(self, stream: str, position: int) -> None:
        """Raise ``InvalidPosition`` unless ``position`` is a message position or the length."""
        known = self._known_checkpoint(stream)
        await self._with_reader(stream, _check_position, known, position)

    def _known_first_position(self, stream: str) -> int | None:
        """The first readable position, when known as ``_known_length`` is."""
        known = self._known_checkpoint(stream)
        return None if known is None else known.first_position

    def _known_length(self, stream: str) -> int | None:
        """The committed length, for readers to skip reading the checkpoint, when known."""
        known = self._known_checkpoint(stream)
        return None if known is None else known.length

    async def _with_reader(self, stream: str, function: Callable[..., T], *args: object) -> T:
        """``function(reader, *args)`` in the I/O pool, with a reused reader.

        Opening a reader costs file opens (or, on Azure, a checkpoint round
        trip), so idle ones are kept per stream.
        """
        await self._recover(stream)
        era = self._idle_readers.era(stream)
        reader = self._idle_readers.take(stream)
        work = functools.partial(
            contextvars.copy_context().run,  # as in run(): log lines keep their request id
            _using_reader,
            self.storage,
            stream,
            reader,
            function,
            *args,
        )
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, work)
        except BaseException:  # the pool is shut down: the reader will not be used
            if reader is not None:
                reader.close()
            raise

        def keep(done: asyncio.Future[tuple[T, Reader]]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._idle_readers.give(stream, done.result()[1], era)
            elif reader is not None:
                reader.close()  # idempotent: a failed read closed it already

        future.add_done_callback(keep)
        # shield: a request that goes away still lets the reader come back.
        result, _ = await asyncio.shield(future)
        return result

    async def read_access(self, stream: str) -> ReadAccess:
        await self._recover(stream)  # direct readers start from the rolled-forward checkpoint
        return await self.run(_read_access, self.storage, stream)

    async def list_streams(self) -> list[str]:
        return await self.run(self.storage.list_streams)

    async def close_writers(self) -> None:
        """Finish in-flight commits and close every writer; reads go on. Idempotent."""
        self._closed = True  # later appends: CommitterClosed (503), not a new writer
        committers, self._committers = list(self._committers.values()), {}
        for committer in committers:
            await self.run(committer.close)

    async def close(self) -> None:
        """Finish in-flight commits, close every writer, stop the I/O pool."""
        await self.close_writers()
        self._pool.shutdown(wait=True)
        self._idle_readers.close()


def _succeeded(future: asyncio.Future[Checkpoint]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A shared read's failure reaches whoever awaits it; nobody may, hence this look."""
    if not future.cancelled():
        future.exception()


def _log_failed_close(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a deposed writer failed", exc_info=task.exception())


def _using_reader(
    storage: Storage,
    stream: str,
    reader: Reader | None,
    function: Callable[..., T],
    *args: object,
) -> tuple[T, Reader]:
    """Run ``function(reader, *args)``, opening a reader if none was given.

    Returns the reader with the result, for reuse; closes it on failure,
    since a failed read may have left it in any state.
    """
    if reader is None:
        reader = Reader.open(
            storage, validate_stream_name(stream), chunk_size=READ_CHUNK_SIZE, read_ahead=False
        )
    try:
        return function(reader, *args), reader
    except BaseException:
        reader.close()
        raise


def _read_access(storage: Storage, stream: str) -> ReadAccess:
    store = storage.open_stream(validate_stream_name(stream))
    try:
        return store.read_access()
    finally:
        store.close()


def _check_position(reader: Reader, known: Checkpoint | None, position: int) -> None:
    # Checks the position (a trimmed one too); reads no frame yet.
    if known is None:
        reader.read(position)
    else:
        reader.read(position, committed=known.length, first_position=known.first_position)


def _first_header(reader: Reader, checkpoint: Checkpoint) -> FrameHeader | None:
    try:
        return reader.header_at(checkpoint.first_position, committed=checkpoint.length)
    except CorruptData:  # released meanwhile (a trim since the checkpoint): look again
        checkpoint = reader.checkpoint()
        if checkpoint.first_position >= checkpoint.length:
            return None
        return reader.header_at(checkpoint.first_position, committed=checkpoint.length)


def _read_messages(
    reader: Reader, known: Checkpoint | None, position: int, limit: int, max_bytes: int
) -> tuple[list[Message], int]:
    """At least one message (whatever its size), then more while they fit ``max_bytes``.

    A message is only taken from the reader once it is known to be wanted:
    a large value after the page is full is never read.
    """
    messages: list[Message] = []
    size = 0
    messages_read = reader.read(
        position,
        committed=None if known is None else known.length,
        first_position=None if known is None else known.first_position,
        max_bytes=max_bytes,
    )
    for message in messages_read:
        if messages and size + len(message.value) > max_bytes:
            break
        messages.append(message)
        size += len(message.value) + len(message.key)
        if len(messages) >= limit:
            break
    if messages:
        return messages, messages[-1].next_position
    # None yet: where they will start (past 0 on a trimmed stream), for a wait to go from.
    return messages, position or reader.frame_of(0, known)
