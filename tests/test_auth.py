"""Auth: every stream route refuses missing, wrong or insufficient credentials."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from messagevault import FileStorage, MemoryStorage, encode_batch
from messagevault.cli import main
from messagevault.server import StreamHub, create_app
from messagevault.server import auth as auth_module
from messagevault.server.auth import (
    USERS_FILE,
    Authenticator,
    Principal,
    Users,
    ensure_admin,
    load_users,
    save_users,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def _basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def storage() -> MemoryStorage:  # type: ignore[override]
    storage = MemoryStorage()
    users = Users()
    for name, claims in {
        "root": ["admin"],
        "writer": ["orders:write"],
        "reader": ["orders:read"],
        "everyone": ["all:read"],
    }.items():
        users.set_password(name, f"{name}-secret")
        users.grant(name, claims)
    save_users(storage, users)
    return storage


@pytest.fixture
async def client(aiohttp_client: MakeClient, storage: MemoryStorage) -> Client:
    app = create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=0))
    client = await aiohttp_client(app)
    for stream in ("orders", "billing"):
        response = await client.post(
            f"/streams/{stream}",
            json={"messages": [{"value": "seed"}]},
            headers=_basic("root", "root-secret"),
        )
        assert response.status == 200
    return client


ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/streams/orders", {"json": {"messages": [{"value": "x"}]}}),
    (
        "POST",
        "/streams/orders",
        {
            "data": encode_batch([(b"k", b"x")]).frame(),
            "headers": {"Content-Type": "application/x-messagevault-batch"},
        },
    ),
    ("GET", "/streams", {}),
    ("GET", "/streams/orders", {}),
    ("GET", "/streams/orders/messages", {}),
]


async def _lengths(client: Client) -> dict[str, int]:
    response = await client.get("/streams", headers=_basic("root", "root-secret"))
    return {s["stream"]: s["length"] for s in (await response.json())["streams"]}


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES)
@pytest.mark.parametrize(
    "credentials",
    [None, ("root", "wrong"), ("nobody", "x"), "Basic !!!notbase64", "Bearer token"],
)
async def test_every_stream_route_needs_valid_credentials(
    client: Client, method: str, path: str, kwargs: dict[str, Any], credentials: object
) -> None:
    before = await _lengths(client)
    headers = dict(kwargs.get("headers", {}))
    if isinstance(credentials, tuple):
        headers |= _basic(*credentials)
    elif isinstance(credentials, str):
        headers["Authorization"] = credentials
    response = await client.request(method, path, **{**kwargs, "headers": headers})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert (await response.json())["error"] == "unauthenticated"
    assert await _lengths(client) == before


async def test_claims_per_stream(client: Client) -> None:
    before = await _lengths(client)
    writer, reader = _basic("writer", "writer-secret"), _basic("reader", "reader-secret")
    # orders:write may write and read orders, nothing of billing.
    assert (
        await client.post("/streams/orders", json={"messages": [{"value": "w"}]}, headers=writer)
    ).status == 200
    assert (await client.get("/streams/orders/messages", headers=writer)).status == 200
    for method, path in [
        ("POST", "/streams/billing"),
        ("GET", "/streams/billing"),
        ("GET", "/streams/billing/messages"),
    ]:
        response = await client.request(
            method, path, json={"messages": [{"value": "x"}]}, headers=writer
        )
        assert response.status == 403, path
        assert (await response.json())["error"] == "forbidden"
    # orders:read may read orders but not write it.
    assert (await client.get("/streams/orders", headers=reader)).status == 200
    response = await client.post(
        "/streams/orders", json={"messages": [{"value": "x"}]}, headers=reader
    )
    assert response.status == 403
    # The list shows only what the user may read.
    listed = await (await client.get("/streams", headers=writer)).json()
    assert [s["stream"] for s in listed["streams"]] == ["orders"]
    everyone = await (
        await client.get("/streams", headers=_basic("everyone", "everyone-secret"))
    ).json()
    assert {s["stream"] for s in everyone["streams"]} == {"orders", "billing"}
    after = await _lengths(client)
    assert after["billing"] == before["billing"]
    assert after["orders"] > before["orders"]  # only the one allowed append


async def test_public_routes(client: Client) -> None:
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200


async def test_user_changes_reach_a_running_server(client: Client, storage: MemoryStorage) -> None:
    headers = _basic("late", "late-secret")
    assert (await client.get("/streams/orders", headers=headers)).status == 401
    users = load_users(storage)
    users.set_password("late", "late-secret")
    users.grant("late", ["orders:read"])
    save_users(storage, users)
    assert (await client.get("/streams/orders", headers=headers)).status == 200
    users.entries.pop("late")
    save_users(storage, users)
    assert (await client.get("/streams/orders", headers=headers)).status == 401


def test_first_start_creates_admin_once_with_a_random_password(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    password = ensure_admin(storage)
    assert password and len(password) >= 20
    assert ensure_admin(storage) is None  # never again, never a well-known default
    raw = (tmp_path / "_system" / USERS_FILE).read_bytes()
    assert password.encode() not in raw  # only the argon2 hash is stored
    assert b"$argon2id$" in raw
    principal = Authenticator(storage).authenticate(_basic("admin", password)["Authorization"])
    assert principal == Principal("admin", frozenset({"admin"}))
    assert ensure_admin(FileStorage(tmp_path / "other")) != password


def test_users_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"MESSAGEVAULT_STORAGE": f"file:{tmp_path}"}

    def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
        result = runner.invoke(main, ["users", *args], input=stdin, env=env)
        return result.exit_code, result.output

    assert run("add", "alice", "--claim", "orders:write", stdin="pw-1\n")[0] == 0
    assert run("add", "alice", stdin="pw\n")[0] == 2  # exists
    assert run("grant", "alice", "billing:read")[0] == 0
    code, out = run("list")
    assert code == 0
    assert "alice\tbilling:read orders:write" in out
    assert run("grant", "alice", "bogus")[0] != 0
    assert run("passwd", "alice", stdin="pw-2\n")[0] == 0
    auth = Authenticator(FileStorage(tmp_path))
    assert auth.authenticate(_basic("alice", "pw-2")["Authorization"]).name == "alice"
    assert run("remove", "alice")[0] == 0
    assert run("remove", "alice")[0] == 2
    assert json.loads((tmp_path / "_system" / USERS_FILE).read_text())["users"] == {}


class CountingHasher:
    """The module's argon2 hasher, counting verifications (argon2 is the cost the cache saves)."""

    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher
        self.verified = 0

    def hash(self, password: str) -> str:
        return str(self.hasher.hash(password))

    def verify(self, stored_hash: str, password: str) -> bool:
        self.verified += 1
        return bool(self.hasher.verify(stored_hash, password))


