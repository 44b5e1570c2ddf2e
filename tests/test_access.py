"""Keys, endpoint tokens, service accounts with OAuth2, scopes, limits, usage and secrets, against the
running application and fake workers run in-process (tests/inprocess.py) on loopback ports."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Admin, async_wait_for
from test_gateway import healthy, sdk
from test_supervisor import WORKERS, fake_folder, replicas

from appliance.api.app import make_app

class Clock:
    """Real time moved by `offset` seconds: the app keeps ticking, and the test jumps it where it needs."""

    def __init__(self, start: float | None = None) -> None:
        self.offset = 0.0 if start is None else start - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def clock() -> Clock:
    """The app's clock: real time, moved forward by the tests that wait for an expiry (none waits in real time)."""
    return Clock()


@pytest.fixture
async def admin(launcher: Any, aiohttp_client: Any, make_config: Any, clock: Clock) -> Admin:
    # as conftest's start_inprocess_app, with `clock`; the launcher is set up first, so that it is torn down after the app
    config = make_config({"workers": WORKERS, "auth": {"auth_failure_events_per_minute": 5}})
    client = await aiohttp_client(make_app(config, clock=clock, launcher=launcher), server_kwargs={"handler_cancellation": True})

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await async_wait_for(ready, timeout=10, what="/readyz")
    return Admin(client, config)


