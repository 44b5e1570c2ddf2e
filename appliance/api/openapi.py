"""openapi.json, generated from the route table and the same models the handlers validate with."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from appliance import __version__
from appliance.api.http import Route
from appliance.api.views import ErrorResponse
from appliance.domain.specs import NAME_RE

_REF = "#/components/schemas/{model}"
# What a path parameter may be, so that generated requests reach the handlers' own checks.
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": NAME_RE.pattern},
    "id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
    "replica": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
}


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

    error = {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__, "tags": list(r.tags)}
        params = [{"name": p, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(p, {"type": "string"})} for p in re.findall(r"\{(\w+)\}", r.path)]
        params += [{"name": q.name, "in": "query", "required": False, "description": q.description, "schema": {"type": q.type}} for q in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(r.body, "validation")}}}
        ok: dict[str, Any] = {"description": "success"}
        if r.response is not None:
            ok["content"] = {"application/json": {"schema": ref(r.response, "serialization")}}
        failed = error if r.error is None else {"description": "error", "content": {"application/json": {"schema": ref(r.error, "serialization")}}}
        op["responses"] = {str(r.status): ok, "default": failed}
        op["security"] = [{"bearer": []}] if r.auth else []
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
