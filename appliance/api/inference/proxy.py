"""Forwarding to a replica over one shared client session: bodies pass as they come, unbuffered
for streams, and a request is retried on another replica only if no byte has reached the client."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from appliance.api.inference.rename import Rename, RenameStream
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
_NOT_TO_WORKER = HOP_BY_HOP | {"authorization", "cookie", "x-request-id"}
_CONTAINED = {"X-Content-Type-Options": "nosniff"}  # a worker's answer is taken for the type it states
_BUFFER_LIMIT = 1 << 20  # a non-streamed answer up to this size is sent in one piece (and its usage read)


UPSTREAM_KEEPALIVE_SECONDS = 30.0


class NewestFirstConnector(aiohttp.TCPConnector):
    """A pool that hands out the connection released last. aiohttp's own reuses the oldest first, so
    under a steady load every connection a burst opened stays busy enough never to idle out, and the
    pool keeps its peak size for good; newest first, the extra ones sit unused and close after the
    keep-alive timeout."""

    def _get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        conns = self._conns.get(key) if isinstance(getattr(self, "_conns", None), dict) else None
        if isinstance(conns, deque) and len(conns) > 1:
            conns.rotate(1)  # the newest to the front, where aiohttp takes from; the oldest stay in order
        return super()._get(key, *args, **kwargs)


def make_session(connect_timeout: float, idle_read_timeout: float, max_connections: int) -> aiohttp.ClientSession:
    connector = NewestFirstConnector(
        limit=max_connections, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS, enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=idle_read_timeout)
    # No cookie jar: a cookie set on one client's answer must never ride on another client's request. aiohttp's
    # jar ignores IP addresses, but keeps the cookies of a named host, such as a Ray Serve proxy's.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())


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


class UpstreamUnreachable(Exception):
    """Nothing was sent to the client: the caller may try another replica."""


# What aiohttp would otherwise add for a client that did not send them: its own User-Agent, and
# compression this client never asked for (bodies pass through undecoded). Filling the gaps here
# is also cheaper than aiohttp's per-request skip_auto_headers.
_DEFAULTS = (("Accept", "*/*"), ("Accept-Encoding", "identity"), ("User-Agent", "appliance"))


def worker_headers(headers: Mapping[str, str], request_id: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _NOT_TO_WORKER}
    out["X-Request-ID"] = request_id  # vLLM and SGLang take it as their own request id
    for name, value in _DEFAULTS:
        if name not in headers:  # case-insensitive on a request's headers
            out[name] = value
    return out


class IdleWatch:
    """The idle-read timeout of a body being streamed. aiohttp's sock_read timeout re-arms a timer on
    every chunk (a few µs for every token of every stream), so once the headers are in it is switched
    off, as aiohttp does for websockets, and this keeps one timer per quiet period instead."""

    __slots__ = ("_content", "_handle", "_loop", "_timeout", "last")
    WRITING = float("inf")  # `last` while a chunk is being written to the client

    def __init__(self, response: aiohttp.ClientResponse, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._content = response.content
        protocol = response.connection.protocol if response.connection else None
        if protocol is not None:
            protocol.read_timeout = None  # the timer already armed still covers the first silence
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.last == self.WRITING:
            self._handle = self._loop.call_at(now + self._timeout, self._check)
        elif now - self.last >= self._timeout - 0.01:  # timers may fire a little early
            self._content.set_exception(aiohttp.SocketTimeoutError(f"no data for {now - self.last:.1f}s"))
        else:
            self._handle = self._loop.call_at(self.last + self._timeout, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


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
    session: aiohttp.ClientSession,
    request: web.Request,
    *,
    method: str,
    url: str | URL,
    body: bytes,
    headers: Mapping[str, str],
    replica: str,
    outcome: Outcome,
    extra_headers: Mapping[str, str] | None = None,
    drop_usage_event: bool = False,
    rename: Rename | None = None,
    clock: Callable[[], float] = time.monotonic,
    track: set[aiohttp.ClientResponse] | None = None,
    stopping: asyncio.Event | None = None,
) -> web.StreamResponse:
    """Relay one request to a worker. `track` holds the worker's answer while it is relayed (so a
    shutdown can end it); `stopping` set means that is why it ended."""
    started = clock()
    try:
        upstream = await session.request(method, url, data=body, headers=headers, allow_redirects=False)
    except aiohttp.SocketTimeoutError:
        # The worker took the request and then went silent: not safe to run it again elsewhere.
        raise ApplianceError(
            f"replica {replica} sent nothing for {session.timeout.sock_read:g}s ([gateway] idle_read_timeout_seconds)",
            status=504, code="worker_timeout", source="worker",
        ) from None
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ConnectionTimeoutError) as exc:
        raise UpstreamUnreachable(f"{exc.__class__.__name__}: {exc}") from None
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
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
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
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _failed_answering(replica, exc) from None
        response = (_HeadWithFirstChunk if chunk else web.StreamResponse)(status=upstream.status, headers=out_headers)
        try:
            await _relay(request, response, upstream, chunk, replica, outcome, drop_usage_event, rename, clock, started, stopping, session.timeout.sock_read)
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


# What reading a worker's body raises when the worker fails (or stays silent past the idle timeout).
_UPSTREAM_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


async def _relay(
    request: web.Request, response: web.StreamResponse, upstream: aiohttp.ClientResponse, chunk: bytes, replica: str, outcome: Outcome,
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
    watch = IdleWatch(upstream, idle) if idle else None
    now = asyncio.get_running_loop().time
    try:
        while True:
            if not chunk:
                chunk = await content.readany()
                if not chunk:
                    break
            if watch is not None:
                watch.last = IdleWatch.WRITING  # a slow client is not a silent worker
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
            if watch is not None:
                watch.last = now()
        await _write_rest(response, events, renaming)
    except _UPSTREAM_ERRORS as exc:
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
        if watch is not None:
            watch.cancel()
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
