"""A replica evicted by its engine's sleep (vLLM's sleep mode, level 1): it drains, the engine moves its
weights to host RAM and frees its KV cache, and its process lives on, never routed to. What it still
holds on its GPU (read from NVML) stays claimed, its weights count against the host memory budget,
and a request wakes it in place: room is made on its own GPU again, then `/wake_up`.

Support is found, not assumed: an engine that does not answer `/is_sleeping` is never sent to sleep,
and one whose sleep fails or frees less than half of its claim is stopped instead, as every eviction
of that endpoint is from then on (vLLM on CPU, or started without --enable-sleep-mode)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from appliance.config import Config
from appliance.control.host.listener import tree_pids
from appliance.control.supervision.drain import drain
from appliance.control.supervision.ledger import Ledger
from appliance.control.supervision.load import Load
from appliance.control.supervision.backend import ReplicaBackend
from appliance.control.supervision.prober import Record
from appliance.control.supervision.replica import EndpointRun, GpuSource, Replica, RunnerHost
from appliance.control.telemetry import Telemetry
from appliance.domain.memory import fmt_bytes
from appliance.domain.placement import Allocation, GpuInfo, Unplaceable, visible
from appliance.domain.residency import NoRoom
from appliance.domain.states import ReplicaState
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

LEVEL = 1  # weights to host RAM, KV cache dropped: a wake reloads nothing from disk
MIN_FREED = 0.5  # a sleep must free at least this part of the replica's claim to be worth keeping it asleep
_ROOM_RETRY = 1.0  # seconds between placement attempts of a wake while its GPU is full (a release retries at once)



class Sleeper:
    def __init__(
        self, config: Config, backend: ReplicaBackend, ledger: Ledger, load: Load, gpus: GpuSource, host: RunnerHost, record: Record,
        clock: Callable[[], float], telemetry: Telemetry,
    ) -> None:
        self._config = config
        self._backend = backend
        self._ledger = ledger
        self._load = load
        self._gpus = gpus
        self._host = host
        self._record = record
        self._clock = clock
        self._telemetry = telemetry

    async def nap(self, run: EndpointRun, r: Replica, exited: asyncio.Future[int]) -> str | None:
        """Put `r` to sleep (or book it asleep when a probe found it so), and wake it when a request wants it.
        Returns None once it serves again, "" when a stop came or its worker ended (the runner goes on as
        for any stop or exit), or why waking it failed (the runner replaces it)."""
        outside = r.found_asleep
        r.found_asleep = False
        if not outside:
            why = self._cannot_hold_weights(run, r)
            if why:
                await self._host.sleep_failed(run, why)
                return None  # it serves until the stop that follows
            await drain(self._load, self._record, self._clock, run, r, exited, "draining to sleep")
            if exited.done() or r.stop_requested.is_set():
                return ""
            failed = await self._backend.engine_call(r, f"/sleep?level={LEVEL}")
            if failed is None and await self._backend.asleep(r) is not True:
                failed = "the engine still says it is awake (/is_sleeping)"
            if failed is not None:
                return await self._stays_awake(run, r, f"sleep failed: {failed}")
        slept_at = self._clock()
        claim = r.allocation.claim if r.allocation is not None else None
        held = await self._held_on_gpu(r)
        if not outside and claim and (held is None or held > claim * (1 - MIN_FREED)):
            seen = "NVML shows no process of it" if held is None else f"NVML shows {fmt_bytes(held)} of its {fmt_bytes(claim)} claim still held"
            await self._backend.engine_call(r, "/wake_up")
            return await self._stays_awake(run, r, f"sleeping freed too little GPU memory ({seen})")
        self._book_asleep(run, r, held)
        what = f"holds {fmt_bytes(held or 0)} on its GPU, weights in host RAM" if claim else "not routed to until a request wakes it"
        await self._record(r, ReplicaState.SLEEPING, ("found asleep (/is_sleeping)" if outside else f"asleep (level {LEVEL})") + f": {what}",
                           {"gpu_memory_held": held, "claim": claim})
        self._telemetry.slept(r.endpoint)
        self._host.released(r)  # what it let go of: replicas waiting for room look again
        stop = asyncio.ensure_future(r.stop_requested.wait())
        rouse = asyncio.ensure_future(r.rouse.wait())
        try:
            await asyncio.wait({stop, rouse, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            rouse.cancel()
        if exited.done() or r.stop_requested.is_set():
            return ""
        r.rouse.clear()
        return await self._wake(run, r, exited, slept_at)

    def _cannot_hold_weights(self, run: EndpointRun, r: Replica) -> str | None:
        """Why the weights of `r` would not fit in host memory while it sleeps, or None."""
        budget = self._config.residency.host_memory_budget
        if budget is None:
            return None
        weights = _weights(run, r)
        others = sum(n for rid, n in self._ledger.host_claims().items() if rid != r.id)
        if others + weights <= budget:
            return None
        return (f"no room in host memory for its weights while it sleeps ({fmt_bytes(weights)}; {fmt_bytes(others)} of the "
                f"{fmt_bytes(budget)} [residency] host_memory_budget is claimed)")

    def _book_asleep(self, run: EndpointRun, r: Replica, held: int | None) -> None:
        """Its GPU claim shrinks to what NVML shows it holds; its weights are claimed in host memory."""
        g = r.allocation
        if g is None or not g.claim or held is None:
            return  # on CPU its weights never left host memory, which it claims already
        r.allocation = Allocation(uuids=g.uuids, share=0.0, claim=held, fraction=g.fraction)
        self._ledger.reserve(r.id, r.allocation, None)
        if self._config.residency.host_memory_budget is not None:
            self._ledger.reserve(r.id, None, ((r.wants[1] or 0) if r.wants else 0) + _weights(run, r))

    async def _stays_awake(self, run: EndpointRun, r: Replica, why: str) -> str:
        """A sleep that failed or freed too little: never again for this endpoint; this eviction stops it instead."""
        r.log.note(why)
        log.warning("replica %s: %s; evictions of endpoint %s stop its replicas from now on", r.id, why, run.name)
        run.sleep_frees = False
        await self._record(r, ReplicaState.DRAINING, f"{why}: stopping it instead")
        await self._host.sleep_failed(run, why)
        return ""  # drained already: the runner stops it

    async def _wake(self, run: EndpointRun, r: Replica, exited: asyncio.Future[int], slept_at: float) -> str | None:
        started = self._clock()
        if not await self._room_again(run, r, exited):
            return ""
        failed = await self._backend.engine_call(r, "/wake_up")
        if failed is None and await self._backend.asleep(r) is not False:
            failed = "the engine still says it is asleep (/is_sleeping)"
        if failed is not None:
            return f"wake failed: {failed}"
        took = self._clock() - started
        self._telemetry.woke(r.endpoint, took)
        await self._record(r, ReplicaState.HEALTHY, f"awake in {took:.2f}s (asleep {started - slept_at:.0f}s)", {"wake_seconds": round(took, 3)})
        return None

    async def _room_again(self, run: EndpointRun, r: Replica, exited: asyncio.Future[int]) -> bool:
        """Claim again its memory on its own GPU(s) (making room there as a load would) and its host claim
        without the weights. False: a stop came or its worker ended first."""
        while not (exited.done() or r.stop_requested.is_set()):
            if r.wants is None or r.allocation is None or not r.allocation.uuids:
                return True
            request, host, _ = r.wants
            r.room.clear()
            reason = f"its GPU ({', '.join(r.allocation.uuids)}) is not in NVML's list"
            try:
                mine = [g for g in visible(await self._gpus(), self._config.gpus.devices) if g.uuid in r.allocation.uuids]
            except ApplianceError as exc:
                mine, reason = [], exc.message
            try:
                if mine:
                    r.allocation = self._ledger.hold_gpus(r.id, request, mine)
                    self._ledger.hold_host(r.id, host, self._config.residency.host_memory_budget)
                    return True
            except Unplaceable as exc:
                reason = exc.reason
                try:
                    await self._host.make_room(run, r, request, host, mine)
                except NoRoom as blocked:
                    reason = f"{reason}; {blocked.reason}"
            if r.last_error != reason:
                r.last_error = reason
                await self._record(r, ReplicaState.SLEEPING, f"waking: {reason}")
            await r.wait_for_room(_ROOM_RETRY, exited)
        return False

    async def _held_on_gpu(self, r: Replica) -> int | None:
        """Bytes the replica's process tree holds on its GPUs, per NVML; None when NVML lists none of its processes."""
        if r.process is None or r.process.pid is None or r.allocation is None or not r.allocation.uuids:
            return None
        gpus: list[GpuInfo] = await self._gpus()
        pids = await asyncio.to_thread(tree_pids, r.process.pid, r.process.cgroup)
        pids.add(r.process.pid)
        found = [p.used_memory or 0 for g in gpus if g.uuid in r.allocation.uuids for p in g.processes if p.pid in pids]
        return sum(found) if found else None


def _weights(run: EndpointRun, r: Replica) -> int:
    """Bytes of weights a sleeping replica keeps in host RAM: the model's tensors, else its whole claim."""
    estimate = run.config.memory_estimate
    if estimate is not None:
        return estimate.weights
    return (r.allocation.claim or 0) if r.allocation is not None else 0
