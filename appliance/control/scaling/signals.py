"""Autoscaling signals: scrapes the workers' /metrics, reads NVML and the replicas' process
trees, and takes the gateway's own figures. Each value is per replica, averaged over the
endpoint's replicas.

- gpu: NVML utilisation and memory of the GPUs a replica holds;
- kernel (Backend.AI's KERNEL): CPU and memory of a replica's process tree (psutil), and its
  GPUs (NVML), as Backend.AI's live-stat `pct`: cpu_util, mem, cuda_util, cuda_mem; mem_rss in bytes;
- inference, prometheus: a series of the replicas' own /metrics (vLLM, SGLang, TGI…), mean per replica;
- inference_framework (Backend.AI's INFERENCE_FRAMEWORK): the same series, aggregated as Backend.AI
  does: the total over the HEALTHY replicas divided by the active routes (replicas provisioning,
  starting, healthy or unhealthy);
- gateway: what the appliance measured itself (latency, time to first token, load, queue).

Sampled sources are kept as (time, value) history per endpoint and averaged over each
rule's window; latency figures are computed from the gateway's request records over the
window directly, so a percentile is never an average of percentiles.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Reversible
from typing import TYPE_CHECKING, Protocol

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from appliance.control.supervision.load import Load
from appliance.domain.placement import GpuInfo
from appliance.domain.scaling import pct, per_route, percentile, series_names, window_average
from appliance.domain.states import ReplicaState

if TYPE_CHECKING:
    from appliance.control.supervision.replica import Replica
    from appliance.control.supervision.supervisor import Supervisor

log = logging.getLogger(__name__)

MetricKey = tuple[str, str, float]  # (source, name, window seconds)
_ROUTES = frozenset({ReplicaState.PROVISIONING, ReplicaState.STARTING, ReplicaState.HEALTHY, ReplicaState.UNHEALTHY})
_TREE = frozenset({"cpu_util", "mem", "mem_rss"})
_CUDA = frozenset({"cuda_util", "cuda_mem"})


def _only(text: str, names: Iterable[str]) -> str:
    """The lines of an exposition that can hold `names` (any of their series names, a counter's
    `_total`): a full parse of a vLLM exposition takes tens of milliseconds of pure Python, and
    even in a thread it holds the GIL the event loop needs; a rule reads a handful of series."""
    wanted: set[str] = set()
    for name in names:
        for s in series_names(name):
            wanted |= {s, s + "_total"}
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) > 2 and parts[1] in ("TYPE", "HELP") and parts[2] in wanted:
                keep.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in wanted:
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse_exposition(text: str, names: Iterable[str] | None = None) -> dict[str, float]:
    """The series of a Prometheus text exposition (only those that can hold `names`, if given),
    summed over label sets. A counter is also found by its family name, as Backend.AI (whose parser
    drops `_total`) names it."""
    if names is not None:
        text = _only(text, names)
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names = [sample.name]
            if family.type == "counter" and sample.name == family.name + "_total":
                names.append(family.name)
            for n in names:
                found[n] = found.get(n, 0.0) + sample.value
    return found


def lookup(found: dict[str, float], name: str) -> float | None:
    """A rule's metric in a parsed exposition, under any of series_names(name)."""
    return next((found[n] for n in series_names(name) if n in found), None)


def prometheus_value(text: str, name: str) -> float | None:
    """One metric from an exposition, through the same filtered parse a scrape uses."""
    return lookup(parse_exposition(text, [name]), name)


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


async def scrape(session: aiohttp.ClientSession, url: str, timeout: float | None = None) -> str | None:
    """A worker's /metrics exposition, or None when it has none to give (an error, a non-200, too slow)."""
    limit = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}  # else the session's own
    try:
        async with session.get(url + "/metrics", **limit) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


