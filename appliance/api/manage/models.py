"""Admin API for the model registry (/api/v1/models), and the registry's place in the app's life:
started (declared models, interrupted warms resumed) before declared endpoints are applied, stopped
before the workers are. Credentials are only ever named, never shown."""

from __future__ import annotations

import functools
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from appliance.api.http import Query, Route, json_response, page, read_model
from appliance.api.services import SERVICES, Services
from appliance.api.manage.views import Deleted, View
from appliance.config import Config
from appliance.control.models.declared import apply_declared, prune_declared
from appliance.control.models.registry import Registry
from appliance.domain.models import ModelSpec, ModelState
from appliance.domain.specs import NAME_RE, NAME_RULE
from appliance.domain.states import EndpointStatus
from appliance.errors import ApplianceError

PREFIX = "/api/v1/models"
REGISTRY = web.AppKey("model_registry", Registry)
DEMAND_SECONDS = 2.0  # how often models that endpoints need but that are not on disk are looked for


class ModelProgress(View):
    bytes_total: int = 0
    bytes_done: int = Field(0, description="bytes present and verified, or written (resumed parts included)")
    percent: float = 0.0
    files_total: int = 0
    files_done: int = 0
    bytes_fetched: int = Field(0, description="bytes read from the source by this warm (what a resume saved is not counted)")
    bytes_per_second: float | None = Field(None, description="over the last 10 s while warming; the average once done")
    eta_seconds: float | None = Field(None, description="at the current rate; null until something has moved")
    started_at: str | None = None
    elapsed_seconds: float | None = None
    refetched: list[str] = Field(default_factory=list, description="files whose size or sha256 did not match and were fetched again")


class ModelFile(View):
    path: str
    size: int
    sha256: str | None = Field(description="null until the file was first fetched")


class ModelView(View):
    object: Literal["model"] = "model"
    name: str
    revision: str
    source: str = Field(description="an absolute path or s3://bucket/prefix/")
    endpoint_url: str | None
    region: str | None
    credentials: str | None = Field(description="the name of a [models.credentials] entry; its secrets are never shown")
    description: str = ""
    origin: Literal["api", "config"] = Field(description="config: declared in the config file and managed by it")
    state: ModelState
    local_path: str = Field(description="where endpoints serve it from once READY: state_dir/models/<name>/<revision>")
    size: int
    files: int
    progress: ModelProgress
    last_error: str
    last_used_at: str | None
    ready_at: str | None
    created_at: str
    updated_at: str
    used_by: list[str] = Field(description="endpoints that serve it (it cannot be deleted while there are any)")
    manifest: list[ModelFile] | None = Field(None, description="every file with its size and sha256 (one model's answer only)")


class ModelList(View):
    object: Literal["list"] = "list"
    has_more: bool = Field(False, description="more items follow: ask again with after=<the last item's name>")
    data: list[ModelView]


def _view(registry: Registry, row: dict[str, Any], used_by: list[str], *, manifest: bool = False) -> ModelView:
    live = registry.live(row["name"]) if row["state"] == ModelState.WARMING.value else None
    keys = ("name", "revision", "source", "endpoint_url", "region", "credentials", "origin", "state", "local_path", "size", "files", "last_error",
            "last_used_at", "ready_at", "created_at", "updated_at")
    return ModelView.model_validate({
        **{k: row[k] for k in keys}, "description": row["spec"].get("description", ""), "progress": live or row["progress"] or {},
        "used_by": used_by, "manifest": row["manifest"] if manifest else None,
    })


def model_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_RE.match(name):
        raise ApplianceError(f"invalid model name {name!r}: {NAME_RULE}", status=400, code="invalid_name", param="name")
    return name


async def _one(request: web.Request, row: dict[str, Any]) -> web.Response:
    users = await request.app[SERVICES].store.models.users(row["name"])
    return json_response(_view(request.app[REGISTRY], row, users, manifest=True))


