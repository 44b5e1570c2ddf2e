"""Admin API (/api/v1): thin handlers over the endpoint service and the event log."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from aiohttp import web

from appliance.api.inference.gateway import GATEWAY
from appliance.api.http import Query, Route, endpoint_name, int_query, json_response, page, read_model
from appliance.api.services import SERVICES
from appliance.api.manage.views import (
    Deleted, EndpointList, EndpointView, EventList, EventView, GpuBudget, GpuHolder, GpuList, GpuView, ReplicaList, ReplicaView, RequestList, RequestView,
)
from appliance.control.supervision.replica import Replica
from appliance.control.host.replica_log import Keep
from appliance.domain.health import probe_access_line
from appliance.domain.memory import budget, fmt_bytes
from appliance.domain.memory import claim as memory_claim
from appliance.domain.placement import claimed, visible
from appliance.domain.specs import EndpointPatch, EndpointSpec, HealthCheck, Resources
from appliance.errors import ApplianceError
from appliance.security.vault import mask_argv
from appliance.store import iso

PREFIX = "/api/v1"
_EVENT_QUERY = (
    Query("limit", "how many events, newest first (1–1000, default 100)", "integer"),
    Query("before", "only events with a smaller id (paging)", "integer"),
    Query("kind", "only this kind, or kinds under it (endpoint → endpoint.created, …)"),
)


def _view(request: web.Request, row: dict, budgets: list[GpuBudget] | None = None) -> EndpointView:  # type: ignore[type-arg]
    services = request.app[SERVICES]
    view = EndpointView.of(row, services.supervisor.counts(row["name"]))
    res, overhead = view.resources, services.config.gpus.claim_overhead
    claim = memory_claim(res, view.memory_estimate, overhead)
    source = (
        "stated" if res.gpu_memory is not None else "estimate" if claim is not None
        else "share" if res.gpu_share is not None else "whole" if res.gpus else "none"
    )
    return view.model_copy(update={"gpu_memory_claim": claim, "claim_source": source, "gpu_budgets": budgets or []})


async def _budgets(request: web.Request) -> list[GpuBudget]:
    """Each usable GPU's budget and what replicas claim on it; none when NVML is not there."""
    services = request.app[SERVICES]
    try:
        gpus = visible(await services.gpus.inventory(), services.config.gpus.devices)
    except ApplianceError:
        return []
    held = services.supervisor.held()
    claims, whole = claimed(held), {u for a in held.values() if a.whole for u in a.uuids}
    reserve = services.config.gpus.memory_reserve
    return [
        GpuBudget(index=g.index, uuid=g.uuid, memory_total=g.memory_total, budget=(b := budget(g.memory_total, reserve)),
                  claimed=b if g.uuid in whole else claims.get(g.uuid, 0))
        for g in gpus
    ]


