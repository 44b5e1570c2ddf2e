"""Admin API for who may call and how much: API keys, endpoint tokens, usage."""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from appliance.api.http import Query, Route, endpoint_name, json_response, page, read_model
from appliance.api.services import SERVICES, Services
from appliance.api.manage.views import Deleted, View
from appliance.domain.limits import Limits
from appliance.domain.specs import INT64_MAX, Model, Name
from appliance.domain.timefmt import BAI_DURATION_HELP, LATEST, parse_duration, parse_instant, parse_since, token_expiry
from appliance.errors import ApplianceError
from appliance.security.auth import ADMIN, INFERENCE, TOKEN_PREFIX, key_row, new_key
from appliance.security.usage import hour_label
from appliance.store import iso, parse_iso

PREFIX = "/api/v1"
Scope = Literal["admin", "inference", "read"]
Duration = str | int


class KeyCreate(Model):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[Scope] = Field(default_factory=lambda: [INFERENCE], min_length=1, description="admin covers everything")
    endpoints: list[Name] | None = Field(None, description="endpoints this key may call; null: all")
    expires_at: str | None = Field(None, description="ISO 8601 date or time; null: never")
    expires_in: Duration | None = Field(None, description="instead of expires_at: 30d, 12h, 15m or seconds")
    rpm_limit: int | None = Field(None, ge=1, le=INT64_MAX, description="requests per minute")
    tpm_limit: int | None = Field(None, ge=1, le=INT64_MAX, description="prompt + completion tokens per minute")
    max_parallel_requests: int | None = Field(None, ge=1, le=INT64_MAX)
    metadata: dict[str, Any] = Field(default_factory=dict)


class KeyPatch(Model):
    """Fields to change; null removes a limit, the allow-list (all endpoints) or the expiry (never)."""

    name: str | None = Field(None, min_length=1, max_length=100)
    scopes: list[Scope] | None = Field(None, min_length=1)
    endpoints: list[Name] | None = None
    expires_at: str | None = None
    expires_in: Duration | None = None
    rpm_limit: int | None = Field(None, ge=1, le=INT64_MAX)
    tpm_limit: int | None = Field(None, ge=1, le=INT64_MAX)
    max_parallel_requests: int | None = Field(None, ge=1, le=INT64_MAX)
    metadata: dict[str, Any] | None = None


class KeyView(View):
    id: str
    object: Literal["api_key", "endpoint_token"]
    name: str
    prefix: str = Field(description="first characters of the key, to recognise it")
    status: Literal["active", "expired", "revoked"]
    scopes: list[str]
    endpoints: list[str] | None
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None = Field(description="written in batches, up to [auth] usage_flush_seconds late")
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    metadata: dict[str, Any]


class KeyCreated(KeyView):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class KeyList(View):
    object: Literal["list"] = "list"
    has_more: bool = Field(False, description="more items follow: ask again with after=<the last item's name or id>")
    data: list[KeyView]


class TokenCreate(Model):
    """Backend.AI's "Generate Token": a credential for one endpoint that ends at a set time."""

    valid_until: int | float | str | None = Field(
        None, description="when it ends: Unix epoch seconds (1767225600 or \"1767225600\", as Backend.AI) or ISO 8601 "
        "(2027-01-01T09:00:00+09:00; no zone: UTC); wins over duration",
    )
    duration: int | float | str | None = Field(
        None, description=f"Backend.AI TimeDuration from now: {BAI_DURATION_HELP}; e.g. 3600, 90m, 1.5h, 7d, 2w, 2mo, 1yr",
    )
    name: str | None = Field(None, max_length=100)


class TokenCreated(KeyView):
    token: str = Field(description="send as `Authorization: BackendAI <token>` or `Bearer <token>`; shown this once")


class UsageRow(View):
    hour: str = Field(description="UTC hour, e.g. 2026-11-23T11")
    key_id: str = Field(description="empty for calls without a key to public endpoints")
    key_name: str | None
    endpoint: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int


class UsageTotals(View):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0


class UsageList(View):
    object: Literal["list"] = "list"
    data: list[UsageRow]
    totals: UsageTotals


def key_view(row: dict[str, Any], now: float) -> KeyView:
    expires = row.get("expires_at")
    status = "revoked" if row.get("revoked_at") else "expired" if expires and parse_iso(expires) <= now else "active"
    return KeyView(
        id=row["id"], object="endpoint_token" if row["kind"] == "endpoint_token" else "api_key", name=row["name"], prefix=row["prefix"],
        status=status, scopes=json.loads(row["scopes"]), endpoints=json.loads(row["endpoints"]) if row.get("endpoints") else None,
        created_at=row["created_at"], expires_at=expires, revoked_at=row.get("revoked_at"), last_used_at=row.get("last_used_at"),
        rpm_limit=row.get("rpm_limit"), tpm_limit=row.get("tpm_limit"), max_parallel_requests=row.get("max_parallel_requests"),
        metadata=json.loads(row.get("metadata") or "{}"),
    )


