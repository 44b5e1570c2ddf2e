#!/usr/bin/env python3
"""Streams from a real vLLM replica under concurrency: direct, through a bare pass-through proxy and
through the appliance, side by side in one run.

Starts `appliance serve` with one `vllm` endpoint on the locally made tiny model (every thread of
the engine's tree at nice 5 or more; the appliance itself starts it at nice 10, its session's
autogroup too), a bare aiohttp pass-through proxy (about 20 lines, benchkit.BARE_PROXY) in a process of its own,
and an inference key with rpm/tpm limits. Then, in rounds whose order rotates, it sends bursts
of N concurrent `/v1/completions` streams of T tokens (ignore_eos) to each path while a liveness
poll runs every 10 ms against the same path (the replica's /health, the proxy's, the appliance's
/healthz). Per path it prints:

  - the median inter-chunk gap and the TTFT (medians over streams), and the output tokens/s;
  - the share of lumped streams and bursts: a stream is lumped when its chunks arrive together at the
    end (median gap under 0.2 ms and TTFT over half its total time), a burst when one of its streams is;
  - how many liveness answers came per second of burst, their p99 and the slowest one (the proxy's loop lag);
  - the proxy's CPU per output token, and the share of the time its main thread and the engine's API
    server waited for a CPU (runnable, on the run queue: /proc/PID/task/PID/schedstat).

Usage: .venv/bin/python scripts/bench_streams.py [--rounds 6] [--concurrency 8] [--tokens 128] [--nice 5]
       [--engine-group-nice N] [--verbose] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchkit import LUMP_GAP, ROOT, WORKERS_USER, api, cpu_seconds, free_port, free_range, liveness, schedstat, start_bare_proxy, wait

sys.path.insert(0, str(ROOT))
from appliance.demo_model import write_demo_model  # noqa: E402

async def stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str, tokens: int) -> dict[str, float]:
    """One streamed completion: when each chunk of the body arrived, as the client's reads see it."""
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    t = time.perf_counter()
    times: list[float] = []
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        async for _ in resp.content.iter_any():
            times.append(time.perf_counter() - t)
    gaps = [b - a for a, b in zip(times, times[1:])] or [0.0]
    total = times[-1] if times else time.perf_counter() - t
    ttft = times[0] if times else total
    return {"ttft": ttft, "gap": statistics.median(gaps), "total": total, "lumped": float(statistics.median(gaps) < LUMP_GAP and ttft > total / 2)}


