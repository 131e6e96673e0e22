"""Leases kept in this process's memory: for unit tests of the cluster logic.

They follow the same contract as the file and Azure leases
(``tests/test_lease_contract.py``), expiring by ``time.time()``, and accept
durations down to ``leases.MIN_FILE_DURATION`` so that tests need not wait.
``MemoryStorage.leases()`` gives each memory storage its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from messagevault.errors import LeaseLost
from messagevault.storage.leases import (
    MAX_DURATION,
    MIN_FILE_DURATION,
    HeldLease,
    LeaseRecord,
    StoredLease,
    take,
    validate_duration,
    validate_holder,
    validate_lease_name,
    validate_lease_prefix,
)


class MemoryLeases:
    """Leases in a dict under one lock. Thread-safe; nothing survives the process."""

    def __init__(self) -> None:
        self._leases: dict[str, StoredLease] = {}
        self._lock = threading.Lock()

    def acquire(self, name: str, *, holder: str, address: str, duration: float) -> HeldLease:
        validate_lease_name(name)
        duration = validate_duration(duration, MIN_FILE_DURATION, MAX_DURATION)
        validate_holder(holder, address)
        with self._lock:
            taken = self._leases[name] = take(
                name, self._leases.get(name), holder, address, duration
            )
        return HeldLease(
            name, taken.lease_id, holder, address, taken.generation, duration, time.monotonic()
        )

    def renew(self, lease: HeldLease) -> HeldLease:
        with self._lock:
            state = self._ours(lease)
            if state is None:
                raise LeaseLost(f"lease {lease.name} (generation {lease.generation}) is lost")
            state.expires_at = time.time() + lease.duration
            return dataclasses.replace(lease, acquired_at=time.monotonic())

    def release(self, lease: HeldLease) -> None:
        with self._lock:
            state = self._ours(lease)
            if state is not None:
                state.held = False
                state.expires_at = None

    def break_(self, name: str) -> None:
        validate_lease_name(name)
        with self._lock:
            state = self._leases.get(name)
            if state is not None:
                state.held = False
                state.expires_at = None

    def inspect(self, name: str) -> LeaseRecord | None:
        validate_lease_name(name)
        with self._lock:
            state = self._leases.get(name)
            return None if state is None else state.record(name)

    def list(self, prefix: str) -> list[LeaseRecord]:
        validate_lease_prefix(prefix)
        with self._lock:
            return [
                state.record(name)
                for name, state in sorted(self._leases.items())
                if name.startswith(prefix)
            ]

    def superseded(self, lease: HeldLease) -> int | None:
        """None while ``lease`` still holds its name; else the generation stored now (fencing)."""
        with self._lock:
            state = self._leases.get(lease.name)
            if state is None:
                return 0
            if state.holds(lease):
                return None
            return state.generation

    def _ours(self, lease: HeldLease) -> StoredLease | None:
        """The lease's state if ``lease`` still holds it (an expiry nobody acted on included)."""
        validate_lease_name(lease.name)
        state = self._leases.get(lease.name)
        return state if state is not None and state.holds(lease) else None
