#!/usr/bin/env python3
"""The gateway's client to its workers against aiohttp's client, side by side in one process.

One aiohttp server on loopback answers a small JSON request (a chat completion's size) and a 50-event
SSE stream; both clients call it in turns on the same event loop (uvloop where installed, as the
appliance runs): aiohttp's `ClientSession` with the settings the gateway used to have, and the
appliance's `UpstreamPool` (api/inference/upstream.py). Each request's whole cost is counted, server
included, so the difference between the two rows is the clients' own. Prints µs per request (the median
over rounds) and the ratio pool / aiohttp.

Usage: .venv/bin/python scripts/bench_upstream.py [--rounds 30] [--per-round 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.api.inference.upstream import UpstreamPool  # noqa: E402

BODY = b'{"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
ANSWER = (b'{"id": "x", "object": "chat.completion", "model": "bench", "choices": [{"index": 0, "finish_reason": "length",'
          b' "message": {"role": "assistant", "content": "tok0"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}')
EVENT = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
HEADERS = {"Content-Type": "application/json", "Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": "appliance", "X-Request-ID": "0123456789abcdef"}


async def small(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(50):
        await resp.write(EVENT)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def main(rounds: int, per_round: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", small)
    app.router.add_post("/v1/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    session = aiohttp.ClientSession(  # the gateway's former client and its settings
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0, enable_cleanup_closed=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=600.0), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
    )
    pool = UpstreamPool(5.0, 600.0)

    async def via_aiohttp(path: str) -> None:
        resp = await session.request("POST", base + path, data=BODY, headers=HEADERS, allow_redirects=False)
        while await resp.content.readany():
            pass
        resp.release()

    async def via_pool(path: str) -> None:
        resp = await pool.request("POST", base, path, HEADERS, BODY)
        while await resp.content.readany():
            pass
        resp.release()

    clients = {"aiohttp ClientSession": via_aiohttp, "appliance UpstreamPool": via_pool}
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for path, what in (("/v1/chat/completions", "small JSON request"), ("/v1/stream", "50-event SSE stream")):
            for name, call in clients.items():
                for _ in range(50):  # warm up
                    await call(path)
            for r in range(rounds):
                order = list(clients.items()) if r % 2 == 0 else list(clients.items())[::-1]
                for name, call in order:
                    t = time.perf_counter()
                    for _ in range(per_round):
                        await call(path)
                    results.setdefault((what, name), []).append((time.perf_counter() - t) / per_round * 1e6)
    finally:
        await session.close()
        await pool.close()
        await runner.cleanup()
    print(f"{'':24}{'aiohttp µs':>12}{'pool µs':>10}{'pool / aiohttp':>16}   (server included, one process)")
    for what in ("small JSON request", "50-event SSE stream"):
        a = statistics.median(results[(what, "aiohttp ClientSession")])
        p = statistics.median(results[(what, "appliance UpstreamPool")])
        print(f"{what:24}{a:12.1f}{p:10.1f}{p / a:16.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.rounds, args.per_round))
    else:
        uvloop.run(main(args.rounds, args.per_round))
