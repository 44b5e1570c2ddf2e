#!/usr/bin/env python3
"""One endpoint on this box and on a local Ray Serve cluster, side by side in one run.

The same fake worker (tests/fake_worker.py, 50 tokens/s) is served four ways, measured in interleaved
rounds so drift hits all alike:

  direct     the worker the appliance started on this box, called on its own port
  appliance  that worker through the appliance's gateway (a public endpoint)
  serve      a second appliance with `[backend] kind = "ray"` on a local Ray head node: its replica's
             worker runs in a Serve replica; called through Serve's HTTP proxy (the replica's route)
  on-ray     that replica through the second appliance's gateway: then Serve's proxy (--route proxy, the
             default), or straight to the worker at the address its replica gives (--route direct)

Printed: p50 at 1 client (and added over direct), requests/s at 32 clients, 128-stream inter-token p99,
and the cluster's memory (PSS of every Ray process) idle with the endpoint deployed.

Usage: .venv/bin/python scripts/bench_ray.py [--rounds N] [--route proxy|direct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402
from benchkit import ROOT, WORKERS_USER, api, free_port, free_range, stop_all, wait  # noqa: E402

BIN = Path(sys.executable).parent


def ray_pss() -> int:
    """Bytes of PSS of every Ray process on the box (raylet, GCS, dashboard, Serve's controller, proxy, replicas)."""
    total = 0
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if "ray" in (p.info["name"] or "") or "/ray/" in line or line.startswith("ray::"):
                total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--route", choices=("proxy", "direct"), default="proxy", help="[backend] route of the appliance on Ray")
    args = parser.parse_args()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    procs: list[subprocess.Popen[bytes]] = []
    ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port")}
    temp = Path("/tmp") / f"ray-bench-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "bench"
        folder.mkdir()
        service = {"start_command": ["python", str(bg.FAKE), "--port", "8000", "--tokens-per-second", "50"], "port": 8000,
                   "health_check": {"path": "/health", "interval": 2.0, "max_retries": 3, "initial_delay": 30}}
        (folder / "model-definition.yaml").write_text(json.dumps({"models": [{"name": "bench", "model_path": "/models", "service": service}]}))
        port, ray_port, serve_port = free_port(), free_port(), free_port()
        first, last = free_range()
        endpoint = f'[[endpoints]]\nname = "bench"\nmodel_folder = "{folder}"\npublic = true\n'
        config = work / "config.toml"
        config.write_text(f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\n[gpus]\ndevices = "none"\n[workers]\nport_range = [{first}, {last}]\n'
                          f'{WORKERS_USER}{endpoint}')
        on_ray = work / "ray.toml"
        on_ray.write_text(f'[server]\nport = {ray_port}\nstate_dir = "{work / "ray-state"}"\n[gpus]\ndevices = "none"\n[backend]\nkind = "ray"\n'
                          f'address = "http://127.0.0.1:{ports["dashboard-port"]}"\nproxy = "http://127.0.0.1:{serve_port}"\nroute = "{args.route}"\n{endpoint}')
        try:
            t = time.monotonic()
            subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "4", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
                            "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", str(temp), *[f"--{k}={v}" for k, v in ports.items()]],
                           env=env, check=True, capture_output=True)
            head = time.monotonic() - t
            t = time.monotonic()
            procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(on_ray)], cwd=ROOT, stderr=subprocess.DEVNULL))
            ray_appliance = f"http://127.0.0.1:{ray_port}"
            ray_key = wait("the appliance on Ray", lambda: (work / "ray-state" / "admin.key").exists() and (work / "ray-state" / "admin.key").read_text().strip(), 60)
            wait("its replica on Ray Serve", lambda: next((r for r in api(ray_appliance, "/api/v1/endpoints/bench/replicas", ray_key)["data"]
                                                           if r["state"] == "HEALTHY"), None), 120)
            running = time.monotonic() - t
            replica = next(a for a in _applications(ports["dashboard-port"]) if a.startswith("bench-"))
            serve = f"http://127.0.0.1:{serve_port}/replicas/{replica}"
            procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], cwd=ROOT, stderr=subprocess.DEVNULL))
            appliance = f"http://127.0.0.1:{port}"
            key = wait("the appliance", lambda: (work / "state" / "admin.key").exists() and (work / "state" / "admin.key").read_text().strip(), 60)
            wait("/readyz", lambda: api(appliance, "/readyz", key)["status"] == "ok", 60)
            worker = wait("a healthy replica", lambda: next((r["port"] for r in api(appliance, "/api/v1/endpoints/bench/replicas", key)["data"]
                                                             if r["state"] == "HEALTHY"), None), 60)
            time.sleep(2.0)  # the cluster settles: its memory read idle
            memory = ray_pss()
            path = "/v1/chat/completions"
            targets = {"direct": f"http://127.0.0.1:{worker}{path}", "appliance": appliance + path, "serve": serve + path, "on-ray": ray_appliance + path}
            res = asyncio.run(measure(targets, args.rounds))
        finally:
            stop_all(procs)
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
            subprocess.run(["rm", "-rf", str(temp)], check=False)
    d = statistics.median(res["direct"]["lat"])
    print(f"fake worker (50 tokens/s), {args.rounds} interleaved rounds, {os.cpu_count()} cores, the appliance on Ray with route = {args.route}")
    print(f"{'':11}{'p50 ms':>9}{'added ms':>10}{'req/s @32':>11}{'ITL p99 ms':>12}")
    for name, r in res.items():
        m = statistics.median(r["lat"])
        print(f"{name:11}{m * 1e3:9.2f}{(m - d) * 1e3:10.2f}{statistics.median(r['tp']):11.0f}{bg.pct(r['gap'], 0.99) * 1e3:12.2f}")
    a, s, o = (statistics.median(res[k]["lat"]) - d for k in ("appliance", "serve", "on-ray"))
    print(f"\nadded p50: Serve's proxy {s * 1e3:.2f} ms, the appliance's gateway {a * 1e3:.2f} ms, the appliance on Ray (route = {args.route}) "
          f"{o * 1e3:.2f} ms (target for the Ray path: ≤ 3 ms)")
    print(f"Ray: head node up in {head:.1f} s, the replica HEALTHY {running:.1f} s after `appliance serve` started; "
          f"the cluster's PSS with it deployed and idle: {memory / 2**30:.2f} GiB")
    return 0


def _applications(dashboard_port: int) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/serve/applications/", timeout=10) as resp:
        return list(json.loads(resp.read())["applications"])


async def measure(targets: dict[str, str], rounds: int) -> dict[str, dict[str, list[float]]]:
    res: dict[str, dict[str, list[float]]] = {k: {"lat": [], "tp": [], "gap": []} for k in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in targets.values():
            await bg.latency(session, url, 30)  # warm up
        for r in range(rounds):
            n = r % len(targets)
            order = list(targets.items())[n:] + list(targets.items())[:n]
            for name, url in order:
                res[name]["lat"] += await bg.latency(session, url, 200)
            for name, url in order:
                rps, _ = await bg.throughput(session, url, 32, 2.0)
                res[name]["tp"].append(rps)
            for name, url in order:
                _, gaps = await bg.streams(session, url, 128)
                res[name]["gap"] += gaps
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return res


if __name__ == "__main__":
    sys.exit(main())
