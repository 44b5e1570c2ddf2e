"""The OpenAI-compatible gateway (/v1/*) and each endpoint's own URL (/endpoints/{name}/*).

Handlers only: the routing table comes from the supervisor, the pick from router.py, the
forwarding from proxy.py, admission (requests in flight per replica, a first-come first-served queue
per endpoint, the wait for a starting replica) from admission.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from appliance.api.inference.admission import Admission, EndpointQueue
from appliance.api.inference.callers import authorize, caller, check_route, did_you_mean, lookup, refuse_unless_public
from appliance.api.http import Route, parse_json, read_body, request_id
from appliance.api.inference.proxy import Outcome, forward, worker_headers
from appliance.api.inference.upstream import UpstreamPool, UpstreamResponse, UpstreamUnreachable
from appliance.api.inference.rename import Rename
from appliance.api.inference.rename import rename as renamed
from appliance.api.services import SERVICES, Services
from appliance.control.telemetry import Telemetry
from appliance.domain.limits import retry_after_header
from appliance.domain.routing import RoutableReplica, prefix_key
from appliance.domain.specs import EndpointConfig
from appliance.domain.timefmt import parse_keep_alive
from appliance.errors import ApplianceError
from appliance.security.auth import INFERENCE, READ, Principal

log = logging.getLogger(__name__)
CLIENT_CLOSED = "client_closed"  # a request's error_source when its client went away before the answer ended


@dataclass(slots=True)
class RequestRecord:
    """One answered request, kept in memory for metrics, autoscaling and usage."""

    time: float
    endpoint: str
    replica: str | None
    key_id: str | None
    status: int
    latency: float
    ttfb: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    streamed: bool
    error_source: str | None  # "appliance" or "worker" for failures; "client_closed": the client left first
    request_id: str = ""


class Gateway:
    def __init__(self, services: Services, telemetry: Telemetry) -> None:
        self._services = services
        self._telemetry = telemetry
        self._active = 0  # requests being handled, queued ones included
        self._upstreams: set[UpstreamResponse] = set()  # worker answers being relayed
        self.stopping = asyncio.Event()
        cfg = services.config.gateway
        self._pool: UpstreamPool | None = None
        self._admission = Admission(services)
        self.records: deque[RequestRecord] = deque(maxlen=cfg.request_records)

    async def drain(self, timeout: float) -> None:
        """At shutdown: requests in flight get `timeout` seconds to finish; then open answers are ended
        (a stream with an SSE error event and a clean end) and new ones refused."""
        if self._active:
            log.info("stopping: %d requests in flight get up to %g s to finish", self._active, timeout)
        await self._wait_idle(timeout)
        self.stopping.set()
        if self._upstreams:
            log.info("stopping: ending %d answers still open", len(self._upstreams))
        for upstream in list(self._upstreams):
            upstream.close()
        await self._wait_idle(_STRAGGLERS)

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        cfg = self._services.config.gateway
        self._pool = UpstreamPool(cfg.connect_timeout_seconds, cfg.idle_read_timeout_seconds, cfg.max_connections)

    async def stop(self) -> None:
        await self._admission.close()
        if self._pool:
            await self._pool.close()

    def inflight(self, endpoint: str) -> dict[str, int]:
        return dict(self._services.load.inflight(endpoint))

    def queue_length(self, endpoint: str) -> int:
        return self._admission.queue_length(endpoint)

    async def acquire(self, endpoint: str, config: EndpointConfig, key: str | None, exclude: set[str]) -> tuple[EndpointQueue, RoutableReplica]:
        """A replica with room for one more request, counted in flight until release()."""
        return await self._admission.acquire(endpoint, config, key, exclude)

    def release(self, queue: EndpointQueue, replica: RoutableReplica) -> None:
        self._admission.release(queue, replica)

    # --- one request ----------------------------------------------------------------------------

    def admit(self, principal: Principal | None) -> dict[str, str] | None:
        """Count the request against the key's limits; x-ratelimit-* headers for the answer, or a 429."""
        if principal is None or not principal.limits.any:
            return None
        refusal, headers = self._services.limiter.admit(principal.id, principal.limits, self._services.clock())
        if refusal is not None:
            raise ApplianceError(
                refusal.message, status=429, code="rate_limit_exceeded",
                headers={"Retry-After": retry_after_header(refusal.retry_after), **refusal.headers},
            )
        return headers

    async def proxy(
        self, request: web.Request, endpoint: str, config: EndpointConfig, target: str, body: bytes, key: str | None,
        principal: Principal | None, *, drop_usage_event: bool = False, rename: Rename | None = None,
    ) -> web.StreamResponse:
        assert self._pool is not None
        if self.stopping.is_set():
            raise ApplianceError("the appliance is shutting down", status=503, code="shutting_down")
        started = time.monotonic()
        self._services.load.arrived(endpoint)
        outcome = Outcome()
        replica_id: str | None = None
        waited = 0.0
        error_source: str | None = None
        tried: set[str] = set()
        headers = worker_headers(request.headers, request_id(request))
        limited = False
        self._active += 1  # from here on, the finally below counts it out
        try:
            extra = self.admit(principal)
            limited = extra is not None
            while True:
                adm, replica = await self.acquire(endpoint, config, key, tried)
                replica_id = replica.id
                waited = time.monotonic() - started  # in the queue, and on replicas that could not be reached
                try:
                    response = await forward(
                        self._pool, request, method=request.method, base=replica.url, target=target, body=body, headers=headers, replica=replica.id,
                        outcome=outcome, extra_headers=extra, drop_usage_event=drop_usage_event, track=self._upstreams, stopping=self.stopping,
                        rename=rename,
                    )
                except UpstreamUnreachable as exc:
                    tried.add(replica.id)  # nothing reached the client yet: another replica may answer
                    if not [r for r in self._services.supervisor.table.routable.get(endpoint, ()) if r.id not in tried]:
                        raise ApplianceError(
                            f"replica {replica.id} of endpoint {endpoint} could not be reached: {exc}",
                            status=502, code="worker_unreachable", source="worker",
                        ) from None
                    continue
                finally:
                    self.release(adm, replica)
                if outcome.error:
                    error_source = "worker"
                elif outcome.client_closed:
                    error_source = CLIENT_CLOSED
                return response
        except ApplianceError as exc:
            outcome.status = exc.status
            error_source = exc.source
            raise
        except asyncio.CancelledError:
            if not self.stopping.is_set():  # the server cancels a request whose client disconnected
                error_source = CLIENT_CLOSED
            raise
        finally:
            self._active -= 1
            now = self._services.clock()
            key_id = principal.id if principal else None
            if limited and principal is not None:
                tokens = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
                self._services.limiter.finish(principal.id, tokens, self._services.clock())
            failed = outcome.status >= 400 or bool(outcome.error) or outcome.status == 0
            self._services.accounting.record(
                now, key_id, endpoint, failed=failed, prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens
            )
            latency = time.monotonic() - started
            self.records.append(
                RequestRecord(
                    time=now, endpoint=endpoint, replica=replica_id, key_id=key_id, status=outcome.status,
                    latency=latency, ttfb=outcome.ttfb, prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens, streamed=outcome.streamed,
                    error_source=error_source if (error_source or outcome.status >= 500) else None, request_id=request_id(request),
                )
            )
            gap = None
            if outcome.streamed and outcome.chunks > 1 and outcome.ttfb is not None and outcome.last_chunk is not None:
                gap = (outcome.last_chunk - outcome.ttfb) / (outcome.chunks - 1)
            self._telemetry.request(
                endpoint, outcome.status, latency, ttft=waited + outcome.ttfb if outcome.streamed and outcome.ttfb is not None else None, gap=gap,
                prompt=outcome.prompt_tokens, completion=outcome.completion_tokens,
            )


