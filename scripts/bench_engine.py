#!/usr/bin/env python3
"""A real vLLM replica direct, through a bare pass-through proxy and through the appliance, side by side in one run.

Starts `appliance serve` with one private `vllm` endpoint on the locally made tiny model, and a bare aiohttp
pass-through proxy (benchkit.BARE_PROXY, about 20 lines) on the same replica: the fair reference, since on
shared cores any proxy takes CPU from the engine. Every request carries an inference key with rpm/tpm limits,
as real clients' do. At each concurrency it runs the same workload (streamed chat requests of about 32 prompt
tokens and exactly 32 output tokens) on the three paths in rounds whose order rotates, so drift hits all
alike, while a liveness GET every 10 ms goes to the same path (the replica's /health, the proxy's, the
appliance's /healthz). It prints, per concurrency and path:

  - output tokens/s (median over rounds) and its ratio to the bare proxy's (median of per-round ratios; target ≥ 0.97);
  - TTFT p50/p99 and inter-token p50/p99 over every request of the rounds; the median TTFT the path adds over
    the bare proxy's (median of per-round differences; target ≤ +5 ms);
  - the proxy process's own CPU per output token;
  - the liveness poll's p50/p99/max: the event loop's lag as a client sees it (target: appliance p99 ≤ 20 ms).

With --pin (the default where there are at least 2 CPUs) the engine's whole tree, every thread, and this load
generator run on the last CPU, the proxies on the others, as on a GPU box with cores to spare; the load
generator does the same work for every path, so sharing the engine's CPU slows all alike. Exits non-zero
when a target is missed.

Usage: .venv/bin/python scripts/bench_engine.py [--requests 64] [--concurrency 1 8 32] [--rounds 6] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchkit import (
    ROOT, api, cpu_seconds, free_port, healthy_replica, liveness, pct, start_bare_proxy, stop_all, threads_of_tree, timed_stream, vllm_config,
    wait,
)

sys.path.insert(0, str(ROOT))
from appliance.demo_model import write_demo_model  # noqa: E402

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 2)  # about 32 prompt tokens with the chat template
OUTPUT_TOKENS = 32
PATHS = ("direct", "bare proxy", "appliance")
TARGET_RATIO, TARGET_TTFT_MS, TARGET_LAG_MS = 0.97, 5.0, 20.0


def body(model: str) -> dict[str, Any]:
    return {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }


async def run(base: str, live: str, headers: dict[str, str], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` streamed requests, `concurrency` at a time, with the liveness poll running beside them."""
    queue = list(range(requests))
    results: list[dict[str, Any]] = []
    lag: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while queue:
                queue.pop()
                results.append(await timed_stream(session, base + "/v1/chat/completions", body("tiny"), headers))

        stop = asyncio.Event()
        poller = asyncio.create_task(liveness(session, live, stop, lag))
        t = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t
        stop.set()
        await poller
    tokens = sum(r["usage"].get("completion_tokens", 0) for r in results)
    return {
        "tps": tokens / wall, "tokens": tokens, "ttft": [r["ttft"] for r in results], "gaps": [g for r in results for g in r["gaps"]],
        "lag": lag, "prompt": statistics.mean(r["usage"].get("prompt_tokens", 0) for r in results),
        "lumped": sum(r["lumped"] for r in results),
    }


def pin(tids: list[int], cpus: set[int]) -> int:
    """Each thread onto `cpus` (sched_setaffinity on a pid moves only its main thread)."""
    n = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
            n += 1
        except OSError:
            pass
    return n


