"""Service accounts and the OAuth2 client-credentials grant (RFC 6749 §4.4) that turns them into
short-lived access tokens (signed JWTs) for the gateway and the admin API."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import urllib.parse
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from appliance.api.http import MAX_BODY, Query, Route, json_response, page, read_model
from appliance.api.services import SERVICES
from appliance.api.manage.views import Deleted, View
from appliance.domain.specs import Model
from appliance.security.auth import ADMIN, ROLES, hash_key

if TYPE_CHECKING:
    from aiohttp.web_request import FileField
    from multidict import MultiDictProxy

PREFIX = "/api/v1"
Role = Literal["viewer", "user", "admin"]
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class AccountCreate(Model):
    name: str = Field(min_length=1, max_length=100)
    role: Role = Field(description="viewer: list models and read admin data; user: inference; admin: everything")
    metadata: dict[str, Any] = Field(default_factory=dict)


class AccountPatch(Model):
    name: str | None = Field(None, min_length=1, max_length=100)
    role: Role | None = None
    disabled: bool | None = Field(None, description="true: its tokens are refused at once, and it gets no new ones")
    metadata: dict[str, Any] | None = None


class AccountView(View):
    id: str
    object: Literal["service_account"] = "service_account"
    name: str
    role: Role
    client_id: str
    disabled: bool
    created_at: str
    disabled_at: str | None
    last_token_at: str | None
    metadata: dict[str, Any]


class AccountCreated(AccountView):
    client_secret: str = Field(description="shown this once, stored only as a hash")


class AccountList(View):
    object: Literal["list"] = "list"
    has_more: bool = Field(False, description="more items follow: ask again with after=<the last item's name or id>")
    data: list[AccountView]


class TokenResponse(View):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    scope: str


class TokenRequest(BaseModel):
    """The token endpoint's form (RFC 6749 §4.4.2). The client authenticates with HTTP Basic, or with
    client_id and client_secret here; unknown parameters are ignored, as §3.2 asks."""

    grant_type: Literal["client_credentials"]
    # A form field is there or not: no null in the document.
    scope: str | SkipJsonSchema[None] = Field(None, description="space-separated scopes; default: those of the account's role")
    client_id: str | SkipJsonSchema[None] = None
    client_secret: str | SkipJsonSchema[None] = None


class OAuthErrorBody(View):
    """RFC 6749 §5.2: the token endpoint's errors are not OpenAI-shaped."""

    error: Literal["invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type", "invalid_scope", "temporarily_unavailable"]
    error_description: str


class Rotated(View):
    rotated: bool = True
    detail: str


def _view(row: dict[str, Any]) -> AccountView:
    return AccountView(
        id=row["id"], name=row["name"], role=row["role"], client_id=row["client_id"], disabled=bool(row.get("disabled_at")),
        created_at=row["created_at"], disabled_at=row.get("disabled_at"), last_token_at=row.get("last_token_at"),
        metadata=json.loads(row.get("metadata") or "{}"),
    )


async def create_account(request: web.Request) -> web.Response:
    body = await read_model(request, AccountCreate, "service account")
    services = request.app[SERVICES]
    secret = "sas-" + secrets.token_urlsafe(32)
    row = {
        "id": "sa_" + secrets.token_hex(8), "name": body.name, "role": body.role, "client_id": "sa-" + secrets.token_hex(12),
        "secret_hash": hash_key(secret), "metadata": json.dumps(body.metadata),
    }
    stored = await services.store.accounts.insert(row, f"service account {body.name} created with role {body.role}")
    services.auth.put_account(stored, stored["id"])
    return json_response(AccountCreated(**_view(stored).model_dump(), client_secret=secret), status=201)


async def list_accounts(request: web.Request) -> web.Response:
    rows, more = page(request, await request.app[SERVICES].store.accounts.list(), lambda r: r["id"])
    return json_response(AccountList(data=[_view(r) for r in rows], has_more=more))


async def get_account(request: web.Request) -> web.Response:
    return json_response(_view(await request.app[SERVICES].store.accounts.get(request.match_info["id"])))


