"""Who may call which endpoint through the gateway: decided from the headers, before a body is read,
and answered alike for a private endpoint and a missing one (names cannot be probed)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

from aiohttp import web

from appliance.api.services import SERVICES
from appliance.domain.routes import is_inference_route
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError
from appliance.security.auth import ADMIN, INFERENCE, Authenticator, Principal
from appliance.security.sessions import Origin, missing_credential

# Why an anonymous caller would be refused; made only when it is (a public endpoint's anonymous calls,
# the common case there, never build the error).
Refusal = ApplianceError | Callable[[], ApplianceError]


def error_of(refusal: Refusal) -> ApplianceError:
    return refusal if isinstance(refusal, ApplianceError) else refusal()


async def caller(request: web.Request) -> tuple[Principal | None, Refusal | None]:
    """Who is calling, decided from the headers before any body is read: a principal, or None and why not."""
    return await identify_caller(request.app[SERVICES].auth, request)


async def identify_caller(auth: Authenticator, origin: Origin) -> tuple[Principal | None, Refusal | None]:
    """`caller` for any origin (a gRPC call's metadata too): nothing is recorded yet, the refusal is decided later."""
    headers = origin.headers
    if "Authorization" not in headers and "Cookie" not in headers:
        return None, partial(missing_credential, origin)
    try:
        return await auth.identify(origin, record=False), None
    except ApplianceError as err:
        return None, err


def refuse_unless_public(request: web.Request, refusal: Refusal | None) -> None:
    """An anonymous caller is refused before its body is read when no endpoint is public."""
    table = request.app[SERVICES].supervisor.table
    if refusal is not None and not any(c.public for c in table.endpoints.values()):
        raise request.app[SERVICES].auth.refuse(request, error_of(refusal))


def authorize(request: web.Request, principal: Principal | None, refusal: Refusal | None, name: str, config: EndpointConfig | None) -> Principal | None:
    """The principal the call runs as (None: anonymous on a public endpoint). Without a valid credential
    the answer is the same 401 whether the endpoint is private or does not exist: names are not probed."""
    def not_found() -> ApplianceError:  # asked only of a known caller
        hint = did_you_mean(request, principal, name) if principal is not None else ""
        return ApplianceError(f"The model '{name}' does not exist{hint}", status=404, code="model_not_found", param="model")

    return admit_caller(request.app[SERVICES].auth, request, principal, refusal, config, not_found)


def admit_caller(
    auth: Authenticator, origin: Origin, principal: Principal | None, refusal: Refusal | None, config: EndpointConfig | None,
    not_found: Callable[[], ApplianceError], *, admin_only: str | None = None,
) -> Principal | None:
    """The rules every transport applies to a call for endpoint `config` (None: no such endpoint): anonymous
    only on a public endpoint; a key that may not use a public endpoint gets in anonymously; otherwise the
    inference scope and the key's endpoint list. `admin_only` says why a call acts on the whole server: then it
    needs an admin key, and anonymous calls are refused even on a public endpoint."""
    if principal is None:
        if config is None or not config.public or admin_only:
            assert refusal is not None
            raise auth.refuse(origin, error_of(refusal))
        return None
    if config is None:
        raise not_found()
    if config.public and not admin_only and not (principal.has(INFERENCE) and principal.allows(config.name)):
        return None  # on a public endpoint a key that may not use it still gets in, anonymously
    if not principal.has(INFERENCE):
        raise auth.refuse(origin, ApplianceError(
            f"{principal.name!r} lacks the 'inference' scope (it has: {', '.join(sorted(principal.scopes)) or 'none'})", status=403, code="insufficient_scope",
        ))
    auth.check_endpoint(origin, principal, config.name)
    if admin_only and not principal.has(ADMIN):
        raise auth.refuse(origin, ApplianceError(f"{admin_only}: it needs an admin key", status=403, code="route_not_allowed"))
    return principal


def check_route(request: web.Request, principal: Principal | None, config: EndpointConfig, path: str) -> None:
    """An engine's control routes (not inference) need an admin key: they act on every caller's engine."""
    if is_inference_route(config.runtime, path) or (principal is not None and principal.has(ADMIN)):
        return
    raise request.app[SERVICES].auth.refuse(request, ApplianceError(
        f"{path.split('?', 1)[0]} is not an inference route of the {config.runtime} runtime: it needs an admin key",
        status=403, code="route_not_allowed",
    ))


def lookup(request: web.Request, model: str) -> tuple[str, EndpointConfig | None]:
    table = request.app[SERVICES].supervisor.table
    name = table.resolve(model)
    if name is None or name not in table.endpoints:
        return model, None
    return name, table.endpoints[name]


def did_you_mean(request: web.Request, principal: Principal, name: str) -> str:
    """A hint naming the endpoints (or aliases) closest to a name that is not one, among those the caller
    may use, as /v1/models lists them for it: a credential never learns of names it could not call."""
    table = request.app[SERVICES].supervisor.table
    names = [n for n, endpoint in table.names.items() if (cfg := table.endpoints.get(endpoint)) is not None and (cfg.public or principal.allows(endpoint))]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:
        return ""
    quoted = [f"'{n}'" for n in close]
    return "; did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