def report(conc: int, got: dict[str, list[dict[str, Any]]], cpu: dict[str, float]) -> list[tuple[str, float, str, bool]]:
    bare = got["bare proxy"]
    print(f"\nconcurrency {conc}: {len(bare)} rounds")
    print(f"{'path':<11} {'tok/s':>7} {'÷bare':>6} {'TTFT p50':>9} {'p99':>8} {'+bare p50':>9} {'ITL p50':>8} {'p99':>7} "
          f"{'CPU µs/tok':>10} {'live p50':>9} {'p99':>7} {'max':>7} {'lumped':>6}")
    for name, runs in got.items():
        ttft = [x for r in runs for x in r["ttft"]]
        gaps = [x for r in runs for x in r["gaps"]]
        lag = [x for r in runs for x in r["lag"]]
        ratio = statistics.median(r["tps"] / b["tps"] for r, b in zip(runs, bare))
        added = statistics.median((statistics.median(r["ttft"]) - statistics.median(b["ttft"])) * 1000 for r, b in zip(runs, bare))
        tokens = sum(r["tokens"] for r in runs)
        cpu_tok = f"{cpu[name] / tokens * 1e6:>10.1f}" if name != "direct" else f"{'–':>10}"
        print(f"{name:<11} {statistics.median(r['tps'] for r in runs):>7.0f} {ratio:>6.3f} {statistics.median(ttft) * 1000:>7.1f}ms "
              f"{pct(ttft, 0.99) * 1000:>6.1f}ms {added:>+7.2f}ms {pct(gaps, 0.5) * 1000:>6.2f}ms {pct(gaps, 0.99) * 1000:>5.1f}ms {cpu_tok} "
              f"{pct(lag, 0.5) * 1000:>7.1f}ms {pct(lag, 0.99) * 1000:>5.1f}ms {max(lag, default=0) * 1000:>5.0f}ms {sum(r['lumped'] for r in runs):>6}")
    app = got["appliance"]
    ratios = [a["tps"] / b["tps"] for a, b in zip(app, bare)]
    added = [(statistics.median(a["ttft"]) - statistics.median(b["ttft"])) * 1000 for a, b in zip(app, bare)]
    lag99 = pct([x for r in app for x in r["lag"]], 0.99) * 1000
    print(f"  per round, appliance ÷ bare: {' '.join(f'{x:.3f}' for x in ratios)}; TTFT p50 added ms: {' '.join(f'{x:+.1f}' for x in added)}")
    return [
        (f"c={conc} tokens/s, appliance ÷ bare proxy", statistics.median(ratios), f"≥ {TARGET_RATIO}", statistics.median(ratios) >= TARGET_RATIO),
        (f"c={conc} TTFT p50, appliance − bare proxy (ms)", statistics.median(added), f"≤ +{TARGET_TTFT_MS:g}", statistics.median(added) <= TARGET_TTFT_MS),
        (f"c={conc} appliance liveness p99 (ms)", lag99, f"≤ {TARGET_LAG_MS:g}", lag99 <= TARGET_LAG_MS),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=6, help="runs per path and concurrency; the order of paths rotates each round")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the engine, the proxies and this script share every CPU")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    args.pin = args.pin and len(cpus) >= 2
    engine_cpus, rest = ({cpus[-1]}, set(cpus[:-1])) if args.pin else (set(cpus), set(cpus))
    omp = str(cpus[-1]) if args.pin else "auto"  # vLLM's CPU worker binds its OpenMP threads to these CPUs
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    model = write_demo_model(work / "tiny")
    port = free_port()
    config = vllm_config(work, model, port, public=False, environ={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": omp})
    procs: list[subprocess.Popen[bytes]] = []
    log = open(work / "server.log", "wb")
    procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        admin = wait("the appliance", lambda: (work / "state" / "admin.key").read_text().strip(), 60)
        rep = healthy_replica(url, admin)
        direct = f"http://127.0.0.1:{rep['port']}"
        bare_proc, bare = start_bare_proxy(direct)
        procs.append(bare_proc)
        key = api(url, "/api/v1/keys", admin, {"name": "bench", "scopes": ["inference"], "rpm_limit": 10**9, "tpm_limit": 10**12})["key"]
        if args.pin:
            threads = pin(threads_of_tree(rep["pid"]), engine_cpus)
            pin(threads_of_tree(procs[0].pid) + threads_of_tree(bare_proc.pid), rest)
            pin(threads_of_tree(os.getpid()), engine_cpus)
            print(f"engine ({threads} threads) and load generator on CPU {sorted(engine_cpus)}; appliance and bare proxy on CPU {sorted(rest)}")
        paths = {
            "direct": (direct, direct + "/health", {}, 0),
            "bare proxy": (bare, bare + "/health", {}, bare_proc.pid),
            "appliance": (url, url + "/healthz", {"Authorization": f"Bearer {key}"}, procs[0].pid),
        }
        for base, live, headers, _ in paths.values():  # warm every path
            asyncio.run(run(base, live, headers, 8, 4))
        checks: list[tuple[str, float, str, bool]] = []
        prompt = 0.0
        for conc in args.concurrency:
            got: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
            cpu = dict.fromkeys(PATHS, 0.0)
            for rnd in range(args.rounds):
                for name in PATHS[rnd % 3:] + PATHS[: rnd % 3]:
                    base, live, headers, pid = paths[name]
                    before = cpu_seconds(pid)
                    got[name].append(asyncio.run(run(base, live, headers, args.requests, conc)))
                    cpu[name] += cpu_seconds(pid) - before
            prompt = got["direct"][-1]["prompt"]
            checks += report(conc, got, cpu)
        print(f"\nprompt ≈ {prompt:.0f} tokens, {OUTPUT_TOKENS} output tokens per request, {args.requests} requests per run, {args.rounds} rounds, "
              f"{'pinned' if args.pin else 'not pinned'}; live: the liveness GET's latency (the proxy's event-loop lag as a client sees it)")
        for label, value, target, ok in checks:
            print(f"{label:48} {value:8.3f}  target {target:6}  {'PASS' if ok else 'FAIL'}")
        return 0 if all(ok for *_, ok in checks) else 1
    finally:
        stop_all(procs)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
