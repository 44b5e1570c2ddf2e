"""Who is calling: API keys, endpoint tokens, access tokens and console sessions, checked in one place.

Keys (`ak-…`) and endpoint tokens (`et-…`) are 32 random bytes; only their sha256 is stored.
Every active, expired or revoked key is held in memory by hash, so the check on the hot path is
one hash and one dict lookup, and an API change (revoke, patch) updates that map before it
answers. Access tokens are JWTs signed with the key in state_dir/jwt.key; the account they name
is looked up on every call, so disabling it rejects its tokens at once. A console session stands
for the key it was opened with (security/sessions.py), checked on every use as the key itself is.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from sqlite_utils import Database

from appliance.domain.limits import Limits
from appliance.errors import ApplianceError
from appliance.security.sessions import Origin, Sessions, credential, csrf_refusal, missing_credential, session_id, unauthorized
from appliance.store import Clock, Store, dumps, iso, parse_iso

log = logging.getLogger(__name__)

KEY_PREFIX = "ak-"
TOKEN_PREFIX = "et-"
ADMIN, INFERENCE, READ = "admin", "inference", "read"
SCOPES = (ADMIN, INFERENCE, READ)
ROLES: dict[str, frozenset[str]] = {"viewer": frozenset({READ}), "user": frozenset({INFERENCE}), "admin": frozenset({ADMIN})}
BOOTSTRAP_NAME = "admin (bootstrap)"
_JWT_ALGORITHM = "HS256"
_JWT_ISSUER = "appliance"
_JWT_CACHE_MAX = 10_000


def new_key(prefix: str = KEY_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_row(
    key: str,
    name: str,
    scopes: Iterable[str],
    *,
    kind: str = "key",
    endpoints: list[str] | None = None,
    expires_at: str | None = None,
    limits: Limits = Limits(),
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": ("tok_" if kind == "endpoint_token" else "key_") + secrets.token_hex(8),
        "name": name,
        "kind": kind,
        "prefix": key[: len(KEY_PREFIX) + 6],
        "hash": hash_key(key),
        "scopes": dumps(sorted(set(scopes))),
        "endpoints": None if endpoints is None else dumps(sorted(set(endpoints))),
        "expires_at": expires_at,
        "rpm_limit": limits.rpm,
        "tpm_limit": limits.tpm,
        "max_parallel_requests": limits.parallel,
        "metadata": dumps(metadata or {}),
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
        fix, code = "pass --key-file FILE, or `appliance admin-key reset` (with the server's --config) writes a new one there", "key_file_not_found"
    except PermissionError:
        fix, code = "run the command as the appliance's user (e.g. with sudo), or pass --key-file with a copy you may read", "key_file_unreadable"
    raise ApplianceError(f"admin key file {path} {'not found' if code.endswith('found') else 'is not readable by this user'}: {fix}", status=401, code=code)


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


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a key, an endpoint token or a service account."""

    id: str
    name: str
    kind: str  # key | endpoint_token | service_account
    scopes: frozenset[str]
    endpoints: frozenset[str] | None = None  # None: every endpoint
    limits: Limits = Limits()
    expires_at: float | None = None
    revoked: bool = False

    def has(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes  # admin may do everything

    def allows(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints


def principal_of(row: dict[str, Any]) -> Principal:
    endpoints = json.loads(row["endpoints"]) if row.get("endpoints") else None
    return Principal(
        id=row["id"],
        name=row["name"],
        kind=row.get("kind") or "key",
        scopes=frozenset(json.loads(row["scopes"])),
        endpoints=None if endpoints is None else frozenset(endpoints),
        limits=Limits(rpm=row.get("rpm_limit"), tpm=row.get("tpm_limit"), parallel=row.get("max_parallel_requests")),
        expires_at=parse_iso(row["expires_at"]) if row.get("expires_at") else None,
        revoked=bool(row.get("revoked_at")),
    )


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    role: str
    client_id: str
    secret_hash: str
    disabled: bool


def account_of(row: dict[str, Any]) -> Account:
    return Account(row["id"], row["name"], row["role"], row["client_id"], row["secret_hash"], bool(row.get("disabled_at")))


class TokenSigner:
    """HS256 access tokens under a random key in state_dir/jwt.key (0600); rotate() voids every token."""

    def __init__(self, key_path: Path) -> None:
        self._path = key_path
        self._key: bytes | None = None

    def _secret(self) -> bytes:
        if self._key is None:
            try:
                self._key = bytes.fromhex(self._path.read_text().strip())
            except FileNotFoundError:
                self.rotate()
        assert self._key is not None
        return self._key

    def rotate(self) -> None:
        key = secrets.token_bytes(32)
        write_secret_file(self._path, key.hex())
        self._key = key

    def issue(self, account: Account, scopes: frozenset[str], ttl: float, now: float) -> str:
        claims = {
            "iss": _JWT_ISSUER, "sub": account.client_id, "sa": account.id, "role": account.role,
            "scope": " ".join(sorted(scopes)), "iat": int(now), "exp": int(now + ttl), "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret(), algorithm=_JWT_ALGORITHM)

    def verify(self, token: str, now: float) -> dict[str, Any]:
        """Claims of a valid token; ApplianceError 401 otherwise. Expiry is judged by the injected clock."""
        try:
            claims = jwt.decode(
                token, self._secret(), algorithms=[_JWT_ALGORITHM], issuer=_JWT_ISSUER,
                options={"require": ["exp", "iat", "sub", "sa"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise ApplianceError(f"invalid access token: {exc}", status=401, code="invalid_token") from None
        if now >= float(claims["exp"]):
            raise ApplianceError("the access token has expired; ask /oauth/token for a new one", status=401, code="token_expired")
        return claims


FailureHook = Callable[[str, Origin, str | None], None]


class Authenticator:
    """The one check every protected route calls, over an in-memory copy of keys and accounts."""

    def __init__(self, store: Store, clock: Clock, signer: TokenSigner, on_failure: FailureHook | None = None, sessions: Sessions | None = None) -> None:
        self._store = store
        self._clock = clock
        self.signer = signer
        self.on_failure = on_failure
        self.sessions = sessions or Sessions(clock)
        self._by_hash: dict[str, Principal] = {}
        self._hash_of: dict[str, str] = {}
        self._accounts: dict[str, Account] = {}
        self._jwt_cache: dict[str, tuple[str, frozenset[str], float]] = {}
        self._miss_check: asyncio.Future[None] | None = None  # shared by concurrent unknown keys
        self._data_version: int | None = None
        self._version = 0  # bumped by every change made here: a reload that raced one is dropped

    # --- the in-memory copy ----------------------------------------------------------------------

    async def reload(self, *, force: bool = False) -> None:
        """Re-read keys and accounts when another process changed the database (or when forced).

        Changes made through this process's API are applied directly (put_key/put_account); SQLite's
        data_version tells whether any other connection wrote since the last read, so the periodic
        reload costs one pragma when nothing changed. Maps are built on the store thread.
        """
        version = self._version
        seen = None if force else self._data_version
        loaded = await self._store.run(_load_all, seen)
        if loaded is None or version != self._version:
            return  # nothing new, or a change landed while reading: what was read may predate it
        self._by_hash, self._hash_of, self._accounts, self._data_version = loaded

    async def _check_for_new_keys(self) -> None:
        """An unknown key may have been written by another process (offline reset): re-read if the
        database changed. Costs one pragma; a flood of wrong keys shares one check at a time."""
        if self._miss_check is None:
            self._miss_check = asyncio.ensure_future(self.reload())
            self._miss_check.add_done_callback(lambda _: setattr(self, "_miss_check", None))
        await asyncio.shield(self._miss_check)

    def put_key(self, row: dict[str, Any]) -> None:
        self._version += 1
        self._by_hash[row["hash"]] = principal_of(row)
        self._hash_of[row["id"]] = row["hash"]

    def put_account(self, row: dict[str, Any] | None, account_id: str) -> None:
        self._version += 1
        if row is None:
            self._accounts.pop(account_id, None)
        else:
            self._accounts[account_id] = account_of(row)

    def forget_tokens(self) -> None:
        self._version += 1
        self._jwt_cache.clear()

    def account_by_client_id(self, client_id: str) -> Account | None:
        for account in self._accounts.values():
            if hmac.compare_digest(account.client_id.encode(), client_id.encode()):  # any text, not only ASCII
                return account
        return None

    def count_admin_keys(self, exclude: str | None = None) -> int:
        now = self._clock()
        return sum(
            1 for p in self._by_hash.values()
            if ADMIN in p.scopes and not p.revoked and (p.expires_at is None or p.expires_at > now) and p.id != exclude
        )

    # --- the check ---------------------------------------------------------------------------------

    def refuse(self, request: Origin, err: ApplianceError) -> ApplianceError:
        """Record a refusal decided by the caller of identify(record=False)."""
        return self._fail(request, credential(request), err)

    def _fail(self, request: Origin, token: str | None, err: ApplianceError, record: bool = True) -> ApplianceError:
        if record and self.on_failure is not None:
            self.on_failure(err.code, request, token[:9] if token else None)
        return err

    async def identify(self, request: Origin, *, record: bool = True) -> Principal:
        """The caller behind the Authorization header, else a console session cookie, or a 401 (recorded in events unless `record` is false)."""
        token = credential(request)
        if token is None:
            sid = session_id(request)
            if sid is not None:
                return self._from_session(request, sid, record)
            raise self._fail(request, None, missing_credential(request), record)
        if token.startswith("eyJ") and token.count(".") == 2:
            return self._from_jwt(request, token, record)
        return await self.check_key(request, token, record=record)

    async def check_key(self, request: Origin, token: str, *, record: bool = True) -> Principal:
        """The key or endpoint token `token`, wherever the request carried it (the console's login sends it in the body)."""
        digest = hash_key(token)
        principal = self._by_hash.get(digest)
        if principal is None:
            await self._check_for_new_keys()
            principal = self._by_hash.get(digest)
        if principal is None:
            raise self._fail(request, token, unauthorized("invalid API key", "invalid_api_key"), record)
        if principal.revoked:
            code = "revoked_token" if principal.kind == "endpoint_token" else "revoked_api_key"
            raise self._fail(request, token, unauthorized(f"this {_what(principal)} was revoked", code), record)
        if principal.expires_at is not None and self._clock() >= principal.expires_at:
            raise self._fail(request, token, unauthorized(f"this {_what(principal)} expired at {iso(principal.expires_at)}", "expired_api_key"), record)
        return principal

    def _from_session(self, request: Origin, sid: str, record: bool) -> Principal:
        """The key a console session was opened with, as it is now; state changes need the session's CSRF token."""
        session = self.sessions.use(sid)
        if session is None:
            raise self._fail(request, None, unauthorized("the console session has ended (logged out or unused too long): log in again", "session_expired"), record)
        principal = self._by_hash.get(self._hash_of.get(session.key_id, ""))
        if principal is None or principal.revoked or (principal.expires_at is not None and self._clock() >= principal.expires_at):
            self.sessions.close_key(session.key_id)
            ended = "expired" if principal is not None and not principal.revoked else "revoked"
            raise self._fail(request, None, unauthorized(f"the key of this console session was {ended}: log in again", f"{ended}_api_key"), record)
        refusal = csrf_refusal(request, session)
        if refusal is not None:
            raise self._fail(request, None, refusal, record)
        return principal

    def _from_jwt(self, request: Origin, token: str, record: bool) -> Principal:
        now = self._clock()
        cached = self._jwt_cache.get(token)
        if cached is None or now >= cached[2]:
            try:
                claims = self.signer.verify(token, now)
            except ApplianceError as err:
                raise self._fail(request, token, unauthorized(err.message, err.code), record) from None
            if len(self._jwt_cache) >= _JWT_CACHE_MAX:
                self._jwt_cache.clear()
            cached = (str(claims["sa"]), frozenset(str(claims.get("scope", "")).split()), float(claims["exp"]))
            self._jwt_cache[token] = cached
        account = self._accounts.get(cached[0])
        if account is None:
            raise self._fail(request, token, unauthorized("the service account of this token no longer exists", "unknown_account"), record)
        if account.disabled:
            raise self._fail(request, token, unauthorized(f"service account {account.name} is disabled", "account_disabled"), record)
        scopes = cached[1] & ROLES[account.role] if ADMIN not in ROLES[account.role] else cached[1]
        return Principal(id=account.id, name=account.name, kind="service_account", scopes=scopes, expires_at=cached[2])

    async def authenticate(self, request: Origin, scope: str, *, also: str | None = None) -> Principal:
        """The caller, who must hold `scope` (or `also`); 401 without a valid credential, 403 without the scope."""
        principal = await self.identify(request)
        if not (principal.has(scope) or (also is not None and principal.has(also))):
            needed = f"{scope!r}" + (f" or {also!r}" if also else "")
            raise self._fail(request, None, ApplianceError(
                f"{_what(principal)} {principal.name!r} lacks the {needed} scope (it has: {', '.join(sorted(principal.scopes)) or 'none'})",
                status=403, code="insufficient_scope",
            ))
        return principal

    def check_endpoint(self, request: Origin, principal: Principal, endpoint: str) -> None:
        if not principal.allows(endpoint):
            raise self._fail(request, None, ApplianceError(
                f"{_what(principal)} {principal.name!r} may not use endpoint {endpoint!r}", status=403, code="endpoint_not_allowed", param="model",
            ))


def _what(principal: Principal) -> str:
    return {"endpoint_token": "endpoint token", "service_account": "service account"}.get(principal.kind, "API key")


_Loaded = tuple[dict[str, Principal], dict[str, str], dict[str, Account], int]


def _load_all(db: Database, seen: int | None) -> _Loaded | None:
    data_version = int(db.execute("pragma data_version").fetchone()[0])
    if seen is not None and data_version == seen:
        return None
    keys = list(db.query("select * from api_keys"))
    accounts = list(db.query("select * from service_accounts"))
    return (
        {row["hash"]: principal_of(row) for row in keys},
        {row["id"]: row["hash"] for row in keys},
        {row["id"]: account_of(row) for row in accounts},
        data_version,
    )
