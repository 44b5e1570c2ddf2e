"""The gateway's client to its workers (appliance/api/inference/upstream.py): keep-alive connections reused
newest first, idle ones closed, no cookies kept, a connection the worker closed meanwhile retried, the
ways an answer can end (length, chunks, the connection's close, a HEAD, a 1xx first), silence, backpressure
and the connection limit. Real servers on loopback: aiohttp's, and raw ones for what aiohttp never sends."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import async_wait_for

from appliance.api.inference.connection import _HIGH_WATER
from appliance.api.inference.upstream import UpstreamPool, UpstreamTimeout, UpstreamUnreachable


async def _aiohttp_server(handle: Callable[[web.Request], Awaitable[web.StreamResponse]], **kwargs: float) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", **kwargs)
    await server.start_server()
    return server


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(handle: RawHandler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def _get(pool: UpstreamPool, base: str, target: str = "/", method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    resp = await pool.request(method, base, target, headers or {}, b"")
    try:
        return resp.status, await resp.read()
    finally:
        resp.release() if resp.content.at_eof() else resp.close()


async def _serve_with_ports() -> tuple[TestServer, list[int], asyncio.Event]:
    ports: list[int] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else 0)
        if request.query.get("hold"):
            await release.wait()
        return web.Response(text="ok")

    return await _aiohttp_server(handle), ports, release


async def test_a_steady_load_after_a_burst_reuses_the_newest_connection() -> None:
    server, ports, release = await _serve_with_ports()
    base = str(server.make_url("")).rstrip("/")
    pool = UpstreamPool(5.0, 30.0, keepalive=30.0)
    try:
        held = [asyncio.create_task(_get(pool, base, "/?hold=1")) for _ in range(8)]
        await async_wait_for(lambda: len(ports) >= 8, timeout=10, what="the burst to reach the server")
        release.set()
        assert [s for s, _ in await asyncio.gather(*held)] == [200] * 8
        assert len(set(ports)) == 8 and pool.idle_count() == 8
        del ports[:]
        for _ in range(16):  # one at a time, as a quiet steady load
            assert await _get(pool, base) == (200, b"ok")
        assert len(set(ports)) == 1, f"one request at a time went over {len(set(ports))} connections"
    finally:
        await pool.close()
        await server.close()


async def test_idle_connections_beyond_the_newest_are_closed_after_the_keepalive_timeout() -> None:
    server, _, release = await _serve_with_ports()
    release.set()
    base = str(server.make_url("")).rstrip("/")
    pool = UpstreamPool(5.0, 30.0, keepalive=0.3)
    try:
        await asyncio.gather(*(_get(pool, base) for _ in range(6)))
        assert pool.open_count() >= 2

        async def one_left() -> bool:  # one connection kept busy while the others pass their keep-alive
            await _get(pool, base)
            return pool.open_count() <= 1

        await async_wait_for(one_left, timeout=10, interval=0.05, what="the idle connections to be closed")
    finally:
        await pool.close()
        await server.close()


async def test_a_cookie_one_answer_sets_never_rides_on_the_next_request() -> None:
    """A worker reached by host name (a Ray Serve proxy's, say) sets a cookie on one client's answer: it must
    not come back on any later client's request."""
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.Response(text="ok")
        resp.set_cookie("session", "first-client", path="/")
        return resp

    server = await _aiohttp_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        for _ in range(2):
            resp = await pool.request("GET", f"http://localhost:{server.port}", "/", {}, b"")
            assert "session=first-client" in resp.headers["Set-Cookie"]
            await resp.read()
            resp.release()
        assert seen == [None, None]
    finally:
        await pool.close()
        await server.close()


async def test_a_kept_alive_connection_the_worker_closed_meanwhile_is_replaced_unseen() -> None:
    """The worker closes an idle connection (its keep-alive ran out) just as the gateway reuses it: the
    request goes again on a new connection instead of failing as if the worker were gone."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then closes
        await writer.drain()
        writer.close()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        assert await _get(pool, base) == (200, b"ok")
        assert await _get(pool, base) == (200, b"ok")
        assert served == 2
    finally:
        await pool.close()
        server.close()


async def test_no_worker_listening_is_unreachable_with_the_address() -> None:
    server, base = await _raw_server(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    pool = UpstreamPool(5.0, 30.0)
    try:
        with pytest.raises(UpstreamUnreachable, match=r"cannot connect to 127\.0\.0\.1:\d+"):
            await pool.request("GET", base, "/", {}, b"")
        assert pool.open_count() == 0
    finally:
        await pool.close()


async def test_a_worker_that_closes_without_answering_is_unreachable() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        with pytest.raises(UpstreamUnreachable, match="closed the connection"):
            await pool.request("POST", base, "/v1/completions", {"Content-Type": "application/json"}, b"{}")
    finally:
        await pool.close()
        server.close()


async def test_a_malformed_answer_is_refused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        with pytest.raises(UpstreamUnreachable, match="not valid HTTP"):
            await pool.request("GET", base, "/", {}, b"")
    finally:
        await pool.close()
        server.close()


async def test_an_answer_head_without_end_is_refused_at_64_kib() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(2000):
            writer.write(b"X-Filler-%d: %s\r\n" % (i, b"f" * 64))
        await writer.drain()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        with pytest.raises(UpstreamUnreachable, match="not valid HTTP/1.1: its headers pass 64 KiB"):
            await pool.request("GET", base, "/", {}, b"")
        assert pool.open_count() == 0
    finally:
        await pool.close()
        server.close()


async def test_a_silent_worker_times_out_and_its_connection_is_closed() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # silent until the gateway hangs up
        closed.set()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 0.3)
    try:
        with pytest.raises(UpstreamTimeout, match="no data for"):
            await pool.request("GET", base, "/", {}, b"")
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        await pool.close()
        server.close()


async def test_silence_counts_only_while_the_gateway_waits_for_the_worker() -> None:
    """A client slow to take the answer leaves the worker's chunks waiting here: that is not the worker's silence."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        resp = await pool.request("GET", base, "/", {}, b"")
        conn = resp.content
        await async_wait_for(lambda: conn._chunks, timeout=10, what="the first chunk")
        loop = asyncio.get_running_loop()
        conn._last_data = conn._waiting_since = loop.time() - 60  # as if the client had taken a minute
        conn._timeout = 1.0
        conn._check_silence()  # the relay is writing, not waiting: no timeout
        assert await resp.content.readany() == b"first"
        conn._check_silence()
        assert conn._exc is None
        reading = asyncio.create_task(resp.content.readany())
        await async_wait_for(lambda: conn._waiter is not None, timeout=10, what="the reader to wait")
        conn._last_data = conn._waiting_since = loop.time() - 60  # now the gateway waits, and the worker is silent
        conn._check_silence()
        with pytest.raises(UpstreamTimeout):
            await reading
        resp.close()
    finally:
        release.set()
        await pool.close()
        server.close()


@pytest.mark.parametrize("answer, body, reused", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", b"hello", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello", False),  # no length: the body ends with the connection
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
])
async def test_every_way_an_answer_ends(answer: bytes, body: bytes, reused: bool) -> None:
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            requests += 1
            writer.write(answer)
            await writer.drain()
            if not reused:
                writer.close()
                return

    server, base = await _raw_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        status, got = await _get(pool, base)
        assert status in (200, 201, 204) and got == body
        assert pool.idle_count() == (1 if reused else 0)
        assert await _get(pool, base) == (status, body)
        assert requests == 2
    finally:
        await pool.close()
        server.close()


