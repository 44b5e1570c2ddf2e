#!/usr/bin/env python3
"""Autoscaling: how fast decisions come, how many requests scaling loses, what a wake costs.

Starts `appliance serve` with fake workers (tests/fake_worker.py) and measures in one run:

  1. threshold breach → decision: closed-loop clients push requests in flight per replica over a
     rule's threshold; time until the endpoint's desired count changes (target ≤ interval + 1 s)
  2. requests lost at a sustained open-loop rate across a rule-driven scale-out, a rule-driven
     scale-in and a rolling update (target 0)
  3. wake from zero: a request to a scaled-to-zero endpoint, against the worker's own start time
     measured by starting the same command directly (overhead target ≤ 0.2 s)

Usage: .venv/bin/python scripts/bench_scaling.py [--interval 5] [--rate 40] [--trials 3]
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
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import FAKE, free_port, wait_http  # noqa: E402

HEALTH = {"path": "/health", "interval": 1.0, "max_retries": 3, "initial_delay": 30}
STARTUP_DELAY = 1.0  # the fake worker's own start: a stand-in for loading a model


def folder(root: Path, name: str, *knobs: str) -> Path:
    path = root / name
    path.mkdir()
    service = {"start_command": ["python", str(FAKE), "--port", "8000", *knobs], "port": 8000, "health_check": HEALTH}
    (path / "model-definition.yaml").write_text(json.dumps({"models": [{"name": name, "model_path": "/models", "service": service}]}))
    return path


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str, key: str) -> None:
        self.s, self.url, self.h = session, url, {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.s.request(method, self.url + path, json=body, headers=self.h) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise SystemExit(f"{method} {path}: {resp.status} {data}")
            return data

    async def until(self, what: str, check: Any, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return time.monotonic()
            await asyncio.sleep(0.02)
        raise SystemExit(f"timed out waiting for {what}")

    async def desired(self, name: str) -> int:
        return int((await self.call("GET", f"/api/v1/endpoints/{name}"))["desired_replicas"])

    async def live(self, name: str) -> list[dict[str, Any]]:
        return [r for r in (await self.call("GET", f"/api/v1/endpoints/{name}/replicas"))["data"] if r["state"] != "TERMINATED"]

    async def healthy_count(self, name: str, n: int) -> bool:
        live = await self.live(name)
        return len(live) == n and all(r["state"] == "HEALTHY" for r in live)

    async def rule(self, name: str, **fields: Any) -> str:
        return str((await self.call("POST", f"/api/v1/endpoints/{name}/autoscaling-rules", fields))["id"])

    async def drop_rule(self, name: str, rule: str) -> None:
        await self.call("DELETE", f"/api/v1/endpoints/{name}/autoscaling-rules/{rule}")


async def chat(session: aiohttp.ClientSession, url: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return 0


async def breach_to_decision(api: Api, url: str, trials: int, limit: float) -> list[float]:
    """Closed-loop clients make in-flight requests per replica jump from 0 to ~16 at once."""
    rule = await api.rule("bench", metric_source="gateway", metric_name="inflight_per_replica", comparator="GREATER_THAN",
                          threshold=4, step_size=1, max_replicas=2, window_seconds=0.5, cooldown_seconds=0)
    delays = []
    for _ in range(trials):
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                await chat(api.s, url, "bench")

        started = time.monotonic()
        clients = [asyncio.create_task(client()) for _ in range(16)]
        decided = await api.until("a scale-out decision", lambda: _is(api.desired("bench"), 2))
        delays.append(decided - started)
        if delays[-1] > limit:  # show what the appliance recorded meanwhile
            print(f"  trial {len(delays)} over {limit:g}s; recent events:", file=sys.stderr)
            for e in reversed((await api.call("GET", "/api/v1/events?limit=40"))["data"]):
                print("   ", e["time"], e["endpoint"], e["kind"], e["message"][:150], file=sys.stderr)
        stop.set()
        await asyncio.gather(*clients)
        await api.call("PATCH", "/api/v1/endpoints/bench", {"replicas": 1})  # back to one (clears the autoscaler's count)
        await api.until("one replica again", lambda: api.healthy_count("bench", 1))
    await api.drop_rule("bench", rule)
    return delays


async def _is(value: Any, expected: Any) -> bool:
    return await value == expected


class OpenLoop:
    """A fixed request rate, independent of answers; every outcome counted per phase."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rate: float) -> None:
        self.s, self.url, self.rate = session, url, rate
        self.phase = "warm-up"
        self.sent: dict[str, int] = {}
        self.failed: dict[str, list[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start, i = time.monotonic(), 0
        while True:
            i += 1
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            task = asyncio.create_task(self._one(self.phase))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, phase: str) -> None:
        self.sent[phase] = self.sent.get(phase, 0) + 1
        status = await chat(self.s, self.url, "bench")
        if status != 200:
            self.failed.setdefault(phase, []).append(status)

    async def stop(self) -> None:
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        await asyncio.gather(*list(self._tasks))


async def losses(api: Api, url: str, rate: float) -> OpenLoop:
    load = OpenLoop(api.s, url, rate)
    await asyncio.sleep(2)
    load.phase = "scale-out (rule)"
    rule = await api.rule("bench", metric_source="gateway", metric_name="rps_per_replica", comparator="GREATER_THAN",
                          threshold=rate * 0.6, step_size=1, max_replicas=2, window_seconds=2, cooldown_seconds=0)
    await api.until("scale-out under load", lambda: api.healthy_count("bench", 2))
    await api.drop_rule("bench", rule)
    await asyncio.sleep(2)
    load.phase = "scale-in (rule)"
    rule = await api.rule("bench", metric_source="gateway", metric_name="rps_per_replica", comparator="LESS_THAN",
                          threshold=rate * 10, step_size=-1, min_replicas=1, window_seconds=2, cooldown_seconds=0)
    await api.until("scale-in under load", lambda: api.healthy_count("bench", 1))
    await api.drop_rule("bench", rule)
    await asyncio.sleep(2)
    load.phase = "rolling update"
    generation = (await api.call("PATCH", "/api/v1/endpoints/bench", {"environ": {"FAKE_VERSION": "2"}}))["generation"]

    async def rolled() -> bool:
        live = await api.live("bench")
        return len(live) == 1 and live[0]["generation"] == generation and live[0]["state"] == "HEALTHY"

    await api.until("the rolling update", rolled)
    await asyncio.sleep(2)
    await load.stop()
    return load


async def worker_start(runs: int) -> list[float]:
    """Spawn → first healthy answer of the worker command, started directly."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
        for _ in range(runs):
            port = free_port()
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(sys.executable, str(FAKE), "--port", str(port), "--startup-delay", str(STARTUP_DELAY),
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.005)
            out.append(time.monotonic() - started)
            proc.terminate()
            await proc.wait()
    return out


async def wakes(api: Api, url: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        await api.until("scale to zero", lambda: _is(api.live("nap"), []), timeout=180)
        await api.until("status SCALED_TO_ZERO", lambda: _status(api, "nap", "SCALED_TO_ZERO"))
        started = time.monotonic()
        status = await chat(api.s, url, "nap")
        out.append(time.monotonic() - started)
        if status != 200:
            raise SystemExit(f"the waking request failed: {status}")
    return out


async def _status(api: Api, name: str, status: str) -> bool:
    return (await api.call("GET", f"/api/v1/endpoints/{name}"))["status"] == status


async def measure(url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        api = Api(session, url, key)
        await api.until("bench healthy", lambda: api.healthy_count("bench", 1))
        print("1/3 breach → decision…", file=sys.stderr)
        delays = await breach_to_decision(api, url, args.trials, args.interval + 1)
        print("2/3 requests lost while scaling…", file=sys.stderr)
        load = await losses(api, url, args.rate)
        print("3/3 wake from zero…", file=sys.stderr)
        start = await worker_start(args.trials)
        wake = await wakes(api, url, args.trials)
        steps = await wake_steps(api)
    return {"delays": delays, "load": load, "start": start, "wake": wake, "steps": steps}


async def wake_steps(api: Api) -> list[tuple[str, float]]:
    """Where the last wake's time went, from the event log: offsets from the wake event."""
    rows = list(reversed((await api.call("GET", "/api/v1/endpoints/nap/events?limit=100"))["data"]))
    first = max(i for i, e in enumerate(rows) if e["kind"] == "autoscale.wake")
    t0 = _seconds(rows[first]["time"])
    steps = []
    for e in rows[first:]:
        label = e["kind"] if e["kind"] != "replica.note" else e["message"].split(": ", 1)[-1]
        steps.append((label, _seconds(e["time"]) - t0))
        if e["kind"] == "replica.healthy":
            break
    # The fake worker prints "<unix time> listening on PORT" once it accepts connections.
    replica = rows[-1]["details"].get("replica") if rows else None
    for e in rows[first:]:
        replica = e["details"].get("replica") or replica
    if replica:
        async with api.s.get(f"{api.url}/api/v1/endpoints/nap/replicas/{replica}/logs?tail=200", headers=api.h) as resp:
            for line in (await resp.text()).splitlines():
                head, _, rest = line.partition(" ")
                if rest.startswith("listening on"):
                    steps.insert(-1, ("worker listening", float(head) - t0))
    return steps


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=5.0, help="[autoscaling] interval_seconds (default 5, the default)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second during the loss test")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench = folder(root, "bench", "--latency", "0.02")
        nap = folder(root, "nap", "--startup-delay", str(STARTUP_DELAY))
        port = free_port()
        config = root / "config.toml"
        config.write_text(
            f'[server]\nport = {port}\nstate_dir = "{root / "state"}"\n[gpus]\ndevices = "none"\n'
            f"[autoscaling]\ninterval_seconds = {args.interval}\n"
            f'[[endpoints]]\nname = "bench"\nmodel_folder = "{bench}"\npublic = true\nreplicas = 1\nmax_replicas = 2\n'
            f'[[endpoints]]\nname = "nap"\nmodel_folder = "{nap}"\npublic = true\nreplicas = 1\nmin_replicas = 0\nidle_timeout_seconds = 1\n'
        )
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/readyz")
            key = (root / "state" / "admin.key").read_text().strip()
            print(f"measuring on {os.cpu_count()} cores, autoscaling interval {args.interval:g}s…", file=sys.stderr)
            r = asyncio.run(measure(url, key, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    delays, load, start, wake = r["delays"], r["load"], r["start"], r["wake"]
    print(f"breach → decision (s): {', '.join(f'{d:.2f}' for d in delays)}  (interval {args.interval:g})")
    for phase in ("scale-out (rule)", "scale-in (rule)", "rolling update"):
        failed = load.failed.get(phase, [])
        print(f"{phase:18} sent {load.sent.get(phase, 0):5}  failed {len(failed)}" + (f"  statuses {sorted(set(failed))}" if failed else ""))
    overhead = statistics.median(wake) - statistics.median(start)
    print(f"worker start alone (s): {', '.join(f'{x:.3f}' for x in start)}")
    print(f"wake from zero, request answered (s): {', '.join(f'{x:.3f}' for x in wake)}")
    print("last wake, from the event log: " + "; ".join(f"{label} +{t * 1000:.0f} ms" for label, t in r["steps"]))
    at = dict(r["steps"])
    if {"replica.starting", "worker listening", "replica.healthy"} <= set(at):
        own = at["replica.starting"] + at["replica.healthy"] - at["worker listening"]
        print(f"  the appliance's own share: wake → spawned + listening → HEALTHY = {own * 1000:.0f} ms")
    lost = sum(len(load.failed.get(p, [])) for p in ("scale-out (rule)", "scale-in (rule)", "rolling update"))
    checks = [
        ("breach → decision, worst (s)", max(delays), f"≤ {args.interval + 1:g}", max(delays) <= args.interval + 1),
        ("requests lost across scale-out, scale-in, rolling update", lost, "0", lost == 0),
        ("wake overhead beyond the worker's own start, median (s)", overhead, "≤ 0.2", overhead <= 0.2),
    ]
    print()
    for name, value, target, ok in checks:
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{name:58} {shown:>8}   target {target:8} {'met' if ok else 'NOT met'}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
