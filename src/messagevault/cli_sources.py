"""The two places a ``messagevault`` command reads and writes, behind one face.

``StorageSource`` opens storage directly (a data folder, an Azure account);
``ServerSource`` goes through a server with the client library. Commands are
written once against ``Source``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Protocol

import click

from messagevault.cli_config import Target, server_target
from messagevault.client.base import Trimmed
from messagevault.errors import StreamNotFound
from messagevault.format import EncodedBatch, Message, read_header
from messagevault.polling import PollBackoff
from messagevault.reader import Reader, VerifyReport
from messagevault.replicate import FrameSource, ReaderFrames
from messagevault.storage import open_storage
from messagevault.storage.base import ReadAccess, Storage, SystemFiles
from messagevault.storage.file import SYSTEM_FOLDER, FileStorage
from messagevault.wire import StreamInfo
from messagevault.writer import AppendResult, Writer

if TYPE_CHECKING:
    from messagevault.retention_policy import RetentionPolicy

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TrimTarget:
    """Where ``trim`` cuts a stream: one of these, the others None."""

    before_position: int | None = None
    before_sequence: int | None = None
    before_time: datetime | float | None = None


class Source(Protocol):
    """What the commands need from a server or from storage."""

    target: Target

    def describe(self) -> str: ...

    def streams(self) -> list[StreamInfo]: ...

    def info(self, stream: str) -> StreamInfo: ...

    def cluster(self) -> dict[str, Any]:
        """The nodes and which writes each stream (``GET /cluster``, or the leases in storage)."""
        ...

    def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        """Where message ``sequence``, or the first message at or after ``time``, is."""
        ...

    def read(self, stream: str, position: int) -> Iterator[Message]:
        """Messages from ``position`` up to the committed end; a bad position fails at once."""
        ...

    def follow(
        self,
        stream: str,
        position: int,
        stop: threading.Event,
        backoff: PollBackoff | None = None,
    ) -> Iterator[Iterable[Message]]:
        """Runs of messages as they are committed, until ``stop`` is set.

        Each run holds what arrived together: the caller flushes its output
        after each one. ``backoff`` paces the checks of storage at the tail
        (default: ``PollBackoff()``); a server is long-polled instead.
        """
        ...

    def publish(self, stream: str, batch: EncodedBatch) -> AppendResult: ...

    def verify(self, stream: str, progress: Progress) -> VerifyReport: ...

    def frame_source(self, stream: str) -> FrameSource: ...

    def delete_stream(self, stream: str) -> None:
        """Delete the stream and its retention policy (through a server: the admin claim)."""
        ...

    def retention(self, stream: str) -> dict[str, Any]:
        """The retention that applies: ``max_age``, ``max_bytes``, ``source`` (as the HTTP API)."""
        ...

    def set_retention(self, stream: str, policy: RetentionPolicy) -> dict[str, Any]: ...

    def clear_retention(self, stream: str) -> None: ...

    def trim(self, stream: str, target: TrimTarget) -> Trimmed:
        """Release the messages before ``target`` (through a server: the admin claim)."""
        ...

    def close(self) -> None: ...


def open_source(target: Target) -> Source:
    if target.url is not None:
        return ServerSource(target)
    assert target.storage is not None
    return StorageSource(storage_from(target.storage, "--storage"), target)


def storage_from(location: str, option: str) -> Storage:
    try:
        return open_storage(location)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def sas_url_of(text: str) -> str | None:
    """``text`` as a SAS URL: ``sas:URL``, or an http(s) URL signed with ``sig=``."""
    if text.startswith("sas:"):
        return text.removeprefix("sas:")
    if text.startswith(("https://", "http://")) and "sig=" in text.partition("?")[2]:
        return text
    return None


@contextlib.contextmanager
def sas_reader(url: str) -> Iterator[Reader]:
    try:
        reader = Reader.from_read_access(ReadAccess("azure-sas", url))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SAS URL") from exc
    with reader:
        yield reader


def copy_source(
    stack: contextlib.ExitStack, stream: str, origin: str, profile: str | None
) -> tuple[FrameSource, str, Target | None]:
    """What ``copy --from SRC`` names: frames, a credential-free description, the server if one."""
    sas = sas_url_of(origin)
    if sas is not None:
        return ReaderFrames(stack.enter_context(sas_reader(sas))), "a SAS URL", None
    if origin.startswith(("http://", "https://")):
        target = server_target(origin, profile)
        source = stack.enter_context(contextlib.closing(ServerSource(target)))
        return source.frame_source(stream), target.shown, target
    storage = storage_from(origin, "--from")
    reader = stack.enter_context(Reader.open(storage, stream))
    return ReaderFrames(reader), storage.describe(), None


def stream_info(reader: Reader, stream: str) -> StreamInfo:
    checkpoint = reader.checkpoint()
    first = None
    if checkpoint.first_position < checkpoint.length:  # a message is left (a trim takes all)
        first = reader.header_at(checkpoint.first_position, committed=checkpoint.length)
    return StreamInfo.from_timestamps(
        stream,
        checkpoint.length,
        checkpoint.next_sequence,
        first_write=first.timestamp if first else None,
        last_write=checkpoint.last_timestamp if checkpoint.length else None,
        first_position=checkpoint.first_position,
        first_sequence=first.base_sequence if first else checkpoint.next_sequence,
    )


class StorageSource:
    def __init__(self, storage: Storage, target: Target) -> None:
        self.storage = storage
        self.target = target
        self._readers: dict[str, Reader] = {}
        self._writers: dict[str, Writer] = {}

    def describe(self) -> str:
        return self.storage.describe()

    def cluster(self) -> dict[str, Any]:
        from messagevault.server.cluster import lease_report
        from messagevault.storage.leases import LeaseStorage

        if isinstance(self.storage, FileStorage):  # a mistyped path is no empty cluster
            self._check_data_folder(self.storage, self.storage.list_streams(), self.target.origin)
        if not isinstance(self.storage, LeaseStorage):
            return {"nodes": [], "streams": []}
        leases = self.storage.leases()
        return dict(lease_report(leases.list("nodes/"), leases.list("streams/")))

    def _refuse_if_served(self) -> None:
        self.refuse_if_served("publish through them, e.g. --url {address}")

    def refuse_if_served(self, advice: str) -> None:
        """Appends to storage that server nodes serve go through them, never around them.

        A node writes a stream under its lease; a writer beside the nodes
        would take streams none of them has open now, and hold them from the
        nodes until it closed.
        """
        from messagevault.storage.leases import LeaseStorage

        if not isinstance(self.storage, LeaseStorage):
            return
        live = [record for record in self.storage.leases().list("nodes/") if record.live()]
        if live:
            names = ", ".join(record.name.removeprefix("nodes/") for record in live)
            raise click.ClickException(
                f"{self.storage.describe()} ({self.target.origin}) is served by server nodes "
                f"({names}): " + advice.format(address=live[0].address)
            )

    def reader(self, stream: str) -> Reader:
        if stream not in self._readers:
            self._readers[stream] = Reader.open(self.storage, stream)
        return self._readers[stream]

    def streams(self) -> list[StreamInfo]:
        names = self.storage.list_streams()
        if isinstance(self.storage, FileStorage):
            self._check_data_folder(self.storage, names, self.target.origin)
        found = []
        for name in names:
            try:
                checkpoint = self.reader(name).checkpoint()
            except StreamNotFound:  # being created (its checkpoint comes last), or gone
                continue
            last = checkpoint.last_timestamp if checkpoint.length else None
            found.append(
                StreamInfo.from_timestamps(
                    name,
                    checkpoint.length,
                    checkpoint.next_sequence,
                    first_write=None,
                    last_write=last,
                )
            )
        return found

    @staticmethod
    def _check_data_folder(storage: FileStorage, names: list[str], origin: str) -> None:
        """A typo in ``--storage`` must not look like an empty data folder."""
        root = storage.root
        if not root.exists():
            raise click.ClickException(f"there is no folder {root} ({origin}): check the path")
        if not root.is_dir():
            raise click.ClickException(f"{root} ({origin}) is a file, not a data folder")
        if names or (root / SYSTEM_FOLDER).is_dir():
            return
        others = sorted(entry.name for entry in root.iterdir() if not entry.name.startswith("."))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise click.ClickException(
                f"{root} ({origin}) is not a MessageVault data folder: it holds {shown} "
                "but no streams; check the path"
            )

    def info(self, stream: str) -> StreamInfo:
        return stream_info(self.reader(stream), stream)

    def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        return self.reader(stream).seek(sequence=sequence, time=time)

    def read(self, stream: str, position: int) -> Iterator[Message]:
        return self.reader(stream).read(position)

    def follow(
        self,
        stream: str,
        position: int,
        stop: threading.Event,
        backoff: PollBackoff | None = None,
    ) -> Iterator[Iterable[Message]]:
        reader = self.reader(stream)
        committed = reader.checkpoint().length
        first = reader.read(position, committed=committed)  # checks the position now
        pace = backoff if backoff is not None else PollBackoff()
        return self._runs(reader, first, max(position, committed), stop, pace)

    @staticmethod
    def _runs(
        reader: Reader,
        first: Iterator[Message],
        position: int,
        stop: threading.Event,
        backoff: PollBackoff,
    ) -> Iterator[Iterable[Message]]:
        """``first`` (messages up to ``position``), then what each new commit adds.

        Each check is a checkpoint read (a billed request on Azure): they
        thin out while the stream is idle, as ``Reader.follow``'s do.
        """
        yield first
        while not stop.is_set():
            committed = reader.checkpoint().length
            if position < committed:
                backoff.found()
                yield reader.read(position, committed=committed)
                position = committed
            else:
                stop.wait(backoff.idle())

    def publish(self, stream: str, batch: EncodedBatch) -> AppendResult:
        writer = self._writers.get(stream)
        if writer is None:
            self._refuse_if_served()
            writer = self._writers[stream] = Writer.open(self.storage, stream)
        return writer.append_batches([batch])[0]

    def verify(self, stream: str, progress: Progress) -> VerifyReport:
        return self.reader(stream).verify(progress=progress)

    def frame_source(self, stream: str) -> FrameSource:
        return ReaderFrames(self.reader(stream))

    def delete_stream(self, stream: str) -> None:
        """Delete under the server lock: a server serving this storage must do it itself.

        It would otherwise go on serving what it has open of the stream.
        """
        from messagevault.retention_policy import delete_policy
        from messagevault.storage.base import ServerLock

        self.refuse_if_served("delete it through them, e.g. --url {address}")
        lock = self.storage.hold_server_lock() if isinstance(self.storage, ServerLock) else None
        with lock or contextlib.nullcontext():
            reader = self._readers.pop(stream, None)
            if reader is not None:
                reader.close()
            self.storage.delete_stream(stream)
            delete_policy(self._system_files(), stream)

    def _system_files(self) -> SystemFiles:
        from messagevault.retention_policy import system_files

        return system_files(self.storage)

    def retention(self, stream: str) -> dict[str, Any]:
        from messagevault.retention_policy import load_policy

        self.reader(stream)  # StreamNotFound for no such stream
        policy = load_policy(self._system_files(), stream)
        if policy is None:  # a server's default is the server's to say
            return {"stream": stream, "max_age": None, "max_bytes": None, "source": "none"}
        return {"stream": stream, **policy.to_json(), "source": "stream"}

    def set_retention(self, stream: str, policy: RetentionPolicy) -> dict[str, Any]:
        from messagevault.retention_policy import save_policy

        self.reader(stream)  # StreamNotFound for no such stream
        save_policy(self._system_files(), stream, policy)
        return self.retention(stream)

    def clear_retention(self, stream: str) -> None:
        from messagevault.retention_policy import delete_policy

        self.reader(stream)  # StreamNotFound for no such stream
        delete_policy(self._system_files(), stream)

    def trim(self, stream: str, target: TrimTarget) -> Trimmed:
        writer = self._writers.pop(stream, None)
        if writer is None:
            self.refuse_if_served("trim through them, e.g. --url {address}")
            writer = Writer.open(self.storage, stream, create=False)
        with writer:
            result = writer.trim_below(
                position=target.before_position,
                sequence=target.before_sequence,
                time=target.before_time,
            )
        return Trimmed(
            stream,
            result.first_position,
            result.first_sequence,
            result.released_bytes,
            result.trimmed,
        )

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for reader in self._readers.values():
            reader.close()


class ServerSource:
    def __init__(self, target: Target) -> None:
        from messagevault.client import Client  # the HTTP stack only when a server is asked for

        assert target.url is not None
        self.target = target
        self.client = Client(target.url, user=target.user, password=target.password)

    def describe(self) -> str:
        return f"the server at {self.target.shown}"

    def streams(self) -> list[StreamInfo]:
        return self.client.streams()

    def info(self, stream: str) -> StreamInfo:
        return self.client.info(stream)

    def cluster(self) -> dict[str, Any]:
        return self.client.cluster()

    def seek(
        self, stream: str, *, sequence: int | None = None, time: datetime | float | None = None
    ) -> int:
        return self.client.seek(stream, sequence=sequence, time=time)

    def read(self, stream: str, position: int) -> Iterator[Message]:
        return self.client.read(stream, position)

    def follow(
        self,
        stream: str,
        position: int,
        stop: threading.Event,
        backoff: PollBackoff | None = None,
    ) -> Iterator[Iterable[Message]]:
        del backoff  # the server's long poll answers at the commit: nothing to pace
        messages = self.client.follow(stream, position, stop=stop)
        return runs_as_they_come(messages, stop)

    def publish(self, stream: str, batch: EncodedBatch) -> AppendResult:
        return self.client.publish_batch(stream, batch)

    def verify(self, stream: str, progress: Progress) -> VerifyReport:
        """Every message through the server: the client checks each frame's CRCs."""
        info = self.client.info(stream)
        length, first = info.length, info.first_position  # past 0 once trimmed
        position = first
        frames = messages = 0
        for data in self.client.read_frames(stream, first, length):  # each frame checked
            offset = 0
            while offset < len(data) and position + offset < length:
                header = read_header(data, offset, position + offset)
                frames += 1
                messages += header.message_count
                offset += header.frame_size
            position += offset
            progress(position - first, length - first)
        return VerifyReport(frames, messages, length - first)

    def frame_source(self, stream: str) -> FrameSource:
        return _ServerFrames(self, stream)

    def delete_stream(self, stream: str) -> None:
        self.client.delete_stream(stream)

    def retention(self, stream: str) -> dict[str, Any]:
        return self.client.retention(stream)

    def set_retention(self, stream: str, policy: RetentionPolicy) -> dict[str, Any]:
        return self.client.set_retention(stream, max_age=policy.max_age, max_bytes=policy.max_bytes)

    def clear_retention(self, stream: str) -> None:
        self.client.clear_retention(stream)

    def trim(self, stream: str, target: TrimTarget) -> Trimmed:
        return self.client.trim(
            stream,
            before_position=target.before_position,
            before_sequence=target.before_sequence,
            before_time=target.before_time,
        )

    def close(self) -> None:
        self.client.close()


