"""The gateway's pool of connections to workers: after a burst, a steady trickle reuses the newest
connection, so the extra ones idle out instead of keeping the pool at its peak size."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import async_wait_for

from appliance.api.inference.proxy import NewestFirstConnector, make_session


async def _serve_with_ports() -> tuple[TestServer, list[int], asyncio.Event]:
    ports: list[int] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else 0)
        if request.query.get("hold"):
            await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, ports, release


async def _burst_then_trickle(connector: aiohttp.TCPConnector) -> tuple[set[int], int, Any]:
    server, ports, release = await _serve_with_ports()
    url = str(server.make_url("/"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def get(hold: bool) -> None:
                async with session.get(url, params={"hold": "1"} if hold else None) as resp:
                    await resp.read()

            held = [asyncio.create_task(get(True)) for _ in range(8)]
            await async_wait_for(lambda: len(ports) >= 8, timeout=10, what="the burst to reach the server")
            release.set()
            await asyncio.gather(*held)
            burst = len(set(ports))
            del ports[:]
            for _ in range(16):  # one at a time, as a quiet steady load
                await get(False)
            return set(ports), burst, connector
    finally:
        await server.close()


async def test_a_steady_load_after_a_burst_reuses_one_connection_and_the_rest_idle_out() -> None:
    trickle, burst, _ = await _burst_then_trickle(NewestFirstConnector(limit=0, keepalive_timeout=0.5))
    assert burst == 8
    assert len(trickle) == 1, f"one request at a time went over {len(trickle)} connections"


async def test_aiohttp_default_pool_cycles_through_every_connection() -> None:
    # The behaviour the connector above exists to change; if aiohttp changes it, this says so.
    trickle, burst, _ = await _burst_then_trickle(aiohttp.TCPConnector(limit=0, keepalive_timeout=0.5))
    assert burst == 8
    assert len(trickle) == 8


async def test_idle_connections_beyond_the_newest_are_closed_after_the_keepalive_timeout() -> None:
    server, _, release = await _serve_with_ports()
    url = str(server.make_url("/"))
    release.set()
    connector = NewestFirstConnector(limit=0, keepalive_timeout=0.3)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def get() -> None:
                async with session.get(url) as resp:
                    await resp.read()

            await asyncio.gather(*(get() for _ in range(6)))
            pooled = sum(len(c) for c in connector._conns.values())
            assert pooled >= 2
            # keep one connection busy while the others pass their keep-alive timeout
            async def one_left() -> bool:
                await get()
                return sum(len(c) for c in connector._conns.values()) <= 1

            await async_wait_for(one_left, timeout=10, interval=0.05, what="the idle connections to be closed")
    finally:
        await server.close()


async def _cookies_sent_back(session: aiohttp.ClientSession) -> list[str | None]:
    """Two requests by host name to a server that sets a cookie on every answer: the Cookie header of each."""
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.Response(text="ok")
        resp.set_cookie("session", "first-client", path="/")
        return resp

    app = web.Application()
    app.router.add_get("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with session:
            for _ in range(2):
                async with session.get(f"http://localhost:{server.port}/") as resp:
                    assert resp.status == 200 and "session=first-client" in resp.headers["Set-Cookie"]
    finally:
        await server.close()
    return seen


async def test_a_cookie_one_answer_sets_never_rides_on_the_next_request() -> None:
    """A worker reached by host name (a Ray Serve proxy's, say) sets a cookie on one client's answer: the
    gateway's session must not keep it and send it with every later client's request."""
    assert await _cookies_sent_back(aiohttp.ClientSession()) == [None, "session=first-client"]  # what a plain session does
    assert await _cookies_sent_back(make_session(5.0, 30.0, 10)) == [None, None]