async def chat(admin: Admin, model: str, headers: dict[str, str] | None = None, **extra: Any) -> tuple[int, Any, Any]:
    resp = await admin.client.post("/v1/chat/completions", json={"model": model, **CHAT, **extra}, headers=headers or {})
    return resp.status, await resp.json(content_type=None), resp.headers


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(admin: Admin, **fields: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", "/api/v1/keys", json_body={"name": "k", **fields})
    assert status == 201, body
    return body


async def test_key_is_shown_once_works_and_revocation_is_immediate(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    key = await new_key(admin, name="app", metadata={"team": "search"})
    assert key["key"].startswith("ak-") and len(key["key"]) >= 3 + 43 and key["status"] == "active" and key["scopes"] == ["inference"]
    status, listed = await admin.call("GET", "/api/v1/keys")
    mine = next(k for k in listed["data"] if k["id"] == key["id"])
    assert "key" not in mine and mine["prefix"] == key["key"][:9] and mine["metadata"] == {"team": "search"}
    assert any(k["name"] == "admin (bootstrap)" and k["scopes"] == ["admin"] for k in listed["data"])  # an ordinary admin key

    assert (await chat(admin, "a", bearer(key["key"])))[0] == 200
    status, body, headers = await chat(admin, "a")
    assert status == 401 and body["error"]["code"] == "missing_api_key" and "Bearer" in headers["WWW-Authenticate"]
    assert (await chat(admin, "a", bearer("ak-not-a-key")))[1]["error"]["code"] == "invalid_api_key"

    assert (await admin.call("DELETE", f"/api/v1/keys/{key['id']}"))[0] == 200
    status, body, _ = await chat(admin, "a", bearer(key["key"]))  # the very next request: no cache delay
    assert status == 401 and body["error"]["code"] == "revoked_api_key"
    status, shown = await admin.call("GET", f"/api/v1/keys/{key['id']}")
    assert shown["status"] == "revoked" and shown["revoked_at"] and shown["last_used_at"]  # read flushes last-used times


async def test_expired_key_and_bad_key_requests(admin: Admin, clock: Clock, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    key = await new_key(admin, expires_in="60s")
    assert (await chat(admin, "a", bearer(key["key"])))[0] == 200
    clock.advance(61)
    status, body, _ = await chat(admin, "a", bearer(key["key"]))
    assert status == 401 and body["error"]["code"] == "expired_api_key"
    for bad, code in (
        ({"scopes": ["root"]}, "validation_error"),
        ({"expires_at": "2020-01-01"}, "invalid_expiry"),
        ({"expires_at": "soon"}, "invalid_time"),
        ({"expires_in": "30d", "expires_at": "2099-01-01"}, "invalid_expiry"),
        ({"expires_in": "forever"}, "invalid_duration"),
        ({"endpoints": ["nope"]}, "endpoint_not_found"),
        ({"rpm_limit": 0}, "validation_error"),
    ):
        status, body = await admin.call("POST", "/api/v1/keys", json_body={"name": "x", **bad})
        assert status in (400, 422) and body["error"]["code"] == code, (bad, body)
    status, body = await admin.call("GET", "/api/v1/keys/key_missing")
    assert status == 404 and body["error"]["code"] == "key_not_found"


async def test_endpoint_allow_list_and_scopes(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    await healthy(admin, "b", fake_folder(tmp_path, "b"))
    only_a = await new_key(admin, endpoints=["a"])
    assert (await chat(admin, "a", bearer(only_a["key"])))[0] == 200
    status, body, _ = await chat(admin, "b", bearer(only_a["key"]))
    assert status == 403 and body["error"]["code"] == "endpoint_not_allowed" and "'b'" in body["error"]["message"]
    assert [m.id for m in (await sdk(admin, only_a["key"]).models.list()).data] == ["a"]

    inference = await new_key(admin)
    status, body = await admin.call("GET", "/api/v1/endpoints", headers=bearer(inference["key"]))
    assert status == 403 and body["error"]["code"] == "insufficient_scope"

    read = await new_key(admin, scopes=["read"])
    assert (await admin.call("GET", "/api/v1/endpoints", headers=bearer(read["key"])))[0] == 200
    assert (await admin.call("GET", "/api/v1/events", headers=bearer(read["key"])))[0] == 200
    status, body = await admin.call("POST", "/api/v1/keys", json_body={"name": "x"}, headers=bearer(read["key"]))
    assert status == 403 and body["error"]["code"] == "insufficient_scope"
    status, _ = await admin.call("DELETE", "/api/v1/endpoints/a", headers=bearer(read["key"]))
    assert status == 403
    assert (await admin.call("GET", "/api/v1/keys", headers=bearer(read["key"])))[0] == 403  # key metadata is admin-only
    assert sorted(m.id for m in (await sdk(admin, read["key"]).models.list()).data) == ["a", "b"]  # read may list models
    assert (await chat(admin, "a", bearer(read["key"])))[0] == 403  # but not call them


async def test_last_admin_key_needs_force(admin: Admin) -> None:
    _, listed = await admin.call("GET", "/api/v1/keys")
    (boot,) = [k for k in listed["data"] if "admin" in k["scopes"]]
    status, body = await admin.call("DELETE", f"/api/v1/keys/{boot['id']}")
    assert status == 409 and body["error"]["code"] == "last_admin_key"
    other = await new_key(admin, scopes=["admin"])
    assert (await admin.call("DELETE", f"/api/v1/keys/{boot['id']}"))[0] == 200
    status, _ = await admin.call("GET", "/api/v1/keys")
    assert status == 401  # the fixture's key was the bootstrap key
    assert (await admin.call("GET", "/api/v1/keys", headers=bearer(other["key"])))[0] == 200


async def test_backendai_header_public_endpoint_and_endpoint_tokens(admin: Admin, clock: Clock, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    await healthy(admin, "open", fake_folder(tmp_path, "open"), public=True)
    assert (await chat(admin, "open"))[0] == 200  # public: no key
    assert (await chat(admin, "open", bearer("sk-anything")))[0] == 200  # SDKs always send some key
    assert (await admin.client.get("/api/v1/endpoints")).status == 401  # admin routes never open

    for bad, code in (({}, "invalid_expiry"), ({"valid_until": "2001-01-01"}, "invalid_expiry"), ({"duration": "-3d"}, "invalid_duration")):
        status, body = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body=bad)
        assert status == 422 and body["error"]["code"] == code
    assert (await admin.call("POST", "/api/v1/endpoints/nope/tokens", json_body={"duration": "1d"}))[0] == 404
    status, tok = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body={"duration": "7d"})
    assert status == 201 and tok["token"].startswith("et-") and tok["object"] == "endpoint_token" and tok["endpoints"] == ["a"]
    assert (await chat(admin, "a", {"Authorization": f"BackendAI {tok['token']}"}))[0] == 200
    assert (await chat(admin, "a", bearer(tok["token"])))[0] == 200
    status, body, _ = await chat(admin, "open", {"Authorization": f"BackendAI {tok['token']}"})
    assert status == 200  # public endpoints stay open whatever the token allows
    await healthy(admin, "b", fake_folder(tmp_path, "b"))
    assert (await chat(admin, "b", bearer(tok["token"])))[1]["error"]["code"] == "endpoint_not_allowed"
    assert (await admin.call("GET", "/api/v1/endpoints", headers=bearer(tok["token"])))[0] == 403
    _, listed = await admin.call("GET", "/api/v1/endpoints/a/tokens")
    assert [t["id"] for t in listed["data"]] == [tok["id"]]
    assert (await admin.call("DELETE", f"/api/v1/endpoints/b/tokens/{tok['id']}"))[0] == 404
    assert (await admin.call("DELETE", f"/api/v1/endpoints/a/tokens/{tok['id']}"))[0] == 200
    status, body, _ = await chat(admin, "a", bearer(tok["token"]))
    assert status == 401 and body["error"]["code"] == "revoked_token" and "endpoint token was revoked" in body["error"]["message"]

    _, short = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body={"duration": 60})
    assert (await chat(admin, "a", bearer(short["token"])))[0] == 200
    clock.advance(61)
    status, body, _ = await chat(admin, "a", bearer(short["token"]))
    assert status == 401 and body["error"]["code"] == "expired_api_key"
    _, last = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body={"valid_until": "2099-01-01"})
    assert (await admin.call("DELETE", "/api/v1/endpoints/a"))[0] == 200
    await healthy(admin, "a", fake_folder(tmp_path, "a2"))  # a new endpoint of the same name
    assert (await chat(admin, "a", bearer(last["token"])))[1]["error"]["code"] == "revoked_token"


def curl_token(url: str, client_id: str, secret: str) -> dict[str, Any]:
    import json

    out = subprocess.run(["curl", "-s", "-u", f"{client_id}:{secret}", "-d", "grant_type=client_credentials", url + "/oauth/token"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


async def test_oauth_client_credentials_with_curl_then_the_openai_sdk(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    status, user = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "ci", "role": "user"})
    assert status == 201 and user["client_secret"] and user["client_id"].startswith("sa-")
    _, listed = await admin.call("GET", "/api/v1/service-accounts")
    assert "client_secret" not in listed["data"][0] and "secret_hash" not in listed["data"][0]
    url = str(admin.client.make_url("")).rstrip("/")
    grant = await asyncio.to_thread(curl_token, url, user["client_id"], user["client_secret"])
    assert grant["token_type"] == "Bearer" and grant["expires_in"] == 3600 and grant["scope"] == "inference"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=grant["access_token"], max_retries=0)
    reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].message.content == "tok0 tok1"
    assert (await admin.call("GET", "/api/v1/endpoints", headers=bearer(grant["access_token"])))[0] == 403  # user: inference only

    _, viewer = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "dash", "role": "viewer"})
    vtoken = (await asyncio.to_thread(curl_token, url, viewer["client_id"], viewer["client_secret"]))["access_token"]
    assert (await admin.call("GET", "/api/v1/endpoints", headers=bearer(vtoken)))[0] == 200
    assert (await chat(admin, "a", bearer(vtoken)))[0] == 403
    assert (await admin.call("POST", "/api/v1/keys", json_body={"name": "x"}, headers=bearer(vtoken)))[0] == 403

    # disabling rejects tokens already issued, at once
    assert (await admin.call("PATCH", f"/api/v1/service-accounts/{user['id']}", json_body={"disabled": True}))[0] == 200
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
    assert (await asyncio.to_thread(curl_token, url, user["client_id"], user["client_secret"]))["error"] == "invalid_client"
    # rotation voids every token issued before it
    assert (await admin.call("POST", "/api/v1/oauth/rotate-key"))[0] == 200
    status, body = await admin.call("GET", "/api/v1/endpoints", headers=bearer(vtoken))
    assert status == 401 and body["error"]["code"] == "invalid_token"


