"""Where a stress run sends its load and reads it back: a server's URL and credentials."""

from __future__ import annotations

from dataclasses import dataclass

from messagevault.client import AsyncClient, Client

# Publishes are idempotent and retried, as for any user of the client, but a
# server gone for longer than this ends the run (with a partial table) rather
# than holding it up for the client's default minute.
RETRY_TIMEOUT = 5.0


@dataclass(frozen=True)
class Connection:
    url: str
    user: str | None
    password: str | None

    def client(self) -> Client:
        return Client(self.url, user=self.user, password=self.password, retry_timeout=RETRY_TIMEOUT)

    def async_client(self) -> AsyncClient:
        return AsyncClient(
            self.url, user=self.user, password=self.password, retry_timeout=RETRY_TIMEOUT
        )