class ProcessTree:
    """CPU % needs two readings of the same psutil.Process: keep them between samples."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def read(self, pids: list[int]) -> dict[int, tuple[float | None, float]]:
        """pid → (cpu % of one core summed over its tree, None on the first reading; rss bytes)."""
        out: dict[int, tuple[float | None, float]] = {}
        seen: set[int] = set()
        for pid in pids:
            try:
                root = psutil.Process(pid)
                members = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            cpu, rss, first = 0.0, 0.0, False
            for p in members:
                try:
                    known = self._procs.get(p.pid)
                    fresh = known is None or known.create_time() != p.create_time()
                    if fresh:
                        self._procs[p.pid] = known = p
                    assert known is not None
                    seen.add(p.pid)
                    with known.oneshot():
                        usage = known.cpu_percent(None)  # since the last reading; a fresh one only starts measuring
                        rss += known.memory_info().rss
                except psutil.Error:
                    continue
                if fresh:
                    first = first or p.pid == pid
                else:
                    cpu += usage
            out[pid] = (None if first else cpu, rss)
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        return out


class RequestRecord(Protocol):
    time: float
    endpoint: str
    replica: str | None
    status: int
    ttfb: float | None
    latency: float


class GatewayFigures(Protocol):
    """What the gateway measures; the api layer provides it, so control never imports api."""

    @property
    def records(self) -> Reversible[RequestRecord]: ...

    def queue_length(self, endpoint: str) -> int: ...


class Signals:
    def __init__(
        self, supervisor: Supervisor, gateway: GatewayFigures, load: Load, gpus: Callable[[], Awaitable[list[GpuInfo]]],
        *, scrape_timeout: float, history_seconds: float,
    ) -> None:
        self._supervisor = supervisor
        self._gateway = gateway
        self._load = load
        self._gpus = gpus
        self._scrape_timeout = scrape_timeout
        self._history_seconds = history_seconds
        self._history: dict[tuple[str, str, str], deque[tuple[float, float]]] = {}
        self._tree = ProcessTree()
        self._session: aiohttp.ClientSession | None = None

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def prune(self, now: float) -> None:
        """Drop history older than the longest window (and series that emptied: a deleted endpoint's)."""
        for key, samples in list(self._history.items()):
            while samples and now - samples[0][0] > self._history_seconds:
                samples.popleft()
            if not samples:
                del self._history[key]

    async def gather(self, endpoint: str, needed: set[MetricKey], now: float) -> dict[MetricKey, float]:
        """Each needed metric's value over its window; absent when there is none."""
        sampled: dict[tuple[str, str], float | None] = {}
        for source in {s for s, _, _ in needed if s != "gateway"}:
            names = {n for s, n, _ in needed if s == source}
            sampled.update(await self._read(source, endpoint, names))
        for name in ("inflight_per_replica", "queue_length"):
            if any(s == "gateway" and n == name for s, n, _ in needed):
                sampled[("gateway", name)] = self._gateway_sample(endpoint, name)
        for (source, name), value in sampled.items():
            if value is not None:
                self._history.setdefault((endpoint, source, name), deque()).append((now, value))
        out: dict[MetricKey, float] = {}
        for key in needed:
            source, name, window = key
            if source == "gateway" and (source, name) not in sampled:
                value = self._from_records(endpoint, name, window, now)
            else:
                value = window_average(self._history.get((endpoint, source, name), ()), now, window)
            if value is not None:
                out[key] = value
        return out

    # --- sources ------------------------------------------------------------------------------

    def _healthy(self, endpoint: str) -> list[Replica]:
        return [r for r in self._supervisor.replicas(endpoint) if r.state is ReplicaState.HEALTHY and r.live]

    async def _read(self, source: str, endpoint: str, names: set[str]) -> dict[tuple[str, str], float | None]:
        replicas = self._healthy(endpoint)
        if source == "gpu":
            util, mem = await self._gpu(replicas)
            return {("gpu", "gpu_util"): util, ("gpu", "gpu_mem"): mem}
        if source == "kernel":
            out: dict[tuple[str, str], float | None] = {}
            if names & _TREE:
                out.update(await self._kernel(endpoint, replicas))
            if names & _CUDA:  # Backend.AI's CUDA live stats are the gpu source's figures under its names
                util, mem = await self._gpu(replicas)
                out.update({("kernel", "cuda_util"): util, ("kernel", "cuda_mem"): mem})
            return out
        texts = await asyncio.gather(*(self._scrape(r.url) for r in replicas))
        # each exposition parsed once, off the loop: streams keep flowing while it runs
        parsed = await asyncio.to_thread(lambda: [parse_exposition(t, names) if t is not None else None for t in texts])
        values = {n: [lookup(p, n) if p is not None else None for p in parsed] for n in names}
        if source == "inference_framework":
            routes = sum(1 for r in self._supervisor.replicas(endpoint) if r.live and r.state in _ROUTES)
            return {(source, n): per_route(v, routes) for n, v in values.items()}
        return {(source, n): mean(v) for n, v in values.items()}

    async def _gpu(self, replicas: list[Replica]) -> tuple[float | None, float | None]:
        """Mean over replicas of their GPUs' utilisation, and of the share of their GPUs' memory in use (%)."""
        try:
            inventory = {g.uuid: g for g in await self._gpus()}
        except Exception as exc:  # noqa: BLE001 -- no NVML, whatever the error: the metric is missing, the rule says so
            log.debug("gpu metrics unavailable: %s", exc)
            inventory = {}
        per = [[inventory[u] for u in (r.allocation.uuids if r.allocation else ()) if u in inventory] for r in replicas]
        util = mean(mean(g.utilization_gpu for g in gs) for gs in per)
        mem = mean(pct(sum(g.memory_used for g in gs), sum(g.memory_total for g in gs)) for gs in per if gs)
        return util, mem

    async def _kernel(self, endpoint: str, replicas: list[Replica]) -> dict[tuple[str, str], float | None]:
        pids = [r.process.pid for r in replicas if r.process is not None and r.process.pid is not None]
        readings = await asyncio.to_thread(self._tree.read, pids)
        config = self._supervisor.table.endpoints.get(endpoint)
        # Backend.AI's mem capacity is the container's memory limit; here it is resources.mem, the limit the
        # replica's cgroup gets, or without one the box's memory.
        limit = config.resources.mem if config is not None and config.resources.mem else psutil.virtual_memory().total
        rss = [readings[p][1] for p in pids if p in readings]
        return {
            ("kernel", "cpu_util"): mean(readings[p][0] for p in pids if p in readings),
            ("kernel", "mem_rss"): mean(rss),
            ("kernel", "mem"): mean(pct(b, limit) for b in rss),
        }

    async def _scrape(self, url: str) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._scrape_timeout))
        return await scrape(self._session, url)

    def _gateway_sample(self, endpoint: str, name: str) -> float | None:
        if name == "queue_length":
            return float(self._gateway.queue_length(endpoint))
        routable = len(self._supervisor.table.routable.get(endpoint, ()))
        return self._load.total(endpoint) / routable if routable else None

    def _from_records(self, endpoint: str, name: str, window: float, now: float) -> float | None:
        records = []
        for rec in reversed(self._gateway.records):
            if now - rec.time > window:
                break
            if rec.endpoint == endpoint:
                records.append(rec)
        if name == "rps_per_replica":
            routable = len(self._supervisor.table.routable.get(endpoint, ()))
            served = sum(1 for r in records if r.replica is not None)
            return served / window / routable if routable else None
        ok = [r for r in records if r.replica is not None and r.status < 400]
        if name == "ttft_p95":
            return percentile([r.ttfb for r in ok if r.ttfb is not None], 95)
        return percentile([r.latency for r in ok], 50 if name == "latency_p50" else 95)