async def test_oauth_errors_follow_rfc_6749(admin: Admin) -> None:
    _, acct = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "svc", "role": "viewer"})
    cid, secret = acct["client_id"], acct["client_secret"]

    async def post(data: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        resp = await admin.client.post("/oauth/token", data=data, headers=headers or {})
        return resp.status, await resp.json(content_type=None), resp.headers

    basic = "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()
    status, body, headers = await post({"grant_type": "client_credentials"}, {"Authorization": basic})
    assert status == 200 and body["access_token"] and headers["Cache-Control"] == "no-store"
    status, body, _ = await post({"grant_type": "client_credentials", "client_id": cid, "client_secret": secret})
    assert status == 200  # credentials in the form body
    status, body, headers = await post({"grant_type": "client_credentials"}, {"Authorization": "Basic " + base64.b64encode(f"{cid}:wrong".encode()).decode()})
    assert (status, body["error"]) == (401, "invalid_client") and headers["WWW-Authenticate"].startswith("Basic")
    status, body, _ = await post({"grant_type": "client_credentials"}, {"Authorization": "Basic %%%not-base64"})
    assert (status, body["error"]) == (400, "invalid_request") and "malformed" in body["error_description"]
    status, body, _ = await post({"grant_type": "client_credentials"}, {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()})
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = await post({"grant_type": "password"}, {"Authorization": basic})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body, _ = await post({"scope": "read"}, {"Authorization": basic})
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = await post({"grant_type": "client_credentials"})
    assert (status, body["error"]) == (401, "invalid_client")
    status, body, _ = await post({"grant_type": "client_credentials", "scope": "admin"}, {"Authorization": basic})
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body, _ = await post({"grant_type": "client_credentials", "client_id": cid, "client_secret": secret}, {"Authorization": basic})
    assert (status, body["error"]) == (400, "invalid_request")  # two authentication methods


async def test_rpm_tpm_and_parallel_limits(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    rpm = await new_key(admin, rpm_limit=2)
    first = await chat(admin, "a", bearer(rpm["key"]))
    assert first[0] == 200 and first[2]["x-ratelimit-limit-requests"] == "2" and first[2]["x-ratelimit-remaining-requests"] == "1"
    assert (await chat(admin, "a", bearer(rpm["key"])))[0] == 200
    status, body, headers = await chat(admin, "a", bearer(rpm["key"]))
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and "2 requests per minute" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        await sdk(admin, rpm["key"]).chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}])

    tpm = await new_key(admin, tpm_limit=10)
    assert (await chat(admin, "a", bearer(tpm["key"]), max_tokens=8))[0] == 200  # 3 prompt + 8 completion = 11 > 10
    status, body, headers = await chat(admin, "a", bearer(tpm["key"]))
    assert status == 429 and "tokens per minute" in body["error"]["message"] and headers["x-ratelimit-remaining-tokens"] == "0"

    stream_tpm = await new_key(admin, tpm_limit=10)  # streamed answers count too
    client = sdk(admin, stream_tpm["key"])
    stream = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=8, stream=True)
    assert len([c async for c in stream]) == 8
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=1)


