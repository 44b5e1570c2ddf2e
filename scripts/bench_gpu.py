#!/usr/bin/env python3
"""The gateway on a fast engine: a random-weight Llama big enough to keep a GPU busy (about 0.4 B
parameters, made here: no download) on `transformers serve --continuous-batching` on one GPU, and
streamed chat requests of 64 tokens, direct to the replica and through the appliance (a key with limits,
as real clients use), in alternating rounds in one run, at 1, 16 and 64 concurrent streams. On a GPU the
engine is fast, so this is where the gateway's own cost shows.

Prints, and writes with --json, per concurrency: output tokens/s direct and through the appliance and their
ratio, the TTFT the appliance adds (p50), and the appliance's CPU per 1,000 tokens streamed through it.
Needs NVML and a GPU (the GPU kit runs it: scripts/gpu_check.sh).

Usage: python scripts/bench_gpu.py [--streams 1 16 64] [--rounds 2] [--tokens 64] [--json FILE]
       python scripts/bench_gpu.py --cpu-smoke     # the same plumbing on CPU with the tiny demo model (no figure worth keeping)
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
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, WORKERS_USER, api, cpu_seconds, free_port, free_range, stop_all, timed_stream, wait  # noqa: E402

# About 0.4 B parameters (float32 on disk, 1.6 GB): a decode step takes the GPU long enough to batch streams.
SHAPE = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 4,
         "max_position_embeddings": 512}


async def burst(url: str, headers: dict[str, str], model: str, streams: int, tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t = time.perf_counter()
        got = await asyncio.gather(*(timed_stream(session, url, body, headers) for _ in range(streams)))
        wall = time.perf_counter() - t
    produced = sum(g["usage"].get("completion_tokens", len(g["gaps"]) + 1) for g in got)
    return {"tps": produced / wall, "tokens": produced, "ttft": [g["ttft"] for g in got]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: the tiny demo model on CPU, 1 and 2 streams of 8 tokens")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.streams, args.rounds, args.tokens = [1, 2], 1, 8
    from appliance.control.host.gpus import Nvml
    from appliance.demo_model import write_demo_model

    try:
        device = "CPU (smoke run)" if args.cpu_smoke else Nvml().inventory()[0].name
    except Exception as exc:  # noqa: BLE001 -- no NVML or no GPU: nothing to measure here
        print(f"bench_gpu: needs a GPU ({exc})", file=sys.stderr)
        return 3
    shape = {} if args.cpu_smoke else SHAPE
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.monotonic()
        model = write_demo_model(work / "model", shape=shape)
        made = time.monotonic() - t
        port = free_port()
        first, last = free_range()
        config = work / "config.toml"
        config.write_text(
            f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\n[workers]\n{WORKERS_USER}port_range = [{first}, {last}]\n'
            f'[[endpoints]]\nname = "bench"\nmodel_folder = "{model}"\nruntime = "transformers"\ncontinuous_batching = {str(not args.cpu_smoke).lower()}\n'
            f'max_concurrency = 256\nqueue_size = 1024\nresources = {{ gpus = {0 if args.cpu_smoke else 1} }}\n'
            'health_check = { path = "/health", interval = 1.0, max_retries = 5, initial_delay = 300.0 }\n'
        )
        try:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], cwd=ROOT, stderr=subprocess.DEVNULL)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            admin = wait("the appliance", lambda: (work / "state" / "admin.key").exists() and (work / "state" / "admin.key").read_text().strip(), 60)
            wait("a HEALTHY replica", lambda: api(url, "/api/v1/endpoints/bench", admin)["status"] == "HEALTHY", 120)
            (rep,) = [r for r in api(url, "/api/v1/endpoints/bench/replicas", admin)["data"] if r["state"] == "HEALTHY"]
            key = api(url, "/api/v1/keys", admin, {"name": "bench", "scopes": ["inference"], "rpm_limit": 10**9, "tpm_limit": 10**12})["key"]
            direct = (f"http://127.0.0.1:{rep['port']}/v1/chat/completions", {}, str(model))
            gateway = (url + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, "bench")
            asyncio.run(burst(*direct, 4, 8))  # the model loads on its first request; warm both paths
            asyncio.run(burst(*gateway, 4, 8))
            rows = [measure(direct, gateway, n, args.rounds, args.tokens, proc.pid) for n in args.streams]
        finally:
            stop_all(procs)
    report = {"device": device, "model": {**shape, "made_in_seconds": round(made, 1)}, "tokens_per_stream": args.tokens,
              "rounds": args.rounds, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{device}: transformers serve, random Llama {shape.get('hidden_size', 'tiny')}×{shape.get('num_hidden_layers', 2)}, {args.tokens} tokens per stream")
    print(f"{'streams':>8}{'direct tok/s':>14}{'appliance tok/s':>17}{'ratio':>8}{'TTFT +ms p50':>14}{'CPU ms/1k tok':>15}")
    for r in rows:
        print(f"{r['streams']:8d}{r['direct_tps']:14.0f}{r['appliance_tps']:17.0f}{r['ratio']:8.3f}{r['ttft_added_ms']:+14.1f}{r['cpu_ms_per_1k_tokens']:15.1f}")
    return 0


def measure(direct: tuple[str, dict[str, str], str], gateway: tuple[str, dict[str, str], str], streams: int, rounds: int, tokens: int,
            appliance_pid: int) -> dict[str, Any]:
    got: dict[str, list[dict[str, Any]]] = {"direct": [], "appliance": []}
    cpu = 0.0
    for r in range(rounds):
        for name in (("direct", "appliance") if r % 2 == 0 else ("appliance", "direct")):
            before = cpu_seconds(appliance_pid)
            got[name].append(asyncio.run(burst(*(direct if name == "direct" else gateway), streams, tokens)))
            if name == "appliance":
                cpu += cpu_seconds(appliance_pid) - before
    d, a = (statistics.median(x["tps"] for x in got[k]) for k in ("direct", "appliance"))
    ttft = {k: statistics.median(t for x in got[k] for t in x["ttft"]) for k in got}
    through = sum(x["tokens"] for x in got["appliance"])
    return {"streams": streams, "direct_tps": d, "appliance_tps": a, "ratio": a / d if d else 0.0,
            "ttft_added_ms": (ttft["appliance"] - ttft["direct"]) * 1e3, "cpu_ms_per_1k_tokens": cpu * 1e3 / through * 1000 if through else 0.0}


if __name__ == "__main__":
    sys.exit(main())
