"""Forwarding to a replica over the gateway's pool of worker connections: bodies pass as they come,
unbuffered for streams, and a request is retried on another replica only if no byte has reached the client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from appliance.api.inference.rename import Rename, RenameStream
from appliance.api.inference.upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout
from appliance.api.inference.usage import UsageEventFilter, usage_from_body, usage_from_sse
from appliance.errors import ApplianceError
from appliance.security.sessions import COOKIE_PREFIX

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailers", "Transfer-Encoding", "Upgrade",
        "Host", "Content-Length",
    )
)
# The appliance's credentials stay here; the request id is set by the gateway (the client's, or a new one).
_NOT_TO_WORKER = HOP_BY_HOP | {"authorization", "cookie", "x-request-id", "expect"}  # the body is whole by now
_CONTAINED = {"X-Content-Type-Options": "nosniff"}  # a worker's answer is taken for the type it states
_BUFFER_LIMIT = 1 << 20  # a non-streamed answer up to this size is sent in one piece (and its usage read)


@dataclass
class Outcome:
    status: int = 0
    ttfb: float | None = None  # seconds to the first body byte from the worker
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    streamed: bool = False
    error: str = ""
    chunks: int = 0  # body chunks relayed from a stream
    last_chunk: float | None = None  # seconds from the start to the last of them
    client_closed: bool = False  # the client went away before the answer ended


def _answer_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A worker's headers for the client: a multidict, so repeated ones (several Set-Cookie) all get
    there; hop-by-hop ones dropped, and a cookie named as the console's session a worker tries to set
    on this origin. (Copy-then-pop is the cheapest way here: about 0.4 µs.)"""
    out = CIMultiDict(headers)
    for name in HOP_BY_HOP:
        out.popall(name, None)
    if "Set-Cookie" in out:
        for cookie in out.popall("Set-Cookie"):
            if not cookie.startswith(COOKIE_PREFIX):
                out.add("Set-Cookie", cookie)
    return out


# What a worker sees where the client sent none: the appliance as the agent, and no compression
# (bodies pass through undecoded, so a worker must not compress what the client never asked to be).
_DEFAULTS = (("Accept", "*/*"), ("Accept-Encoding", "identity"), ("User-Agent", "appliance"))


def worker_headers(headers: Mapping[str, str], request_id: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _NOT_TO_WORKER}
    out["X-Request-ID"] = request_id  # vLLM and SGLang take it as their own request id
    for name, value in _DEFAULTS:
        if name not in headers:  # case-insensitive on a request's headers
            out[name] = value
    return out


class _HeadWithFirstChunk(web.StreamResponse):
    """Holds the status line and headers back until the first body write, as aiohttp's own Response
    does: with the first chunk already in hand, head and chunk reach the client in one packet."""

    _send_headers_immediately = False


def _failed_answering(replica: str, exc: Exception) -> ApplianceError:
    """The worker failed before anything reached the client."""
    return ApplianceError(f"replica {replica} failed while answering: {exc.__class__.__name__}", status=502, code="worker_failed", source="worker")


def sse_error_event(message: str, replica: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "worker_failed", "source": "worker", "replica": replica}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def forward(
    pool: UpstreamPool,
    request: web.Request,
    *,
    method: str,
    base: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    replica: str,
    outcome: Outcome,
    extra_headers: Mapping[str, str] | None = None,
    drop_usage_event: bool = False,
    rename: Rename | None = None,
    clock: Callable[[], float] = time.monotonic,
    track: set[UpstreamResponse] | None = None,
    stopping: asyncio.Event | None = None,
) -> web.StreamResponse:
    """Relay one request to the worker at `base` (scheme://host:port) for `target` (the client's path and
    query, byte for byte). `track` holds the worker's answer while it is relayed (so a shutdown can end
    it); `stopping` set means that is why it ended. Raises UpstreamUnreachable when no byte of an answer came."""
    started = clock()
    try:
        upstream = await pool.request(method, base, target, headers, body)
    except UpstreamTimeout:
        # The worker took the request and then went silent: not safe to run it again elsewhere.
        raise ApplianceError(
            f"replica {replica} sent nothing for {pool.idle_read_timeout:g}s ([gateway] idle_read_timeout_seconds)",
            status=504, code="worker_timeout", source="worker",
        ) from None
    if track is not None:
        track.add(upstream)
    try:
        outcome.status = upstream.status
        out_headers = _answer_headers(upstream.headers)
        if extra_headers:
            out_headers.update(extra_headers)
        ctype = upstream.headers.get("Content-Type", "")
        out_headers.update(_CONTAINED)
        if "html" in ctype or "xml" in ctype:
            # A worker's page (an engine's /docs, a custom server) is served from the console's origin:
            # sandboxed, its scripts cannot use a logged-in operator's session cookie.
            out_headers["Content-Security-Policy"] = "sandbox"
        length = upstream.content_length
        if "text/event-stream" not in ctype and length is not None and length <= _BUFFER_LIMIT:
            try:
                data = await upstream.read()
            except UpstreamError as exc:
                raise _failed_answering(replica, exc) from None
            outcome.ttfb = clock() - started
            if "json" in ctype:
                usage_from_body(data, outcome)
                if rename is not None:
                    data = rename(data)
            answer = web.Response(body=data, status=upstream.status, headers=out_headers)
            # Sent here, not after the handler returns: the request's bookkeeping (records, usage, limits)
            # then runs while the client reads the answer instead of before it is sent.
            try:
                await answer.prepare(request)
                await answer.write_eof()
            except ConnectionError:
                outcome.client_closed = True
            return answer
        outcome.streamed = True
        content = upstream.content
        try:
            chunk = content.read_nowait()  # a first chunk that came with the head
        except UpstreamError as exc:
            raise _failed_answering(replica, exc) from None
        response = (_HeadWithFirstChunk if chunk else web.StreamResponse)(status=upstream.status, headers=out_headers)
        try:
            await _relay(request, response, upstream, chunk, replica, outcome, drop_usage_event, rename, clock, started, stopping, pool.idle_read_timeout)
        except _ClientGone:
            # The client left: nothing more can reach it, and the worker is not to blame. The upstream
            # connection is closed below, so the worker sees the disconnect and stops generating.
            outcome.client_closed = True
        return response
    finally:
        if track is not None:
            track.discard(upstream)
        if upstream.content.at_eof():
            upstream.release()  # back to the pool for the next request
        else:
            upstream.close()  # cut short (client gone, error): the worker sees the disconnect and stops generating


