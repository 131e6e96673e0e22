"""Consumers that keep their place: handle every message, save the position, resume.

A ``Consumer`` reads one stream (through a server ``Client``, or straight
from storage), calls a handler per message or per batch, and saves its
position in a ``PositionStore`` every N messages and/or T seconds. After a
crash or restart it resumes right after the last saved message: every
message is handled at least once, in order; what was handled after the
last save is handled again.

The rule that makes this safe: a position is saved only once the handler
has returned for every message before it, never earlier. The application
may keep its own state in the same document (``state=``), saved atomically
with the position, so that state and position never disagree.

Modules: ``sync`` (``Consumer``), ``aio`` (``AsyncConsumer``), ``progress``
(the position and when to save it, shared by both), ``feeds`` (reading the
source: storage inline, a client on a fetching thread).
"""

from __future__ import annotations

from messagevault.consumer.aio import AsyncConsumer, AsyncStreamClient
from messagevault.consumer.feeds import StreamClient
from messagevault.consumer.progress import Start
from messagevault.consumer.sync import Consumer, Source

__all__ = ["AsyncConsumer", "AsyncStreamClient", "Consumer", "Source", "Start", "StreamClient"]
