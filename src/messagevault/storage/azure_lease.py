"""Blob leases with typed errors: the single-writer lock and, later, leader election.

A lease is Azure's mutex on a blob: while held, writes to the blob must name
the lease id, so a deposed holder can no longer write (fencing). Leases last
15-60 seconds and must be renewed, or forever (-1) until released or broken.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, BlobLeaseClient

from messagevault.errors import LeaseHeld, LeaseLost, StorageError

INFINITE = -1


@dataclass
class BlobLease:
    """One holder's lease on one blob.

    >>> lease = BlobLease(blob_client)            # doctest: +SKIP
    >>> lease.acquire(duration=15)                # LeaseHeld if another holds it
    >>> lease.renew(); lease.release()
    """

    blob: BlobClient
    lease_id: str = ""

    def __post_init__(self) -> None:
        # Keep our own id: after release() the SDK forgets it, and a forgotten
        # id would let a later write go out unfenced (see docs/notes on Azurite).
        self.lease_id = self.lease_id or str(uuid.uuid4())

    @property
    def _client(self) -> BlobLeaseClient:
        # A fresh client per call: the SDK's client sets its id to None on
        # release, after which it would acquire under a random id of its own.
        return BlobLeaseClient(self.blob, lease_id=self.lease_id)

    def acquire(self, duration: int = INFINITE) -> None:
        """Take the lease for ``duration`` seconds (15-60, or -1 for ever). Idempotent for us."""
        if duration != INFINITE and not 15 <= duration <= 60:
            raise ValueError("a lease lasts 15-60 seconds, or -1 for ever")
        try:
            self._client.acquire(lease_duration=duration)
        except HttpResponseError as exc:
            if exc.status_code == 409:
                raise LeaseHeld(f"{self._name()} is leased by another holder") from exc
            raise _storage_error(f"cannot lease {self._name()}", exc) from exc

    def renew(self) -> None:
        """Extend the lease; ``LeaseLost`` if it expired and someone else took it, or was broken."""
        try:
            self._client.renew()
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                raise LeaseLost(f"lease on {self._name()} is lost: {error_code(exc)}") from exc
            raise _storage_error(f"cannot renew lease on {self._name()}", exc) from exc

    def release(self) -> None:
        """Give the lease up so another holder can take it at once. Idempotent."""
        try:
            self._client.release()
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                return  # not ours any more: nothing to release
            raise _storage_error(f"cannot release lease on {self._name()}", exc) from exc

    def break_(self) -> None:
        """End whoever's lease this blob has, at once (takeover after a holder died)."""
        try:
            BlobLeaseClient(self.blob).break_lease(lease_break_period=0)
        except HttpResponseError as exc:
            if exc.status_code == 409 and error_code(exc) == "LeaseNotPresentWithLeaseOperation":
                return  # nobody holds it
            raise _storage_error(f"cannot break lease on {self._name()}", exc) from exc

    def _name(self) -> str:
        return f"blob {self.blob.container_name}/{self.blob.blob_name}"


def error_code(exc: HttpResponseError) -> str:
    """The service's error code, e.g. ``LeaseIdMismatchWithBlobOperation``."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _storage_error(message: str, exc: HttpResponseError) -> StorageError:
    return StorageError(f"{message}: {exc.status_code} {error_code(exc) or exc.reason}")
