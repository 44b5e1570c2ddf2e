#!/usr/bin/env python3
"""Gateway overhead, measured side by side in one run.

Starts the appliance (serving a fast fake upstream as its one replica), a bare aiohttp
pass-through proxy as the reference, and measures against the upstream directly, the
reference and the appliance, interleaved in rounds so drift hits all three alike:

  1. latency p50/p99 at 1 client, small JSON request → appliance added p50 / reference added p50 (target ≤ 1.2)
  2. throughput at 32 concurrent clients → appliance / reference (target ≥ 0.9)
  3. 128 concurrent SSE streams of 50 tokens at 20 ms → TTFT p99 and inter-token p99 (target ≤ reference + 2 ms)

It also prints what wall-clock figures on a shared box cannot attribute: the CPU time each proxy
process spends per request (small JSON, 50-token stream), and the TTFT p99 gap burst by burst
(paired: each burst of the appliance against the reference's burst of the same round).

With --private the endpoint needs a key: every request carries an inference key that has
rpm/tpm limits (set far above the load), so the key check, the limiter and usage accounting
are all on the measured path.

Usage: .venv/bin/python scripts/bench_gateway.py [--quick] [--private] [--streams-only] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit  # noqa: E402  (the CPU count to the nanosecond, as every bench takes it)

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_worker.py"

REFERENCE = '''
import asyncio, sys
import aiohttp
from aiohttp import web
UP = sys.argv[2]
async def handle(request):
    body = await request.read()
    async with request.app["s"].request(request.method, UP + request.path_qs, data=body,
                                        headers={"Content-Type": request.headers.get("Content-Type", "application/json")}) as up:
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
async def session(app):
    app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["s"].close()
try:
    import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # the appliance uses it too: same loop, fair
except ImportError:
    pass
app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_route("*", "/{p:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''

SMALL = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
STREAM = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url, json=SMALL) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        out.append(time.perf_counter() - t)
    return out


async def throughput(session: aiohttp.ClientSession, url: str, clients: int, seconds: float) -> tuple[float, int]:
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with session.post(url, json=SMALL) as resp:
                await resp.read()
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t), done


async def streams(session: aiohttp.ClientSession, url: str, n: int) -> tuple[list[float], list[float]]:
    ttft: list[float] = []
    gaps: list[float] = []

    async def one() -> None:
        t = time.perf_counter()
        last = None
        async with session.post(url, json=STREAM) as resp:
            async for _line in resp.content:
                if not _line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t)
                else:
                    gaps.append(now - last)
                last = now

    await asyncio.gather(*(one() for _ in range(n)))
    return ttft, gaps


def cpu_seconds(proc: psutil.Process | None) -> float:
    return benchkit.cpu_seconds(proc.pid if proc is not None else 0)


async def measure(
    targets: dict[str, str], procs: dict[str, psutil.Process | None], quick: bool, streams_only: bool, headers: dict[str, str], rounds: int | None
) -> dict[str, dict[str, Any]]:
    rounds = rounds or (2 if quick else (12 if streams_only else 6))
    n_lat = 200 if quick else 500
    tp_seconds = 2.0 if quick else 4.0
    res: dict[str, dict[str, list[float]]] = {k: {"lat": [], "tp": [], "ttft": [], "gap": [], "ttft_round": []} for k in targets}
    # CPU seconds the proxy process spent, and requests it served, per phase: explains tail gaps
    # that wall-clock figures on a shared box cannot attribute.
    cpu: dict[str, dict[str, float]] = {k: {"small": 0.0, "small_n": 0, "stream": 0.0, "stream_n": 0} for k in targets}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        for url in targets.values():  # warm up connections and code paths
            await latency(session, url, 50)
        for r in range(rounds):
            order = list(targets.items())[:: -1 if r % 2 else 1]  # alternate, so going first or second favours no one
            for name, url in order:
                before = cpu_seconds(procs[name])
                lat = await latency(session, url, 20 if streams_only else n_lat)
                res[name]["lat"] += lat
                cpu[name]["small"] += cpu_seconds(procs[name]) - before
                cpu[name]["small_n"] += len(lat)
            for name, url in order:
                before = cpu_seconds(procs[name])
                rps, n = await throughput(session, url, 32, 0.2 if streams_only else tp_seconds)
                res[name]["tp"].append(rps)
                cpu[name]["small"] += cpu_seconds(procs[name]) - before
                cpu[name]["small_n"] += n
            for name, url in order:
                before = cpu_seconds(procs[name])
                ttft, gaps = await streams(session, url, 128)
                cpu[name]["stream"] += cpu_seconds(procs[name]) - before
                cpu[name]["stream_n"] += 128
                res[name]["ttft"] += ttft
                res[name]["ttft_round"].append(pct(ttft, 0.99))
                res[name]["gap"] += gaps
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {
        name: {
            "p50_ms": statistics.median(v["lat"]) * 1e3,
            "p99_ms": pct(v["lat"], 0.99) * 1e3,
            "rps": statistics.median(v["tp"]),
            "ttft_p99_ms": pct(v["ttft"], 0.99) * 1e3,
            "ttft_p50_ms": statistics.median(v["ttft"]) * 1e3,
            "gap_p99_ms": pct(v["gap"], 0.99) * 1e3,
            "ttft_rounds_ms": [x * 1e3 for x in v["ttft_round"]],
            "cpu_small_us": cpu[name]["small"] / max(1, cpu[name]["small_n"]) * 1e6,
            "cpu_stream_us": cpu[name]["stream"] / max(1, cpu[name]["stream_n"]) * 1e6,
        }
        for name, v in res.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--private", action="store_true", help="a private endpoint: requests carry a key with rpm/tpm limits")
    parser.add_argument("--streams-only", action="store_true", help="mostly the 128-stream burst, 12 rounds (latency and throughput figures are then rough)")
    parser.add_argument("--rounds", type=int, help="rounds (each: latency, throughput and one 128-stream burst per target); default 6, 12 with --streams-only, 2 with --quick")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "bench"
        folder.mkdir()
        definition = {"models": [{"name": "bench", "model_path": "/models", "service": {
            "start_command": ["python", str(FAKE), "--port", "8000", "--tokens-per-second", "50"],
            "port": 8000, "health_check": {"path": "/health", "interval": 0.5, "max_retries": 3, "initial_delay": 30}}}]}
        (folder / "model-definition.yaml").write_text(json.dumps(definition))  # JSON is YAML
        port = free_port()
        config = root / "config.toml"
        config.write_text(f'[server]\nport = {port}\nstate_dir = "{root / "state"}"\n[gpus]\ndevices = "none"\n'
                          + ('[workers]\nuser = "root"\n' if os.geteuid() == 0 else "")  # as root, workers would get a uid that cannot read a venv under /root
                          + f'[[endpoints]]\nname = "bench"\nmodel_folder = "{folder}"\npublic = {"false" if args.private else "true"}\n')
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stderr=subprocess.DEVNULL))
            appliance = f"http://127.0.0.1:{port}"
            wait_http(appliance + "/readyz")
            key = (root / "state" / "admin.key").read_text().strip()
            deadline = time.monotonic() + 60
            upstream_port = None
            while time.monotonic() < deadline and upstream_port is None:
                req = urllib.request.Request(appliance + "/api/v1/endpoints/bench/replicas", headers={"Authorization": f"Bearer {key}"})
                reps = json.loads(urllib.request.urlopen(req, timeout=5).read())["data"]
                upstream_port = next((r["port"] for r in reps if r["state"] == "HEALTHY"), None)
                time.sleep(0.1)
            if upstream_port is None:
                raise SystemExit("the bench replica did not become healthy")
            direct = f"http://127.0.0.1:{upstream_port}"
            ref_port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", REFERENCE, str(ref_port), direct]))
            reference = f"http://127.0.0.1:{ref_port}"
            wait_http(reference + "/health")
            headers: dict[str, str] = {}
            if args.private:
                body = json.dumps({"name": "bench", "scopes": ["inference"], "rpm_limit": 10**9, "tpm_limit": 10**12}).encode()
                req = urllib.request.Request(appliance + "/api/v1/keys", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                headers["Authorization"] = "Bearer " + json.loads(urllib.request.urlopen(req, timeout=5).read())["key"]
            path = "/v1/chat/completions"
            print(f"measuring on {os.cpu_count()} cores (direct, reference proxy, appliance interleaved)…", file=sys.stderr)
            targets = {"direct": direct + path, "reference": reference + path, "appliance": appliance + path}
            proxies = {"direct": None, "reference": psutil.Process(procs[1].pid), "appliance": psutil.Process(procs[0].pid)}
            r = asyncio.run(measure(targets, proxies, args.quick, args.streams_only, headers, args.rounds))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)

    d, ref, app = r["direct"], r["reference"], r["appliance"]
    print(f"{'':12}{'p50 ms':>9}{'p99 ms':>9}{'req/s @32':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p99':>9}")
    for name in ("direct", "reference", "appliance"):
        x = r[name]
        print(f"{name:12}{x['p50_ms']:9.3f}{x['p99_ms']:9.3f}{x['rps']:11.0f}{x['ttft_p50_ms']:10.2f}{x['ttft_p99_ms']:10.2f}{x['gap_p99_ms']:9.2f}")
    print()
    print(f"{'proxy CPU per request':28}{'reference':>12}{'appliance':>12}{'ratio':>8}")
    for label, k in (("small JSON request (µs)", "cpu_small_us"), ("50-token stream (µs)", "cpu_stream_us")):
        print(f"{label:28}{ref[k]:12.0f}{app[k]:12.0f}{app[k] / ref[k]:8.2f}")
    rounds = [a - b for a, b in zip(app["ttft_rounds_ms"], ref["ttft_rounds_ms"])]
    paired = statistics.median(rounds)
    print(f"TTFT p99 per burst, appliance − reference (ms): median {paired:+.2f}, "
          f"each: {' '.join(f'{x:+.1f}' for x in rounds)}")
    pooled = app["ttft_p99_ms"] - ref["ttft_p99_ms"]
    print(f"TTFT p99 of all bursts pooled, appliance − reference (ms): {pooled:+.2f} (set by the worst burst or two)")
    ref_added = ref["p50_ms"] - d["p50_ms"]
    app_added = app["p50_ms"] - d["p50_ms"]
    checks = [
        ("added p50 latency, appliance / reference", app_added / ref_added if ref_added > 0 else float("inf"), "≤ 1.2", app_added <= 1.2 * ref_added),
        ("throughput at 32 clients, appliance / reference", app["rps"] / ref["rps"], "≥ 0.9", app["rps"] >= 0.9 * ref["rps"]),
        # Each round bursts both proxies, in alternating order: the median of the paired per-burst gaps
        # is what the appliance adds, with the drift between rounds taken out.
        ("TTFT p99 per burst, appliance − reference (ms)", paired, "≤ 2", paired <= 2),
        ("inter-token p99, appliance − reference (ms)", app["gap_p99_ms"] - ref["gap_p99_ms"], "≤ 2", app["gap_p99_ms"] <= ref["gap_p99_ms"] + 2),
    ]
    print()
    for label, value, target, ok in checks:
        print(f"{label:50}{value:8.2f}  target {target:5}  {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