async def test_parallel_limit(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "slow", fake_folder(tmp_path, "slow", "--latency", "0.5"))
    one = await new_key(admin, max_parallel_requests=1)
    results = await asyncio.gather(*(chat(admin, "slow", bearer(one["key"])) for _ in range(3)))
    assert sorted(r[0] for r in results) == [200, 429, 429]
    refused = next(r for r in results if r[0] == 429)
    assert "in flight" in refused[1]["error"]["message"]
    assert (await chat(admin, "slow", bearer(one["key"])))[0] == 200  # released when the first finished


async def test_usage_totals_under_concurrent_streaming(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a", "--tokens-per-second", "200"))
    key = await new_key(admin, name="meter")
    client = sdk(admin, key["key"])

    async def streamed(n: int) -> str:
        stream = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=n, stream=True)
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks)  # the usage-only event the gateway asked for never reaches the client
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    texts = await asyncio.gather(*(streamed(5) for _ in range(16)), *(streamed(3) for _ in range(8)))
    assert all(t.count("tok") in (3, 5) for t in texts)
    plain = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert plain.usage and plain.usage.completion_tokens == 4
    # a client that asks for usage itself gets it
    stream = await client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    last = [c async for c in stream][-1]
    assert last.choices == [] and last.usage and last.usage.completion_tokens == 2
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key['id']}&since=1h")
    assert status == 200 and len(usage["data"]) == 1
    row = usage["data"][0]
    assert row["key_name"] == "meter" and row["endpoint"] == "a"
    assert row["requests"] == 16 + 8 + 1 + 1 and row["errors"] == 0
    assert row["prompt_tokens"] == 3 * 26 and row["completion_tokens"] == 16 * 5 + 8 * 3 + 4 + 2
    assert usage["totals"]["requests"] == row["requests"]
    _, by_endpoint = await admin.call("GET", "/api/v1/usage?endpoint=nope")
    assert by_endpoint["data"] == [] and by_endpoint["totals"]["requests"] == 0
    status, body = await admin.call("GET", "/api/v1/usage?since=yesterday-ish")
    assert status == 422 and body["error"]["code"] == "invalid_time"


