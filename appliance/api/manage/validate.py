"""POST /api/v1/endpoints/validate: a dry run of an endpoint spec, streamed as server-sent events."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web

from appliance.api.http import Query, Route, int_query, read_model
from appliance.api.services import SERVICES
from appliance.control.supervision.validation import default_timeout, validate
from appliance.domain.specs import EndpointSpec

PREFIX = "/api/v1"


async def validate_endpoint(request: web.Request) -> web.StreamResponse:
    """Events `state` ({state, reason, seconds}), `log` ({line}) and, last, `verdict` ({ok, reason,
    seconds, last_lines when it failed}). A spec that does not resolve is a plain 4xx, before any stream."""
    services = request.app[SERVICES]
    spec = await read_model(request, EndpointSpec, "endpoint")
    config = await services.endpoints.candidate(spec)
    timeout = int_query(request, "timeout", None, low=1, high=24 * 3600)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    steps = validate(services.supervisor, spec.name, config, float(timeout) if timeout else default_timeout(config))
    async with contextlib.aclosing(steps):  # a caller that goes away cancels this: the replica is torn down all the same
        async for step in steps:
            await response.write(f"event: {step.kind}\ndata: {json.dumps(step.data)}\n\n".encode())
    await response.write_eof()
    return response


ROUTES = [
    Route("POST", f"{PREFIX}/endpoints/validate", validate_endpoint,
          "Dry run: start one temporary replica of the spec outside routing and stream its log and states (SSE) until a verdict",
          body=EndpointSpec, query=(Query("timeout", "seconds to wait for health (default: the health check's own worst case)", "integer"),),
          tags=("endpoints",)),
]
