"""Retention applied in the background: each stream's policy, every ``interval`` seconds.

A server applies the policies of the streams it writes (one of several
nodes: those whose lease it holds; the only server: all of them). For each
stream it reads the policy (``retention_policy``, in storage, so every node
sees the same one; the server's default for streams without one), works out
from a reader where the stream should start, and when that is past its
first readable position asks the hub to trim it there. The reading runs in
the I/O pool beside appends; only the trim itself (one checkpoint commit,
then releasing storage) has the stream's writer to itself, between commits.

- ``max_age``: the stream starts at its first message at or after
  ``now - max_age`` (a time seek); all of it goes once every message is older.
- ``max_bytes``: it starts at the first whole frame at or after
  ``length - max_bytes`` (a search over sequences by seek, then a few frame
  headers), so at most ``max_bytes`` stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from messagevault.checkpoint import Checkpoint
from messagevault.errors import (
    CommitterClosed,
    InvalidInput,
    MessageVaultError,
    NotWriter,
    StreamNotFound,
)
from messagevault.reader import Reader
from messagevault.retention_policy import (
    RetentionPolicy,
    delete_policy,
    load_policy,
    save_policy,
    system_files,
)
from messagevault.server.hub import StreamHub
from messagevault.storage.base import Storage
from messagevault.wire import parse_json

log = logging.getLogger("messagevault.retention")

DEFAULT_INTERVAL: Final = 60.0  # seconds between two passes over the streams


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How often the server applies retention, and the policy of streams without one."""

    interval: float = DEFAULT_INTERVAL
    default: RetentionPolicy | None = None

    def __post_init__(self) -> None:
        if not 0 < self.interval <= 86400:  # also refuses nan
            raise ValueError(
                f"the retention interval must be above 0 and at most a day, not {self.interval}"
            )


@dataclass(frozen=True, slots=True)
class Applied:
    """One trim that retention made."""

    stream: str
    policy: RetentionPolicy
    first_position: int  # where the stream now starts
    first_sequence: int
    trimmed_bytes: int  # bytes that became unreadable
    released_bytes: int  # storage given back (0 where the backend cannot)