async def test_secret_environ_is_sealed_masked_and_reaches_only_the_worker(admin: Admin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-Value-4-test"
    folder = fake_folder(tmp_path, "sec")
    status, created = await admin.call(
        "POST", "/api/v1/endpoints",
        json_body={"name": "sec", "model_folder": str(folder), "secret_environ": {"FAKE_TOKEN": secret}, "environ": {"FAKE_PLAIN": "p"}},
    )
    assert status == 201 and created["secret_environ"] == {"FAKE_TOKEN": "********"} and created["spec"]["secret_environ"] == {"FAKE_TOKEN": "********"}
    await async_wait_for(lambda: _healthy(admin, "sec"), timeout=20, what="sec healthy")
    (replica,) = await replicas(admin, "sec")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{replica['port']}/whoami") as resp:
        assert (await resp.json())["env"]["FAKE_TOKEN"] == secret  # the worker gets the plaintext

    # sent back masked: kept as is, nothing restarts; a new value rolls the workers
    status, same = await admin.call("PATCH", "/api/v1/endpoints/sec", json_body={"secret_environ": {"FAKE_TOKEN": "********"}})
    assert status == 200 and same["generation"] == created["generation"]
    _, same2 = await admin.call("PATCH", "/api/v1/endpoints/sec", json_body={"secret_environ": {"FAKE_TOKEN": secret}})
    assert same2["generation"] == created["generation"]
    _, changed = await admin.call("PATCH", "/api/v1/endpoints/sec", json_body={"secret_environ": {"FAKE_TOKEN": secret + "-2"}})
    assert changed["generation"] == created["generation"] + 1
    status, body = await admin.call("PATCH", "/api/v1/endpoints/sec", json_body={"secret_environ": {"NEW": "********"}})
    assert status == 422 and body["error"]["code"] == "invalid_secret"
    status, body = await admin.call("PATCH", "/api/v1/endpoints/sec", json_body={"secret_environ": {"FAKE_PLAIN": "x"}})
    assert status == 422 and "either secret or not" in str(body)

    texts = [str(await admin.call("GET", path)) for path in ("/api/v1/endpoints", "/api/v1/endpoints/sec", "/api/v1/events?limit=1000",
                                                             "/api/v1/endpoints/sec/events")]
    texts.append(await (await admin.client.get(f"/api/v1/endpoints/sec/replicas/{replica['id']}/logs", headers=admin.headers)).text())
    texts.append("\n".join(r.getMessage() for r in caplog.records))
    for text in texts:
        assert secret not in text
    db = admin.config.db_path
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert secret.encode() not in raw  # database and WAL
    assert "fernet:" in str(sqlite3.connect(db).execute("select spec from endpoints where name='sec'").fetchone())
    assert (admin.config.secret_key_path.stat().st_mode & 0o777) == 0o600


async def _healthy(admin: Admin, name: str) -> bool:
    _, body = await admin.call("GET", f"/api/v1/endpoints/{name}")
    return body["status"] == "HEALTHY"


async def test_auth_failures_are_recorded_with_a_cap(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    for i in range(12):
        await chat(admin, "a", bearer(f"ak-wrong-{i}"))
    _, events = await admin.call("GET", "/api/v1/usage")  # reading usage flushes what is pending
    _, events = await admin.call("GET", "/api/v1/events?kind=auth&limit=100")
    failures = [e for e in events["data"] if e["kind"] == "auth.failure"]
    suppressed = [e for e in events["data"] if e["kind"] == "auth.failure.suppressed"]
    assert len(failures) == 5 and failures[0]["details"]["code"] == "invalid_api_key"
    assert failures[0]["details"]["credential_prefix"] == "ak-wrong-" and failures[0]["details"]["path"] == "/v1/chat/completions"
    assert sum(e["details"]["count"] for e in suppressed) == 7


async def test_service_account_bad_input(admin: Admin) -> None:
    assert (await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "a", "role": "user"}))[0] == 201
    status, body = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "a", "role": "user"})
    assert status == 409 and body["error"]["code"] == "account_exists"
    status, body = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "b", "role": "root"})
    assert status == 422 and body["error"]["param"] == "role"
    status, body = await admin.call("PATCH", "/api/v1/service-accounts/sa_missing", json_body={"disabled": True})
    assert status == 404 and body["error"]["code"] == "account_not_found"
    status, body = await admin.call("POST", "/api/v1/service-accounts", data="{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"


async def test_anonymous_public_calls_count_under_an_empty_key(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "open", fake_folder(tmp_path, "open"), public=True)
    assert (await chat(admin, "open"))[0] == 200
    _, usage = await admin.call("GET", "/api/v1/usage?endpoint=open")
    (row,) = usage["data"]
    assert row["key_id"] == "" and row["key_name"] is None and row["requests"] == 1 and row["completion_tokens"] == 2


async def test_callers_without_a_key_cannot_tell_private_endpoints_from_missing_ones(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "secretive", fake_folder(tmp_path, "secretive"))
    private = await chat(admin, "secretive")
    missing = await chat(admin, "no-such-model")
    for answer in (private, missing):
        answer[1]["error"].pop("request_id")  # each request has its own
    assert private[0] == missing[0] == 401 and private[1] == missing[1] and private[1]["error"]["code"] == "missing_api_key"
    for path in ("/endpoints/secretive/v1/models", "/endpoints/no-such-model/v1/models"):
        resp = await admin.client.get(path)
        error = (await resp.json())["error"]
        assert resp.status == 401 and error.pop("request_id") and error == private[1]["error"]
    key = await new_key(admin)
    assert (await chat(admin, "no-such-model", bearer(key["key"])))[0] == 404  # a caller with a key learns what exists


@pytest.mark.parametrize(("headers", "says"), [
    ({"Authorization": "ak-0123456789"}, "put `Bearer ` before the key"),
    ({"x-api-key": "ak-0123456789"}, "sent in an x-api-key header, which is not read"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "the Authorization scheme 'Basic' is not accepted"),
    ({"Authorization": "Bearer "}, "has the Bearer scheme but no key"),
])
async def test_a_key_sent_the_wrong_way_gets_a_precise_message(admin: Admin, tmp_path: Path, headers: dict[str, str], says: str) -> None:
    await healthy(admin, "precise", fake_folder(tmp_path, "precise"))
    status, body, _ = await chat(admin, "precise", headers)
    assert status == 401 and says in body["error"]["message"], body


async def test_without_public_endpoints_a_keyless_request_is_refused_before_its_body_is_read(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "guarded", fake_folder(tmp_path, "guarded"))
    url = admin.client.make_url("/v1/chat/completions")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    # 16 MB announced, none sent: an answer can only come from headers alone
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16000000\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    assert status_line.split()[1] == b"401"


async def test_the_token_endpoints_errors_match_their_documented_rfc_6749_schema(admin: Admin) -> None:
    from appliance.api.manage.oauth import OAuthErrorBody

    resp = await admin.client.post("/oauth/token", data={"grant_type": "password"}, headers={"Authorization": "Basic " + base64.b64encode(b"a:b").decode()})
    body = await resp.json()
    assert resp.status in (400, 401) and OAuthErrorBody.model_validate(body).error in ("unsupported_grant_type", "invalid_client")
    _, spec = await admin.call("GET", "/api/v1/openapi.json")
    assert spec["paths"]["/oauth/token"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OAuthErrorBody")
    assert spec["paths"]["/api/v1/endpoints/{name}"]["get"]["parameters"][0]["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,50}$"
