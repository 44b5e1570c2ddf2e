#!/usr/bin/env python3
"""A swap, measured against a cold start, in one run.

Two on-demand endpoints of the same model on one box whose memory budget holds one of them
([residency] host_memory_budget; on a GPU box the same happens per GPU). Rounds alternate:

  cold  nothing loaded; a streamed request for B → its first token (B's cold start through the appliance)
  swap  A loaded and idle; a streamed request for B → its first token (A unloaded for B, then B's cold start)

For each, the replica events split the time: the engine's own start (B's worker spawned → healthy),
the victim's drain and stop (A: out of routing → its worker gone, swap only), and the rest, the
appliance's own share (wake, placement, waiting for memory, routing, the relay). Printed: medians
per kind, swap ÷ cold, and the appliance's share of each.

Evictions by vLLM's sleep (a wake instead of a cold start) need vLLM on a CUDA GPU; on this box
(and on CPU anywhere) the swap measured is a stop and a start.

Usage: .venv/bin/python scripts/bench_swap.py [--engine transformers|vllm] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, WORKERS_USER, api, free_port, free_range, stop_all, wait  # noqa: E402

sys.path.insert(0, str(ROOT))
from appliance.demo_model import write_demo_model  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}


def config(work: Path, model: Path, port: int, engine: str) -> Path:
    first, last = free_range()
    endpoints = ""
    for name in ("a", "b"):
        endpoints += (
            f'[[endpoints]]\nname = "{name}"\nmodel_folder = "{model}"\nruntime = "{engine}"\npublic = true\non_demand = true\n'
            'keep_alive = "1h"\nresources = { mem = "6gb" }\n'
            + ('environ = { VLLM_CPU_KVCACHE_SPACE = "1" }\n' if engine == "vllm" else "")
            + 'health_check = { path = "/health", interval = 10.0, max_retries = 5, max_wait_time = 5.0, initial_delay = 600.0 }\n\n'
        )
    path = work / "config.toml"
    path.write_text(
        f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\n\n[workers]\nport_range = [{first}, {last}]\n{WORKERS_USER}\n'
        '[gpus]\ndevices = "none"\n\n[residency]\nhost_memory_budget = "10gb"\nmin_resident_seconds = 0\n\n' + endpoints
    )
    return path


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def replica_times(url: str, key: str, endpoint: str) -> dict[str, dict[str, float]]:
    """replica id → event kind → when it first happened."""
    out: dict[str, dict[str, float]] = {}
    for e in reversed(api(url, f"/api/v1/endpoints/{endpoint}/events?limit=200", key)["data"]):
        rid = e["details"].get("replica")
        if rid and e["kind"].startswith("replica."):
            out.setdefault(rid, {}).setdefault(e["kind"], stamp(e["time"]))
    return out


def loaded(url: str, key: str) -> set[str]:
    return {e["endpoint"] for e in api(url, "/api/v1/ps", key)["data"]}


def unload_all(url: str, key: str) -> None:
    """Nothing loaded, and every worker gone (its memory back), so a cold start starts from nothing."""
    for name in loaded(url, key):
        api(url, f"/api/v1/endpoints/{name}/unload", key, {})

    def gone() -> bool:
        reps = [r for n in ("a", "b") for r in api(url, f"/api/v1/endpoints/{n}/replicas", key)["data"]]
        return all(r["state"] == "TERMINATED" for r in reps)

    wait("every endpoint unloaded", gone, 120)


async def first_token(url: str, model: str) -> float:
    async with aiohttp.ClientSession() as session:
        t = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json={"model": model, **CHAT}, timeout=aiohttp.ClientTimeout(total=900)) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            async for line in resp.content:
                if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                    ttft = time.perf_counter() - t
                    await resp.read()
                    return ttft
    raise SystemExit(f"{model}: no token in the answer")


def measure(url: str, key: str, kind: str) -> dict[str, float]:
    unload_all(url, key)
    victim_before = set(replica_times(url, key, "a"))
    if kind == "swap":
        asyncio.run(first_token(url, "a"))
        victim_before = set(replica_times(url, key, "a")) - victim_before
    before = set(replica_times(url, key, "b"))
    asked = time.time()
    ttft = asyncio.run(first_token(url, "b"))
    (rid,) = set(replica_times(url, key, "b")) - before
    b = replica_times(url, key, "b")[rid]
    engine = b["replica.healthy"] - b["replica.starting"]
    out = {"ttft": ttft, "engine": engine, "victim": 0.0, "waited": b["replica.starting"] - asked}
    if kind == "swap":
        (victim,) = victim_before
        a = replica_times(url, key, "a")[victim]
        left = a.get("replica.draining", a.get("replica.terminating"))
        out["victim"] = (a["replica.terminated"] - left) if left and "replica.terminated" in a else float("nan")
    out["appliance"] = ttft - engine - out["victim"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_demo_model(work / "model")
        port = free_port()
        path = config(work, model, port, args.engine)
        url = f"http://127.0.0.1:{port}"
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(path)], cwd=ROOT, stderr=subprocess.DEVNULL))
            key = wait("the appliance", lambda: (work / "state" / "admin.key").exists() and (work / "state" / "admin.key").read_text().strip(), 60)
            wait("/readyz", lambda: api(url, "/readyz", key)["status"] == "ok", 60)
            results: dict[str, list[dict[str, float]]] = {"cold": [], "swap": []}
            for r in range(args.rounds):
                for kind in (("cold", "swap") if r % 2 == 0 else ("swap", "cold")):
                    results[kind].append(measure(url, key, kind))
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            stop_all(procs)
    print(f"{args.engine} on the demo model, {args.rounds} rounds (medians, seconds)")
    print(f"{'':6}{'first token':>13}{'engine start':>14}{'victim out':>12}{'appliance':>11}{'waited':>9}")
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("ttft", "engine", "victim", "appliance", "waited")} for k, v in results.items()}
    for kind in ("cold", "swap"):
        m = med[kind]
        print(f"{kind:6}{m['ttft']:13.2f}{m['engine']:14.2f}{m['victim']:12.2f}{m['appliance']:11.2f}{m['waited']:9.2f}")
    print()
    print(f"swap ÷ cold, first token: {med['swap']['ttft'] / med['cold']['ttft']:.2f}")
    print(f"the appliance's share: cold {med['cold']['appliance']:.2f} s, swap {med['swap']['appliance']:.2f} s "
          f"(victim's drain and stop {med['swap']['victim']:.2f} s on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
