"""HTTP Basic auth against a users file kept in storage, with per-stream claims.

The users file (``users.json``, a system file of the storage) maps each user
to an argon2 hash of the password and a list of claims:

    all:read  all:write  <stream>:read  <stream>:write  admin

Write implies read; ``admin`` implies everything. Passwords are never
stored, only argon2id hashes. Verifying one costs ~0.2 s of CPU by design,
so verified credentials are remembered in memory, keyed by a SHA-256 of
the Authorization header, with the stored hash they were checked against:
changing either the password or the hash invalidates them.
The server re-reads the file at most every ``reload_interval`` seconds, so
``messagevault users ...`` takes effect on a running server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# Forbidden and Unauthenticated lived here; importing them from here still works.
from messagevault.errors import Forbidden as Forbidden  # noqa: PLC0414
from messagevault.errors import InvalidInput
from messagevault.errors import Unauthenticated as Unauthenticated  # noqa: PLC0414
from messagevault.names import validate_stream_name
from messagevault.storage.base import SystemFiles

USERS_FILE = "users.json"
_hasher = PasswordHasher()


def validate_claim(claim: str) -> str:
    if claim == "admin":
        return claim
    scope, _, action = claim.partition(":")
    if action not in ("read", "write"):
        raise InvalidInput(f"claim {claim!r} must be admin, all:read|write or <stream>:read|write")
    if scope != "all":
        validate_stream_name(scope)
    return claim


@dataclass(frozen=True)
class Principal:
    name: str
    claims: frozenset[str]
    node: bool = False  # another node of the cluster, forwarding a user's append

    def may(self, action: str, stream: str | None = None) -> bool:
        """Whether this user may ``read`` or ``write`` ``stream`` (any stream if None)."""
        if "admin" in self.claims:
            return True
        wanted = {f"all:{action}"}
        if stream is not None:
            wanted.add(f"{stream}:{action}")
        if action == "read":
            wanted |= {claim.replace(":read", ":write") for claim in wanted}
        return bool(self.claims & wanted)


@dataclass
class Users:
    """The users file's content: {name: (argon2 hash, claims)}."""

    entries: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes | None) -> Users:
        if raw is None:
            return cls()
        document = json.loads(raw)
        return cls({name: (u["hash"], list(u["claims"])) for name, u in document["users"].items()})

    def dump(self) -> bytes:
        users = {
            name: {"hash": h, "claims": claims}
            for name, (h, claims) in sorted(self.entries.items())
        }
        return json.dumps({"version": 1, "users": users}, indent=2).encode()

    def set_password(self, name: str, password: str) -> None:
        if not password:
            raise InvalidInput("the password must not be empty")
        claims = self.entries.get(name, ("", []))[1]
        self.entries[name] = (_hasher.hash(password), claims)

    def grant(self, name: str, claims: list[str]) -> None:
        hashed, current = self.entries[name]
        self.entries[name] = (hashed, sorted({*current, *map(validate_claim, claims)}))


def load_users(files: SystemFiles) -> Users:
    return Users.parse(files.read_system_file(USERS_FILE))


def save_users(files: SystemFiles, users: Users) -> None:
    files.write_system_file(USERS_FILE, users.dump())


def ensure_admin(files: SystemFiles, password: str | None = None) -> str | None:
    """On first start, create ``admin`` with ``password`` (else a random one) and return it.

    None when users exist already: nothing changed.
    """
    if files.read_system_file(USERS_FILE) is not None:
        return None
    password = password or secrets.token_urlsafe(18)
    users = Users()
    users.set_password("admin", password)
    users.grant("admin", ["admin"])
    create = getattr(files, "create_system_file", None)
    if create is None:
        save_users(files, users)
        return password
    # Several nodes starting at once on new storage: one admin, whose
    # password is the one its creator shows; the others find it made.
    return password if create(USERS_FILE, users.dump()) else None


class Authenticator:
    """Checks Basic credentials against the users file, re-read now and then."""

    def __init__(self, files: SystemFiles, *, reload_interval: float = 1.0) -> None:
        self._files = files
        self._reload_interval = reload_interval
        self._users = Users()
        self._loaded_at = -float("inf")
        # SHA-256 of an Authorization header -> (the users-file entry it was
        # verified against, its principal). One cache for both uses: argon2 is
        # skipped while the entry's hash is unchanged, and ``known`` answers on
        # the event loop while the whole entry is. No password is kept.
        self._known: dict[bytes, tuple[tuple[str, list[str]], Principal]] = {}
        self._lock = threading.Lock()

    def _current(self) -> Users:
        with self._lock:
            if time.monotonic() - self._loaded_at >= self._reload_interval:
                self._users = load_users(self._files)
                self._loaded_at = time.monotonic()
            return self._users

    def known(self, authorization: str | None) -> Principal | None:
        """The principal of credentials verified before, if that needs no I/O and no argon2.

        For the event loop: None means "call ``authenticate`` in a thread"
        (unknown or wrong credentials, or a users file due for a re-read).
        An entry changed since (new password, other claims) is not known.
        """
        if authorization is None or time.monotonic() - self._loaded_at >= self._reload_interval:
            return None
        known = self._known.get(_cache_key(authorization))
        if known is None:
            return None
        entry, principal = known
        return principal if self._users.entries.get(principal.name) == entry else None

    def authenticate(self, authorization: str | None) -> Principal:
        """The user named by an ``Authorization: Basic ...`` header, or ``Unauthenticated``."""
        if not authorization or not authorization.startswith("Basic "):
            raise Unauthenticated("this request needs HTTP Basic credentials")
        try:
            name, _, password = (
                base64.b64decode(authorization[6:], validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Unauthenticated("malformed Basic credentials") from None
        entry = self._current().entries.get(name)
        if entry is None:
            raise Unauthenticated("unknown user or wrong password")
        stored_hash, claims = entry
        key = _cache_key(authorization)
        known = self._known.get(key)
        if known is None or known[0][0] != stored_hash:
            try:
                _hasher.verify(stored_hash, password)
            except (VerificationError, InvalidHashError):
                raise Unauthenticated("unknown user or wrong password") from None
        principal = Principal(name, frozenset(claims))
        with self._lock:
            if len(self._known) > 10_000:
                self._known.clear()
            self._known[key] = (entry, principal)
        return principal


def _cache_key(authorization: str) -> bytes:
    return hashlib.sha256(authorization.encode()).digest()
