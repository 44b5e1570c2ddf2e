"""The credential a request carries: an Authorization header, or the web console's session cookie.

A console session is server-side: the cookie holds only a random id, and the id stands for the key a
person logged in with, a CSRF token and when the session was last used. Only the id's SHA-256 is kept,
so the table never holds a usable cookie. A session ends after `idle_seconds` unused, on logout, and
at once when its key is revoked or expires (the authenticator checks the key on every use). A request
the cookie authenticates that changes anything must repeat the session's CSRF token in a header: the
cookie alone (SameSite=Strict already keeps it off cross-site requests) is never enough to change state.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from appliance.errors import ApplianceError
from appliance.store import Clock

class Origin(Protocol):
    """What the checks read of a call: an HTTP request, or a gRPC call's metadata seen as headers."""

    @property
    def headers(self) -> Mapping[str, str]: ...  # case-insensitive
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def remote(self) -> str | None: ...


COOKIE_PREFIX = "appliance_"  # the appliance's own cookies: a worker's answer may not set them
SESSION_COOKIE = COOKIE_PREFIX + "session"
CSRF_HEADER = "X-CSRF-Token"
IDLE_SECONDS = 12 * 3600.0
MAX_SESSIONS = 10_000  # a bound on memory: past it the least recently used session ends
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


def credential(request: Origin) -> str | None:
    """The credential of `Authorization: Bearer <key>` or Backend.AI's `Authorization: BackendAI <token>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "backendai") and value.strip():
        return value.strip()
    return None


def missing_credential(request: Origin) -> ApplianceError:
    """No usable credential: say precisely what was wrong with what was sent."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if not scheme:
        sent_elsewhere = "x-api-key" in request.headers or "api-key" in request.headers
        message = "the key was sent in an x-api-key header, which is not read" if sent_elsewhere else "missing API key"
    elif not value.strip():
        no_key = scheme.lower() in ("bearer", "backendai")
        message = f"the Authorization header has the {scheme} scheme but no key" if no_key else "the Authorization header holds a bare value: put `Bearer ` before the key"
    else:
        message = f"the Authorization scheme {scheme!r} is not accepted (Backend.AI's `BackendAI <token>` is)"
    return ApplianceError(f"{message}: send `Authorization: Bearer <key>`", status=401, code="missing_api_key", headers={"WWW-Authenticate": 'Bearer realm="appliance"'})


def unauthorized(message: str, code: str) -> ApplianceError:
    """A credential was sent but is not (or no longer) valid."""
    return ApplianceError(message, status=401, code=code, headers={"WWW-Authenticate": 'Bearer realm="appliance", error="invalid_token"'})


def session_id(request: Origin) -> str | None:
    """The console session id of the request's cookie, if it sent one."""
    return request.cookies.get(SESSION_COOKIE) or None


@dataclass(slots=True)
class Session:
    key_id: str
    csrf: str
    created: float
    seen: float


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    """Open console sessions, in memory: a restart logs everyone out, which costs one login."""

    def __init__(self, clock: Clock, idle_seconds: float = IDLE_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self.idle_seconds = idle_seconds
        self._limit = limit
        self._by_digest: dict[str, Session] = {}  # insertion order is use order: the first is the least recent

    def __len__(self) -> int:
        return len(self._by_digest)

    def open(self, key_id: str) -> tuple[str, Session]:
        """A new session for `key_id`: its id (for the cookie) and the session."""
        now = self._clock()
        self._prune(now)
        while len(self._by_digest) >= self._limit:
            self._by_digest.pop(next(iter(self._by_digest)))
        sid = secrets.token_urlsafe(32)
        session = Session(key_id=key_id, csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._by_digest[_digest(sid)] = session
        return sid, session

    def use(self, sid: str) -> Session | None:
        """The live session of `sid`, marked as used now; None when unknown, ended or idle too long."""
        digest = _digest(sid)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen >= self.idle_seconds:
            del self._by_digest[digest]
            return None
        session.seen = now
        self._by_digest[digest] = self._by_digest.pop(digest)  # now the most recently used
        return session

    def expires_at(self, session: Session) -> float:
        return session.seen + self.idle_seconds

    def close(self, sid: str) -> bool:
        return self._by_digest.pop(_digest(sid), None) is not None

    def close_key(self, key_id: str) -> int:
        """End every session opened with `key_id` (it was revoked or expired)."""
        ended = [d for d, s in self._by_digest.items() if s.key_id == key_id]
        for digest in ended:
            del self._by_digest[digest]
        return len(ended)

    def _prune(self, now: float) -> None:
        for digest in [d for d, s in self._by_digest.items() if now - s.seen >= self.idle_seconds]:
            del self._by_digest[digest]


def csrf_refusal(request: Origin, session: Session) -> ApplianceError | None:
    """Why a cookie-authenticated request may not go on: one that changes state must carry the session's CSRF token."""
    if request.method in _SAFE_METHODS:
        return None
    sent = request.headers.get(CSRF_HEADER)
    if not sent:
        return ApplianceError(
            f"{request.method} with the console's session cookie needs the {CSRF_HEADER} header (GET /ui/session gives the token); "
            "API clients send `Authorization: Bearer <key>` instead",
            status=403, code="csrf_token_missing",
        )
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        return ApplianceError(f"the {CSRF_HEADER} header does not match this session's token: reload the console", status=403, code="csrf_token_invalid")
    return None


def set_cookie(response: web.StreamResponse, sid: str, *, secure: bool) -> None:
    # No Max-Age: the browser forgets it when it closes; the server ends it after IDLE_SECONDS unused anyway.
    response.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="Strict", secure=secure)


def clear_cookie(response: web.StreamResponse, *, secure: bool) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=secure)
