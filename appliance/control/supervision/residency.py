"""Which endpoints stay loaded when memory is short. A replica that cannot be placed for a request
(a wake, `/load`) or for a pinned endpoint asks for room: idle on-demand endpoints are chosen as
victims, least recently used first (domain/residency.py), they drain and stop as in a scale-in, and
what they free is reserved in the ledger for the replica that waits. GPU memory is counted per GPU
from the replicas' claims, host memory against `[residency] host_memory_budget`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from appliance.config import Config
from appliance.control.host.listener import tree_pids
from appliance.control.supervision.ledger import Ledger
from appliance.control.supervision.load import Load
from appliance.control.supervision.replica import EndpointRun, Replica
from appliance.control.telemetry import Telemetry
from appliance.domain.memory import budget, fmt_bytes
from appliance.domain.placement import Allocation, GpuInfo, GpuRequest, claim_on_gpu, claims_by_device, holdings, shortfall
from appliance.domain.residency import HOST, Holder, NoRoom, Shortfall, choose_victims
from appliance.domain.rollout import wake_target
from appliance.domain.states import ReplicaState
from appliance.errors import ApplianceError

# (endpoint, count, event kind, message, details, expected count) → applied: the supervisor's scale
Scale = Callable[[str, int, str, str, dict[str, Any], int | None], Awaitable[bool]]
Event = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]  # (endpoint, kind, message, details)


class Residency:
    def __init__(
        self, config: Config, ledger: Ledger, load: Load, clock: Callable[[], float], runs: Mapping[str, EndpointRun], scale: Scale,
        telemetry: Telemetry, publish: Callable[[], None], event: Event,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._load = load
        self._clock = clock
        self._runs = runs
        self._scale = scale
        self._telemetry = telemetry
        self._publish = publish  # a new routing table: `blocked` is read from it
        self._event = event  # an endpoint event (kind, message, details) that changes no count
        self._wakes: dict[str, asyncio.Future[None]] = {}

    # --- loads ----------------------------------------------------------------------------------

    async def wake(self, name: str) -> None:
        """A request for an endpoint with no replica (on demand, idle, evicted): ask for one. Concurrent callers share one wake."""
        waking = self._wakes.get(name)
        if waking is None:
            waking = self._wakes[name] = asyncio.ensure_future(self._wake(name, "a request arrived"))
            waking.add_done_callback(lambda _: self._wakes.pop(name, None))
        await asyncio.shield(waking)

    async def _wake(self, name: str, why: str) -> bool:
        run = self._runs.get(name)
        asleep = [r for r in run.replicas.values() if r.live and r.state is ReplicaState.SLEEPING] if run else []
        if run is not None and asleep:
            run.loading_since = run.loading_since or self._clock()
            for r in asleep:
                r.rouse.set()  # its runner makes room on its GPU and wakes the engine
            return True
        target = wake_target(run.desired, run.config.min_replicas) if run else None
        if run is None or target is None:
            return False
        run.awaiting = True
        run.blocked = None  # a new load: what blocked the last one is looked at again
        run.loading_since = self._clock()
        return await self._scale(
            name, target, "autoscale.wake", f"endpoint {name}: {why} while it had no replica: 0 → {target}", {"from": 0, "to": target, "reason": "wake"}, 0,
        )

    def healthy(self, run: EndpointRun) -> None:
        """A replica of `run` became HEALTHY: a load that was asked for has ended."""
        if run.loading_since is not None:
            self._telemetry.loaded(run.name, self._clock() - run.loading_since)
            run.loading_since = None

    async def load(self, name: str) -> bool:
        """POST /endpoints/{name}/load: as a request would, without one. False: it already has replicas."""
        return await self._wake(name, "a load was asked for")

    async def unload(self, name: str) -> bool:
        """POST /endpoints/{name}/unload: its replicas drain and stop; the next request loads it again."""
        run = self._runs.get(name)
        if run is None:
            raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found")
        if run.config.pin:
            raise ApplianceError(f"endpoint {name} is pinned (pin = true): it is never unloaded; unpin it first", status=409, code="endpoint_pinned")
        if not run.config.wakes:
            raise ApplianceError(
                f"endpoint {name} is not on demand: unloaded, no request would load it again (set on_demand = true, or scale it to 0 replicas)",
                status=409, code="not_on_demand",
            )
        if run.desired == 0:
            return False
        self._telemetry.evicted(name, "unload")
        return await self._scale(name, 0, "residency.unload", f"endpoint {name} unloaded on request: {run.desired} → 0", {"from": run.desired, "to": 0, "reason": "unload"}, None)

    # --- room -----------------------------------------------------------------------------------

    def released(self, by: Replica) -> None:
        """`by` let go of what it held: the others waiting for room look again at once."""
        for run in self._runs.values():
            for waiting in run.replicas.values():
                if waiting.waiting_for_capacity and waiting is not by:
                    waiting.room.set()

    async def make_room(self, run: EndpointRun, r: Replica, request: GpuRequest, host_claim: int | None, inventory: Sequence[GpuInfo]) -> None:
        """`r` of `run` found no room. Evict for it when a request or a pin asks for it; raise NoRoom when
        nothing can be evicted. Victims already leaving are not chosen again: what they free is reserved."""
        blocked = run.blocked
        try:
            await self._make_room(run, r, request, host_claim, inventory)
        finally:
            if run.blocked != blocked:
                self._publish()

    async def _make_room(self, run: EndpointRun, r: Replica, request: GpuRequest, host_claim: int | None, inventory: Sequence[GpuInfo]) -> None:
        if self._runs.get(run.name) is not run or not (run.loading_since is not None or run.config.pin):
            return  # a scale-out, a roll or a validation waits for room as before: eviction is for loads someone asked for
        owner = {rid: name for name, rn in self._runs.items() for rid in rn.replicas}
        leaving = {rid for rn in self._runs.values() for rid, rep in rn.replicas.items() if rep.stop_requested.is_set()}
        staying = {rid: a for rid, a in self._ledger.held().items() if rid not in leaving and rid != r.id}
        host = {rid: n for rid, n in self._ledger.host_claims().items() if rid not in leaving and rid != r.id}
        budget = self._config.residency.host_memory_budget
        short: list[Shortfall] = []
        gpu_short = shortfall(request, inventory, staying)
        if gpu_short:
            short.append(Shortfall(gpu_short, max(1, request.count)))
        if budget is not None and host_claim:
            short.append(Shortfall({HOST: sum(host.values()) + host_claim - budget}))
        holders = self._holders(owner, holdings(staying, inventory, self._config.gpus.memory_reserve), host)
        now = self._clock()
        victims: list[str] = []
        try:
            for need in short:
                for v in choose_victims(need, holders, now, self._config.residency.min_resident_seconds, waiting=run.name):
                    if v not in victims:
                        victims.append(v)
        except NoRoom as exc:
            try:  # only newly loaded endpoints stand in the way: the swap waits for them, requests queue
                for need in short:
                    choose_victims(need, holders, now, 0.0, waiting=run.name)
                run.blocked = None
            except NoRoom:
                run.blocked = exc.reason  # nothing will ever make room as things stand: requests get 503 at once
            raise
        run.blocked = None
        # Reserved first: while the victims are scaled (awaits), no other load can take what they free.
        self._reserve(r, request, inventory, host_claim, gpu_short, victims, holders)
        by_name = {h.endpoint: h for h in holders}
        for v in victims:
            h = by_name[v]
            idle = now - h.last_used
            details = {
                "victim": v, "reason": "room", "waiting": run.name, "claims": dict(h.claims), "idle_seconds": round(idle, 1), "in_flight": h.busy,
            }
            freed = ", ".join(f"{fmt_bytes(n)} on {d}" for d, n in sorted(h.claims.items()))
            self._telemetry.evicted(v, "room")
            why = f"least recently used: idle {idle:.0f}s; frees {freed}"
            if self._sleep(v):
                await self._event(v, "residency.evicted", f"endpoint {v} put to sleep to make room for {run.name} ({why})", {**details, "by": "sleep"})
                continue
            await self._scale(v, 0, "residency.evicted", f"endpoint {v} unloaded to make room for {run.name} ({why})", {**details, "by": "stop"}, None)

    def _sleep(self, name: str) -> bool:
        """Send the replicas of `name` to sleep, when every one of them can (an engine with the sleep API, on a
        shared GPU with a claim, and no failed sleep before). False: evict by stopping them."""
        run = self._runs[name]
        live = [r for r in run.replicas.values() if r.live]
        if not run.config.sleep or run.sleep_frees is False or not live:
            return False
        if not all(r.sleeps and r.state is ReplicaState.HEALTHY and r.allocation is not None and r.allocation.claim for r in live):
            return False
        for r in live:
            r.nap.set()
        self._publish()  # out of routing before a new request picks one
        return True

    async def sleep_failed(self, run: EndpointRun, why: str) -> None:
        """A replica of `run` could not sleep for an eviction: the eviction stops it instead."""
        if self._runs.get(run.name) is run and run.desired:
            await self._scale(run.name, 0, "residency.evicted", f"endpoint {run.name} unloaded: {why}", {"victim": run.name, "reason": "room", "by": "stop"}, None)

    def _holders(self, owner: Mapping[str, str], gpu: Mapping[str, Mapping[str, int]], host: Mapping[str, int]) -> list[Holder]:
        claims: dict[str, dict[str, int]] = {}
        for rid, per in gpu.items():
            name = owner.get(rid)
            if name is not None:
                mine = claims.setdefault(name, {})
                for device, n in per.items():
                    mine[device] = mine.get(device, 0) + n
        for rid, n in host.items():
            name = owner.get(rid)
            if name is not None:
                mine = claims.setdefault(name, {})
                mine[HOST] = mine.get(HOST, 0) + n
        out = []
        now = self._clock()
        for name, per in claims.items():
            run = self._runs[name]
            loaded = loaded_at(run.replicas.values()) or now
            out.append(Holder(
                endpoint=name, claims=per, evictable=run.config.evictable and run.desired > 0, busy=self._load.total(name),
                loaded_at=loaded, last_used=max(self._load.last_request.get(name, loaded), loaded),
            ))
        return out

    def _reserve(
        self, r: Replica, request: GpuRequest, inventory: Sequence[GpuInfo], host_claim: int | None, gpu_short: Mapping[str, int],
        victims: Sequence[str], holders: Sequence[Holder],
    ) -> None:
        """Hold the room the victims free (or that is already free by claims) for `r`."""
        freed: dict[str, int] = {}
        for h in holders:
            if h.endpoint in victims:
                for device, n in h.claims.items():
                    freed[device] = freed.get(device, 0) + n
        fits = sorted((d for d, need in gpu_short.items() if need - freed.get(d, 0) <= 0), key=lambda d: gpu_short[d] - freed.get(d, 0))
        allocation: Allocation | None = None
        count = max(1, request.count)
        if len(fits) >= count:
            chosen = tuple(fits[:count])
            if request.count:
                allocation = Allocation(uuids=chosen)
            else:
                g = next(g for g in inventory if g.uuid == chosen[0])
                allocation = Allocation(uuids=chosen, share=request.share, claim=claim_on_gpu(request, g))
        self._ledger.reserve(r.id, allocation, host_claim)


def loaded_at(replicas: Iterable[Replica]) -> float | None:
    """When an endpoint was loaded: its oldest replica's start; None before any started."""
    return min((r.started_at for r in replicas if r.started_at is not None), default=None)


