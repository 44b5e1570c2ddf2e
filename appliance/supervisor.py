"""The supervisor: the only code that changes replica state.

It reconciles each endpoint's desired replicas with the running ones. Every replica has
one runner task that walks it through PROVISIONING → STARTING → HEALTHY ⇄ UNHEALTHY and,
on a crash, FAILED → (backoff) → PROVISIONING again; a stop request takes it through
TERMINATING → TERMINATED. The reconcile loop only creates runners and asks them to stop.
Routable replicas are published as an immutable snapshot for the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp

from appliance.config import Config
from appliance.definitions import find_definition_file, load_model_definition
from appliance.errors import ApplianceError
from appliance.gpu import Allocation, GpuInfo, GpuRequest, Unplaceable, place, visible
from appliance.health import Health, HealthState, due_for_replacement, next_probe_delay, observe
from appliance.load import Load
from appliance.probe import probe
from appliance.router import RoutableReplica, RoutingTable
from appliance.runtimes import Placement, WorkerSpec, build_worker_spec
from appliance.specs import EndpointConfig
from appliance.states import EndpointStatus, ReplicaState
from appliance.store import Clock, Store
from appliance.worker import ReplicaLog, WorkerProcess, looks_like_port_conflict, pick_port, run_pre_start_actions, stop_orphan

log = logging.getLogger(__name__)

GpuSource = Callable[[], Awaitable[list[GpuInfo]]]
_WAIT_FOR_CAPACITY = 2.0  # seconds between placement attempts while GPUs are busy
_PORT_QUARANTINE = 60.0  # a port another program took is skipped this long
_READY_POLL = 0.05  # seconds between readiness polls of a starting replica
_KEEP_TERMINATED = 10  # finished replicas listed per endpoint, for their logs and last error


@dataclass
class Replica:
    id: str
    endpoint: str
    generation: int
    work_dir: Path
    log: ReplicaLog
    state: ReplicaState = ReplicaState.PROVISIONING
    port: int | None = None
    allocation: Allocation | None = None
    process: WorkerProcess | None = None
    health: HealthState | None = None
    argv: tuple[str, ...] = ()
    restarts: int = 0
    failures: int = 0  # consecutive
    next_start_at: float = 0.0
    started_at: float | None = None
    last_error: str = ""
    waiting_for_capacity: bool = False  # no GPU room yet: during a roll an old replica makes way
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # retry or stop while parked
    task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self.state not in (ReplicaState.TERMINATED,) and not self.stop_requested.is_set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class EndpointRun:
    """What the supervisor knows of one endpoint beyond its stored config."""

    name: str
    config: EndpointConfig
    generation: int
    desired: int  # the autoscaler's count, else config.replicas
    updated_at: str = ""
    error: str | None = None
    replicas: dict[str, Replica] = field(default_factory=dict)
    finished: list[Replica] = field(default_factory=list)
    status: tuple[EndpointStatus, str] | None = None
    awaiting: bool = False  # capacity taken away on purpose (wake, roll without room) until a replica is HEALTHY


def derive_status(desired: int, states: list[ReplicaState], error: str | None, leaving: int = 0) -> tuple[EndpointStatus, str]:
    """Endpoint status from its live replicas and the number still stopping (pure)."""
    if error:
        return EndpointStatus.ERROR, error
    if desired == 0 and not states and leaving:
        return EndpointStatus.HEALTHY, f"scaling to zero: {leaving} replica(s) draining or stopping"
    counts: dict[str, int] = {}
    for s in states:
        counts[s.value] = counts.get(s.value, 0) + 1
    healthy = counts.get(ReplicaState.HEALTHY.value, 0)
    others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s != ReplicaState.HEALTHY.value)
    if desired == 0 and not states:
        return EndpointStatus.SCALED_TO_ZERO, "no replicas desired"
    if healthy >= desired and not others:
        return EndpointStatus.HEALTHY, f"{healthy}/{desired} healthy"
    if healthy > 0:
        return EndpointStatus.DEGRADED, f"{healthy} healthy, {len(states) - healthy} not ({others}); {desired} desired"
    if not states:
        return EndpointStatus.PENDING, f"0/{desired} replicas started"
    starting = {ReplicaState.PROVISIONING.value, ReplicaState.STARTING.value}
    if set(counts) <= starting:
        return EndpointStatus.PROVISIONING, f"0/{desired} healthy ({others})"
    return EndpointStatus.UNHEALTHY, f"0/{desired} healthy ({others})"


def backoff_delay(failures: int, base: float, cap: float) -> float:
    return min(cap, base * 2 ** max(0, failures - 1))


class Supervisor:
    def __init__(
        self, config: Config, store: Store, clock: Clock, gpus: GpuSource, unseal: Callable[[Mapping[str, str]], dict[str, str]] = dict,
        load: Load | None = None,
    ) -> None:
        self._load = load or Load(clock)  # requests in flight per replica, counted by the gateway
        self._wakes: dict[str, asyncio.Future[None]] = {}
        self._unseal = unseal  # secret environ values are decrypted only into the worker's environment
        self._config = config
        self._store = store
        self._clock = clock
        self._gpus = gpus
        self._runs: dict[str, EndpointRun] = {}
        self._held: dict[str, Allocation] = {}  # replica id → GPUs it holds; the one ledger
        self._ports: set[int] = set()
        self._port_quarantine: dict[int, float] = {}
        self._last_port: int | None = None
        self._poke = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._dirty = True  # the routing table must be published again
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.table = RoutingTable()
        self._changed = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        await self._stop_orphans()
        await self._reconcile()
        self._loop_task = asyncio.create_task(self._loop(), name="supervisor")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        replicas = [r for run in self._runs.values() for r in run.replicas.values()]
        for r in replicas:
            self._request_stop(r)  # HEALTHY ones drain first
        await asyncio.gather(*(r.task for r in replicas if r.task), return_exceptions=True)
        if self._session:
            await self._session.close()

    def poke(self) -> None:
        """Something changed: reconcile soon (from the loop)."""
        self._poke.set()

    async def sync(self) -> None:
        """Reconcile now and return once the routing table reflects the store (after an API change).
        Before start() (declared endpoints being applied) there is nothing to do: start() reconciles."""
        if self._loop_task is not None:
            await self._reconcile()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=1.0)
            except TimeoutError:
                pass
            self._poke.clear()
            try:
                await self._reconcile()
            except Exception:  # one bad pass must not end supervision
                log.exception("reconcile failed")

    async def _stop_orphans(self) -> None:
        rows = [r for r in await self._store.replicas.all() if r["pid"] and r["state"] != ReplicaState.TERMINATED.value]
        grace = self._config.workers.stop_grace_seconds

        async def stop(row: dict[str, Any]) -> None:
            if await asyncio.to_thread(stop_orphan, row["pid"], row["pid_started_at"], grace):
                await self._store.events.add(
                    "replica.orphan_stopped",
                    f"stopped worker pid {row['pid']} of replica {row['id']} left by an earlier run",
                    endpoint=row["endpoint"],
                    details={"replica": row["id"], "pid": row["pid"]},
                )

        await asyncio.gather(*(stop(row) for row in rows))  # one grace period in all, not one each
        await self._store.replicas.clear()

    # --- reconciliation ----------------------------------------------------------------------

    async def _reconcile(self) -> None:
        async with self._reconcile_lock:  # the loop and API calls never reconcile at the same time
            await self._reconcile_once()

    async def _reconcile_once(self) -> None:
        rows = {row["name"]: row for row in await self._store.endpoints.list()}
        for name in list(self._runs):
            if name not in rows:
                run = self._runs[name]
                for r in run.replicas.values():
                    self._request_stop(r)
                if not run.replicas:
                    del self._runs[name]
                self._dirty = True
        for name, row in rows.items():
            run = self._runs.get(name)
            desired = row["desired_replicas"] if row.get("desired_replicas") is not None else row["config"]["replicas"]
            if run is None:
                run = self._runs[name] = EndpointRun(name, EndpointConfig.model_validate(row["config"]), row["generation"], desired, row["updated_at"])
                if row["status"] == EndpointStatus.ERROR.value:
                    run.error = row["status_message"]  # stays in ERROR across restarts until retried
                self._dirty = True
            elif row["updated_at"] != run.updated_at:  # validated again only when it changed
                if row["generation"] != run.generation:
                    run.generation, run.error = row["generation"], None  # new workers: a new chance, ERROR clears
                run.config, run.updated_at = EndpointConfig.model_validate(row["config"]), row["updated_at"]
                self._dirty = True
            if run.desired != desired:
                run.desired, self._dirty = desired, True
            self._reconcile_endpoint(run)
            await self._publish_status(run)
        if self._dirty:
            self._publish_snapshot()

    def _reconcile_endpoint(self, run: EndpointRun) -> None:
        desired = run.desired
        live = [r for r in run.replicas.values() if r.live]
        current = [r for r in live if r.generation == run.generation]
        old = []
        for r in live:
            if r.generation == run.generation:
                continue
            if r.state is ReplicaState.HEALTHY:
                old.append(r)
            else:
                self._request_stop(r)  # an old replica that serves nothing goes at once
        # Rolling: new replicas start at most max_surge above the desired count. When none can start
        # beside the old ones (max_surge 0, or GPUs full), one old replica makes way, one at a time.
        wanted = desired - len(current)
        room = desired + run.config.max_surge - len(current) - len(old) if old else wanted
        by_load = self._leaving_order(run.name, old)
        leaving_old = any(r.generation != run.generation and r.stop_requested.is_set() for r in run.replicas.values())
        pending = any(r.state is not ReplicaState.HEALTHY for r in current)
        stuck = (wanted > 0 and room <= 0 and not pending) or any(r.waiting_for_capacity for r in current)
        if by_load and stuck and not leaving_old and not run.error:
            run.awaiting = len(by_load) == 1  # the last one that serves: requests wait for its successor
            self._request_stop(by_load.pop(0))
            room += 1
        if not run.error:  # in ERROR nothing new starts until retried
            for _ in range(max(0, min(wanted, room))):
                self._create(run)
        if len(current) > desired:
            for r in self._leaving_order(run.name, current)[: len(current) - desired]:
                self._request_stop(r)
        # Old replicas leave (draining) as new ones become healthy.
        healthy_new = sum(r.state is ReplicaState.HEALTHY for r in current)
        for r in by_load[: max(0, len(by_load) + healthy_new - desired)]:
            self._request_stop(r)

    def _leaving_order(self, endpoint: str, replicas: list[Replica]) -> list[Replica]:
        """Who goes first: replicas that serve nothing, then the healthy one with the fewest requests in flight."""
        order = [ReplicaState.FAILED, ReplicaState.PROVISIONING, ReplicaState.STARTING, ReplicaState.UNHEALTHY, ReplicaState.HEALTHY]
        inflight = self._load.inflight(endpoint)
        return sorted(
            (r for r in replicas if r.live),
            key=lambda r: (order.index(r.state) if r.state in order else 0, inflight.get(r.id, 0), -(r.started_at or 0)),
        )

    def _create(self, run: EndpointRun) -> Replica:
        rid = f"{run.name}-{secrets.token_hex(3)}"
        replica = Replica(
            id=rid,
            endpoint=run.name,
            generation=run.generation,
            work_dir=self._config.server.state_dir / "replicas" / rid,
            log=ReplicaLog(self._config.log_dir / f"{rid}.log", self._config.workers.log_max_bytes, self._config.workers.log_backups),
        )
        run.replicas[rid] = replica
        replica.task = asyncio.create_task(self._run(run, replica), name=f"replica-{rid}")
        return replica

    def _request_stop(self, r: Replica) -> None:
        if not r.stop_requested.is_set():
            r.stop_requested.set()
            r.wake.set()
            if r.state is ReplicaState.HEALTHY:
                self._publish_snapshot()  # out of routing now, before any new request can pick it

    # --- one replica ---------------------------------------------------------------------------

    async def _run(self, run: EndpointRun, r: Replica) -> None:
        try:
            await self._record(r, ReplicaState.PROVISIONING, "replica created")
            while not r.stop_requested.is_set():
                if run.error and r.failures:
                    await self._park(r)  # restart budget spent: wait for retry or stop
                    continue
                delay = r.next_start_at - self._clock()
                if delay > 0 and await self._wait_or_stop(r, delay):
                    break
                outcome = await self._run_once(run, r)
                if outcome == "stopped":
                    break
                if outcome == "crashed":
                    self._count_failure(run, r)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave a worker unsupervised
            log.exception("replica %s runner failed", r.id)
            r.last_error = f"internal error: {exc}"
        finally:
            await self._finish(run, r)

    async def _wait_or_stop(self, r: Replica, seconds: float) -> bool:
        try:
            await asyncio.wait_for(r.stop_requested.wait(), timeout=seconds)
            return True
        except TimeoutError:
            return False

    async def _park(self, r: Replica) -> None:
        r.wake.clear()
        await r.wake.wait()

    def _count_failure(self, run: EndpointRun, r: Replica) -> None:
        w = self._config.workers
        r.failures += 1
        r.restarts += 1
        if r.failures >= w.max_consecutive_failures:
            tail = "\n".join(r.log.last_lines(10))
            run.error = f"replica {r.id} failed {r.failures} times in a row; last error: {r.last_error}" + (f"\nlast log lines:\n{tail}" if tail else "")
            r.next_start_at = 0.0
        else:
            r.next_start_at = self._clock() + backoff_delay(r.failures, w.restart_backoff_seconds, w.restart_backoff_max_seconds)
        self.poke()

    async def _run_once(self, run: EndpointRun, r: Replica) -> str:
        """Provision, spawn and watch one process of `r`. Returns 'stopped', 'crashed' or 'retry'."""
        if r.state is not ReplicaState.PROVISIONING:
            await self._record(r, ReplicaState.PROVISIONING, f"restarting (attempt {r.restarts + 1})")
        config = run.config
        try:
            spec, env = await self._provision(run, r)
        except Unplaceable as exc:
            self._release(r)  # hold nothing while waiting
            r.waiting_for_capacity = not exc.permanent
            if r.waiting_for_capacity:
                self.poke()
            if exc.permanent:
                run.error = exc.reason
                r.last_error = exc.reason
                r.failures = max(r.failures, 1)
                await self._record(r, ReplicaState.FAILED, exc.reason)
                return "retry"
            if r.last_error != exc.reason:
                r.last_error = exc.reason
                await self._record(r, ReplicaState.PROVISIONING, exc.reason)
            await self._wait_or_stop(r, _WAIT_FOR_CAPACITY)
            return "retry"
        except (ApplianceError, OSError) as exc:  # a failed start, counted: a lasting cause ends in ERROR
            return await self._failed(r, exc.message if isinstance(exc, ApplianceError) else f"could not prepare the replica: {exc}")
        r.waiting_for_capacity = False
        try:
            r.log.note(f"starting: {' '.join(spec.argv)} (port {r.port})")
            r.process = await WorkerProcess.spawn(spec.argv, env=env, cwd=r.work_dir, sink=r.log)
        except ApplianceError as exc:
            return await self._failed(r, exc.message)
        r.started_at = self._clock()
        r.health = HealthState(spawned_at=r.started_at)
        await self._record(r, ReplicaState.STARTING, f"spawned pid {r.process.pid} on port {r.port}")
        replace = asyncio.Event()
        prober = asyncio.create_task(self._probe_loop(config, spec, r, replace), name=f"probe-{r.id}")
        exited = asyncio.create_task(r.process.wait())
        stop = asyncio.create_task(r.stop_requested.wait())
        swap = asyncio.create_task(replace.wait())
        try:
            await asyncio.wait({exited, stop, swap}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            prober.cancel()
            for t in (stop, swap):
                t.cancel()
            await asyncio.gather(prober, stop, swap, return_exceptions=True)
        process = r.process
        if exited.done():
            code = exited.result()
            tail = r.log.last_lines(10)
            if not r.stop_requested.is_set() and r.health and not r.health.ever_healthy and looks_like_port_conflict(tail):
                self._release(r)
                bad = spec.port
                self._port_quarantine[bad] = self._clock() + _PORT_QUARANTINE
                r.log.note(f"port {bad} was taken by another program; starting again on another port")
                await self._record(r, ReplicaState.PROVISIONING, f"port {bad} in use by another program; respawning on another port")
                return "retry"
            if r.stop_requested.is_set():
                self._release(r)
                return "stopped"
            early = " before becoming healthy" if r.health and not r.health.ever_healthy else ""
            return await self._failed(r, f"worker exited with code {code}{early}", {"exit_code": code, "last_log_lines": tail})
        if r.stop_requested.is_set() and r.state is ReplicaState.HEALTHY:
            await self._drain(run, r, exited)
        exited.cancel()
        if r.stop_requested.is_set():
            await self._record(r, ReplicaState.TERMINATING, "stopping")
            code = await process.stop(self._config.workers.stop_grace_seconds)
            self._release(r)
            r.log.note(f"stopped (exit code {code})")
            return "stopped"
        # Unhealthy for too long: replace it.
        await self._record(r, ReplicaState.TERMINATING, "unhealthy for too long: replacing")
        await process.stop(self._config.workers.stop_grace_seconds)
        return await self._failed(r, f"replaced after {config.unhealthy_replace_after:g}s unhealthy ({r.health.last_result if r.health else ''})")

    async def _drain(self, run: EndpointRun, r: Replica, exited: asyncio.Task[int]) -> None:
        """Out of routing already; let the requests in flight finish (up to the drain timeout) before the stop."""
        timeout = run.config.drain_timeout_seconds
        n = self._load.inflight(r.endpoint).get(r.id, 0)
        await self._record(r, ReplicaState.DRAINING, f"draining: {n} request(s) in flight, up to {timeout:g}s")
        if not n:
            return
        started = self._clock()
        idle = asyncio.ensure_future(self._load.wait_idle(r.endpoint, r.id, timeout))
        try:
            await asyncio.wait({idle, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
        left = self._load.inflight(r.endpoint).get(r.id, 0)
        took = self._clock() - started
        if left:
            r.log.note(f"drain ended after {took:.1f}s with {left} request(s) still in flight")
            await self._record(r, ReplicaState.DRAINING, f"drain timeout: {left} request(s) still in flight after {took:.1f}s", {"in_flight": left})
        else:
            r.log.note(f"drained in {took:.1f}s")

    async def _failed(self, r: Replica, reason: str, details: dict[str, Any] | None = None) -> str:
        """A failed start or a crash: free what it held and say why. Counted by the caller."""
        self._release(r)
        r.last_error = reason
        await self._record(r, ReplicaState.FAILED, reason, details)
        return "crashed"

    async def _provision(self, run: EndpointRun, r: Replica) -> tuple[WorkerSpec, dict[str, str]]:
        config = run.config
        res = config.resources
        request = GpuRequest(
            count=res.gpus, share=res.gpu_share, name=res.gpu_name, min_free_memory=res.gpu_min_free_mem, placement=res.placement
        )
        allocation = Allocation(uuids=())
        if request.wants_gpu:
            try:
                inventory = visible(await self._gpus(), self._config.gpus.devices)
            except ApplianceError as exc:
                raise Unplaceable(exc.message, permanent=True) from None
            others = {k: v for k, v in self._held.items() if k != r.id}
            allocation = place(request, inventory, others)
        self._held[r.id] = r.allocation = allocation
        now = self._clock()
        self._port_quarantine = {p: t for p, t in self._port_quarantine.items() if t > now}
        first, last = self._config.workers.port_range
        taken = self._ports | set(self._port_quarantine)
        # Chosen and reserved in one step on the loop: replicas starting together never get the same port.
        port = pick_port(first, last, taken, start=self._last_port)
        if port is None:
            raise Unplaceable(f"waiting for a free port in {first}-{last}")
        self._ports.add(port)
        r.port = self._last_port = port
        await asyncio.to_thread(r.work_dir.mkdir, parents=True, exist_ok=True)
        definition = None
        if config.runtime == "custom":
            folder = Path(config.model_folder)
            path = await asyncio.to_thread(find_definition_file, folder, config.definition_file)
            definition = await asyncio.to_thread(load_model_definition, path) if path else None
        spec = build_worker_spec(config, definition, Placement(port=port, replica_id=r.id, work_dir=str(r.work_dir), gpu_share=allocation.share))
        r.argv = spec.argv
        env = {**_base_env(), **spec.env, **self._unseal(config.secret_environ), "CUDA_VISIBLE_DEVICES": allocation.cuda_visible_devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        if spec.pre_start_actions:
            await run_pre_start_actions(spec.pre_start_actions, work_dir=r.work_dir, values=dict(spec.values), env=env, sink=r.log)
        return spec, env

    def _release(self, r: Replica) -> None:
        self._held.pop(r.id, None)
        r.allocation = None
        if r.port is not None:
            self._ports.discard(r.port)
        r.process = None

    async def _probe_loop(self, config: EndpointConfig, spec: WorkerSpec, r: Replica, replace: asyncio.Event) -> None:
        assert self._session is not None
        check = config.health_check
        deep = spec.served_model_name if config.deep_probe else None  # asked for: the operator knows it speaks OpenAI
        w = self._config.workers
        while True:
            started = self._clock()
            passed, detail = await probe(self._session, r.url, check, deep_model=deep)
            now = self._clock()
            before = r.health
            assert before is not None
            r.health = after = observe(before, check, passed=passed, detail=detail, now=now)
            if after.status is not before.status:
                if after.status is Health.HEALTHY:
                    await self._record(r, ReplicaState.HEALTHY, detail)
                elif after.status is Health.UNHEALTHY:
                    await self._record(r, ReplicaState.UNHEALTHY, f"{after.consecutive_failures} failed probes in a row: {detail}")
            if after.healthy_since is not None and now - after.healthy_since >= w.restart_backoff_reset_seconds:
                r.failures = 0
            if due_for_replacement(after, config.unhealthy_replace_after, now):
                replace.set()
                return
            delay = next_probe_delay(started, self._clock(), check.interval)
            if not after.ever_healthy:
                delay = await self._poll_until_ready(r, check, deep, self._clock() + delay)
            await asyncio.sleep(delay)

    async def _poll_until_ready(self, r: Replica, check: Any, deep: str | None, until: float) -> float:
        """Between the counted probes of a replica that was never healthy, poll every _READY_POLL:
        a pass makes it HEALTHY at once (a wake or a roll waits less); failures here count for nothing.
        Returns the time left until the next counted probe."""
        assert self._session is not None and r.health is not None
        while (left := until - self._clock()) > 0:
            await asyncio.sleep(min(_READY_POLL, left))
            passed, detail = await probe(self._session, r.url, check, deep_model=deep)
            if passed:
                r.health = observe(r.health, check, passed=True, detail=detail, now=self._clock())
                await self._record(r, ReplicaState.HEALTHY, detail)
                break
        return max(0.0, until - self._clock())

    async def _finish(self, run: EndpointRun, r: Replica) -> None:
        if r.process is not None:
            await r.process.stop(self._config.workers.stop_grace_seconds)
        self._release(r)
        await self._record(r, ReplicaState.TERMINATED, "replica stopped")
        r.log.close()
        await asyncio.to_thread(shutil.rmtree, r.work_dir, True)  # its log stays in log_dir
        run.replicas.pop(r.id, None)
        run.finished = (run.finished + [r])[-_KEEP_TERMINATED:]
        if self._runs.get(run.name) is run:
            self.poke()

    # --- records and views -----------------------------------------------------------------------

    async def _record(self, r: Replica, state: ReplicaState, message: str, details: dict[str, Any] | None = None) -> None:
        changed = r.state is not state
        r.state = state
        row = {
            "id": r.id,
            "endpoint": r.endpoint,
            "generation": r.generation,
            "state": state.value,
            "pid": r.process.pid if r.process else None,
            "pid_started_at": r.process.started_at if r.process else None,
            "port": r.port,
            "gpus": list(r.allocation.uuids) if r.allocation else [],
            "gpu_share": r.allocation.share if r.allocation else None,
            "work_dir": str(r.work_dir),
            "log_path": str(r.log.path),
            "restarts": r.restarts,
            "last_error": r.last_error,
        }
        kind = f"replica.{state.value.lower()}" if changed else "replica.note"
        await self._store.replicas.save(row, kind, f"replica {r.id}: {message}", {"replica": r.id, **(details or {})})
        run = self._runs.get(r.endpoint)
        if run is not None:
            if state is ReplicaState.HEALTHY:
                run.awaiting = False
            await self._publish_status(run)
        if changed:
            self._publish_snapshot()

    async def _publish_status(self, run: EndpointRun) -> None:
        states = [r.state for r in run.replicas.values() if r.live]
        status = derive_status(run.desired, states, run.error, leaving=len(run.replicas) - len(states))
        if status != run.status and self._runs.get(run.name) is run:
            run.status = status
            self._dirty = True  # the table carries statuses too
            await self._store.endpoints.set_status(run.name, status[0].value, status[1])

    def _publish_snapshot(self) -> None:
        """A new immutable routing table; waiters (requests waiting for a replica) wake up."""
        names: dict[str, str] = {}
        for name, run in self._runs.items():
            names[name] = name
            for alias in run.config.aliases:
                names.setdefault(alias, name)
        self.table = RoutingTable(
            routable=MappingProxyType(
                {
                    name: tuple(
                        RoutableReplica(r.id, name, r.url, run.config.served_model_name)
                        for r in run.replicas.values()
                        if r.state is ReplicaState.HEALTHY and not r.stop_requested.is_set()
                    )
                    for name, run in self._runs.items()
                }
            ),
            endpoints=MappingProxyType({name: run.config for name, run in self._runs.items()}),
            names=MappingProxyType(names),
            counts=MappingProxyType({name: MappingProxyType(self.counts(name)) for name in self._runs}),
            statuses=MappingProxyType({name: (run.status[0].value if run.status else "PENDING") for name, run in self._runs.items()}),
            desired=MappingProxyType({name: run.desired for name, run in self._runs.items()}),
            awaiting=frozenset(name for name, run in self._runs.items() if run.awaiting),
        )
        self._dirty = False
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> None:
        """Until the next routing table is published, or `timeout` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=timeout)
        except TimeoutError:
            pass

    # --- operator actions and views ------------------------------------------------------------

    async def retry(self, name: str) -> None:
        run = self._runs.get(name)
        if run is None:
            raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found")
        previous = run.error
        run.error = None
        for r in run.replicas.values():
            r.failures = 0
            r.next_start_at = 0.0
            r.wake.set()
        run.status = None
        await self._store.events.add("endpoint.retry", f"endpoint {name}: error cleared, retrying", endpoint=name, details={"previous_error": previous})
        await self._publish_status(run)
        self.poke()

    def desired(self, name: str) -> int | None:
        run = self._runs.get(name)
        return run.desired if run else None

    async def scale(self, name: str, replicas: int, kind: str, message: str, details: dict[str, Any], rules: Sequence[str] = ()) -> None:
        """Set the desired count (the autoscaler's one effect) and reconcile at once."""
        if await self._store.endpoints.set_desired(name, replicas, kind, message, details, list(rules)):
            await self.sync()

    async def wake(self, name: str) -> None:
        """A request for a scaled-to-zero endpoint: ask for one replica. Concurrent callers share one wake."""
        waking = self._wakes.get(name)
        if waking is None:
            waking = self._wakes[name] = asyncio.ensure_future(self._wake(name))
            waking.add_done_callback(lambda _: self._wakes.pop(name, None))
        await asyncio.shield(waking)

    async def _wake(self, name: str) -> None:
        run = self._runs.get(name)
        if run is None or run.desired != 0:
            return
        target = max(1, run.config.min_replicas)
        run.awaiting = True
        await self.scale(name, target, "autoscale.wake", f"endpoint {name}: a request arrived while scaled to zero: 0 → {target}", {"from": 0, "to": target, "reason": "wake"})

    def replicas(self, name: str) -> list[Replica]:
        run = self._runs.get(name)
        if run is None:
            return []
        return list(run.replicas.values()) + list(reversed(run.finished))

    def replica(self, name: str, rid: str) -> Replica | None:
        return next((r for r in self.replicas(name) if r.id == rid), None)

    def counts(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        run = self._runs.get(name)
        for r in run.replicas.values() if run else ():
            out[r.state.value] = out.get(r.state.value, 0) + 1
        return out

    def held(self) -> dict[str, Allocation]:
        return dict(self._held)


def _base_env() -> dict[str, str]:
    """What a worker inherits from the appliance: only what programs need to run, not its settings."""
    keep = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env
