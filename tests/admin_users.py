"""Users for tests of admin-only routes: root (admin), writer and reader of ``orders``;
and the requests those tests make.

Argon2 at its lowest cost (``cheap_passwords``, an autouse fixture where a
test module imports it): these tests check claims, not hashing.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar, cast

import pytest
from argon2 import PasswordHasher

from messagevault.server import auth as auth_module
from messagevault.server.auth import Users, save_users
from messagevault.storage.base import SystemFiles

S = TypeVar("S")  # a storage: every backend keeps system files


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        auth_module, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )


def basic(name: str) -> dict[str, str]:
    """The Authorization header of user ``name`` (password ``<name>-secret``)."""
    token = base64.b64encode(f"{name}:{name}-secret".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ROOT, WRITER, READER = basic("root"), basic("writer"), basic("reader")


def with_users(storage: S) -> S:
    """``storage`` with the three users saved in it."""
    users = Users()
    for name, claims in {
        "root": ["admin"],
        "writer": ["orders:write"],
        "reader": ["orders:read"],
    }.items():
        users.set_password(name, f"{name}-secret")
        users.grant(name, claims)
    save_users(cast(SystemFiles, storage), users)
    return storage


async def publish(client: Any, stream: str, values: list[str]) -> dict[str, Any]:
    """Append ``values`` as root through an aiohttp test client; the answer."""
    response = await client.post(
        f"/streams/{stream}", json={"messages": [{"value": v} for v in values]}, headers=ROOT
    )
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def error_detail(response: Any, status: int, code: str) -> str:
    """The one-line detail of an error answer with this status and code."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"] == code, body
    detail: str = body["detail"]
    assert detail and "\n" not in detail
    return detail
