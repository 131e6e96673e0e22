"""Leases as blobs in the system container, for several server nodes on one Azure account.

    container messagevault-system
      leases/streams/<stream>   empty block blob: who writes the stream
      leases/nodes/<node-id>    empty block blob: a live node

The blob's own lease (15-60 s) is the lock: Azure decides who holds it,
ends it when not renewed, and refuses any other holder's lease id. Who holds
it, where, and with which generation is blob metadata (``holder``,
``address``, ``generation``, ``expiresat``), set right after acquiring and
on each renewal under the lease id, so that a holder that lost the lease can
no longer set it. The new generation is the stored one plus one, read after
acquiring: no two acquisitions can read the same.

Values are percent-encoded (metadata must be ASCII). ``list`` is one
``list_blobs`` call; the lease state comes with each blob.
"""

from __future__ import annotations

import contextlib
import math
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobLeaseClient, ContainerClient

from messagevault.errors import LeaseHeld, LeaseLost, StaleWriter, StorageError
from messagevault.storage.azure_lease import BlobLease, error_code
from messagevault.storage.leases import (
    MAX_DURATION,
    MIN_DURATION,
    HeldLease,
    LeaseRecord,
    new_lease_id,
    validate_duration,
    validate_holder,
    validate_lease_name,
    validate_lease_prefix,
)

LEASES_PREFIX = "leases/"  # blob names in the system container
_HELD_STATES = frozenset({"leased", "breaking"})


class AzureLeases:
    """Leases on blobs of the system container (``system_container`` makes it on first use)."""

    def __init__(self, system_container: Callable[[], ContainerClient]) -> None:
        self._system_container = system_container
        self._container: ContainerClient | None = None

    def _blob(self, name: str) -> BlobClient:
        if self._container is None:
            self._container = self._system_container()
        return self._container.get_blob_client(LEASES_PREFIX + validate_lease_name(name))

    def acquire(self, name: str, *, holder: str, address: str, duration: float) -> HeldLease:
        blob = self._blob(name)
        duration = validate_duration(duration, MIN_DURATION, MAX_DURATION)
        validate_holder(holder, address)
        if not duration.is_integer():
            raise ValueError(f"a lease on Azure lasts whole seconds, 15-60, not {duration!r}")
        lease_id = new_lease_id()
        started = time.time()  # Azure's lease began later: never promise beyond it
        try:
            try:
                _acquire(blob, lease_id, int(duration))
            except ResourceNotFoundError:
                with contextlib.suppress(ResourceExistsError):  # another node made it first
                    blob.upload_blob(b"", overwrite=False)  # If-None-Match: *
                _acquire(blob, lease_id, int(duration))
        except HttpResponseError as exc:
            if exc.status_code == 409 and error_code(exc) != "BlobAlreadyExists":
                record = self.inspect(name)
                raise LeaseHeld(
                    f"lease {name} is held by {record.holder if record else 'another holder'}"
                    f" ({record.address if record else 'unknown address'})",
                    record=record,
                ) from exc
            raise _error(f"cannot acquire lease {name}", exc) from exc
        try:
            stored = _generation(blob.get_blob_properties().metadata)
            generation = stored + 1
            blob.set_blob_metadata(
                _metadata(holder, address, generation, started + duration), lease=lease_id
            )
        except HttpResponseError as exc:
            BlobLease(blob, lease_id).release()  # not to be left held under no generation
            raise _error(f"cannot record lease {name}", exc) from exc
        return HeldLease(name, lease_id, holder, address, generation, duration, time.monotonic())

    def renew(self, lease: HeldLease) -> HeldLease:
        blob = self._blob(lease.name)
        started = time.time()
        try:
            BlobLeaseClient(blob, lease_id=lease.lease_id).renew()
            renewed_at = time.monotonic()
            blob.set_blob_metadata(
                _metadata(lease.holder, lease.address, lease.generation, started + lease.duration),
                lease=lease.lease_id,
            )
        except ResourceNotFoundError as exc:
            raise LeaseLost(f"lease {lease.name} is lost: its blob is gone") from exc
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                raise LeaseLost(
                    f"lease {lease.name} (generation {lease.generation}) is lost: {error_code(exc)}"
                ) from exc
            raise _error(f"cannot renew lease {lease.name}", exc) from exc
        return HeldLease(
            lease.name,
            lease.lease_id,
            lease.holder,
            lease.address,
            lease.generation,
            lease.duration,
            renewed_at,
        )

    def release(self, lease: HeldLease) -> None:
        blob = self._blob(lease.name)
        try:
            BlobLease(blob, lease.lease_id).release()
        except StorageError:
            if self.inspect(lease.name) is not None:
                raise

    def break_(self, name: str) -> None:
        blob = self._blob(name)
        try:
            BlobLease(blob).break_()
        except StorageError:
            record = self.inspect(name)
            if record is not None and record.held:
                raise  # a lease that is there and would not break

    def inspect(self, name: str) -> LeaseRecord | None:
        blob = self._blob(name)
        try:
            properties = blob.get_blob_properties()
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            raise _error(f"cannot read lease {name}", exc) from exc
        return _record(name, properties.metadata, properties.lease.state)

    def list(self, prefix: str) -> list[LeaseRecord]:
        validate_lease_prefix(prefix)
        if self._container is None:
            self._container = self._system_container()
        records = []
        try:
            for blob in self._container.list_blobs(
                name_starts_with=LEASES_PREFIX + prefix, include=["metadata"]
            ):
                name = blob.name[len(LEASES_PREFIX) :]
                try:
                    validate_lease_name(name)
                except ValueError:
                    continue  # not a lease blob
                record = _record(name, blob.metadata, blob.lease.state)
                if record is not None:
                    records.append(record)
        except HttpResponseError as exc:
            raise _error("cannot list leases", exc) from exc
        return sorted(records, key=lambda record: record.name)

    def check_current(self, lease: HeldLease) -> None:
        """``StaleWriter`` unless storage still says ``lease`` holds its name at its generation."""
        record = self.inspect(lease.name)
        if record is None or not record.held or record.generation != lease.generation:
            stream = lease.name.partition("/")[2]
            stored = record.generation if record else 0
            raise StaleWriter(
                f"stream {stream!r} was taken over (lease generation {stored} "
                f"> ours {lease.generation})"
                if stored > lease.generation
                else f"stream {stream!r}: its lease (generation {lease.generation}) is not held"
            )


