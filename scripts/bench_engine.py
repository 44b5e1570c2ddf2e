#!/usr/bin/env python3
"""A real vLLM replica, direct and through the appliance, measured side by side in one run.

Starts `appliance serve` with one `vllm` endpoint on the locally made tiny model, then sends the
same workload (streamed chat requests of about 32 prompt tokens and exactly 32 output tokens) at
each concurrency, alternating direct-to-replica and through-the-appliance rounds so drift hits
both alike. It prints, per concurrency:

  - output tokens/s through the appliance ÷ direct (target ≥ 0.97);
  - the TTFT p50 the appliance adds (target ≤ +2 ms at concurrency 1);
  - the appliance process's own CPU seconds per 1,000 output tokens.

On a small CPU box the engine, the gateway and the load generator would otherwise share the
cores, and the engine's pace would swing with whatever else runs. With --pin (the default where
there are at least 2 CPUs) the engine's whole tree, every thread, and this load generator run
on the last CPU, the appliance alone on the others. The load generator does the same work on
both paths, so sharing the engine's CPU slows both alike, while the gateway pays for its own
CPU time on cores of its own, as it would on a GPU box with cores to spare. Ratios are
taken per round (a direct run and an appliance run back to back) and the median is reported.

Usage: .venv/bin/python scripts/bench_engine.py [--requests 64] [--concurrency 1 8 32] [--rounds 6] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from appliance.demo_model import write_demo_model  # noqa: E402

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 2)  # about 32 prompt tokens with the chat template
OUTPUT_TOKENS = 32


def body(model: str) -> dict[str, Any]:
    return {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }


def api(url: str, path: str, key: str) -> Any:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def wait(what: str, check: Any, timeout: float) -> Any:
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


async def one(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str) -> tuple[float, int, int]:
    """TTFT seconds, prompt tokens, completion tokens of one streamed request."""
    t = time.perf_counter()
    ttft = None
    usage: dict[str, int] = {}
    async with session.post(url + "/v1/chat/completions", json=body(model), headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                ttft = time.perf_counter() - t
            if event.get("usage"):
                usage = event["usage"]
    return ttft or (time.perf_counter() - t), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)


async def run(url: str, headers: dict[str, str], model: str, requests: int, concurrency: int) -> dict[str, Any]:
    queue = list(range(requests))
    results: list[tuple[float, int, int]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while queue:
                queue.pop()
                results.append(await one(session, url, headers, model))

        t = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    out_tokens = sum(r[2] for r in results)
    return {"tps": out_tokens / wall, "ttft": [r[0] for r in results], "tokens": out_tokens, "prompt": statistics.mean(r[1] for r in results)}


def pin(pid: int, cpus: set[int]) -> int:
    """Every thread of `pid` onto `cpus` (sched_setaffinity on a pid moves only its main thread)."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            n += 1
        except OSError:
            pass
    return n


def engine_tree(leader: int) -> list[int]:
    root = psutil.Process(leader)
    return [root.pid] + [c.pid for c in root.children(recursive=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=6, help="direct/appliance pairs per concurrency, order alternating")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the engine, the appliance and this script share every CPU")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    args.pin = args.pin and len(cpus) >= 2
    engine_cpus, rest = ({cpus[-1]}, set(cpus[:-1])) if args.pin else (set(cpus), set(cpus))
    omp = str(cpus[-1]) if args.pin else "auto"  # vLLM's CPU worker binds its OpenMP threads to these CPUs
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    model = write_demo_model(work / "tiny")
    state = work / "state"
    config = work / "config.toml"
    config.write_text(
        f'[server]\nport = 0\nstate_dir = "{state}"\n[gpus]\ndevices = "none"\n'
        + ('[workers]\nuser = "root"\n' if os.geteuid() == 0 else "")  # as root, workers would get a uid that cannot read a venv under /root
        + f'[[endpoints]]\nname = "tiny"\nmodel_folder = "{model}"\nruntime = "vllm"\nmax_concurrency = 256\nqueue_size = 1024\n'
        'environ = { VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "' + omp + '" }\n'
    )
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        info = wait("the appliance", lambda: json.loads((state / "server.json").read_text()), 60)
        url, key = info["url"], (state / "admin.key").read_text().strip()
        print(f"waiting for the vLLM replica (about a minute on 2 cores); log: {work / 'server.log'}", flush=True)
        wait("a HEALTHY replica", lambda: api(url, "/api/v1/endpoints/tiny", key)["status"] == "HEALTHY", 600)
        (rep,) = [r for r in api(url, "/api/v1/endpoints/tiny/replicas", key)["data"] if r["state"] == "HEALTHY"]
        direct = f"http://127.0.0.1:{rep['port']}"
        me = psutil.Process(server.pid)
        if args.pin:
            threads = sum(pin(p, engine_cpus) for p in engine_tree(rep["pid"]))
            pin(server.pid, rest)
            pin(os.getpid(), engine_cpus)
            print(f"engine ({threads} threads) and load generator on CPU {sorted(engine_cpus)}; appliance on CPU {sorted(rest)}")
        headers = {"Authorization": f"Bearer {key}"}
        asyncio.run(run(url, headers, "tiny", 8, 4))  # warm both paths
        print(f"{'conc':>4} {'direct tok/s':>12} {'appl. tok/s':>11} {'ratio':>6} {'TTFT p50 direct':>15} {'added':>9} {'appl. CPU s/1k tok':>18}")
        for conc in args.concurrency:
            ratios: list[float] = []
            added: list[float] = []
            d_tps: list[float] = []
            a_tps: list[float] = []
            d_ttft: list[float] = []
            cpu = 0.0
            tokens = 0
            for rnd in range(args.rounds):
                order = ("direct", "appliance") if rnd % 2 == 0 else ("appliance", "direct")
                got: dict[str, dict[str, Any]] = {}
                for path in order:
                    if path == "direct":
                        got[path] = asyncio.run(run(direct, {}, "tiny", args.requests, conc))
                    else:
                        before = sum(me.cpu_times()[:2])
                        got[path] = asyncio.run(run(url, headers, "tiny", args.requests, conc))
                        cpu += sum(me.cpu_times()[:2]) - before
                        tokens += got[path]["tokens"]
                d, a = got["direct"], got["appliance"]
                ratios.append(a["tps"] / d["tps"])
                added.append((statistics.median(a["ttft"]) - statistics.median(d["ttft"])) * 1000)
                d_tps.append(d["tps"])
                a_tps.append(a["tps"])
                d_ttft += d["ttft"]
            r = a
            print(
                f"{conc:>4} {statistics.median(d_tps):>12.1f} {statistics.median(a_tps):>11.1f} {statistics.median(ratios):>6.3f} "
                f"{statistics.median(d_ttft) * 1000:>13.1f}ms {statistics.median(added):>+7.2f}ms {cpu / tokens * 1000:>18.3f}",
                flush=True,
            )
            print(f"     per round: ratio {' '.join(f'{x:.3f}' for x in ratios)}; added ms {' '.join(f'{x:+.2f}' for x in added)}", flush=True)
        print(f"prompt ≈ {r['prompt']:.0f} tokens, {OUTPUT_TOKENS} output tokens per request, {args.requests} requests per run, {args.rounds} rounds, "
              f"{'pinned' if args.pin else 'not pinned'}; tok/s, ratio and added TTFT are medians over rounds")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
