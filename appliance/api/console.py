"""The web console at /ui: static files from the console/ folder next to this module, and its session
routes. The pages call the same admin API and gateway as any client, authenticated by the session
cookie (security/sessions.py); nothing is built or fetched from elsewhere at run time."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from pydantic import Field

from appliance.api.http import Route, json_response, read_body, read_model
from appliance.api.services import SERVICES
from appliance.api.manage.views import View
from appliance.domain.specs import Model
from appliance.errors import ApplianceError
from appliance.security.auth import ADMIN, READ, Principal
from appliance.security.sessions import Session, Sessions, clear_cookie, credential, session_id, set_cookie
from appliance.store import iso

FOLDER = Path(__file__).resolve().parent / "console"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
# Scripts and styles only from these files (no inline code, no eval), no plugins, no framing. connect-src is
# wider than 'self' because the chat test may call any OpenAI-compatible server the operator types in,
# straight from the browser; what stops injected script is script-src, which no page widens.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' http: https:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_STATIC_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class LoginRequest(Model):
    key: str = Field(min_length=1, max_length=1024, description="an API key with the read or admin scope")


class SessionView(View):
    object: Literal["session"] = "session"
    logged_in: bool
    reason: str = Field("", description="why not, when not logged in (no session, ended, key revoked or expired)")
    key_id: str | None = None
    name: str | None = None
    scopes: list[str] = Field(default_factory=list)
    read_only: bool = Field(True, description="the key lacks the admin scope: the console only reads")
    csrf_token: str | None = Field(None, description="send as X-CSRF-Token on every POST, PATCH, PUT and DELETE made with the session cookie; null for a bearer key")
    expires_at: str | None = Field(None, description="when the session ends unless used before (idle timeout); null for a bearer key")
    idle_timeout_seconds: float
    key_expires_at: str | None = None


class LoggedOut(View):
    object: Literal["session"] = "session"
    ended: bool = Field(description="false when the request carried a bearer key rather than a session")


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _read(folder: Path) -> dict[str, _File]:
    """Every file the console serves, read once when the module loads (a few dozen KiB): no request waits on
    the disk, and no name a request makes up reaches the filesystem."""
    files: dict[str, _File] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        kind = _TYPES.get(path.suffix)
        if kind is not None and path.is_file() and not path.name.startswith("."):
            body = path.read_bytes()
            files[path.name] = _File(body, kind, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files


FILES = _read(FOLDER)


def _static(request: web.Request, name: str) -> web.Response:
    found = FILES.get(name)
    if found is None:
        raise ApplianceError(f"the console has no file {name!r}", status=404, code="not_found")
    headers = {**_STATIC_HEADERS, "ETag": found.etag}
    if request.headers.get("If-None-Match") == found.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})


async def console_root(request: web.Request) -> web.Response:
    return _static(request, "index.html")


async def console_index(request: web.Request) -> web.Response:
    return _static(request, "index.html")


async def console_file(request: web.Request) -> web.Response:
    return _static(request, request.match_info["file"])


def _view(principal: Principal, session: Session | None, sessions: Sessions) -> SessionView:
    return SessionView(
        logged_in=True, key_id=principal.id, name=principal.name, scopes=sorted(principal.scopes), read_only=ADMIN not in principal.scopes,
        csrf_token=session.csrf if session else None, expires_at=iso(sessions.expires_at(session)) if session else None,
        idle_timeout_seconds=sessions.idle_seconds, key_expires_at=iso(principal.expires_at) if principal.expires_at else None,
    )


def _private(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store"  # carries the CSRF token
    return response


def _same_origin(request: web.Request) -> None:
    """A login posted from another site's page (login CSRF: the victim would work under the attacker's key) is refused."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise ApplianceError(f"a console login must come from the console's own page, not from {origin}", status=403, code="cross_site_login")


async def _key_of(request: web.Request) -> str:
    if request.content_type == "application/x-www-form-urlencoded":
        fields = parse_qs((await read_body(request)).decode("utf-8", "replace"))
        key = (fields.get("key") or [""])[0].strip()
        if not key:
            raise ApplianceError("key: the form has no key", status=422, code="validation_error", param="key")
        return key
    return (await read_model(request, LoginRequest, "login")).key.strip()


async def login(request: web.Request) -> web.Response:
    """Check the key as any request's key is checked (a wrong one is an auth failure in the events), then
    open a session for it: a fresh id every time, so an id planted before the login is worth nothing."""
    services = request.app[SERVICES]
    if not services.readiness.ready:
        raise ApplianceError("not ready: the appliance is starting", status=503, code="not_ready", headers={"Retry-After": "1"})
    _same_origin(request)
    key = await _key_of(request)
    auth = services.auth
    principal = await auth.check_key(request, key)
    if principal.kind != "key":
        raise auth.refuse(request, ApplianceError("the console needs an API key (ak-…); an endpoint token only calls its endpoint", status=403, code="insufficient_scope"))
    if not principal.has(READ):
        raise auth.refuse(request, ApplianceError(
            f"API key {principal.name!r} has only {', '.join(sorted(principal.scopes))}: the console needs the read or admin scope", status=403, code="insufficient_scope",
        ))
    old = session_id(request)
    if old is not None:
        auth.sessions.close(old)
    sid, session = auth.sessions.open(principal.id)
    response = _private(json_response(_view(principal, session, auth.sessions)))
    set_cookie(response, sid, secure=request.secure)
    return response


def _own_session(request: web.Request) -> str | None:
    """The session id the request was authenticated by (a bearer key wins over a cookie)."""
    return session_id(request) if credential(request) is None else None


async def get_session(request: web.Request) -> web.Response:
    """Who is logged in; a page without a live session is told so (200), as the console opens with this call. A
    wrong key sent in the Authorization header is recorded as any failed key is; a stale cookie is not."""
    auth = request.app[SERVICES].auth
    sent_key = "Authorization" in request.headers
    try:
        principal = await auth.identify(request, record=sent_key)
    except ApplianceError as err:
        reason = err.message if sent_key or session_id(request) else ""  # a first visit is no failure
        return _private(json_response(SessionView(logged_in=False, reason=reason, idle_timeout_seconds=auth.sessions.idle_seconds)))
    sid = _own_session(request)
    return _private(json_response(_view(principal, auth.sessions.use(sid) if sid else None, auth.sessions)))


async def logout(request: web.Request) -> web.Response:
    sid = _own_session(request)
    ended = sid is not None and request.app[SERVICES].auth.sessions.close(sid)
    response = _private(json_response(LoggedOut(ended=ended)))
    if sid is not None:
        clear_cookie(response, secure=request.secure)
    return response


_TAGS = ("console",)
ROUTES = [
    Route("GET", "/ui", console_root, "The web console (a single page)", auth=False, tags=_TAGS),
    Route("GET", "/ui/", console_index, "The web console (a single page)", auth=False, tags=_TAGS),
    Route("GET", "/ui/session", get_session, "Who is logged in (the session cookie, or a bearer key), and the session's CSRF token", response=SessionView,
          auth=False, tags=_TAGS),
    Route("POST", "/ui/login", login, "Open a console session with a key (JSON or form body): sets the HttpOnly session cookie",
          body=LoginRequest, response=SessionView, auth=False, tags=_TAGS),
    Route("POST", "/ui/logout", logout, "End the console session and clear its cookie", response=LoggedOut, scope=READ, tags=_TAGS),
    Route("GET", "/ui/{file}", console_file, "A file of the web console (scripts, styles)", auth=False, tags=_TAGS),
]