def _acquire(blob: BlobClient, lease_id: str, seconds: int) -> None:
    BlobLeaseClient(blob, lease_id=lease_id).acquire(lease_duration=seconds)


def _metadata(holder: str, address: str, generation: int, expires_at: float) -> dict[str, str]:
    return {
        "holder": urllib.parse.quote(holder, safe=""),
        "address": urllib.parse.quote(address, safe=""),
        "generation": str(generation),
        "expiresat": f"{expires_at:.3f}",
    }


def _generation(metadata: dict[str, Any] | None) -> int:
    try:
        generation = int((metadata or {}).get("generation", "0"))
    except ValueError:
        generation = 0
    return max(generation, 0)


def _record(name: str, metadata: dict[str, Any] | None, state: str | None) -> LeaseRecord | None:
    """The record in a lease blob's metadata and state; None if nobody ever recorded one."""
    metadata = metadata or {}
    generation = _generation(metadata)
    held = state in _HELD_STATES
    if generation == 0 and not held:
        return None  # made by an acquisition that failed: never taken
    holder = metadata.get("holder")
    address = metadata.get("address")
    expires_at: float | None = None
    if held:
        try:
            expires_at = float(metadata.get("expiresat", "nan"))
        except ValueError:
            expires_at = math.nan
        if not math.isfinite(expires_at):
            expires_at = None
    return LeaseRecord(
        name=name,
        holder=None if holder is None else urllib.parse.unquote(holder),
        address=None if address is None else urllib.parse.unquote(address),
        generation=generation,
        held=held,
        expires_at=expires_at,
    )


def _error(message: str, exc: HttpResponseError) -> StorageError:
    return StorageError(f"{message}: {exc.status_code} {error_code(exc) or exc.reason}")
