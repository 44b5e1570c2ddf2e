"""openapi.json, generated from the route table and the same models the handlers validate with."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from appliance import __version__
from appliance.api.http import Route
from appliance.api.manage.views import ErrorResponse
from appliance.domain.specs import NAME_RE

_REF = "#/components/schemas/{model}"
# What a path parameter may be, so that generated requests reach the handlers' own checks.
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": NAME_RE.pattern},
    "id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
    "replica": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
}
_ERRORS = {
    400: "malformed request: the body, an endpoint name or a query parameter",
    401: "no valid credential",
    403: "the credential lacks the scope this operation needs",
    404: "no such endpoint, replica, key, token, rule, service account or model",
    408: "the request body stalled",
    409: "conflicts with the current state",
    413: "the request body is larger than server.max_body_bytes",
    422: "well-formed but invalid: every problem is listed",
    503: "the appliance is starting (Retry-After)",
}
# Statuses a handler answers beyond those its route's shape implies (auth, body, path and query
# parameters), by operationId.
_MORE_ERRORS: dict[str, tuple[int, ...]] = {
    "create_endpoint": (409,),
    "update_endpoint": (409,),
    "update_key": (409,),
    "revoke_key": (409,),
    "create_account": (409,),
    "create_model": (409,),  # the name is taken, or the model does not fit on the disk or in the cache
    "warm_model": (409,),
    "delete_model": (409,),  # an endpoint serves it
    "unload_endpoint": (409,),  # pinned, or not on demand
    "get_usage": (422,),
    "metrics": (401, 403),  # unless [metrics] public
    "login": (401, 403, 503),  # the console's: a wrong key, a key without the read scope, another site's page
}
# Routes that check a key themselves, and only when the config asks for one.
_OPTIONAL_AUTH = {"metrics"}
# Bodies sent as a form, not JSON: the OAuth token endpoint (RFC 6749 §4.4.2).
_FORM = {"token"}
# Answers that are not JSON models: operationId → (media type, schema).
_RAW: dict[str, tuple[str, dict[str, Any]]] = {
    "openapi": ("application/json", {"type": "object"}),
    "replica_logs": ("text/plain", {"type": "string"}),
    "metrics": ("text/plain", {"type": "string", "description": "Prometheus text format 0.0.4"}),
    "validate_endpoint": ("text/event-stream", {"type": "string", "description": "events state, log and, last, verdict"}),
}


def error_statuses(route: Route) -> list[int]:
    """Every error status the route answers with (besides a 500 for a fault of the appliance's own)."""
    if route.error is not None:  # the OAuth token endpoint: RFC 6749 §5.2 errors
        return [400, 401, 413, 503]
    if route.handler.__name__ == "readyz":
        return [503]
    codes: set[int] = set(_MORE_ERRORS.get(route.handler.__name__, ()))
    if route.auth:
        codes |= {401, 403, 503}
    if route.body is not None:
        codes |= {400, 408, 413, 422}
    path_params = re.findall(r"\{(\w+)\}", route.path)
    if path_params:
        codes.add(404)  # also the router's answer to a path that matches no route
    if "name" in path_params or any(q.type == "integer" for q in route.query):
        codes.add(400)
    return sorted(codes)


def _failed(route: Route, code: int, ok: dict[str, Any], ref: Callable[[type[BaseModel], JsonSchemaMode], dict[str, Any]]) -> dict[str, Any]:
    if route.handler.__name__ == "readyz":  # its own body, saying why
        return {"description": "not ready: starting, or startup failed", "content": ok["content"]}
    if route.error is not None:
        return {"description": "RFC 6749 §5.2 error", "content": {"application/json": {"schema": ref(route.error, "serialization")}}}
    return {"description": _ERRORS[code], "content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]
    for r in routes:
        if r.body is not None:
            wanted.append((r.body, "validation"))
        if r.response is not None:
            wanted.append((r.response, "serialization"))
        if r.error is not None:
            wanted.append((r.error, "serialization"))
    wanted = list(dict.fromkeys(wanted))
    refs, defs = models_json_schema(wanted, ref_template=_REF)

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return refs[(model, mode)]

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        name = r.handler.__name__
        op: dict[str, Any] = {"summary": r.summary, "operationId": name, "tags": list(r.tags)}
        params = [{"name": p, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(p, {"type": "string"})} for p in re.findall(r"\{(\w+)\}", r.path)]
        params += [{"name": q.name, "in": "query", "required": False, "description": q.description, "schema": {"type": q.type}} for q in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            media = "application/x-www-form-urlencoded" if name in _FORM else "application/json"
            op["requestBody"] = {"required": True, "content": {media: {"schema": ref(r.body, "validation")}}}
        ok: dict[str, Any] = {"description": "success"}
        if r.response is not None:
            ok["content"] = {"application/json": {"schema": ref(r.response, "serialization")}}
        elif name in _RAW:
            media, schema = _RAW[name]
            ok["content"] = {media: {"schema": schema}}
        op["responses"] = {str(r.status): ok} | {str(code): _failed(r, code, ok, ref) for code in error_statuses(r)}
        op["security"] = [{"bearer": []}] if r.auth else [{"bearer": []}, {}] if name in _OPTIONAL_AUTH else []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "appliance admin API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an admin key (state_dir/admin.key)"}},
        },
    }