def memory_books(
    held: Mapping[str, Allocation], host: Mapping[str, int], gpus: Sequence[GpuInfo], reserve: int, host_budget: int | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes claimed and bytes handed out, per device (a GPU's uuid, or host): /metrics and `ps`."""
    claims = claims_by_device(held, gpus, reserve)
    budgets = {g.uuid: budget(g.memory_total, reserve) for g in gpus}
    if host_budget is not None:
        budgets[HOST] = host_budget
        claims[HOST] = sum(host.values())
    return claims, budgets


def worker_trees(runs: Mapping[str, EndpointRun]) -> Callable[[], dict[str, set[int]]]:
    """The pids of each live replica's tree, read off the event loop by the function returned (the
    replicas are listed here, on the loop)."""
    workers = [(r.id, r.process.pid, r.process.cgroup) for run in runs.values() for r in run.replicas.values() if r.live and r.process and r.process.pid]
    return lambda: {rid: tree_pids(pid, cgroup) | {pid} for rid, pid, cgroup in workers}


def resident(
    runs: Mapping[str, EndpointRun], ledger: Ledger, load: Load, gpus: Sequence[GpuInfo], reserve: int, now: float, trees: Mapping[str, set[int]],
) -> list[dict[str, Any]]:
    """What `appliance ps` shows: each endpoint with replicas, its memory, and when it would be unloaded."""
    held, host = ledger.held(), ledger.host_claims()
    by_pid = {p.pid: (g, p.used_memory or 0) for g in gpus for p in g.processes}
    index = {g.uuid: g.index for g in gpus}
    out: list[dict[str, Any]] = []
    for name, run in runs.items():
        live = [r for r in run.replicas.values() if r.live and r.process is not None]  # loaded: a worker runs (not one waiting for room)
        if not live:
            continue
        loaded = loaded_at(live)
        last = load.last_request.get(name)
        idle = now - max(last or 0.0, loaded or now)
        keep = load.idle_timeout(name, run.config.idle_timeout_seconds, run.config.pin)
        mine = holdings({r.id: held[r.id] for r in live if r.id in held}, gpus, reserve)
        in_use = 0
        for r in live:
            in_use += sum(by_pid[pid][1] for pid in trees.get(r.id, ()) if pid in by_pid)
        out.append({
            "endpoint": name,
            "status": run.status[0].value if run.status else "PENDING",
            "replicas": {r.id: r.state.value for r in live},
            "gpus": sorted({index.get(u, -1) for uuid_claims in mine.values() for u in uuid_claims}),
            "gpu_claim": sum(n for per in mine.values() for n in per.values()) or None,
            "host_claim": sum(host.get(r.id, 0) for r in live) or None,
            "gpu_memory_used": in_use if by_pid else None,
            "in_flight": load.total(name),
            "idle_seconds": round(max(0.0, idle), 1),
            "unloads_in_seconds": None if keep is None or not run.config.wakes else round(max(0.0, keep - idle), 1),
            "pin": run.config.pin,
            "priority": run.config.priority,
            "on_demand": run.config.on_demand,
        })
    out.sort(key=lambda e: (not e["pin"], -e["priority"], e["endpoint"]))
    return out