@pytest.fixture
def hasher(monkeypatch: pytest.MonkeyPatch) -> CountingHasher:
    counting = CountingHasher(auth_module._hasher)
    monkeypatch.setattr(auth_module, "_hasher", counting)
    return counting


def test_verification_is_cached_but_a_new_password_is_checked(
    storage: MemoryStorage, hasher: CountingHasher
) -> None:
    auth = Authenticator(storage, reload_interval=0)
    header = _basic("reader", "reader-secret")["Authorization"]
    for _ in range(50):
        assert auth.authenticate(header).name == "reader"
    assert hasher.verified == 1
    users = load_users(storage)
    users.set_password("reader", "changed")
    save_users(storage, users)
    with pytest.raises(Exception, match="wrong password"):
        auth.authenticate(header)
    assert auth.authenticate(_basic("reader", "changed")["Authorization"]).name == "reader"


def test_known_answers_only_verified_unchanged_credentials(
    storage: MemoryStorage, hasher: CountingHasher
) -> None:
    auth = Authenticator(storage, reload_interval=3600)
    header = _basic("reader", "reader-secret")["Authorization"]
    wrong = _basic("reader", "not-the-secret")["Authorization"]
    assert auth.known(header) is None  # never verified
    assert auth.known(None) is None
    assert auth.authenticate(header) == Principal("reader", frozenset({"orders:read"}))
    assert auth.known(header) == Principal("reader", frozenset({"orders:read"}))
    with pytest.raises(Exception, match="wrong password"):
        auth.authenticate(wrong)
    assert auth.known(wrong) is None  # a failure is never remembered
    assert hasher.verified == 2


def test_known_forgets_credentials_whose_user_changed(storage: MemoryStorage) -> None:
    auth = Authenticator(storage, reload_interval=3600)
    header = _basic("reader", "reader-secret")["Authorization"]
    auth.authenticate(header)
    users = load_users(storage)
    users.grant("reader", ["billing:read"])
    save_users(storage, users)
    assert auth.known(header) is not None  # the file is not due for a re-read yet
    auth._loaded_at = -float("inf")  # it is now
    assert auth.known(header) is None, "a stale users file must send the check to a thread"
    assert auth.authenticate(header).claims == {"orders:read", "billing:read"}
    assert auth.known(header) == Principal("reader", frozenset({"orders:read", "billing:read"}))
    users.entries.pop("reader")
    save_users(storage, users)
    auth._loaded_at = -float("inf")
    auth.authenticate(_basic("root", "root-secret")["Authorization"])  # re-reads the file
    assert auth.known(header) is None, "a removed user is not known"


def test_known_is_never_used_when_the_file_is_reread_on_every_request(
    storage: MemoryStorage,
) -> None:
    auth = Authenticator(storage, reload_interval=0)
    header = _basic("reader", "reader-secret")["Authorization"]
    auth.authenticate(header)
    assert auth.known(header) is None


async def test_remembered_credentials_keep_their_claims_on_the_server(
    aiohttp_client: MakeClient, storage: MemoryStorage
) -> None:
    """With a slow re-read, repeat requests take the in-memory path; it must decide the same."""
    client = await aiohttp_client(
        create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=3600))
    )
    body = {"json": {"messages": [{"value": "x"}]}}
    for _ in range(3):  # the first verifies with argon2, the rest are remembered
        response = await client.post(
            "/streams/orders", headers=_basic("writer", "writer-secret"), **body
        )
        assert response.status == 200
        response = await client.post(
            "/streams/billing", headers=_basic("writer", "writer-secret"), **body
        )
        assert response.status == 403
        response = await client.post(
            "/streams/orders", headers=_basic("reader", "reader-secret"), **body
        )
        assert response.status == 403
        response = await client.post("/streams/orders", headers=_basic("writer", "wrong"), **body)
        assert response.status == 401
    response = await client.get("/streams/orders", headers=_basic("writer", "writer-secret"))
    assert (await response.json())["messages"] == 3


@pytest.mark.parametrize(("password", "status"), [("writer-secret", 200), ("wrong", 401)])
async def test_concurrent_requests_with_new_credentials_share_one_verification(
    aiohttp_client: MakeClient,
    storage: MemoryStorage,
    hasher: CountingHasher,
    password: str,
    status: int,
) -> None:
    client = await aiohttp_client(
        create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=3600))
    )
    headers = _basic("writer", password)
    responses = await asyncio.gather(
        *(
            client.post("/streams/orders", json={"messages": [{"value": "x"}]}, headers=headers)
            for _ in range(16)
        )
    )
    assert [r.status for r in responses] == [status] * 16
    assert hasher.verified == 1, "a pool of connections starting must not run argon2 16 times"