async def _check_claim(request: web.Request, resources: Resources | None) -> None:
    """A stated gpu_memory above every GPU's budget is refused now (422), not left to wait for ever."""
    if resources is None or resources.gpu_memory is None:
        return
    budgets = await _budgets(request)
    if not budgets:
        return  # no GPU seen: placement says so
    per_gpu = -(-resources.gpu_memory // max(1, resources.gpus))
    largest = max(budgets, key=lambda b: b.budget)
    if per_gpu > largest.budget:
        reserve = request.app[SERVICES].config.gpus.memory_reserve
        raise ApplianceError(
            f"resources.gpu_memory: {fmt_bytes(per_gpu)} per GPU is more than any GPU here can give: the largest budget is "
            f"{fmt_bytes(largest.budget)} (GPU {largest.index}: {fmt_bytes(largest.memory_total)} less the {fmt_bytes(reserve)} reserve)",
            status=422, code="invalid_field", param="resources.gpu_memory",
        )


async def create_endpoint(request: web.Request) -> web.Response:
    spec = await read_model(request, EndpointSpec, "endpoint")
    await _check_claim(request, spec.resources)
    row = await request.app[SERVICES].endpoints.create(spec)
    return json_response(_view(request, row), status=201)


async def list_endpoints(request: web.Request) -> web.Response:
    rows, more = page(request, await request.app[SERVICES].endpoints.list(), lambda r: r["name"])
    return json_response(EndpointList(data=[_view(request, r) for r in rows], has_more=more))


async def get_endpoint(request: web.Request) -> web.Response:
    row = await request.app[SERVICES].endpoints.get(endpoint_name(request))
    return json_response(_view(request, row, await _budgets(request)))


async def update_endpoint(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    patch = await read_model(request, EndpointPatch, "endpoint update")
    changes = patch.model_dump(mode="json", include=patch.model_fields_set)
    await _check_claim(request, patch.resources)
    row = await request.app[SERVICES].endpoints.update(name, changes)
    return json_response(_view(request, row))


async def delete_endpoint(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    await request.app[SERVICES].endpoints.delete(name)
    return json_response(Deleted(id=name, object="endpoint"))


async def _events(request: web.Request, endpoint: str | None) -> web.Response:
    limit = int_query(request, "limit", 100, low=1, high=1000) or 100
    before = int_query(request, "before", None, low=1)
    await request.app[SERVICES].accounting.flush()  # auth failures still in memory
    rows = await request.app[SERVICES].store.events.list(endpoint=endpoint, kind=request.query.get("kind"), limit=limit + 1, before=before)
    return json_response(EventList(data=[EventView(**r) for r in rows[:limit]], has_more=len(rows) > limit))


async def endpoint_events(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    if await services.store.endpoints.get(name) is None and not await services.store.events.list(endpoint=name, limit=1):
        raise ApplianceError(f"endpoint {name!r} not found and has no recorded events", status=404, code="endpoint_not_found")
    return await _events(request, name)


async def all_events(request: web.Request) -> web.Response:
    return await _events(request, request.query.get("endpoint"))


def _replica_view(r: Replica, inflight: int) -> ReplicaView:
    health = r.health
    return ReplicaView(
        inflight=inflight,
        id=r.id,
        endpoint=r.endpoint,
        generation=r.generation,
        state=r.state,
        pid=r.process.pid if r.process else None,
        cgroup=str(r.process.cgroup) if r.process and r.process.cgroup else None,
        port=r.port,
        grpc_port=r.grpc_port,
        address=r.address,
        gpus=list(r.allocation.uuids) if r.allocation else [],
        gpu_share=r.allocation.share if r.allocation else None,
        gpu_memory=r.allocation.claim if r.allocation else None,
        command=mask_argv(r.argv),
        started_at=iso(r.started_at) if r.started_at else None,
        restarts=r.restarts,
        consecutive_failures=health.consecutive_failures if health else 0,
        last_probe_at=iso(health.last_probe_at) if health and health.last_probe_at else None,
        last_probe_result=health.last_result if health else "",
        last_error=r.last_error,
        work_dir=str(r.work_dir),
        log_path=str(r.log.path),
    )


async def list_replicas(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    await services.endpoints.get(name)
    inflight = services.load.inflight(name)
    return json_response(ReplicaList(data=[_replica_view(r, inflight.get(r.id, 0)) for r in services.supervisor.replicas(name)]))


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "0").lower() in ("1", "true", "yes")


async def _log_view(request: web.Request, name: str) -> Keep | None:
    """Which lines of a replica's log the reader sees: all with probes=1, else all but the worker's own
    access lines of the passing health probes (they are still in the file)."""
    if _flag(request, "probes"):
        return None
    row = await request.app[SERVICES].store.endpoints.get(name)
    if row is None:
        return None
    hide = probe_access_line(HealthCheck.model_validate(row["config"]["health_check"], strict=False))
    return None if hide is None else (lambda line: not hide(line))


async def replica_logs(request: web.Request) -> web.StreamResponse:
    name = endpoint_name(request)
    rid = request.match_info["replica"]
    replica = request.app[SERVICES].supervisor.replica(name, rid)
    if replica is None:
        raise ApplianceError(f"replica {rid!r} of endpoint {name!r} not found", status=404, code="replica_not_found", param="replica")
    tail = int_query(request, "tail", 100, low=0, high=100_000) or 0
    keep = await _log_view(request, name)
    if not _flag(request, "follow"):
        lines = await asyncio.to_thread(replica.log.read_tail, tail, keep)
        return web.Response(text="".join(f"{line}\n" for line in lines), content_type="text/plain")
    lines, queue = await asyncio.to_thread(replica.log.follow_from, tail, asyncio.get_running_loop(), keep)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        if lines:
            await resp.write("".join(f"{line}\n" for line in lines).encode())
        while True:
            try:
                async with asyncio.timeout(1.0):  # not wait_for: on 3.11 it can drop the cancel of a client that left
                    line = await queue.get()
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away
                continue
            if line is None:
                break  # the replica is gone for good
            if keep is None or keep(line):
                await resp.write(f"{line}\n".encode())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away
    finally:
        replica.log.unfollow(queue)
    return resp


async def retry_endpoint(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    services = request.app[SERVICES]
    await services.endpoints.get(name)
    await services.supervisor.retry(name)
    return json_response(_view(request, await services.endpoints.get(name)))


async def list_gpus(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        gpus = await services.gpus.inventory()
    except ApplianceError as exc:
        return json_response(GpuList(available=False, reason=exc.message, data=[]))
    allowed = {g.uuid for g in visible(gpus, services.config.gpus.devices)}
    holders: dict[str, list[GpuHolder]] = {}
    for rid, alloc in services.supervisor.held().items():
        for uuid in alloc.uuids:
            holders.setdefault(uuid, []).append(GpuHolder(replica=rid, share=alloc.share, claim=alloc.claim))
    budgets = {b.uuid: b for b in await _budgets(request)}
    data = [
        GpuView(
            index=g.index, uuid=g.uuid, name=g.name, memory_total=g.memory_total, memory_used=g.memory_used,
            utilization_gpu=g.utilization_gpu, utilization_memory=g.utilization_memory, mig_mode=g.mig_mode,
            processes=[{"pid": p.pid, "used_memory": p.used_memory} for p in g.processes],
            allowed=g.uuid in allowed, held_by=holders.get(g.uuid, []),
            budget=budgets[g.uuid].budget if g.uuid in budgets else 0, claimed=budgets[g.uuid].claimed if g.uuid in budgets else 0,
        )
        for g in gpus
    ]
    return json_response(GpuList(available=True, data=data))


async def list_requests(request: web.Request) -> web.Response:
    limit = int_query(request, "limit", 100, low=1, high=10_000) or 100
    endpoint = request.query.get("endpoint")
    records = [r for r in reversed(request.app[GATEWAY].records) if endpoint is None or r.endpoint == endpoint][:limit]
    return json_response(RequestList(data=[RequestView(**{**asdict(r), "time": iso(r.time)}) for r in records]))


ROUTES = [
    Route("POST", f"{PREFIX}/endpoints", create_endpoint, "Create an endpoint", body=EndpointSpec, response=EndpointView, status=201, tags=("endpoints",)),
    Route("GET", f"{PREFIX}/endpoints", list_endpoints, "List endpoints", response=EndpointList, query=(Query("limit", "items per page (default 100, at most 1000)", "integer"), Query("after", "the last name or id of the previous page")), tags=("endpoints",)),
    Route("GET", f"{PREFIX}/endpoints/{{name}}", get_endpoint, "Show one endpoint", response=EndpointView, tags=("endpoints",)),
    Route(
        "PATCH",
        f"{PREFIX}/endpoints/{{name}}",
        update_endpoint,
        "Change an endpoint (JSON merge: given fields replace, null resets to the default)",
        body=EndpointPatch,
        response=EndpointView,
        tags=("endpoints",),
    ),
    Route("DELETE", f"{PREFIX}/endpoints/{{name}}", delete_endpoint, "Delete an endpoint", response=Deleted, tags=("endpoints",)),
    Route(
        "GET",
        f"{PREFIX}/endpoints/{{name}}/events",
        endpoint_events,
        "Audit events of one endpoint, newest first",
        response=EventList,
        query=_EVENT_QUERY,
        tags=("events",),
    ),
    Route("GET", f"{PREFIX}/endpoints/{{name}}/replicas", list_replicas, "Replicas of an endpoint (live, then recently finished)", response=ReplicaList, tags=("replicas",)),
    Route(
        "GET",
        f"{PREFIX}/endpoints/{{name}}/replicas/{{replica}}/logs",
        replica_logs,
        "A replica's log as text: the last `tail` lines, then new lines as they come with follow=1; passing health probes' access lines are left out unless probes=1",
        query=(
            Query("tail", "lines from the end (default 100)", "integer"), Query("follow", "1: keep streaming new lines"),
            Query("probes", "1: show the worker's access lines of passing health probes too (hidden by default; the file keeps them)"),
        ),
        tags=("replicas",),
    ),
    Route("POST", f"{PREFIX}/endpoints/{{name}}/retry", retry_endpoint, "Clear the error and retry (restart failed replicas now)", response=EndpointView, tags=("endpoints",)),
    Route(
        "GET", f"{PREFIX}/requests", list_requests, "Recent gateway requests, newest first (kept in memory)", response=RequestList,
        query=(Query("endpoint", "only this endpoint"), Query("limit", "how many (default 100)", "integer")), tags=("gateway",),
    ),
    Route("GET", f"{PREFIX}/gpus", list_gpus, "GPUs seen through NVML, and which replicas hold them", response=GpuList, tags=("gpus",)),
    Route(
        "GET",
        f"{PREFIX}/events",
        all_events,
        "All audit events, newest first",
        response=EventList,
        query=(*_EVENT_QUERY, Query("endpoint", "only this endpoint's events")),
        tags=("events",),
    ),
]
