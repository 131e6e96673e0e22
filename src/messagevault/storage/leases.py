"""Named, expiring leases kept in storage: who writes a stream, which nodes are alive.

Several server nodes share one storage (an Azure account, or one data folder
on one machine). Each stream is written by the node holding the stream's
lease (``streams/<stream>``); each live node holds ``nodes/<node-id>``. A
lease lasts ``duration`` seconds unless renewed, and storage itself says who
holds it and at which address, so any node, or an operator, can find a
stream's writer without asking the others.

Every acquisition of a lease by a new holder (including the same node after
a restart) increases its ``generation``: the fencing token. A stream handle
opened under a lease (``Storage.open_stream(..., lease=held)``) writes only
while the stored generation is still its own, so a writer that was paused
past its lease's expiry, and resumed after another node took the stream
over, can no longer change the stream:

- on files every data write, checkpoint advance and side write checks the
  lease file's generation under a shared ``flock`` of that file, which an
  acquisition takes exclusively: the check and the write are one step;
- on Azure a takeover breaks the deposed writer's blob leases, so its Put
  Page and checkpoint updates fail on the lease and ETag conditions that
  Azure checks.

Each backend implements ``Leases`` and passes ``tests/test_lease_contract.py``.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from messagevault.errors import LeaseHeld

# Azure's limits on a blob lease; the file backend keeps to them so that a
# setting that works on one backend works on the other (tests may go lower
# on files: see ``MIN_FILE_DURATION``).
MIN_DURATION = 15.0
MAX_DURATION = 60.0
MIN_FILE_DURATION = 0.5
DEFAULT_DURATION = 15.0  # a stream's lease, unless `serve --lease-duration` says otherwise

_LEASE_NAME = re.compile(r"(streams|nodes)/[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_lease_name(name: str) -> str:
    """Return ``name`` if it names a lease (``streams/<stream>``, ``nodes/<id>``), else ValueError.

    >>> validate_lease_name("nodes/n1")
    'nodes/n1'
    """
    if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"lease name {str(name)[:60]!r} must be streams/<name> or nodes/<name>, the name "
            "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def validate_duration(duration: float, minimum: float, maximum: float = MAX_DURATION) -> float:
    """Return ``duration`` as a float if it lies in ``[minimum, maximum]`` seconds, else ValueError.

    >>> validate_duration(15, MIN_DURATION)
    15.0
    """
    if (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not math.isfinite(duration)
        or not minimum <= duration <= maximum
    ):
        raise ValueError(
            f"a lease lasts {minimum:g}-{maximum:g} seconds, not {str(duration)[:40]!r}"
        )
    return float(duration)


def validate_lease_prefix(prefix: str) -> str:
    """Return ``prefix`` if ``list`` may take it: ``""``, ``"streams/"``, ``"nodes/"`` or longer."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9._/-]{0,140}", prefix):
        raise ValueError(f"lease prefix {str(prefix)[:60]!r} has characters no lease name has")
    return prefix


def validate_holder(holder: str, address: str) -> None:
    """ValueError unless ``holder`` (a node id) and ``address`` (its URL) can be recorded.

    Printable ASCII without spaces: they go into Azure metadata and logs.
    """
    for what, value, longest in (("holder", holder, 128), ("address", address, 2048)):
        if not isinstance(value, str) or not re.fullmatch(rf"[!-~]{{1,{longest}}}", value):
            raise ValueError(
                f"lease {what} {str(value)[:60]!r} must be 1-{longest} printable ASCII "
                "characters without spaces"
            )


def new_lease_id() -> str:
    """A fresh secret for one acquisition (a UUID: Azure's blob lease ids are UUIDs)."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What storage says about one lease now.

    ``holder`` and ``address`` name the last holder even after its lease
    ended (released, broken or expired), so that a node restarting under the
    same id can tell that a lease was its own; ``held`` says whether it still
    counts. ``expires_at`` is a Unix time by the holder's clock when it last
    took or renewed the lease (``None`` when not held).
    """

    name: str
    holder: str | None
    address: str | None
    generation: int  # 0: never held
    held: bool
    expires_at: float | None

    def live(self, now: float | None = None) -> bool:
        """Held, and not past its recorded expiry (a holder that died stops renewing)."""
        if not self.held:
            return False
        if self.expires_at is None:
            return True
        return (time.time() if now is None else now) < self.expires_at