GATEWAY = web.AppKey("gateway", Gateway)
_STRAGGLERS = 2.0  # seconds for ended answers to be written out at shutdown


_USAGE_IN_STREAM = ("/v1/chat/completions", "/v1/completions")
_ASK_USAGE = b', "stream_options": {"include_usage": true}}'


def ask_usage(body: bytes) -> bytes:
    """A JSON object's body (with a `model`, without `stream_options`) that also asks for the stream's usage
    event: spliced before its closing brace, so the client's bytes reach the worker as sent, without a
    parse and re-encode per keyed stream."""
    return body.rstrip()[:-1] + _ASK_USAGE


async def openai_route(request: web.Request) -> web.StreamResponse:
    principal, refusal = await caller(request)
    refuse_unless_public(request, refusal)
    body = await read_body(request)
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApplianceError(f"request body must be a JSON object, got {type(data).__name__}", status=400, code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApplianceError("you must provide a model parameter (an endpoint name)", status=400, code="missing_model", param="model")
    name, found = lookup(request, model)
    principal = authorize(request, principal, refusal, name, found)
    assert found is not None
    config = found
    check_route(request, principal, config, request.path)
    # To learn a keyed stream's token counts (usage, limits) the gateway asks for the final usage event and
    # keeps it from the client: spliced into the body as sent, re-encoded only when the worker also knows the
    # model by another name. Anonymous calls to public endpoints are spared the extra work.
    drop_usage_event = principal is not None and data.get("stream") is True and "stream_options" not in data and request.path in _USAGE_IN_STREAM
    # Ollama's per-request keep_alive: how long the endpoint stays loaded after this request; engines do not know it.
    keep: float | None | bool = parse_keep_alive(data["keep_alive"], param="keep_alive", status=400) if "keep_alive" in data else False
    if drop_usage_event and model == config.served_model_name and keep is False:
        body = ask_usage(body)
    elif drop_usage_event or model != config.served_model_name or keep is not False:
        exact = json.loads(body)  # every number as sent (the fast parser turns huge integers into floats)
        exact["model"] = config.served_model_name
        exact.pop("keep_alive", None)
        if drop_usage_event:
            exact["stream_options"] = {"include_usage": True}
        body = json.dumps(exact).encode()
    if config.wakes and not config.pin and (keep is not False or name in request.app[SERVICES].load.keep_alive):
        request.app[SERVICES].load.keep(name, keep)
    session_key = None
    if config.routing == "session_affinity":
        session_key = request.headers.get("X-Session-ID") or (data.get("user") if isinstance(data.get("user"), str) else None)
    elif config.routing == "prefix":
        session_key = prefix_key(data, config.prefix_length)
    # The answer names the model as the client did, not as the worker knows it (a folder path, a definition's name).
    rename = renamed(config.served_model_name, model) if model != config.served_model_name else None
    return await request.app[GATEWAY].proxy(
        request, name, config, request.raw_path, body, session_key, principal, drop_usage_event=drop_usage_event, rename=rename
    )


async def passthrough(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    principal, refusal = await caller(request)
    found = request.app[SERVICES].supervisor.table.endpoints.get(name)
    if principal is not None and found is None:
        raise ApplianceError(f"endpoint {name!r} not found{did_you_mean(request, principal, name)}", status=404, code="endpoint_not_found", param="name")
    principal = authorize(request, principal, refusal, name, found)
    assert found is not None
    config = found
    check_route(request, principal, config, "/" + request.match_info["path"])
    body = await read_body(request)
    key = request.headers.get("X-Session-ID") if config.routing == "session_affinity" else None
    prefix = f"/endpoints/{name}"
    raw = request.raw_path  # still percent-encoded: %2F stays %2F, %3F stays %3F
    target = raw[len(prefix):] if raw.startswith(prefix + "/") else "/" + quote(request.match_info["path"]) + (f"?{request.query_string}" if request.query_string else "")
    return await request.app[GATEWAY].proxy(request, name, config, target, body, key, principal)


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    table = services.supervisor.table
    principal = None
    if request.headers.get("Authorization"):
        # a wrong key is an error, not a silent public list
        principal = await services.auth.authenticate(request, INFERENCE, also=READ)
    data = [
        {
            "id": name, "object": "model", "created": 0, "owned_by": "appliance", "status": table.statuses.get(name, "PENDING"),
            "aliases": list(cfg.aliases), "runtime": cfg.runtime,
        }
        for name, cfg in sorted(table.endpoints.items())
        if cfg.public or (principal is not None and principal.allows(name))
    ]
    return web.json_response({"object": "list", "data": data})


ROUTES = [
    Route("GET", "/v1/models", list_models, "Models (endpoints) the caller may use", auth=False, tags=("gateway",)),
    Route("POST", "/v1/{tail:.*}", openai_route, "OpenAI-compatible call routed by the body's model", auth=False, tags=("gateway",)),
    Route("*", "/endpoints/{name}/{path:.*}", passthrough, "The endpoint's own URL: any method and path, passed through", auth=False, tags=("gateway",)),
]