async def create_model(request: web.Request) -> web.Response:
    spec = await read_model(request, ModelSpec, "model")
    row = await request.app[REGISTRY].register(spec)
    return json_response(_view(request.app[REGISTRY], row, [], manifest=True), status=201)


async def list_models(request: web.Request) -> web.Response:
    store = request.app[SERVICES].store
    rows, more = page(request, await store.models.list(), lambda r: r["name"])
    used = await store.models.in_use()
    return json_response(ModelList(data=[_view(request.app[REGISTRY], r, used.get(r["name"], [])) for r in rows], has_more=more))


async def get_model(request: web.Request) -> web.Response:
    return await _one(request, await request.app[REGISTRY].get(model_name(request)))


async def warm_model(request: web.Request) -> web.Response:
    row = await request.app[REGISTRY].warm(model_name(request))
    users = await request.app[SERVICES].store.models.users(row["name"])
    return json_response(_view(request.app[REGISTRY], row, users, manifest=True), status=202)


async def delete_model(request: web.Request) -> web.Response:
    name = model_name(request)
    await request.app[REGISTRY].delete(name)
    return json_response(Deleted(id=name, object="model"))


_LIST_QUERY = (Query("limit", "items per page (default 100, at most 1000)", "integer"), Query("after", "the last name of the previous page"))
ROUTES = [
    Route("POST", PREFIX, create_model, "Register a model from a path or an S3 prefix (and start its warm unless warm=false)",
          body=ModelSpec, response=ModelView, status=201, tags=("models",)),
    Route("GET", PREFIX, list_models, "List models with their state and warm progress", response=ModelList, query=_LIST_QUERY, tags=("models",)),
    Route("GET", f"{PREFIX}/{{name}}", get_model, "Show one model, with its manifest", response=ModelView, tags=("models",)),
    Route("POST", f"{PREFIX}/{{name}}/warm", warm_model,
          "Copy the model to local disk, resuming what an earlier warm left; a READY copy is verified and what does not match is fetched again",
          response=ModelView, status=202, tags=("models",)),
    Route("DELETE", f"{PREFIX}/{{name}}", delete_model, "Delete a model and its local copy (409 while an endpoint serves it)", response=Deleted, tags=("models",)),
]


# --- the registry's life in the app ------------------------------------------------------------------


async def _retry_endpoints(services: Services, model: str) -> None:
    """A model became READY: endpoints that failed with it start again."""
    for name in (await services.store.models.in_use()).get(model, []):
        row = await services.store.endpoints.get(name)
        if row is not None and row["status"] == EndpointStatus.ERROR.value:
            await services.supervisor.retry(name)


def attach_models(app: web.Application) -> None:
    """The registry, made while the app may still take new state (before it serves); started by start_models."""
    services = app[SERVICES]
    app[REGISTRY] = Registry(services.config, services.store, services.clock, services.vault, functools.partial(_retry_endpoints, services))


async def start_models(app: web.Application) -> list[str]:
    """At startup, before declared endpoints (which may name declared models): resume interrupted warms,
    register and warm declared models, and look for models endpoints need. Returns the problems met."""
    services = app[SERVICES]
    registry = app[REGISTRY]
    await registry.start()
    problems = await apply_declared(registry, services.store, services.config.models.declared)
    services.jobs.every("models.demand", DEMAND_SECONDS, registry.warm_wanted)
    return problems


async def reload_models(app: web.Application, config: Config) -> list[str]:
    """On reload: the new [models] settings, and the declared models registered or updated."""
    registry = app[REGISTRY]
    registry.reconfigure(config)
    return await apply_declared(registry, app[SERVICES].store, config.models.declared)


async def prune_models(app: web.Application, config: Config) -> list[str]:
    """After declared endpoints are applied: declared models no longer in the file are deleted."""
    return await prune_declared(app[REGISTRY], app[SERVICES].store, config.models.declared)


async def stop_models(app: web.Application) -> None:
    """Warms stop at their next chunk; they resume at the next start."""
    if REGISTRY in app:
        await app[REGISTRY].stop()
