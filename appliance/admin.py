"""Admin API (/api/v1): thin handlers over the endpoint service and the event log."""

from __future__ import annotations

from aiohttp import web

from appliance.errors import ApplianceError
from appliance.http import Query, Route, int_query, json_response, read_model
from appliance.services import SERVICES
from appliance.specs import NAME_RE, NAME_RULE, EndpointPatch, EndpointSpec
from appliance.views import Deleted, EndpointList, EndpointView, EventList, EventView

PREFIX = "/api/v1"
_EVENT_QUERY = (
    Query("limit", "how many events, newest first (1–1000, default 100)", "integer"),
    Query("before", "only events with a smaller id (paging)", "integer"),
    Query("kind", "only this kind, or kinds under it (endpoint → endpoint.created, …)"),
)


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_RE.match(name):
        raise ApplianceError(f"invalid endpoint name {name!r}: {NAME_RULE}", status=400, code="invalid_name", param="name")
    return name


async def create_endpoint(request: web.Request) -> web.Response:
    spec = await read_model(request, EndpointSpec, "endpoint")
    row = await request.app[SERVICES].endpoints.create(spec)
    return json_response(EndpointView.of(row), status=201)


async def list_endpoints(request: web.Request) -> web.Response:
    rows = await request.app[SERVICES].endpoints.list()
    return json_response(EndpointList(data=[EndpointView.of(r) for r in rows]))


async def get_endpoint(request: web.Request) -> web.Response:
    row = await request.app[SERVICES].endpoints.get(_name(request))
    return json_response(EndpointView.of(row))


async def update_endpoint(request: web.Request) -> web.Response:
    name = _name(request)
    patch = await read_model(request, EndpointPatch, "endpoint update")
    changes = patch.model_dump(mode="json", include=patch.model_fields_set)
    row = await request.app[SERVICES].endpoints.update(name, changes)
    return json_response(EndpointView.of(row))


async def delete_endpoint(request: web.Request) -> web.Response:
    name = _name(request)
    await request.app[SERVICES].endpoints.delete(name)
    return json_response(Deleted(id=name, object="endpoint"))


async def _events(request: web.Request, endpoint: str | None) -> web.Response:
    limit = int_query(request, "limit", 100, low=1, high=1000) or 100
    before = int_query(request, "before", None, low=1)
    rows = await request.app[SERVICES].store.events.list(endpoint=endpoint, kind=request.query.get("kind"), limit=limit + 1, before=before)
    return json_response(EventList(data=[EventView(**r) for r in rows[:limit]], has_more=len(rows) > limit))


async def endpoint_events(request: web.Request) -> web.Response:
    name = _name(request)
    services = request.app[SERVICES]
    if await services.store.endpoints.get(name) is None and not await services.store.events.list(endpoint=name, limit=1):
        raise ApplianceError(f"endpoint {name!r} not found and has no recorded events", status=404, code="endpoint_not_found")
    return await _events(request, name)


async def all_events(request: web.Request) -> web.Response:
    return await _events(request, request.query.get("endpoint"))


ROUTES = [
    Route("POST", f"{PREFIX}/endpoints", create_endpoint, "Create an endpoint", body=EndpointSpec, response=EndpointView, status=201, tags=("endpoints",)),
    Route("GET", f"{PREFIX}/endpoints", list_endpoints, "List endpoints", response=EndpointList, tags=("endpoints",)),
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