class _ClientGone(Exception):
    """Writing to the client failed: it closed the connection (or reset it)."""


async def _send(response: web.StreamResponse, data: bytes) -> None:
    """A write to the client, whose failure is told apart from the worker's (both are connection errors)."""
    try:
        await response.write(data)
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is a ConnectionResetError
        raise _ClientGone(str(exc)) from None




async def _relay(
    request: web.Request, response: web.StreamResponse, upstream: UpstreamResponse, chunk: bytes, replica: str, outcome: Outcome,
    drop_usage_event: bool, rename: Rename | None, clock: Callable[[], float], started: float, stopping: asyncio.Event | None, idle: float | None,
) -> None:
    """A streamed body, chunk by chunk, as it comes. A worker's failure ends an SSE stream with an error
    event (a plain body with an abort); a client's raises _ClientGone and nothing more is written."""
    try:
        await response.prepare(request)
    except ConnectionError as exc:
        raise _ClientGone(str(exc)) from None
    # Usage rides in the final event(s): remember only the last chunk that mentions it (and the one
    # before, in case the event straddles two), found with one substring test per chunk.
    previous = usage_at = b""
    ctype = upstream.headers.get("Content-Type", "")
    sse = "text/event-stream" in ctype
    events = UsageEventFilter(outcome) if sse and drop_usage_event else None
    renaming = RenameStream(rename, sse) if rename is not None else None
    content = upstream.content
    try:
        while True:
            if not chunk:
                chunk = await content.readany()
                if not chunk:
                    break
            if outcome.ttfb is None:
                outcome.ttfb = clock() - started
            if events is not None:
                chunk = events.feed(chunk)
            elif sse:
                if b'"usage"' in chunk:
                    usage_at = previous + chunk
                previous = chunk
            if chunk and renaming is not None:
                chunk = renaming.feed(chunk)  # a stream's events name the model too
            if chunk:
                await _send(response, chunk)
                chunk = b""
                outcome.chunks += 1
        await _write_rest(response, events, renaming)
    except UpstreamError as exc:  # the worker failed, or stayed silent past the idle timeout
        silent = f" (sent nothing for {idle:g}s, [gateway] idle_read_timeout_seconds)" if isinstance(exc, TimeoutError) else ""
        outcome.error = f"replica {replica} failed mid-stream: {exc.__class__.__name__}{silent}"
        if stopping is not None and stopping.is_set():
            outcome.error = "the appliance is shutting down: this stream was ended after server.shutdown_timeout_seconds"
        if not sse:
            # A plain body cannot carry an error: end the connection without a clean end, so the client
            # sees an incomplete response instead of a short one that looks whole.
            if request.transport is not None:
                request.transport.abort()
            return
        await _write_rest(response, events, renaming)
        await _send(response, sse_error_event(outcome.error, replica))
    finally:
        outcome.last_chunk = clock() - started
    if usage_at:
        usage_from_sse(usage_at, outcome)
    try:
        await response.write_eof()
    except ConnectionError as exc:
        raise _ClientGone(str(exc)) from None


async def _write_rest(response: web.StreamResponse, events: UsageEventFilter | None, renaming: RenameStream | None) -> None:
    """What the stream's filters still hold, at its end."""
    rest = events.flush() if events is not None else b""
    if renaming is not None:
        rest = renaming.flush(rest)
    if rest:
        await _send(response, rest)
