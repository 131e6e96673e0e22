"""Azure storage whose SDK requests are counted, and whose checkpoint updates can be held.

``ObservedTransport`` is the SDK's own HTTP transport (requests) with a
look at each request on its way out: it counts them by kind (``PUT_PAGE``,
``SET_CHECKPOINT`` ...) and holds every checkpoint update (Set Blob Metadata
on a stream's checkpoint blob) while ``hold()`` is on, so that a test can
widen the window between an acknowledged append and its checkpoint at will.
``failing()`` makes checkpoint updates fail as a refused connection would,
without sending them, until ``recover()``. Every other request goes to a
real Azurite, untouched.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import HttpRequest, RequestsTransport
from azure.storage.blob import BlobServiceClient

from messagevault.storage.azure import CHECKPOINT_BLOB, DATA_BLOB, AzureStorage, client_options

PUT_PAGE = "put page"
SET_CHECKPOINT = "set checkpoint"
READ_CHECKPOINT = "read checkpoint"
OTHER = "other"
HOLD_LIMIT = 120.0  # seconds a held request waits at most (a test that forgets to release)


def kind_of(request: HttpRequest) -> str:
    parts = urlsplit(request.url)
    blob = parts.path.rsplit("/", 1)[-1]
    if request.method == "PUT" and blob == DATA_BLOB and "comp=page" in parts.query:
        return PUT_PAGE
    if blob == CHECKPOINT_BLOB and "comp=metadata" in parts.query and request.method == "PUT":
        return SET_CHECKPOINT
    if blob == CHECKPOINT_BLOB and request.method == "HEAD":
        return READ_CHECKPOINT
    return OTHER


class ObservedTransport(RequestsTransport):
    """Counts requests by kind; holds checkpoint updates while ``hold()`` is on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.held = 0  # checkpoint updates waiting at the hold now
        self._open = threading.Event()
        self._open.set()
        self._failing = threading.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def failing(self) -> None:
        self._failing.set()

    def recover(self) -> None:
        self._failing.clear()

    def count(self, kind: str) -> int:
        with self._lock:
            return self.sent[kind]

    def send(self, request: HttpRequest, **kwargs: Any) -> Any:  # type: ignore[override]
        kind = kind_of(request)
        with self._lock:
            self.sent[kind] += 1
        if kind == SET_CHECKPOINT and not self._open.is_set():
            with self._lock:
                self.held += 1
            try:
                self._open.wait(HOLD_LIMIT)
            finally:
                with self._lock:
                    self.held -= 1
        if kind == SET_CHECKPOINT and self._failing.is_set():
            raise ServiceRequestError("connection refused (injected by the test)")
        return super().send(request, **kwargs)


def observed_storage(
    connection_string: str, **options: Any
) -> tuple[AzureStorage, ObservedTransport]:
    """``AzureStorage(service, **options)`` whose service sends through an ``ObservedTransport``."""
    transport = ObservedTransport()
    service = BlobServiceClient.from_connection_string(
        connection_string, transport=transport, **client_options()
    )
    return AzureStorage(service, **options), transport
