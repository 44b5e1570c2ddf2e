"""Pieces shared by the real-engine benchmarks (bench_engine.py, bench_streams.py): a vLLM endpoint under
`appliance serve`, a bare pass-through proxy on the same replica, streams timed chunk by chunk, a liveness
poll (the event loop's lag as a client sees it), and a process's CPU and run-queue wait."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent

# The bare reference: every request passed through, bodies streamed chunk by chunk as they come, on the
# appliance's event loop (uvloop) where it is installed.
BARE_PROXY = """
import asyncio, sys
from aiohttp import ClientSession, TCPConnector, web
try:
    import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
port, upstream = int(sys.argv[1]), sys.argv[2]
async def start(app):
    app["s"] = ClientSession(connector=TCPConnector(limit=0, keepalive_timeout=2), auto_decompress=False)  # under uvicorn's 5 s
async def relay(request):
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    async with request.app["s"].request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
        out = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out
app = web.Application()
app.on_startup.append(start)
app.router.add_route("*", "/{tail:.*}", relay)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
"""

# Run as root, the appliance would start workers as a uid of their own, which cannot read a venv under /root.
WORKERS_USER = 'user = "root"\n' if os.geteuid() == 0 else ""
LUMP_GAP = 0.0002  # seconds: a median gap below this means the chunks came together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(n: int = 8) -> tuple[int, int]:
    """Ports for the replicas that nothing else holds now (the default range may be another program's)."""
    while True:
        first = free_port()
        if first + n > 65535:
            continue
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return first, first + n - 1


def api(url: str, path: str, key: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def vllm_config(work: Path, model: Path, port: int, *, public: bool, environ: dict[str, str]) -> Path:
    """A config for `appliance serve` with one `vllm` endpoint "tiny" on `model`."""
    env = ", ".join(f'{k} = "{v}"' for k, v in environ.items())
    config = work / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\n[gpus]\ndevices = "none"\n[workers]\n{WORKERS_USER}port_range = {list(free_range())}\n'
        f'[[endpoints]]\nname = "tiny"\nmodel_folder = "{model}"\nruntime = "vllm"\npublic = {str(public).lower()}\n'
        f"max_concurrency = 256\nqueue_size = 1024\nenviron = {{ {env} }}\n"
    )
    return config


def healthy_replica(url: str, admin: str) -> dict[str, Any]:
    print("waiting for the vLLM replica (about a minute on 2 cores)", file=sys.stderr, flush=True)
    wait("a HEALTHY replica", lambda: api(url, "/api/v1/endpoints/tiny", admin)["status"] == "HEALTHY", 600)
    (rep,) = [r for r in api(url, "/api/v1/endpoints/tiny/replicas", admin)["data"] if r["state"] == "HEALTHY"]
    return rep


def start_bare_proxy(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_PROXY, str(port), upstream], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait("the bare proxy", lambda: urllib.request.urlopen(url + "/health", timeout=5).status == 200, 30)
    return proc, url


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


async def timed_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """One streamed request: when each SSE event with content reached the client (seconds from the start),
    and the usage it reported."""
    t = time.perf_counter()
    times: list[float] = []
    usage: dict[str, int] = {}
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter() - t
            event = json.loads(line[6:])
            if event.get("choices"):
                times.append(now)
            if event.get("usage"):
                usage = event["usage"]
    total = time.perf_counter() - t
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": times[0] if times else total, "total": total, "gaps": gaps, "usage": usage,
            "lumped": bool(gaps) and statistics.median(gaps) < LUMP_GAP and (times[0] if times else total) > total / 2}


async def liveness(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float], every: float = 0.01) -> None:
    """A GET every `every` seconds, one at a time: each answer's latency into `out` (inf on an error)."""
    while not stop.is_set():
        t = time.perf_counter()
        try:
            async with session.get(url) as resp:
                await resp.read()
            out.append(time.perf_counter() - t)
        except aiohttp.ClientError:
            out.append(float("inf"))
        await asyncio.sleep(every)


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds a process's main thread has run and waited on a run queue (runnable, no CPU given)."""
    try:
        run, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run) / 1e9, int(waited) / 1e9


def cpu_seconds(pid: int) -> float:
    """CPU seconds every thread of process `pid` has run (0 for none), to the nanosecond from schedstat: a
    short burst takes less than the clock tick that user + system times count in."""
    if not pid:
        return 0.0
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def threads_of_tree(leader: int) -> list[int]:
    """Every thread id of `leader` and its descendants."""
    root = psutil.Process(leader)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            out += [int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir()]
        except OSError:
            pass
    return out