@dataclass
class StoredLease:
    """A lease as a backend that keeps the holder's secret beside it stores it (files, memory).

    ``lease_id`` is empty when it was never taken or its record is torn.
    """

    holder: str | None
    address: str | None
    generation: int
    lease_id: str
    held: bool
    expires_at: float | None

    def record(self, name: str) -> LeaseRecord:
        return LeaseRecord(
            name=name,
            holder=self.holder,
            address=self.address,
            generation=self.generation,
            held=self.held,
            expires_at=self.expires_at if self.held else None,
        )

    def live(self, now: float) -> bool:
        return self.held and (self.expires_at is None or now < self.expires_at)

    def holds(self, lease: HeldLease) -> bool:
        """Whether ``lease`` still holds this record (an expiry nobody acted on included)."""
        return self.held and self.lease_id == lease.lease_id


def take(
    name: str, stored: StoredLease | None, holder: str, address: str, duration: float
) -> StoredLease:
    """The record once ``holder`` takes lease ``name``: a new id and the next generation.

    ``LeaseHeld`` (with the record) while another's lease on it is live.
    """
    now = time.time()
    if stored is not None and stored.live(now):
        record = stored.record(name)
        raise LeaseHeld(
            f"lease {name} is held by {record.holder} ({record.address}) "
            f"for {(record.expires_at or now) - now:.1f} s more",
            record=record,
        )
    generation = (stored.generation if stored is not None else 0) + 1
    return StoredLease(holder, address, generation, new_lease_id(), True, now + duration)


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease this process holds: what it needs to renew, release or write under it.

    ``lease_id`` is the holder's secret for this acquisition (on Azure, the
    blob lease id); ``generation`` is the fencing token.
    """

    name: str
    lease_id: str
    holder: str
    address: str
    generation: int
    duration: float
    acquired_at: float  # time.monotonic() of the acquisition or last renewal

    def expires_in(self, now: float | None = None) -> float:
        """Seconds left by this process's clock before the lease may have ended."""
        return self.acquired_at + self.duration - (time.monotonic() if now is None else now)


class Leases(Protocol):
    """A storage's leases. Calls block (files, network); they are thread-safe."""

    def acquire(self, name: str, *, holder: str, address: str, duration: float) -> HeldLease:
        """Take lease ``name`` for ``duration`` seconds with a new, higher generation.

        Raises ``LeaseHeld`` (its ``record`` attribute: the ``LeaseRecord``)
        while another holder's lease is live: held and neither released,
        broken nor expired. A ``duration`` out of range raises ``ValueError``.
        """
        ...

    def renew(self, lease: HeldLease) -> HeldLease:
        """Extend ``lease`` by its duration from now; the renewed lease (same generation).

        ``LeaseLost`` if it is no longer this holder's: broken, released, or
        expired and taken by another. A lease that expired but that nobody
        took since is renewed.
        """
        ...

    def release(self, lease: HeldLease) -> None:
        """End ``lease`` now so that another may take it at once. Idempotent; no-op if not ours."""
        ...

    def break_(self, name: str) -> None:
        """End whoever's lease ``name`` is now (its holder is gone). A no-op when none is held."""
        ...

    def inspect(self, name: str) -> LeaseRecord | None:
        """What storage says about lease ``name``, or ``None`` if it was never taken."""
        ...

    def list(self, prefix: str) -> list[LeaseRecord]:
        """Every lease whose name starts with ``prefix`` (``"streams/"``, ``"nodes/"``), by name."""
        ...


def held_record(error: LeaseHeld) -> LeaseRecord | None:
    """The ``LeaseRecord`` a ``LeaseHeld`` carries (who holds the lease, where), if any."""
    record = error.record
    return record if isinstance(record, LeaseRecord) else None


@runtime_checkable
class LeaseStorage(Protocol):
    """Storage that keeps leases, so that several server nodes can share it."""

    def leases(self) -> Leases:
        """This storage's leases (one object per storage; cheap to call again)."""
        ...