async def update_account(request: web.Request) -> web.Response:
    patch = await read_model(request, AccountPatch, "service account update")
    services = request.app[SERVICES]
    account_id = request.match_info["id"]
    current = await services.store.accounts.get(account_id)
    fields: dict[str, Any] = {}
    given = patch.model_fields_set
    if patch.name is not None:
        fields["name"] = patch.name
    if patch.role is not None:
        fields["role"] = patch.role
    if "disabled" in given and patch.disabled is not None and patch.disabled != bool(current.get("disabled_at")):
        fields["disabled_at"] = services.store.now() if patch.disabled else None
    if "metadata" in given:
        fields["metadata"] = json.dumps(patch.metadata or {})
    what = "disabled" if fields.get("disabled_at") else "enabled" if "disabled_at" in fields else "updated"
    row = await services.store.accounts.update(account_id, fields, f"service account {current['name']} {what}")
    services.auth.put_account(row, account_id)  # before the answer: a disabled account's tokens stop now
    return json_response(_view(row))


async def new_secret(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = request.match_info["id"]
    current = await services.store.accounts.get(account_id)
    secret = "sas-" + secrets.token_urlsafe(32)
    row = await services.store.accounts.update(account_id, {"secret_hash": hash_key(secret)}, f"service account {current['name']}: new client secret")
    services.auth.put_account(row, account_id)
    return json_response(AccountCreated(**_view(row).model_dump(), client_secret=secret))


async def delete_account(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = request.match_info["id"]
    current = await services.store.accounts.get(account_id)
    await services.store.accounts.delete(account_id, f"service account {current['name']} deleted")
    services.auth.put_account(None, account_id)
    return json_response(Deleted(id=account_id, object="service_account"))


async def rotate_signing_key(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    services.auth.signer.rotate()
    services.auth.forget_tokens()
    await services.store.events.add("oauth.key_rotated", "access-token signing key rotated: every earlier token is void")
    return json_response(Rotated(detail="every access token issued before now is refused; clients ask /oauth/token again"))


# --- the token endpoint (RFC 6749 §4.4, errors as §5.2) --------------------------------------------


def _oauth_error(status: int, error: str, description: str, *, basic: bool = False) -> web.Response:
    headers = dict(_NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="appliance"' if basic else 'Bearer realm="appliance"'
    body = {"error": error, "error_description": description}
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, basic: bool = False) -> None:
        super().__init__(description)
        self.response = _oauth_error(status, error, description, basic=basic)


def _basic_credentials(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise _OAuthError(401, "invalid_client", f"unsupported authentication scheme {scheme!r}; use HTTP Basic", basic=True)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _OAuthError(400, "invalid_request", "malformed Basic credentials: not base64 of client_id:client_secret") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise _OAuthError(400, "invalid_request", "malformed Basic credentials: expected client_id:client_secret")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before being joined
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | FileField]:
    """The form, or an RFC 6749 error: this endpoint's every answer is one."""
    try:
        return await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise _OAuthError(413, "invalid_request", f"the form is larger than the limit of {request.app[MAX_BODY]} bytes (server.max_body_bytes)") from None
    except (UnicodeDecodeError, LookupError):  # bytes that are not text in the charset, or a charset Python does not know
        raise _OAuthError(400, "invalid_request", f"the form is not text in its charset ({request.charset or 'utf-8'})") from None


async def token(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if not services.readiness.ready:
        return _oauth_error(503, "temporarily_unavailable", "the appliance is starting")
    try:
        if not request.content_type == "application/x-www-form-urlencoded":
            raise _OAuthError(400, "invalid_request", "send the parameters as application/x-www-form-urlencoded")
        form = await _form(request)
        fields = {k: form.getall(k) for k in form.keys()}
        for name, values in fields.items():
            if len(values) > 1:
                raise _OAuthError(400, "invalid_request", f"parameter {name} given more than once")
        params = {k: str(v[0]) for k, v in fields.items()}
        header = request.headers.get("Authorization")
        if header and ("client_id" in params and "client_secret" in params):
            raise _OAuthError(400, "invalid_request", "use one client authentication method: the Authorization header or the form body")
        if header:
            client_id, secret = _basic_credentials(header)
        elif "client_id" in params and "client_secret" in params:
            client_id, secret = params["client_id"], params["client_secret"]
        else:
            raise _OAuthError(401, "invalid_client", "client authentication required (HTTP Basic client_id:client_secret)", basic=True)
        grant = params.get("grant_type")
        if grant is None:
            raise _OAuthError(400, "invalid_request", "grant_type is required")
        if grant != "client_credentials":
            raise _OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported; use client_credentials")
        # Client ids are ASCII, and the constant-time comparison refuses non-ASCII strings with a TypeError.
        account = services.auth.account_by_client_id(client_id) if client_id.isascii() else None
        if account is None or not hmac.compare_digest(account.secret_hash, hash_key(secret)):
            services.accounting.auth_failure("invalid_client", request, client_id[:9])
            raise _OAuthError(401, "invalid_client", "unknown client or wrong secret", basic=bool(header))
        if account.disabled:
            services.accounting.auth_failure("account_disabled", request, client_id[:9])
            raise _OAuthError(401, "invalid_client", f"service account {account.name} is disabled", basic=bool(header))
        allowed = ROLES[account.role] | (ROLES["viewer"] | ROLES["user"] if ADMIN in ROLES[account.role] else frozenset())
        requested = frozenset(params.get("scope", "").split()) or ROLES[account.role]
        if not requested <= allowed:
            raise _OAuthError(400, "invalid_scope", f"role {account.role} allows the scopes {' '.join(sorted(allowed))}")
    except _OAuthError as exc:
        return exc.response
    ttl = services.config.auth.access_token_ttl_seconds
    access_token = services.auth.signer.issue(account, requested, ttl, services.clock())
    await services.store.accounts.touch(account.id)
    body = TokenResponse(access_token=access_token, expires_in=ttl, scope=" ".join(sorted(requested)))
    return web.Response(text=body.model_dump_json(), content_type="application/json", headers=_NO_STORE)


_ID = "{id}"
ROUTES = [
    Route("POST", f"{PREFIX}/service-accounts", create_account, "Create a service account (the client secret is in this answer only)",
          body=AccountCreate, response=AccountCreated, status=201, scope=ADMIN, tags=("oauth",)),
    Route("GET", f"{PREFIX}/service-accounts", list_accounts, "List service accounts", response=AccountList, scope=ADMIN,
          query=(Query("limit", "items per page (default 100, at most 1000)", "integer"), Query("after", "the last id of the previous page")), tags=("oauth",)),
    Route("GET", f"{PREFIX}/service-accounts/{_ID}", get_account, "Show a service account", response=AccountView, scope=ADMIN, tags=("oauth",)),
    Route("PATCH", f"{PREFIX}/service-accounts/{_ID}", update_account, "Rename, change role, disable or enable a service account",
          body=AccountPatch, response=AccountView, scope=ADMIN, tags=("oauth",)),
    Route("POST", f"{PREFIX}/service-accounts/{_ID}/secret", new_secret, "Issue a new client secret (the old one stops working)",
          response=AccountCreated, scope=ADMIN, tags=("oauth",)),
    Route("DELETE", f"{PREFIX}/service-accounts/{_ID}", delete_account, "Delete a service account", response=Deleted, scope=ADMIN, tags=("oauth",)),
    Route("POST", f"{PREFIX}/oauth/rotate-key", rotate_signing_key, "New access-token signing key: every earlier token is void",
          response=Rotated, scope=ADMIN, tags=("oauth",)),
    Route("POST", "/oauth/token", token, "OAuth2 client-credentials grant (RFC 6749 §4.4): form body, HTTP Basic client auth",
          body=TokenRequest, response=TokenResponse, error=OAuthErrorBody, auth=False, tags=("oauth",)),
]
