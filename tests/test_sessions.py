"""Console sessions without a browser: the session table, login and logout, the cookie's attributes,
CSRF on every state change the cookie authenticates (admin API and gateway alike), revocation and
expiry of the key ending its sessions, and the headers of the console's files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Admin, async_wait_for
from test_gateway import healthy
from test_supervisor import WORKERS, fake_folder

from appliance.api.console import CSP, FOLDER
from appliance.security.sessions import CSRF_HEADER, SESSION_COOKIE, Sessions


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_after_its_idle_time_and_use_extends_it() -> None:
    clock = FakeClock()
    sessions = Sessions(clock, idle_seconds=100)
    sid, session = sessions.open("key_a")
    clock.now += 99
    assert sessions.use(sid) is session  # used: the idle time starts again
    clock.now += 99
    assert sessions.use(sid) is session
    clock.now += 100
    assert sessions.use(sid) is None and len(sessions) == 0


def test_sessions_end_by_key_on_logout_and_past_the_limit() -> None:
    sessions = Sessions(FakeClock(), limit=2)
    a, _ = sessions.open("key_a")
    b, _ = sessions.open("key_b")
    sessions.use(a)  # now b is the least recently used
    c, _ = sessions.open("key_a")
    assert sessions.use(b) is None and sessions.use(a) is not None
    assert sessions.close_key("key_a") == 2 and len(sessions) == 0
    d, _ = sessions.open("key_c")
    assert sessions.close(d) and not sessions.close(d) and sessions.use(c) is None


def test_the_table_holds_no_usable_session_id() -> None:
    sessions = Sessions(FakeClock())
    sid, session = sessions.open("key_a")
    assert len(sid) >= 43 and len(session.csrf) >= 43 and sid != session.csrf
    assert sid not in repr(vars(sessions))  # only its SHA-256


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


class Browser:
    """Requests as a browser page makes them: the session cookie sent by hand, nothing else implied."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.cookie = ""
        self.csrf = ""

    async def request(self, method: str, path: str, *, csrf: bool = True, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kw.pop("headers", {}))
        if self.cookie:
            headers["Cookie"] = f"{SESSION_COOKIE}={self.cookie}"
        if csrf and self.csrf:
            headers[CSRF_HEADER] = self.csrf
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s, s.request(method, self.admin.client.make_url(path), headers=headers, **kw) as resp:
            body = await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
            return resp.status, body, resp

    async def login(self, key: str, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        status, body, resp = await self.request("POST", "/ui/login", json={"key": key}, **kw)
        if status == 200:
            self.cookie, self.csrf = resp.cookies[SESSION_COOKIE].value, body["csrf_token"]
        return status, body, resp


def admin_key(admin: Admin) -> str:
    return admin.config.admin_key_path.read_text().strip()


async def new_key(admin: Admin, **fields: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", "/api/v1/keys", json_body={"name": "k", **fields})
    assert status == 201, body
    return body


async def test_login_sets_a_strict_httponly_cookie_and_tells_who_and_the_token(admin: Admin) -> None:
    page = Browser(admin)
    status, body, _ = await page.request("GET", "/ui/session")
    assert status == 200 and body["logged_in"] is False and body["reason"] == ""  # a first visit is no failure
    status, body, resp = await page.login(admin_key(admin))
    assert status == 200 and body["logged_in"] and body["name"] == "admin (bootstrap)" and body["read_only"] is False
    assert resp.headers["Cache-Control"] == "no-store"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie and "Secure" not in cookie  # plain HTTP here
    assert "Max-Age" not in cookie and "expires" not in cookie.lower()
    status, who, _ = await page.request("GET", "/ui/session")
    assert who["logged_in"] and who["csrf_token"] == page.csrf and who["key_id"] == body["key_id"]
    status, listed, _ = await page.request("GET", "/api/v1/endpoints", csrf=False)
    assert status == 200 and listed["data"] == []


async def test_a_form_login_works_and_a_cross_site_one_is_refused(admin: Admin) -> None:
    page = Browser(admin)
    status, body, _ = await page.request("POST", "/ui/login", data={"key": admin_key(admin)})
    assert status == 200 and body["logged_in"]
    status, body, _ = await page.request("POST", "/ui/login", json={"key": admin_key(admin)}, headers={"Origin": "http://evil.example"})
    assert status == 403 and body["error"]["code"] == "cross_site_login"
    status, body, _ = await page.request("POST", "/ui/login", json={})
    assert status == 422 and body["error"]["param"] == "key"


async def test_a_cookie_authenticated_change_needs_the_csrf_token(admin: Admin) -> None:
    page = Browser(admin)
    await page.login(admin_key(admin))
    status, body, _ = await page.request("POST", "/api/v1/keys", json={"name": "x"}, csrf=False)
    assert status == 403 and body["error"]["code"] == "csrf_token_missing" and CSRF_HEADER in body["error"]["message"]
    status, body, _ = await page.request("POST", "/api/v1/keys", json={"name": "x"}, csrf=False, headers={CSRF_HEADER: "forged"})
    assert status == 403 and body["error"]["code"] == "csrf_token_invalid"
    for method, path in (("PATCH", "/api/v1/keys/key_x"), ("DELETE", "/api/v1/keys/key_x"), ("POST", "/ui/logout")):
        assert (await page.request(method, path, json={}, csrf=False))[0] == 403, (method, path)
    status, made, _ = await page.request("POST", "/api/v1/keys", json={"name": "x"})
    assert status == 201 and made["key"].startswith("ak-")
    # A bearer key needs no token, cookie or not: a page of another site cannot set that header.
    status, _, _ = await page.request("POST", "/api/v1/keys", json={"name": "y"}, csrf=False, headers={"Authorization": f"Bearer {admin_key(admin)}"})
    assert status == 201
    _, events = await admin.call("GET", "/api/v1/events?kind=auth.failure")
    assert {e["details"]["code"] for e in events["data"]} >= {"csrf_token_missing", "csrf_token_invalid"}


async def test_the_gateway_takes_the_session_and_its_token(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "chat", fake_folder(tmp_path, "chat"))
    page = Browser(admin)
    await page.login(admin_key(admin))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    status, text, _ = await page.request("POST", "/v1/chat/completions", json=body)
    assert status == 200 and "tok2" in text
    status, err, _ = await page.request("POST", "/v1/chat/completions", json=body, csrf=False)
    assert status == 403 and err["error"]["code"] == "csrf_token_missing"


async def test_wrong_keys_at_login_are_auth_failures_and_scopes_are_checked(admin: Admin) -> None:
    page = Browser(admin)
    status, body, _ = await page.login("ak-wrong-key-guess")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    _, events = await admin.call("GET", "/api/v1/events?kind=auth.failure")
    (failure,) = [e for e in events["data"] if e["details"]["path"] == "/ui/login"]
    assert failure["details"]["code"] == "invalid_api_key" and failure["details"]["credential_prefix"] == "ak-wrong-"
    inference = await new_key(admin, name="app")
    status, body, _ = await page.login(inference["key"])
    assert status == 403 and body["error"]["code"] == "insufficient_scope" and "read or admin" in body["error"]["message"]
    reader = await new_key(admin, name="viewer", scopes=["read"])
    status, body, _ = await page.login(reader["key"])
    assert status == 200 and body["read_only"] is True
    status, body, _ = await page.request("POST", "/api/v1/keys", json={"name": "z"})
    assert status == 403 and body["error"]["code"] == "insufficient_scope"  # the token is right; the key only reads


async def test_revoking_the_key_ends_its_sessions_at_once(admin: Admin) -> None:
    other = await new_key(admin, name="second admin", scopes=["admin"])
    page = Browser(admin)
    await page.login(other["key"])
    assert (await page.request("GET", "/api/v1/endpoints"))[0] == 200
    assert (await admin.call("DELETE", f"/api/v1/keys/{other['id']}"))[0] == 200
    status, body, _ = await page.request("GET", "/api/v1/endpoints")  # the very next request
    assert status == 401 and body["error"]["code"] == "revoked_api_key" and "was revoked" in body["error"]["message"]
    status, body, _ = await page.request("GET", "/api/v1/endpoints")
    assert status == 401 and body["error"]["code"] == "session_expired"  # the session itself is gone now
    status, who, _ = await page.request("GET", "/ui/session")
    assert who["logged_in"] is False and who["reason"]


async def test_a_session_ends_when_its_key_expires(admin: Admin) -> None:
    brief = await new_key(admin, name="brief", scopes=["read"], expires_in=2)
    page = Browser(admin)
    assert (await page.login(brief["key"]))[0] == 200

    async def refused() -> bool:
        status, body, _ = await page.request("GET", "/api/v1/endpoints")
        return status == 401 and body["error"]["code"] == "expired_api_key"

    await async_wait_for(refused, timeout=10, interval=0.2, what="the session to end with its key")


async def test_logout_ends_the_session_and_clears_the_cookie(admin: Admin) -> None:
    page = Browser(admin)
    await page.login(admin_key(admin))
    status, body, resp = await page.request("POST", "/ui/logout")
    assert status == 200 and body["ended"] is True
    assert resp.cookies[SESSION_COOKIE].value == "" and "SameSite=Strict" in resp.headers["Set-Cookie"]
    status, body, _ = await page.request("GET", "/api/v1/endpoints")
    assert status == 401 and body["error"]["code"] == "session_expired" and "log in again" in body["error"]["message"]
    a_new_one = Browser(admin)
    await a_new_one.login(admin_key(admin))
    assert a_new_one.cookie != page.cookie  # a fresh id at every login


async def test_console_files_have_strict_headers(admin: Admin) -> None:
    c = admin.client
    for path in ("/ui", "/ui/"):
        resp = await c.get(path)
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8", path
        assert resp.headers["Content-Security-Policy"] == CSP and resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in CSP and "script-src 'self';" in CSP and "frame-ancestors 'none'" in CSP and "unsafe" not in CSP
    resp = await c.get("/ui/app.js")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
    again = await c.get("/ui/app.js", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    assert (await c.get("/ui/style.css")).headers["Content-Type"] == "text/css; charset=utf-8"
    for missing in ("/ui/nothing.js", "/ui/.hidden", "/ui/%2e%2e%2fconsole.py", "/ui/%00", "/ui/index.html%00.js"):
        resp = await c.get(missing)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found", missing


def test_every_module_the_console_imports_is_in_its_folder() -> None:
    """No build step and nothing from elsewhere: each import is a file served from the folder."""
    files = {p.name for p in FOLDER.iterdir()}
    for path in FOLDER.glob("*.js"):
        for target in re.findall(r"from '([^']+)'", path.read_text()):
            assert target.startswith("./") and target[2:] in files, (path.name, target)
    html = (FOLDER / "index.html").read_text()
    for target in re.findall(r'(?:src|href)="(/[^"]*)"', html):
        assert target.startswith("/ui/") and target[4:] in files, target
    assert not re.search(r"https?://", html + "".join(p.read_text() for p in FOLDER.glob("*.js")).replace("http://www.w3.org/2000/svg", "").replace("http://gpu-box", ""))