_BACKLOG = 100_000  # messages a follow may fetch ahead of what is printed


def runs_as_they_come(
    messages: Iterator[Message], stop: threading.Event
) -> Iterator[list[Message]]:
    """Group a blocking stream of messages into runs of what has arrived so far.

    A thread drains ``messages`` (which blocks at the tail) into a queue; a
    run is everything queued when the caller asks, so output can be flushed
    once per batch that arrives rather than once per message.
    """
    queue: SimpleQueue[Message | BaseException | None] = SimpleQueue()

    def pump() -> None:
        try:
            for count, message in enumerate(messages):
                queue.put(message)
                if count % 1024 == 0:
                    while queue.qsize() > _BACKLOG and not stop.is_set():
                        stop.wait(0.01)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            queue.put(exc)
        else:
            queue.put(None)

    thread = threading.Thread(target=pump, name="messagevault-follow", daemon=True)
    thread.start()
    try:
        while not stop.is_set():
            try:
                items = [queue.get(timeout=0.2)]  # short: Ctrl-C is seen between waits
            except Empty:
                continue
            while len(items) < _BACKLOG and not queue.empty():
                items.append(queue.get_nowait())
            last = items[-1]  # the end or an error can only come last
            if run := [item for item in items if isinstance(item, Message)]:
                yield run
            if last is None:
                return
            if isinstance(last, BaseException):
                raise last
    finally:
        stop.set()
        thread.join(timeout=5)


class _ServerFrames:
    """The stored frames of a stream read through a server's binary read route, as stored."""

    def __init__(self, source: ServerSource, stream: str) -> None:
        self._source = source
        self._stream = stream

    def length(self) -> int:
        return self._source.client.info(self._stream).length

    def frames(self, position: int, end: int) -> Iterator[bytes]:
        for page in self._source.client.read_frames(self._stream, position, end):
            # ``end`` was the committed length, so a frame boundary: cut there.
            data = page[: end - position]
            yield data
            position += len(data)
