"""Small documents in one Azure blob container, replaced whole under an ETag condition.

What ``positions.AzurePositionStore`` keeps its consumer positions in. A
block blob upload replaces the blob atomically; ``If-Match`` (or
``If-None-Match: *`` for a blob that must not exist yet) makes the replace a
compare-and-swap, so two writers of one document cannot overwrite each
other unnoticed.
"""

from __future__ import annotations

import contextlib

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient

from messagevault.storage.azure import azure_errors, client_options


class AzureDocuments:
    """Named documents (block blobs) in one container; versions are ETags."""

    def __init__(self, container: ContainerClient) -> None:
        self._container = container

    @classmethod
    def from_connection_string(cls, connection_string: str, container: str) -> AzureDocuments:
        service = BlobServiceClient.from_connection_string(connection_string, **client_options())
        return cls(service.get_container_client(container))

    def describe(self) -> str:
        return f"azure container {self._url()}"

    def location(self, name: str) -> str:
        """The blob's URL without credentials, for messages."""
        return f"{self._url()}/{name}"

    def _url(self) -> str:
        return str(self._container.url).split("?", 1)[0]  # no SAS token in messages

    def read(self, name: str) -> tuple[bytes, str] | None:
        """(content, ETag) of ``name`` from one GET, or ``None`` if it does not exist."""
        with azure_errors(f"cannot read {self.location(name)}"):
            try:
                download = self._container.get_blob_client(name).download_blob()
                return bytes(download.readall()), str(download.properties.etag)
            except ResourceNotFoundError:
                return None  # no blob, or not even the container yet

    def replace(self, name: str, data: bytes, *, etag: str | None) -> str | None:
        """Replace ``name`` with ``data`` if it still has ``etag`` (``None``: if it does not exist).

        Returns the new ETag, or ``None`` when the condition failed (someone
        else wrote or created it) and nothing was written.
        """
        with azure_errors(f"cannot write {self.location(name)}"):
            try:
                try:
                    return self._upload(name, data, etag)
                except ResourceNotFoundError:
                    if etag is not None:
                        return None  # it was deleted since we read it
                    with contextlib.suppress(ResourceExistsError):
                        self._container.create_container()
                    return self._upload(name, data, etag)
            except (ResourceExistsError, ResourceModifiedError):
                # Also what a retried upload meets if its first attempt had
                # landed after all: then the blob holds our data, and all is well.
                current = self.read(name)
                if current is not None and current[0] == data:
                    return current[1]
                return None

    def _upload(self, name: str, data: bytes, etag: str | None) -> str:
        blob = self._container.get_blob_client(name)
        if etag is None:
            result = blob.upload_blob(data, overwrite=False)  # If-None-Match: *
        else:
            result = blob.upload_blob(
                data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified
            )
        return str(result["etag"])

    def remove(self, name: str) -> None:
        """Delete ``name``; nothing happens if it does not exist."""
        with (
            azure_errors(f"cannot delete {self.location(name)}"),
            contextlib.suppress(ResourceNotFoundError),
        ):
            self._container.get_blob_client(name).delete_blob()

    def close(self) -> None:
        self._container.close()