async def burst(url: str, live: str, headers: dict[str, str], model: str, conc: int, tokens: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = asyncio.Event()
        lat: list[float] = []
        poller = asyncio.create_task(liveness(session, live, stop, lat))
        t = time.perf_counter()
        streams = await asyncio.gather(*(stream(session, url, headers, model, tokens) for _ in range(conc)))
        wall = time.perf_counter() - t
        stop.set()
        await poller
    return {"streams": streams, "wall": wall, "tokens": conc * tokens, "polls": len(lat), "poll_max": max(lat, default=float("inf")), "lat": lat}


def renice_tree(pid: int, nice: int) -> int:
    """Every thread of the engine's tree to at least `nice` (setpriority on a pid changes only its main thread)."""
    n = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            try:
                if os.getpriority(os.PRIO_PROCESS, int(task.name)) < nice:  # never above what the appliance gave it
                    os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
                n += 1
            except OSError:
                pass
    return n


def summary(bursts: list[dict[str, Any]]) -> dict[str, float]:
    streams = [s for b in bursts for s in b["streams"]]
    wall = sum(b["wall"] for b in bursts)
    return {
        "gap_ms": statistics.median(s["gap"] for s in streams) * 1000,
        "ttft_ms": statistics.median(s["ttft"] for s in streams) * 1000,
        "ttft_p90_ms": statistics.quantiles([s["ttft"] for s in streams], n=10)[-1] * 1000,
        "lumped_streams": sum(s["lumped"] for s in streams) / len(streams),
        "lumped_bursts": sum(any(s["lumped"] for s in b["streams"]) for b in bursts) / len(bursts),
        "tps": sum(b["tokens"] for b in bursts) / wall,
        "polls_per_s": sum(b["polls"] for b in bursts) / wall,
        "poll_max_ms": max(b["poll_max"] for b in bursts) * 1000,
        "poll_p99_ms": statistics.quantiles([x for b in bursts for x in b["lat"]] or [0.0, 0.0], n=100)[-1] * 1000,
        "cpu_us_tok": sum(b["cpu"] for b in bursts) / sum(b["tokens"] for b in bursts) * 1e6,
        "rq_wait": sum(b["rq_wait"] for b in bursts) / wall,
        "engine_rq_wait": sum(b["engine_rq_wait"] for b in bursts) / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="bursts per path; the order of paths rotates each round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--nice", type=int, default=5, help="the engine's tree runs at this nice value")
    parser.add_argument("--engine-group-nice", type=int, default=None, help="set the nice value of the engine's autogroup (Linux)")
    parser.add_argument("--verbose", action="store_true", help="per burst: what the appliance saw of each stream beside what the client saw")
    parser.add_argument("--keep", action="store_true", help="leave the appliance's log and state in place")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    model = write_demo_model(work / "tiny")
    state = work / "state"
    config = work / "config.toml"
    port = free_port()
    config.write_text(
        f'[server]\nport = {port}\nstate_dir = "{state}"\n[gpus]\ndevices = "none"\n[workers]\n{WORKERS_USER}port_range = {list(free_range())}\n'
        f'[[endpoints]]\nname = "tiny"\nmodel_folder = "{model}"\nruntime = "vllm"\npublic = false\nmax_concurrency = 256\nqueue_size = 1024\n'
        'environ = { VLLM_CPU_KVCACHE_SPACE = "1" }\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    log = open(work / "server.log", "wb")
    procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        admin = wait("the appliance", lambda: (state / "admin.key").read_text().strip(), 60)
        print(f"waiting for the vLLM replica (about a minute on 2 cores); log: {work / 'server.log'}", file=sys.stderr, flush=True)
        started = wait("a replica", lambda: [r["pid"] for r in api(url, "/api/v1/endpoints/tiny/replicas", admin)["data"] if r.get("pid")], 120)
        renice_tree(started[0], args.nice)  # while it loads too; its later threads are reniced once it is ready
        wait("a HEALTHY replica", lambda: api(url, "/api/v1/endpoints/tiny", admin)["status"] == "HEALTHY", 600)
        (rep,) = [r for r in api(url, "/api/v1/endpoints/tiny/replicas", admin)["data"] if r["state"] == "HEALTHY"]
        threads = renice_tree(rep["pid"], args.nice)
        if args.engine_group_nice is not None:  # the scheduler's autogroup of the engine's session, weighed as a whole
            Path(f"/proc/{rep['pid']}/autogroup").write_text(str(args.engine_group_nice))
        direct = f"http://127.0.0.1:{rep['port']}"
        bare_proc, bare = start_bare_proxy(direct)
        procs.append(bare_proc)
        key = api(url, "/api/v1/keys", admin, {"name": "bench", "scopes": ["inference"], "rpm_limit": 10**9, "tpm_limit": 10**12})["key"]
        paths = {
            "direct": (direct, direct + "/health", {}),
            "bare proxy": (bare, bare + "/health", {}),
            "appliance": (url, url + "/healthz", {"Authorization": f"Bearer {key}"}),
        }
        proxy_pid = {"direct": 0, "bare proxy": procs[1].pid, "appliance": procs[0].pid}
        group = Path(f"/proc/{rep['pid']}/autogroup")
        group_nice = group.read_text().split()[-1] if group.exists() else "-"
        print(f"engine tree ({threads} threads) at nice ≥ {args.nice}, its autogroup at nice {group_nice}; {os.cpu_count()} CPUs shared", flush=True)
        for name, (base, live, headers) in paths.items():  # warm every path
            asyncio.run(burst(base, live, headers, "tiny", 2, 8))
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        names = list(paths)
        for rnd in range(args.rounds):
            for name in names[rnd % 3 :] + names[: rnd % 3]:
                base, live, headers = paths[name]
                pid = proxy_pid[name]
                cpu, (_, waited), (_, engine_waited) = cpu_seconds(pid) if pid else 0.0, schedstat(pid), schedstat(rep["pid"])
                b = asyncio.run(burst(base, live, headers, "tiny", args.concurrency, args.tokens))
                b["cpu"] = cpu_seconds(pid) - cpu if pid else 0.0
                b["rq_wait"] = schedstat(pid)[1] - waited if pid else 0.0
                b["engine_rq_wait"] = schedstat(rep["pid"])[1] - engine_waited
                if name == "appliance" and args.verbose:  # what the appliance itself saw of each stream
                    seen = api(url, f"/api/v1/requests?limit={args.concurrency}", admin)["data"]
                    print("  appliance saw ttfb/latency ms:", " ".join(f"{r['ttfb'] * 1000:.0f}/{r['latency'] * 1000:.0f}" for r in seen),
                          "| client saw ttft/total ms:", " ".join(f"{x['ttft'] * 1000:.0f}/{x['total'] * 1000:.0f}" for x in b["streams"]), flush=True)
                got[name].append(b)
        res = {name: summary(b) for name, b in got.items()}
        ref = res["bare proxy"]
        print(f"{args.concurrency} concurrent streams of {args.tokens} tokens, {args.rounds} bursts per path (rq wait: the share of the time the proxy's main thread waited for a CPU)")
        print(f"{'path':<11} {'gap p50':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'lumped str.':>11} {'lumped bursts':>13} "
              f"{'tok/s':>7} {'÷bare':>6} {'live/s':>7} {'live p99':>9} {'live max':>9} {'CPU µs/tok':>10} {'rq wait':>7} {'engine rq':>9}")
        for name, r in res.items():
            print(f"{name:<11} {r['gap_ms']:>6.2f}ms {r['ttft_ms']:>7.1f}ms {r['ttft_p90_ms']:>7.1f}ms {r['lumped_streams']:>11.0%} "
                  f"{r['lumped_bursts']:>13.0%} {r['tps']:>7.0f} {r['tps'] / ref['tps']:>6.3f} {r['polls_per_s']:>7.1f} {r['poll_p99_ms']:>7.1f}ms {r['poll_max_ms']:>7.1f}ms "
                  f"{r['cpu_us_tok']:>10.1f} {r['rq_wait']:>7.0%} {r['engine_rq_wait']:>9.0%}")
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
