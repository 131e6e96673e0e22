"""Where a stress run sends its load and reads it back: a server's URL and credentials."""

from __future__ import annotations

from dataclasses import dataclass

from messagevault.client import AsyncClient, Client


@dataclass(frozen=True)
class Connection:
    url: str
    user: str | None
    password: str | None

    def client(self) -> Client:
        return Client(self.url, user=self.user, password=self.password)

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.url, user=self.user, password=self.password)
