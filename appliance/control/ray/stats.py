"""What a Serve replica of the appliance reports for autoscaling (Serve's `record_autoscaling_stats`):
the figures the endpoint's rules name, measured where the replica runs, under keys the appliance's
Serve policy (policy.py) reads back. One replica's view: the policy combines the replicas' figures as
the appliance's own autoscaler does (means per replica, Backend.AI's total ÷ routes).

Keys are `source/name` (`series/name` for a series of the worker's /metrics) for figures sampled now (kernel, gpu, the worker's /metrics, requests in flight,
requests served so far), and `source/name/window` for percentiles over a rule's window."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence

import aiohttp
import psutil

from appliance.control.host.gpus import Nvml
from appliance.control.scaling.signals import ProcessTree, lookup, mean, parse_exposition, scrape
from appliance.domain.scaling import SERIES_SOURCES, percentile, pct

SERVED = "gateway/served_total"  # requests answered so far: the policy takes their rate over a rule's window
_TREE = frozenset({"cpu_util", "mem", "mem_rss"})
_GPU = {"gpu_util": "util", "gpu_mem": "mem", "cuda_util": "util", "cuda_mem": "mem"}


def key(source: str, name: str, window: float | None = None) -> str:
    """The sources that read the worker's /metrics share one key per series: one scrape serves them all."""
    source = "series" if source in SERIES_SOURCES else source
    return f"{source}/{name}" if window is None else f"{source}/{name}/{window:g}"


def windowed(source: str, name: str) -> bool:
    """Percentiles are computed per window by the replica; everything else is sampled and averaged by the policy."""
    return source == "gateway" and name in ("latency_p50", "latency_p95", "ttft_p95")


class ReplicaStats:
    """Requests the replica relays (in flight, answered, their latencies) and the figures of its worker."""

    def __init__(self, needed: Iterable[Sequence[object]], mem_limit: float | None) -> None:
        self._needed = [(str(s), str(n), float(w)) for s, n, w in needed]  # type: ignore[arg-type]
        self._mem_limit = mem_limit or psutil.virtual_memory().total
        self._tree = ProcessTree()
        self.inflight = 0
        self.served = 0
        self._done: deque[tuple[float, float, float | None]] = deque()  # (finished at, latency, time to first byte)
        self._keep = max((w for s, n, w in self._needed if windowed(s, n)), default=0.0)  # no percentile rule: nothing kept

    def started(self) -> float:
        self.inflight += 1
        return time.monotonic()

    def finished(self, began: float, first_byte: float | None, ok: bool) -> None:
        self.inflight -= 1
        self.served += 1
        if ok and self._keep:
            now = time.monotonic()
            self._done.append((now, now - began, None if first_byte is None else first_byte - began))
            while self._done and now - self._done[0][0] > self._keep:
                self._done.popleft()

    async def sample(self, pid: int | None, session: aiohttp.ClientSession, url: str) -> dict[str, float]:
        """The figures the rules need, now; a figure that cannot be had is left out (the rule reports it missing)."""
        out: dict[str, float] = {key("gateway", "inflight_per_replica"): float(self.inflight), SERVED: float(self.served)}
        names = {(s, n) for s, n, _ in self._needed}
        if pid is not None and any(s == "kernel" and n in _TREE for s, n in names):
            cpu, rss = (await asyncio.to_thread(self._tree.read, [pid])).get(pid, (None, None))
            if cpu is not None:
                out[key("kernel", "cpu_util")] = cpu
            if rss is not None:
                out[key("kernel", "mem_rss")] = rss
                out[key("kernel", "mem")] = pct(rss, self._mem_limit) or 0.0
        wanted_gpu = {(s, n) for s, n in names if s in ("gpu", "kernel") and n in _GPU}
        if wanted_gpu:
            figures = await asyncio.to_thread(_my_gpus)
            for s, n in wanted_gpu:
                if figures.get(_GPU[n]) is not None:
                    out[key(s, n)] = figures[_GPU[n]]  # type: ignore[assignment]
        series = {(s, n) for s, n in names if s in SERIES_SOURCES}
        if series:
            text = await scrape(session, url, timeout=2.0)
            if text is not None:
                found = parse_exposition(text, {n for _, n in series})
                for s, n in series:
                    value = lookup(found, n)
                    if value is not None:
                        out[key(s, n)] = value
        now = time.monotonic()
        for s, n, w in self._needed:
            if windowed(s, n):
                recent = [(lat, ttfb) for at, lat, ttfb in self._done if now - at <= w]
                q = percentile([t for _, t in recent if t is not None] if n == "ttft_p95" else [lat for lat, _ in recent], 50 if n == "latency_p50" else 95)
                if q is not None:
                    out[key(s, n, w)] = q
        return out


@functools.cache
def _nvml() -> Nvml:
    return Nvml()


def _my_gpus() -> dict[str, float | None]:
    """Mean utilisation and memory in use (%) of the GPUs Ray gave this replica (CUDA_VISIBLE_DEVICES: indices or UUIDs)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return {}
    try:
        inventory = _nvml().inventory()
    except Exception:  # noqa: BLE001 -- no NVML on this node: the GPU figures are missing, the rule says so
        return {}
    mine = [g for g in inventory if str(g.index) in visible or g.uuid in visible]
    if not mine:
        return {}
    return {
        "util": mean(g.utilization_gpu for g in mine),
        "mem": pct(sum(g.memory_used for g in mine), sum(g.memory_total for g in mine)),
    }