class RetentionTask:
    """The background pass (``start``/``stop`` with the app), and one pass on demand (``run_once``).

    ``clock``: Unix seconds now (tests age messages with it).
    ``trimmed``: told of every trim, on the event loop (metrics).
    """

    def __init__(
        self,
        hub: StreamHub,
        settings: RetentionSettings,
        *,
        clock: Callable[[], float] = time.time,
        trimmed: Callable[[Applied], None] | None = None,
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self.trimmed = trimmed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.run_once()
            except Exception:  # the loop must outlive any one failure
                log.exception("retention pass failed")

    async def run_once(self) -> list[Applied]:
        """Apply every policy once, to the streams this server writes; the trims made."""
        applied = []
        for stream in await self._written_here():
            try:
                result = await self.apply(stream)
            except (StreamNotFound, NotWriter, CommitterClosed):
                continue  # deleted, moved to another node, or being deleted meanwhile
            except MessageVaultError as exc:
                log.warning("retention not applied", extra={"stream": stream, "error": str(exc)})
                continue
            if result is not None:
                applied.append(result)
        return applied

    async def _written_here(self) -> list[str]:
        if self.hub.leases is not None:  # one of several nodes: the streams it holds
            return sorted(self.hub.leases)
        return await self.hub.list_streams()

    async def policy(self, stream: str) -> RetentionPolicy | None:
        """``stream``'s own policy, else the server's default, else None."""
        own = await self.hub.run(load_policy, system_files(self.hub.storage), stream)
        return own if own is not None else self.settings.default

    async def apply(self, stream: str) -> Applied | None:
        """Trim ``stream`` as its policy says, if it says to; what was done, or None."""
        policy = await self.policy(stream)
        if policy is None:
            return None
        # The writer's own checkpoint: storage may show it a moment later (Azure).
        known = await self.hub.checkpoint(stream)
        checkpoint, target = await self.hub.run(
            retention_target, self.hub.storage, stream, policy, self.clock(), known
        )
        if target <= checkpoint.first_position:
            return None
        result = await self.hub.trim(stream, target)
        if not result.trimmed:
            return None
        applied = Applied(
            stream,
            policy,
            result.first_position,
            result.first_sequence,
            result.first_position - checkpoint.first_position,
            result.released_bytes,
        )
        log.info(
            "trimmed stream by its retention policy",
            extra={
                "stream": stream,
                "policy": policy.describe(),
                "first_position": applied.first_position,
                "first_sequence": applied.first_sequence,
                "trimmed_bytes": applied.trimmed_bytes,
                "released_bytes": applied.released_bytes,
            },
        )
        if self.trimmed is not None:
            self.trimmed(applied)
        return applied


async def retention_answer(task: RetentionTask, stream: str) -> dict[str, object]:
    """What ``GET /streams/{stream}/retention`` answers: the policy that applies, and whence.

    ``source``: ``stream`` (its own), ``default`` (the server's), or
    ``none`` (both limits null: kept for ever).
    """
    own = await task.hub.run(load_policy, system_files(task.hub.storage), stream)
    policy, source = (own, "stream") if own is not None else (task.settings.default, "default")
    if policy is None:
        return {"stream": stream, "max_age": None, "max_bytes": None, "source": "none"}
    return {"stream": stream, **policy.to_json(), "source": source}


async def set_stream_policy(hub: StreamHub, stream: str, body: bytes) -> RetentionPolicy:
    """Store the policy a JSON request body gives; ``InvalidInput`` (nothing stored) if bad."""
    try:
        document = parse_json(body)
    except ValueError as exc:
        raise InvalidInput(f"the retention policy is not JSON: {exc}") from None
    policy = RetentionPolicy.from_json(document)
    await hub.run(save_policy, system_files(hub.storage), stream, policy)
    log.info("retention policy set", extra={"stream": stream, "policy": policy.describe()})
    return policy


async def delete_stream_policy(hub: StreamHub, stream: str) -> bool:
    """Drop ``stream``'s own policy; whether it had one."""
    dropped = await hub.run(delete_policy, system_files(hub.storage), stream)
    if dropped:
        log.info("retention policy dropped", extra={"stream": stream})
    return dropped


def retention_target(
    storage: Storage,
    stream: str,
    policy: RetentionPolicy,
    now: float,
    checkpoint: Checkpoint | None = None,
) -> tuple[Checkpoint, int]:
    """The committed checkpoint, and where ``policy`` says the stream should start (blocking).

    A frame start at or below the committed length; the checkpoint's first
    position when nothing is to go. ``checkpoint``: the committed state when
    the caller knows it better than storage shows it yet.
    """
    with Reader.open(storage, stream, read_ahead=False) as reader:
        checkpoint = checkpoint or reader.checkpoint()
        target = first = checkpoint.first_position
        if first >= checkpoint.length:
            return checkpoint, target
        if policy.max_age is not None:
            if checkpoint.last_timestamp < (now - policy.max_age) * 1000:
                target = checkpoint.length  # every message is older
            else:
                target = max(target, reader.seek(time=now - policy.max_age, checkpoint=checkpoint))
        if policy.max_bytes is not None and checkpoint.length - first > policy.max_bytes:
            keep_from = checkpoint.length - policy.max_bytes
            target = max(target, whole_frame_from(reader, checkpoint, keep_from))
        return checkpoint, min(target, checkpoint.length)


def whole_frame_from(reader: Reader, checkpoint: Checkpoint, target: int) -> int:
    """The start of the first whole frame (not a piece of a value) at or after ``target``.

    The committed length when there is none: the index finds it as it finds
    a seek's start (``Reader.frame_at_or_after``).
    """
    return reader.frame_at_or_after(target, checkpoint)
