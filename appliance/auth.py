"""API keys: generation, hashing, the admin bootstrap key, and the one check every route calls.

A key is `ak-` followed by 32 random bytes (URL-safe base64). Only its sha256 is stored;
the plaintext is shown once (for the bootstrap key: written to state_dir/admin.key, 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from sqlite_utils import Database

from appliance.errors import ApplianceError
from appliance.store import Clock, Store, dumps, iso

log = logging.getLogger(__name__)

KEY_PREFIX = "ak-"
ADMIN = "admin"
BOOTSTRAP_NAME = "admin (bootstrap)"
_RELOAD_INTERVAL = 1.0  # an unknown key re-reads the store at most this often


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_row(key: str, name: str, scopes: list[str]) -> dict[str, object]:
    return {
        "id": "key_" + secrets.token_hex(8),
        "name": name,
        "prefix": key[: len(KEY_PREFIX) + 6],
        "hash": hash_key(key),
        "scopes": dumps(scopes),
        "endpoints": None,
    }


def write_secret_file(path: Path, text: str) -> None:
    """Create or replace `path` with mode 0600 from the first byte (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def read_key_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ApplianceError(f"admin key file {path} not found", status=401, code="key_file_not_found") from None
    except PermissionError:
        raise ApplianceError(f"admin key file {path} is not readable by this user", status=401, code="key_file_unreadable") from None


async def bootstrap_admin_key(store: Store, path: Path) -> bool:
    """At first start: create the admin key and write it to `path`. Returns True when it made one."""
    if await store.keys.active_with_scope(ADMIN):
        if not path.exists():
            log.warning("admin key file %s is missing; `appliance admin-key reset --config …` issues a new one", path)
        return False
    key = new_key()
    await store.keys.insert(key_row(key, BOOTSTRAP_NAME, [ADMIN]), f"bootstrap admin key written to {path}")
    write_secret_file(path, key)
    log.info("created the admin key; it is in %s", path)
    return True


def reset_admin_key(db: Database, path: Path, now: float) -> str:
    """Offline recovery: revoke the bootstrap key(s), issue a new one, write it to `path`."""
    key = new_key()
    stamp = iso(now)
    with db.atomic():
        db.execute("update api_keys set revoked_at = ? where name = ? and revoked_at is null", [stamp, BOOTSTRAP_NAME])
        db["api_keys"].insert({**key_row(key, BOOTSTRAP_NAME, [ADMIN]), "created_at": stamp})
        db["events"].insert({"time": stamp, "endpoint": None, "kind": "key.reset", "message": "admin key reset offline", "details": "{}"})
    write_secret_file(path, key)
    return key


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    scopes: frozenset[str]


def bearer_token(request: web.Request) -> str | None:
    """The credential of `Authorization: Bearer <key>` or Backend.AI's `Authorization: BackendAI <token>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "backendai") and value.strip():
        return value.strip()
    return None


class Authenticator:
    """Checks a presented key against the active keys, in constant time per candidate."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._keys: list[tuple[str, Principal]] = []
        self._loaded_at = float("-inf")

    async def reload(self) -> None:
        rows = await self._store.keys.active_with_scope(ADMIN)
        self._keys = [(r["hash"], Principal(r["id"], r["name"], frozenset(json.loads(r["scopes"])))) for r in rows]
        self._loaded_at = self._clock()

    def _match(self, digest: str) -> Principal | None:
        found = None
        for stored, principal in self._keys:  # no early exit: timing says nothing about which key matched
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    async def authenticate(self, request: web.Request, scope: str) -> Principal:
        token = bearer_token(request)
        if token is None:
            raise ApplianceError(
                "missing API key: send `Authorization: Bearer <key>`",
                status=401,
                code="missing_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="appliance"'},
            )
        digest = hash_key(token)
        principal = self._match(digest)
        if principal is None and self._clock() - self._loaded_at >= _RELOAD_INTERVAL:
            await self.reload()  # a key issued by another process since the last load
            principal = self._match(digest)
        if principal is None:
            raise ApplianceError(
                "invalid API key",
                status=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="appliance", error="invalid_token"'},
            )
        if scope not in principal.scopes and ADMIN not in principal.scopes:  # admin may do everything
            raise ApplianceError(f"this key lacks the {scope!r} scope", status=403, code="insufficient_scope")
        return principal