async def test_a_head_answer_with_a_length_has_no_body() -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100)

    server = await _aiohttp_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        resp = await pool.request("HEAD", str(server.make_url("")).rstrip("/"), "/", {}, b"")
        assert resp.status == 200 and resp.headers["Content-Length"] == "100"
        assert await asyncio.wait_for(resp.read(), 10) == b""
        resp.release()
    finally:
        await pool.close()
        await server.close()


async def test_a_slow_reader_pauses_the_worker_and_gets_every_byte() -> None:
    """A stream the client reads slowly is not buffered here without end: the worker's socket is paused."""
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(payload), 65536):
            await resp.write(payload[i:i + 65536])
        await resp.write_eof()
        return resp

    server = await _aiohttp_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        resp = await pool.request("GET", str(server.make_url("")).rstrip("/"), "/", {}, b"")
        conn = resp.content
        await async_wait_for(lambda: conn._paused, timeout=10, what="the worker's socket to be paused")
        assert conn._size < _HIGH_WATER + 1024 * 1024, conn._size
        got = await resp.read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        resp.release()
    finally:
        await pool.close()
        await server.close()


async def test_past_the_connection_limit_a_request_waits_for_one_to_come_back() -> None:
    server, ports, release = await _serve_with_ports()
    base = str(server.make_url("")).rstrip("/")
    pool = UpstreamPool(5.0, 30.0, max_connections=1)
    try:
        first = asyncio.create_task(_get(pool, base, "/?hold=1"))
        await async_wait_for(lambda: len(ports) == 1, timeout=10, what="the first request")
        second = asyncio.create_task(_get(pool, base))
        await async_wait_for(lambda: pool._room, timeout=10, what="the second request to wait")
        assert len(ports) == 1 and pool.open_count() == 1
        release.set()
        assert await first == (200, b"ok") and await second == (200, b"ok")
        assert len(set(ports)) == 1
    finally:
        await pool.close()
        await server.close()


async def test_the_request_reaches_the_worker_as_given() -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.method, request.raw_path, dict(request.headers), await request.read()))
        return web.Response(text="ok")

    server = await _aiohttp_server(handle)
    pool = UpstreamPool(5.0, 30.0)
    try:
        base = str(server.make_url("")).rstrip("/")
        resp = await pool.request("POST", base, "/v1/a%2Fb?x=%3F&y=1", {"X-Request-ID": "r1", "Content-Type": "application/json"}, b'{"a": 1}')
        await resp.read()
        resp.release()
        resp = await pool.request("POST", base + "/replicas/app-1", "/empty", {}, b"")  # a base with a route prefix (Serve's)
        await resp.read()
        resp.release()
        (method, path, headers, body), (_, prefixed, empty_headers, empty) = seen
        assert prefixed == "/replicas/app-1/empty"
        assert (method, path, body) == ("POST", "/v1/a%2Fb?x=%3F&y=1", b'{"a": 1}')
        assert headers["Host"] == f"127.0.0.1:{server.port}" and headers["X-Request-ID"] == "r1" and headers["Content-Length"] == "8"
        assert empty == b"" and empty_headers["Content-Length"] == "0"
    finally:
        await pool.close()
        await server.close()
