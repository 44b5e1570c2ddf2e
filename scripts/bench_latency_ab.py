#!/usr/bin/env python3
"""Added latency of one client's small requests, two appliance checkouts side by side in one run.

Each checkout serves its own fast fake worker (as in bench_gateway.py); the bare reference proxy
and the direct calls go to the first one's worker. Targets take turns every 50 requests, so drift
on a shared box hits them alike. Prints each target's p50 and its added p50 over the direct call
as a ratio of the reference proxy's (the keyed-path target is ≤ 1.1), with a 90% interval of that ratio
(the rounds resampled): on a shared 2-core box one run's ratio moves by ±0.1 for the same code.

Usage: .venv/bin/python scripts/bench_latency_ab.py CHECKOUT[:public] [CHECKOUT[:public] ...]
  e.g. scripts/bench_latency_ab.py /tmp/before /path/to/appliance       (keyed: a key with rpm/tpm limits)
       scripts/bench_latency_ab.py /path/to/appliance:public /path/to/appliance
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402  (the fake worker, the reference proxy and the helpers)

ROUNDS = int(os.environ.get("ROUNDS", "30"))
PER_TURN = 50


def start(checkout: str, root: Path, name: str, private: bool) -> tuple[subprocess.Popen[bytes], str, int, str]:
    """An appliance from `checkout` with one endpoint on the fake worker: its process, URL, worker port and a limited key."""
    folder = root / name
    folder.mkdir()
    definition = {"models": [{"name": "bench", "model_path": "/models", "service": {
        "start_command": ["python", str(bg.FAKE), "--port", "8000", "--tokens-per-second", "50"],
        "port": 8000, "health_check": {"path": "/health", "interval": 0.5, "max_retries": 3, "initial_delay": 30}}}]}
    (folder / "model-definition.yaml").write_text(json.dumps(definition))
    port = bg.free_port()
    config = root / f"{name}.toml"
    config.write_text(f'[server]\nport = {port}\nstate_dir = "{root / (name + "-state")}"\n[gpus]\ndevices = "none"\n'
                      + ('[workers]\nuser = "root"\n' if os.geteuid() == 0 else "")
                      + f'[[endpoints]]\nname = "bench"\nmodel_folder = "{folder}"\npublic = {str(not private).lower()}\n')
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)],
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=checkout))
    url = f"http://127.0.0.1:{port}"
    bg.wait_http(url + "/readyz")
    admin = {"Authorization": "Bearer " + (root / (name + "-state") / "admin.key").read_text().strip()}
    deadline = time.monotonic() + 60
    worker = None
    while worker is None and time.monotonic() < deadline:
        req = urllib.request.Request(url + "/api/v1/endpoints/bench/replicas", headers=admin)
        worker = next((r["port"] for r in json.loads(urllib.request.urlopen(req, timeout=5).read())["data"] if r["state"] == "HEALTHY"), None)
        time.sleep(0.1)
    if worker is None:
        raise SystemExit(f"{checkout}: the bench replica did not become healthy")
    limits = {} if os.environ.get("UNLIMITED") else {"rpm_limit": 10**9, "tpm_limit": 10**12}
    body = json.dumps({"name": "bench", "scopes": ["inference"], **limits}).encode()
    req = urllib.request.Request(url + "/api/v1/keys", data=body, method="POST", headers={**admin, "Content-Type": "application/json"})
    return proc, url, worker, json.loads(urllib.request.urlopen(req, timeout=5).read())["key"]


async def measure(targets: dict[str, tuple[str, dict[str, str]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url, headers in targets.values():  # warm up
            for _ in range(50):
                async with session.post(url, json=bg.SMALL, headers=headers) as resp:
                    await resp.read()
        names = list(targets)
        for r in range(ROUNDS):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
                url, headers = targets[name]
                for _ in range(PER_TURN):
                    t = time.perf_counter()
                    async with session.post(url, json=bg.SMALL, headers=headers) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status
                    out[name].append(time.perf_counter() - t)
    return out


def main() -> int:
    checkouts = sys.argv[1:]
    if not checkouts:
        print(__doc__, file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            targets: dict[str, tuple[str, dict[str, str]]] = {}
            workers = []
            for i, spec in enumerate(checkouts):
                checkout, _, mode = spec.partition(":")
                proc, url, worker, key = start(checkout, root, f"a{i}", private=mode != "public")
                procs.append(proc)
                workers.append(worker)
                targets[f"{i}: {spec}"] = (url + "/v1/chat/completions", {} if mode == "public" else {"Authorization": f"Bearer {key}"})
            direct = f"http://127.0.0.1:{workers[0]}"
            ref_port = bg.free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", bg.REFERENCE, str(ref_port), direct]))
            bg.wait_http(f"http://127.0.0.1:{ref_port}/health")
            targets["reference proxy"] = (f"http://127.0.0.1:{ref_port}/v1/chat/completions", {})
            targets["direct"] = (direct + "/v1/chat/completions", {})
            print(f"{ROUNDS} rounds of {PER_TURN} requests per target, 1 client, {os.cpu_count()} cores…", file=sys.stderr)
            res = asyncio.run(measure(targets))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
    d = statistics.median(res["direct"])
    ref = statistics.median(res["reference proxy"]) - d
    spread = round_spread(res)
    print(f"{'':40}{'p50 ms':>9}{'added ms':>10}{'added / reference':>19}{'90% interval':>16}")
    for name, values in res.items():
        m = statistics.median(values)
        low, high = spread.get(name, (None, None))
        band = f"{low:.2f} – {high:.2f}" if low is not None else ""
        print(f"{name[:40]:40}{m * 1e3:9.3f}{(m - d) * 1e3:10.3f}{(m - d) / ref:19.2f}{band:>16}")
    return 0


def round_spread(res: dict[str, list[float]], resamples: int = 200) -> dict[str, tuple[float, float]]:
    """A 90% interval of each target's ratio: the rounds drawn again with replacement (a bootstrap), the
    ratio taken over the drawn rounds' requests each time. It says how far one run's ratio can be trusted."""
    def turns(values: list[float]) -> list[list[float]]:
        return [values[i:i + PER_TURN] for i in range(0, len(values), PER_TURN)]

    per_round = {name: turns(values) for name, values in res.items()}
    rounds = min(len(t) for t in per_round.values())
    rng = random.Random(0)
    ratios: dict[str, list[float]] = {name: [] for name in res if name not in ("direct", "reference proxy")}
    for _ in range(resamples):
        picked = [rng.randrange(rounds) for _ in range(rounds)]

        def median_of(name: str) -> float:
            return statistics.median([x for i in picked for x in per_round[name][i]])

        d, ref = median_of("direct"), median_of("reference proxy")
        for name in ratios:
            ratios[name].append((median_of(name) - d) / (ref - d))
    out: dict[str, tuple[float, float]] = {}
    for name, values in ratios.items():
        values.sort()
        out[name] = (values[int(0.05 * len(values))], values[int(0.95 * len(values)) - 1])
    return out


if __name__ == "__main__":
    raise SystemExit(main())
