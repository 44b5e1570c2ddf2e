"""Admin API for autoscaling: an endpoint's rules, and the decisions taken on them. Rules are shown
normalised (sources lowercase, comparators uppercase) with the bounds they act within now."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import ConfigDict, Field, ValidationError

from appliance.api.http import Query, Route, endpoint_name, int_query, json_response, read_model
from appliance.api.services import SERVICES
from appliance.api.manage.views import Deleted, EventList, EventView, View
from appliance.domain.scaling import Rule, RulePatch, RuleSpec, ScaleState, bounds, new_rule_id
from appliance.errors import ApplianceError, validation_error

PREFIX = "/api/v1/endpoints/{name}"
_FIELDS = tuple(RuleSpec.model_fields)


class RuleView(RuleSpec):
    model_config = ConfigDict(allow_inf_nan=True)  # a rule stored before numbers had to be finite still shows

    id: str
    endpoint: str
    created_at: str
    updated_at: str
    last_triggered_at: str | None = Field(description="when the rule last changed the replica count")
    bounds: list[int] = Field(description="[min, max] the rule acts within now: its own min/max_replicas, else the endpoint's")
    warnings: list[str] = Field(default_factory=list, description="why the rule, as it stands, can never change the replica count")


class RuleList(View):
    object: Literal["list"] = "list"
    data: list[RuleView]


def _view(row: dict[str, Any], endpoint: dict[str, Any] | None) -> RuleView:
    config = endpoint["config"] if endpoint else {"min_replicas": 0, "max_replicas": 0, "replicas": 0}
    rule = Rule.of(row)
    low, high, _ = bounds(rule, ScaleState(replicas=config["replicas"], min_replicas=config["min_replicas"], max_replicas=config["max_replicas"]))
    warnings: list[str] = []
    own = rule.max_replicas if rule.direction > 0 else rule.min_replicas
    if own is None and config["min_replicas"] == config["max_replicas"]:
        # An endpoint that states no min/max_replicas has the range [replicas, replicas]: a rule without a
        # bound of its own there has no room, where Backend.AI would let it scale unbounded. Say so.
        side, way = ("max_replicas", "out") if rule.direction > 0 else ("min_replicas", "in")
        warnings.append(
            f"this rule has no {side} of its own and the endpoint's range is [{config['min_replicas']}, {config['max_replicas']}] "
            f"(an endpoint that states no min_replicas/max_replicas is held at its replicas): it cannot scale {way}; "
            f"give the rule or the endpoint a {side}"
        )
    return RuleView.model_validate({**row, "bounds": [low, high], "warnings": warnings}, strict=False)


async def _endpoint(request: web.Request, name: str) -> dict[str, Any] | None:
    return await request.app[SERVICES].store.endpoints.get(name)


def _rule_id(request: web.Request) -> str:
    return request.match_info["id"]


async def create_rule(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    spec = await read_model(request, RuleSpec, "autoscaling rule")
    row = {"id": new_rule_id(), "endpoint": name, **spec.model_dump()}
    created = await request.app[SERVICES].store.rules.insert(row, f"endpoint {name}: autoscaling rule {row['id']} created: {_summary(spec)}")
    return json_response(_view(created, await _endpoint(request, name)), status=201)


async def list_rules(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    rows = await request.app[SERVICES].store.rules.list(name)
    endpoint = await _endpoint(request, name)
    return json_response(RuleList(data=[_view(r, endpoint) for r in rows]))


async def get_rule(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    return json_response(_view(await request.app[SERVICES].store.rules.get(name, _rule_id(request)), await _endpoint(request, name)))


async def update_rule(request: web.Request) -> web.Response:
    name, rule_id = endpoint_name(request), _rule_id(request)
    patch = await read_model(request, RulePatch, "autoscaling rule update")
    store = request.app[SERVICES].store
    current = await store.rules.get(name, rule_id)
    changes = patch.model_dump(include=patch.model_fields_set)
    try:  # the rule as a whole must stay valid (min ≤ max, a metric its source knows)
        spec = RuleSpec.model_validate({**{k: current[k] for k in _FIELDS}, **changes})
    except ValidationError as exc:
        raise validation_error(exc, what="autoscaling rule") from None
    fields = {k: v for k, v in spec.model_dump().items() if k in changes}
    row = await store.rules.update(name, rule_id, fields, f"endpoint {name}: autoscaling rule {rule_id} changed: {_summary(spec)}")
    return json_response(_view(row, await _endpoint(request, name)))


async def delete_rule(request: web.Request) -> web.Response:
    name, rule_id = endpoint_name(request), _rule_id(request)
    await request.app[SERVICES].store.rules.delete(name, rule_id, f"endpoint {name}: autoscaling rule {rule_id} deleted")
    return json_response(Deleted(id=rule_id, object="autoscaling_rule"))


async def decisions(request: web.Request) -> web.Response:
    name = endpoint_name(request)
    store = request.app[SERVICES].store
    if await store.endpoints.get(name) is None:
        raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found", param="name")
    limit = int_query(request, "limit", 50, low=1, high=1000) or 50
    before = int_query(request, "before", None, low=1)
    rows = await store.events.list(endpoint=name, kind="autoscale", limit=limit + 1, before=before)
    return json_response(EventList(data=[EventView(**r) for r in rows[:limit]], has_more=len(rows) > limit))


def _summary(spec: RuleSpec) -> str:
    bounds = f"[{'min' if spec.min_replicas is None else spec.min_replicas}, {'max' if spec.max_replicas is None else spec.max_replicas}]"
    state = "" if spec.enabled else " (disabled)"
    return (
        f"{spec.metric_source}/{spec.metric_name} {spec.comparator} {spec.threshold:g} over {spec.window_seconds:g}s → "
        f"{spec.step_size:+d} within {bounds}, cooldown {spec.cooldown_seconds:g}s{state}"
    )


_TAGS = ("autoscaling",)
ROUTES = [
    Route("GET", f"{PREFIX}/autoscaling-rules", list_rules, "Autoscaling rules of an endpoint", response=RuleList, tags=_TAGS),
    Route("POST", f"{PREFIX}/autoscaling-rules", create_rule, "Add an autoscaling rule", body=RuleSpec, response=RuleView, status=201, tags=_TAGS),
    Route("GET", f"{PREFIX}/autoscaling-rules/{{id}}", get_rule, "Show one autoscaling rule", response=RuleView, tags=_TAGS),
    Route("PATCH", f"{PREFIX}/autoscaling-rules/{{id}}", update_rule, "Change an autoscaling rule", body=RulePatch, response=RuleView, tags=_TAGS),
    Route("DELETE", f"{PREFIX}/autoscaling-rules/{{id}}", delete_rule, "Delete an autoscaling rule", response=Deleted, tags=_TAGS),
    Route(
        "GET", f"{PREFIX}/decisions", decisions, "Autoscaling decisions of an endpoint, newest first: changes, suppressed changes, missing metrics",
        response=EventList, query=(Query("limit", "how many (1–1000, default 50)", "integer"), Query("before", "only older than this event id", "integer")),
        tags=_TAGS,
    ),
]