def _expiry(at: str | None, within: Duration | None, now: float, *, at_name: str, within_name: str) -> str | None:
    if at is not None and within is not None:
        raise ApplianceError(f"give {at_name} or {within_name}, not both", status=422, code="invalid_expiry", param=within_name)
    if within is not None:
        param, moment = within_name, now + parse_duration(within, param=within_name)
    elif at is None:
        return None
    else:
        param, moment = at_name, parse_instant(at, param=at_name)
        if moment <= now:
            raise ApplianceError(f"{at_name} {at} is in the past", status=422, code="invalid_expiry", param=at_name)
    if moment > LATEST:  # beyond what a date can hold
        raise ApplianceError(f"{param}: the expiration time is too far in the future (after 9999-12-31)", status=422, code="invalid_expiry", param=param)
    return iso(moment)


async def _known_endpoints(services: Services, names: list[str] | None) -> list[str] | None:
    if names is None:
        return None
    known = {row["name"] for row in await services.endpoints.list()}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ApplianceError(f"no endpoint named {', '.join(unknown)}", status=422, code="endpoint_not_found", param="endpoints")
    return names


def _key_id(request: web.Request) -> str:
    return request.match_info["id"]


async def create_key(request: web.Request) -> web.Response:
    body = await read_model(request, KeyCreate, "key")
    services = request.app[SERVICES]
    now = services.clock()
    expires = _expiry(body.expires_at, body.expires_in, now, at_name="expires_at", within_name="expires_in")
    key = new_key()
    row = key_row(
        key, body.name, body.scopes, endpoints=await _known_endpoints(services, body.endpoints), expires_at=expires,
        limits=Limits(body.rpm_limit, body.tpm_limit, body.max_parallel_requests), metadata=body.metadata,
    )
    stored = await services.store.keys.insert(row, f"key {body.name} created with scopes {', '.join(body.scopes)}")
    services.auth.put_key(stored)
    return json_response(KeyCreated(**key_view(stored, now).model_dump(), key=key), status=201)


