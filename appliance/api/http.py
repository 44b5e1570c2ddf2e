"""HTTP plumbing shared by every route: the route table, body parsing, and error rendering."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from appliance.control.telemetry import Telemetry
from appliance.domain.specs import NAME_RE, NAME_RULE
from appliance.errors import ApplianceError, validation_error
from appliance.logs import REQUEST_ID

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = web.AppKey("max_body_bytes", int)  # the limit aiohttp enforces, for the 413 message
BODY_TIMEOUT = web.AppKey("body_timeout_seconds", float)
TELEMETRY = web.AppKey("telemetry", Telemetry)


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    type: str = "string"


@dataclass(frozen=True)
class Route:
    """One route: registered with aiohttp and described in openapi.json from the same entry."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    error: type[BaseModel] | None = None  # the error body, when not the OpenAI-shaped one
    status: int = 200
    query: tuple[Query, ...] = ()
    auth: bool = True
    scope: str | None = None  # needed on admin routes; default: read for GET, admin otherwise
    tags: tuple[str, ...] = field(default_factory=tuple)


    @property
    def required_scope(self) -> str:
        return self.scope or ("read" if self.method == "GET" else "admin")


def add_routes(app: web.Application, routes: list[Route], guard: Callable[[Route], Handler] | None = None) -> None:
    """Register routes; `guard` wraps the handlers that need auth (so other routes pay nothing for it)."""
    for r in routes:
        app.router.add_route(r.method, r.path, guard(r) if guard and r.auth else r.handler)


def endpoint_name(request: web.Request) -> str:
    """The `{name}` of an endpoint route, checked against the naming rule."""
    name = request.match_info["name"]
    if not NAME_RE.match(name):
        raise ApplianceError(f"invalid endpoint name {name!r}: {NAME_RULE}", status=400, code="invalid_name", param="name")
    return name


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most server.max_body_bytes of it (a larger declared length is refused before a
    byte is read), from a client that never pauses longer than server.body_timeout_seconds."""
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    if content.is_eof():  # the whole body came with the head (most requests): nothing to wait for, no timer
        body = content.read_nowait(-1)
        if len(body) > limit:
            raise _too_large(limit)
        return body
    idle = request.app[BODY_TIMEOUT]
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
        except TimeoutError:
            raise ApplianceError(
                f"the request body stalled: nothing received for {idle:g} s (server.body_timeout_seconds)", status=408, code="body_timeout"
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)


def _too_large(limit: int) -> ApplianceError:  # made only when raised: read_body is on every request's path
    return ApplianceError(f"request body is larger than the limit of {limit} bytes (server.max_body_bytes)", status=413, code="body_too_large")


try:  # extra `speed`: every gateway request body is parsed to find its model, 3-7x faster with orjson
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - optional
    _fast_loads = None


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400. With orjson an integer past 64 bits comes back as a float: a
    body that is re-encoded must be parsed again with `json.loads`."""
    if not raw or raw.isspace():  # no stripped copy of a large body
        raise ApplianceError("request body is empty; send a JSON object", status=400, code="invalid_json")
    if _fast_loads is not None:
        try:
            return _fast_loads(raw)
        except ValueError:
            pass  # the standard parser decides, and words the error
    try:
        data = json.loads(raw, parse_constant=_not_json)
        if b"\\ud" in raw.lower():  # an escaped surrogate: one left unpaired is no text at all
            json.dumps(data, ensure_ascii=False).encode()
        return data
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApplianceError(f"malformed JSON in request body: {exc}", status=400, code="invalid_json") from None
    except UnicodeEncodeError:
        raise ApplianceError("malformed JSON in request body: a \\u escape is an unpaired surrogate", status=400, code="invalid_json") from None
    except ValueError as exc:
        raise ApplianceError(f"malformed JSON in request body: {exc}", status=400, code="invalid_json") from None
    except RecursionError:
        raise ApplianceError("malformed JSON in request body: nested too deeply", status=400, code="invalid_json") from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: web.Request) -> Any:
    return parse_json(await read_body(request))


async def read_model(request: web.Request, model: type[M], what: str) -> M:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApplianceError(f"request body must be a JSON object, got {type(data).__name__}", status=400, code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, what=what) from None


T = TypeVar("T")
_INT64_MAX = (1 << 63) - 1  # SQLite's integers: a larger one would overflow in the query


def int_query(request: web.Request, name: str, default: int | None, *, low: int = 0, high: int = _INT64_MAX) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApplianceError(f"query parameter {name} must be an integer (got {text!r})", status=400, code="invalid_query", param=name) from None
    if value < low or value > high:
        bound = f"between {low} and {high}"
        raise ApplianceError(f"query parameter {name} must be {bound} (got {value})", status=400, code="invalid_query", param=name)
    return value


def page(request: web.Request, items: list[T], key: Callable[[T], str]) -> tuple[list[T], bool]:
    """One page of a list, in `key` order: `limit` (default 100, at most 1000) items after the
    `after` cursor (the key of the previous page's last item); True when more follow."""
    limit = int_query(request, "limit", 100, low=1, high=1000) or 100
    after = request.query.get("after")
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [i for i in ordered if key(i) > after]
    return ordered[:limit], len(ordered) > limit


def json_response(body: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return web.Response(text=text, status=status, content_type="application/json")


def error_response(err: ApplianceError) -> web.Response:
    body = err.to_json()
    rid = REQUEST_ID.get()
    if rid is not None:
        body["error"]["request_id"] = rid
    return web.Response(text=json.dumps(body), status=err.status, content_type="application/json", headers=err.headers)


REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


REQUEST_ID_KEY = web.RequestKey("request_id", str)


def request_id(request: web.Request) -> str:
    return request.get(REQUEST_ID_KEY, "")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request gets an id (the client's X-Request-ID when it is sane, else a new one) for the
    log, the error body and the worker; every error leaves as OpenAI-shaped JSON, whoever raised it."""
    rid = request.headers.get("X-Request-ID")
    if rid is None or not REQUEST_ID_OK.fullmatch(rid):
        rid = secrets.token_hex(8)
    request[REQUEST_ID_KEY] = rid
    token = REQUEST_ID.set(rid)
    try:
        return await handler(request)
    except ApplianceError as err:
        if 400 <= err.status < 500:  # refused by the appliance itself: malformed, unknown, unauthorized, limited
            request.app[TELEMETRY].rejected(err.code)
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        request.app[TELEMETRY].rejected(code)
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        return error_response(ApplianceError(message, status=exc.status, code=code, headers=headers))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApplianceError("internal error in the appliance; see its log", status=500, code="internal_error"))
    finally:
        REQUEST_ID.reset(token)
