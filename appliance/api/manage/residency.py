"""Which endpoints are loaded, and loading or unloading one by hand: `POST /endpoints/{name}/load`,
`/unload`, and `GET /ps` (Ollama's `ps`: loaded endpoints, their memory and when they unload)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import Field

from appliance.api.http import Route, endpoint_name, json_response
from appliance.api.services import SERVICES
from appliance.control.supervision.residency import memory_books, resident, worker_trees
from appliance.domain.placement import visible
from appliance.domain.specs import Model
from appliance.errors import ApplianceError

PREFIX = "/api/v1"


class Resident(Model):
    endpoint: str
    status: str
    replicas: dict[str, str] = Field(description="live replica id → state")
    gpus: list[int] = Field(description="indices of the GPUs its replicas hold")
    gpu_claim: int | None = Field(description="bytes of GPU memory its replicas claim")
    host_claim: int | None = Field(description="bytes of host memory its replicas claim ([residency] host_memory_budget)")
    gpu_memory_used: int | None = Field(description="bytes of GPU memory NVML shows its processes using; null without NVML")
    in_flight: int
    idle_seconds: float = Field(description="since its last request (or its load)")
    unloads_in_seconds: float | None = Field(description="until keep_alive unloads it; null: not on demand, or keep_alive -1")
    pin: bool
    priority: int
    on_demand: bool


class Device(Model):
    device: str = Field(description="a GPU's index, or host")
    claimed: int
    budget: int


class ResidentList(Model):
    data: list[Resident]
    memory: list[Device] = Field(description="claims against each device's budget")


class LoadResult(Model):
    endpoint: str
    changed: bool = Field(description="false: it was already loaded (or already unloaded)")
    desired_replicas: int


async def ps(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    supervisor = services.supervisor
    try:
        gpus = visible(await services.gpus.inventory(), services.config.gpus.devices)
    except ApplianceError:
        gpus = []
    reserve = services.config.gpus.memory_reserve
    trees = await asyncio.to_thread(worker_trees(supervisor.runs())) if gpus else {}
    rows = resident(supervisor.runs(), supervisor.ledger, services.load, gpus, reserve, services.clock(), trees)
    claims, budgets = memory_books(supervisor.held(), supervisor.ledger.host_claims(), gpus, reserve, services.config.residency.host_memory_budget)
    index = {g.uuid: str(g.index) for g in gpus}
    memory = [Device(device=index.get(d, d), claimed=claims.get(d, 0), budget=b) for d, b in budgets.items()]
    return json_response(ResidentList(data=[Resident(**row) for row in rows], memory=memory))


async def _change(request: web.Request, load: bool) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    await services.endpoints.get(name)  # 404 for an unknown one
    residency = services.supervisor.residency
    changed = await (residency.load(name) if load else residency.unload(name))
    known = services.supervisor.desired_version(name)
    return json_response(LoadResult(endpoint=name, changed=changed, desired_replicas=known[0] if known else 0), status=202)


async def load_endpoint(request: web.Request) -> web.Response:
    return await _change(request, load=True)


async def unload_endpoint(request: web.Request) -> web.Response:
    return await _change(request, load=False)


ROUTES = [
    Route("GET", f"{PREFIX}/ps", ps, "Loaded endpoints: replicas, GPUs, memory claimed and in use, idle time, time until unload", response=ResidentList, tags=("residency",)),
    Route(
        "POST", f"{PREFIX}/endpoints/{{name}}/load", load_endpoint, "Load an endpoint that has no replica (as its first request would); 202 when started",
        response=LoadResult, status=202, tags=("residency",),
    ),
    Route(
        "POST", f"{PREFIX}/endpoints/{{name}}/unload", unload_endpoint, "Unload an on-demand endpoint: its replicas drain and stop (409 when pinned)",
        response=LoadResult, status=202, tags=("residency",),
    ),
]