async def list_keys(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    now = services.clock()
    await services.accounting.flush()  # last-used times still in memory
    rows = await services.store.keys.list(kind="key")
    views = [key_view(r, now) for r in rows]
    wanted = request.query.get("status")
    shown, more = page(request, [v for v in views if wanted is None or v.status == wanted], lambda v: v.id)
    return json_response(KeyList(data=shown, has_more=more))


async def get_key(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await services.accounting.flush()
    return json_response(key_view(await services.store.keys.get(_key_id(request)), services.clock()))


async def update_key(request: web.Request) -> web.Response:
    patch = await read_model(request, KeyPatch, "key update")
    services = request.app[SERVICES]
    now = services.clock()
    key_id = _key_id(request)
    current = await services.store.keys.get(key_id)
    if current.get("revoked_at"):
        raise ApplianceError(f"key {key_id} is revoked; create a new one", status=409, code="key_revoked")
    given = patch.model_fields_set
    fields: dict[str, Any] = {}
    if "name" in given and patch.name is not None:
        fields["name"] = patch.name
    if "scopes" in given and patch.scopes is not None:
        if ADMIN in json.loads(current["scopes"]) and ADMIN not in patch.scopes and not services.auth.count_admin_keys(exclude=key_id):
            raise ApplianceError("this is the last active admin key; create another admin key first", status=409, code="last_admin_key")
        fields["scopes"] = json.dumps(sorted(set(patch.scopes)))
    if "endpoints" in given:
        names = await _known_endpoints(services, patch.endpoints)
        fields["endpoints"] = None if names is None else json.dumps(sorted(set(names)))
    if given & {"expires_at", "expires_in"}:
        fields["expires_at"] = _expiry(patch.expires_at, patch.expires_in, now, at_name="expires_at", within_name="expires_in")
    for name in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
        if name in given:
            fields[name] = getattr(patch, name)
    if "metadata" in given:
        fields["metadata"] = json.dumps(patch.metadata or {})
    row = await services.store.keys.update(key_id, fields, "key.updated", f"key {current['name']} updated")
    services.auth.put_key(row)
    return json_response(key_view(row, now))


async def _revoke(services: Services, row: dict[str, Any], what: str) -> dict[str, Any]:
    if row.get("revoked_at"):
        return row
    updated = await services.store.keys.update(row["id"], {"revoked_at": iso(services.clock())}, "key.revoked", f"{what} {row['name']} revoked")
    services.auth.put_key(updated)  # before the answer: the next request with it is refused
    services.limiter.forget(row["id"])
    return updated


async def revoke_key(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    row = await services.store.keys.get(_key_id(request))
    if row["kind"] != "key":
        raise ApplianceError(f"{row['id']} is an endpoint token; revoke it under its endpoint", status=404, code="key_not_found", param="id")
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    if ADMIN in json.loads(row["scopes"]) and not row.get("revoked_at") and not force and not services.auth.count_admin_keys(exclude=row["id"]):
        raise ApplianceError(
            "this is the last active admin key: revoking it locks the admin API until `appliance admin-key reset` (add ?force=true)",
            status=409, code="last_admin_key",
        )
    await _revoke(services, row, "key")
    return json_response(Deleted(id=row["id"], object="api_key"))


# --- endpoint tokens ------------------------------------------------------------------------------


async def create_token(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    body = await read_model(request, TokenCreate, "token")
    services = request.app[SERVICES]
    await services.endpoints.get(name)
    now = services.clock()
    expires = iso(token_expiry(body.valid_until, body.duration, now))
    token = new_key(TOKEN_PREFIX)
    row = key_row(token, body.name or f"token for {name}", [INFERENCE], kind="endpoint_token", endpoints=[name], expires_at=expires)
    stored = await services.store.keys.insert(row, f"token for endpoint {name} created, valid until {expires}", endpoint=name)
    services.auth.put_key(stored)
    return json_response(TokenCreated(**key_view(stored, now).model_dump(), token=token), status=201)


async def list_tokens(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    await services.endpoints.get(name)
    now = services.clock()
    rows = await services.store.keys.list(kind="endpoint_token", endpoint=name)
    shown, more = page(request, [key_view(r, now) for r in rows], lambda v: v.id)
    return json_response(KeyList(data=shown, has_more=more))


async def revoke_token(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    row = await services.store.keys.get(request.match_info["id"])
    if row["kind"] != "endpoint_token" or name not in json.loads(row["endpoints"] or "[]"):
        raise ApplianceError(f"endpoint {name} has no token {row['id']}", status=404, code="token_not_found", param="id")
    await _revoke(services, row, "endpoint token")
    return json_response(Deleted(id=row["id"], object="endpoint_token"))


# --- usage ------------------------------------------------------------------------------------------


def _hour(moment: float) -> str:
    # Usage hours lie between 1970 and 9999: an instant outside (1000000d ago, year 1 in a zone east of
    # UTC) selects the same hours as that edge, and has no label of its own.
    return hour_label(int(min(max(moment, 0.0), LATEST) // 3600))


async def get_usage(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    now = services.clock()
    since = request.query.get("since") or _USAGE_WINDOW  # never the whole table by default
    until = request.query.get("until")
    await services.accounting.flush()  # what is still in memory counts too
    rows = await services.store.usage.query(
        key_id=request.query.get("key"),
        endpoint=request.query.get("endpoint"),
        since=_hour(parse_since(since, now, param="since")),
        until=_hour(parse_instant(until, param="until")) if until else None,
    )
    names = {r["id"]: r["name"] for r in await services.store.keys.list()} | {r["id"]: r["name"] for r in await services.store.accounts.list()}
    data = [UsageRow(**r, key_name=names.get(r["key_id"])) for r in rows]
    totals = UsageTotals(**{f: sum(getattr(d, f) for d in data) for f in UsageTotals.model_fields})
    return json_response(UsageList(data=data, totals=totals))


_ID = "{id}"
_USAGE_WINDOW = "30d"
ROUTES = [
    Route("POST", f"{PREFIX}/keys", create_key, "Create an API key (the key is in this answer only)", body=KeyCreate, response=KeyCreated,
          status=201, scope=ADMIN, tags=("keys",)),
    Route("GET", f"{PREFIX}/keys", list_keys, "List API keys (never the keys themselves)", response=KeyList, scope=ADMIN,
          query=(Query("status", "active | expired | revoked"), Query("limit", "items per page (default 100, at most 1000)", "integer"),
                 Query("after", "the last id of the previous page")), tags=("keys",)),
    Route("GET", f"{PREFIX}/keys/{_ID}", get_key, "Show an API key", response=KeyView, scope=ADMIN, tags=("keys",)),
    Route("PATCH", f"{PREFIX}/keys/{_ID}", update_key, "Change an API key's name, scopes, endpoints, expiry, limits or metadata",
          body=KeyPatch, response=KeyView, scope=ADMIN, tags=("keys",)),
    Route("DELETE", f"{PREFIX}/keys/{_ID}", revoke_key, "Revoke an API key (at once; kept for usage history)", response=Deleted,
          query=(Query("force", "true: revoke even the last admin key"),), scope=ADMIN, tags=("keys",)),
    Route("POST", f"{PREFIX}/endpoints/{{name}}/tokens", create_token, "Generate a token for this endpoint only, valid until a time",
          body=TokenCreate, response=TokenCreated, status=201, scope=ADMIN, tags=("keys",)),
    Route("GET", f"{PREFIX}/endpoints/{{name}}/tokens", list_tokens, "The endpoint's tokens", response=KeyList, scope=ADMIN,
          query=(Query("limit", "items per page (default 100, at most 1000)", "integer"), Query("after", "the last id of the previous page")),
          tags=("keys",)),
    Route("DELETE", f"{PREFIX}/endpoints/{{name}}/tokens/{_ID}", revoke_token, "Revoke an endpoint token", response=Deleted, scope=ADMIN,
          tags=("keys",)),
    Route("GET", f"{PREFIX}/usage", get_usage, "Requests, tokens and errors per key, endpoint and hour", response=UsageList,
          query=(Query("key", "a key, token or service-account id"), Query("endpoint", "an endpoint name"),
                 Query("since", "24h (ago) or an ISO date/time; default 30d"), Query("until", "an ISO date/time (exclusive)")), tags=("usage",)),
]
