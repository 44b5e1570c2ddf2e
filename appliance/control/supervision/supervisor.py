"""The supervisor: the only code that changes replica state, through its replica runners.

It reconciles each endpoint's desired replicas with the running ones by asking
domain.rollout.plan() what to do and applying the plan: it creates runners and asks them to
stop. It keeps the GPU/port ledger, derives endpoint statuses, and publishes the routable
replicas as an immutable routing table for the gateway.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from appliance.config import Config
from appliance.control.host.cgroups import Isolation
from appliance.control.host.identity import WorkerIdentity
from appliance.control.supervision.ledger import Ledger
from appliance.control.supervision.load import Load
from appliance.control.host.process import Launcher, ProcessLauncher
from appliance.control.supervision.replica import EndpointRun, GpuSource, Replica
from appliance.control.supervision.residency import Residency
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.supervision.backend import LocalBackend, ReplicaBackend
from appliance.control.supervision.orphans import stop_orphans
from appliance.control.supervision.runner import ReplicaRunner
from appliance.control.telemetry import Telemetry
from appliance.domain.placement import Allocation
from appliance.domain.rollout import ReplicaView, plan
from appliance.domain.routing import RoutableReplica, RoutingTable
from appliance.domain.specs import EndpointConfig, resting_replicas
from appliance.domain.states import EndpointStatus, ReplicaState, derive_status
from appliance.errors import ApplianceError
from appliance.store import Clock, Store

log = logging.getLogger(__name__)

_KEEP_TERMINATED = 10  # finished replicas listed per endpoint, for their logs and last error


class Supervisor:
    def __init__(
        self, config: Config, store: Store, clock: Clock, gpus: GpuSource, unseal: Callable[[Mapping[str, str]], dict[str, str]] = dict,
        load: Load | None = None, launcher: Launcher | None = None, isolation: Isolation | None = None, identity: WorkerIdentity | None = None,
        telemetry: Telemetry | None = None, backend: ReplicaBackend | None = None,
    ) -> None:
        self.isolation = isolation or Isolation("process-group", "process groups")
        launcher = launcher or ProcessLauncher(self.isolation, identity)
        self._load = load or Load(clock)  # requests in flight per replica, counted by the gateway
        self._config = config
        self._store = store
        self._clock = clock
        self._runs: dict[str, EndpointRun] = {}
        self._detached: dict[str, Replica] = {}  # validations' replicas, by id
        self._ledger = Ledger(config.workers.port_range)
        self.telemetry = telemetry or Telemetry()
        self.residency = Residency(
            config, self._ledger, self._load, clock, self._runs, self._scale_to, self.telemetry, self._publish_snapshot,
            lambda name, kind, message, details: self._store.events.add(kind, message, endpoint=name, details=details),
        )
        self.released = self.residency.released  # a replica let go of its holdings: those waiting for room look again
        self.make_room = self.residency.make_room  # a replica found no room: evict for it, or say why not (RunnerHost)
        self.sleep_failed = self.residency.sleep_failed  # an eviction by sleep did not free memory: stop instead (RunnerHost)
        self._runner = ReplicaRunner(
            config, store, clock, self._load, self._ledger, gpus, backend or LocalBackend(launcher), unseal, host=self, identity=identity,
            telemetry=self.telemetry,
        )
        self._poke = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._dirty = True  # the routing table must be published again
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.table = RoutingTable()
        self._changed = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        log.info("replica isolation: %s", self.isolation.detail)
        await self._runner.open()
        await stop_orphans(self._store, self.isolation, self._config.workers.stop_grace_seconds)
        await self._reconcile()
        self._loop_task = asyncio.create_task(self._loop(), name="supervisor")

    async def stop(self) -> None:
        if self._loop_task:
            # A flag, not a cancel: on Python 3.11 a wait_for() whose event is set at the moment of the
            # cancel swallows the CancelledError, and a cancelled loop would then run on forever.
            self._closing = True
            self._poke.set()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        replicas = [r for run in self._runs.values() for r in run.replicas.values()] + list(self._detached.values())
        for r in replicas:
            self._request_stop(r)  # those that serve drain first
        await asyncio.gather(*(r.task for r in replicas if r.task), return_exceptions=True)
        await self._runner.close()
        if self.isolation.cgroups:
            await asyncio.to_thread(self.isolation.cgroups.close)

    def endpoint_names(self) -> list[str]:
        return list(self._runs)

    def replica_count(self) -> int:
        return sum(len(run.replicas) for run in self._runs.values())

    def live_logs(self) -> set[Path]:
        """Log files of replicas that still run (retention keeps them)."""
        return {r.log.path for run in self._runs.values() for r in run.replicas.values()}

    def end_followers(self) -> None:
        """Log followers end now: they would never finish on their own."""
        for run in self._runs.values():
            for r in [*run.replicas.values(), *run.finished]:
                r.log.end_followers()

    def poke(self) -> None:
        """Something changed: reconcile soon (from the loop)."""
        self._poke.set()

    async def sync(self) -> None:
        """Reconcile now and return once the routing table reflects the store (after an API change).
        Before start() (declared endpoints being applied) there is nothing to do: start() reconciles."""
        if self._loop_task is not None:
            await self._reconcile()

    async def _loop(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(1.0):
                    await self._poke.wait()
            except TimeoutError:
                pass
            if self._closing:
                break
            self._poke.clear()
            try:
                await self._reconcile()
            except Exception:  # one bad pass must not end supervision
                log.exception("reconcile failed")

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
                    self.telemetry.endpoint_gone(name)
                self._dirty = True
        # Pinned endpoints first, then by priority: those created first are placed first when memory is short.
        for name, row in sorted(rows.items(), key=lambda kv: (not kv[1]["config"].get("pin"), -kv[1]["config"].get("priority", 0))):
            run = self._runs.get(name)
            desired = row["desired_replicas"] if row.get("desired_replicas") is not None else resting_replicas(row["config"])
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
            run.version = row.get("version", 0)
            if run.desired != desired:
                run.desired, self._dirty = desired, True
                if desired == 0:  # unloaded (idle, evicted, asked for): a load that was under way is over
                    run.loading_since, run.blocked, run.awaiting = None, None, False
            self._apply_plan(run)
            await self._publish_status(run)
        if self._dirty:
            self._publish_snapshot()

    def _apply_plan(self, run: EndpointRun) -> None:
        inflight = self._load.inflight(run.name)
        views = [
            ReplicaView(r.id, r.generation, r.state, inflight.get(r.id, 0), r.started_at, r.stop_requested.is_set(), r.waiting_for_capacity)
            for r in run.replicas.values()
        ]
        step = plan(run.desired, run.generation, views, max_surge=run.config.max_surge, error=run.error is not None)
        if step.awaiting is not None:
            run.awaiting = step.awaiting
        for rid in step.stop:
            self._request_stop(run.replicas[rid])
        for _ in range(step.start):
            self._create(run)

    def start_detached(self, run: EndpointRun) -> Replica:
        """One replica of a run the supervisor does not hold (a validation): never routed, never counted
        in a status; it shares the GPU and port ledger, and is stopped with stop_detached."""
        r = self._create(run, watch=asyncio.Queue())
        self._detached[r.id] = r
        return r

    async def stop_detached(self, r: Replica) -> None:
        self._request_stop(r)
        if r.task is not None:
            await asyncio.gather(r.task, return_exceptions=True)
        self._detached.pop(r.id, None)
        if not any(d.endpoint == r.endpoint for d in self._detached.values()):
            self.telemetry.endpoint_gone(r.endpoint)  # a validation's series end with it

    def _create(self, run: EndpointRun, watch: asyncio.Queue[tuple[str, str]] | None = None) -> Replica:
        rid = f"{run.name}-{secrets.token_hex(3)}"
        replica = Replica(
            id=rid,
            endpoint=run.name,
            generation=run.generation,
            work_dir=self._config.server.state_dir / "replicas" / rid,
            log=ReplicaLog(self._config.log_dir / f"{rid}.log", self._config.workers.log_max_bytes, self._config.workers.log_backups),
            watch=watch,
        )
        run.replicas[rid] = replica
        # A context of its own: the replica outlives the request that may have created it (and its request id).
        replica.task = asyncio.create_task(self._runner.run(run, replica), name=f"replica-{rid}", context=contextvars.Context())
        return replica

    def _request_stop(self, r: Replica) -> None:
        if not r.stop_requested.is_set():
            r.stop_requested.set()
            r.wake.set()
            if r.state is ReplicaState.HEALTHY:
                self._publish_snapshot()  # out of routing now, before any new request can pick it

    # --- what runners report (RunnerHost) ------------------------------------------------------

    async def recorded(self, r: Replica, changed: bool) -> None:
        run = self._runs.get(r.endpoint)
        if run is not None:
            if r.state is ReplicaState.HEALTHY:
                run.awaiting = False
                self.residency.healthy(run)
            if r.state is ReplicaState.STARTING:
                run.blocked = None  # placed after all: requests for it wait again (published with this change)
            await self._publish_status(run)
        if changed:
            self._publish_snapshot()

    def unrouted(self, r: Replica) -> None:
        self._publish_snapshot()  # it left HEALTHY: no new request picks it while its record is written

    def finished(self, run: EndpointRun, r: Replica) -> None:
        run.replicas.pop(r.id, None)
        run.finished = (run.finished + [r])[-_KEEP_TERMINATED:]
        self.telemetry.replica_gone(run.name, r.id)
        if self._runs.get(run.name) is run:
            self.poke()

    # --- status and the routing table ----------------------------------------------------------

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
                        RoutableReplica(r.id, name, r.url, run.config.served_model_name, r.grpc_target)
                        for r in run.replicas.values()
                        if r.routable
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
            blocked=MappingProxyType({name: run.blocked for name, run in self._runs.items() if run.blocked}),
        )
        self._dirty = False
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> None:
        """Until the next routing table is published, or `timeout` seconds. A cancel always propagates: Python
        3.11's `asyncio.wait_for` drops one that lands as the event is set, and a watcher looping on this then
        never ended (a stop waited for it for ever)."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
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

    def desired_version(self, name: str) -> tuple[int, int] | None:
        """The desired count and the version of the stored endpoint it was read from."""
        run = self._runs.get(name)
        return (run.desired, run.version) if run else None

    async def scale(
        self, name: str, replicas: int, kind: str, message: str, details: dict[str, Any], rules: Sequence[str] = (), *,
        expected: int | None = None, expected_version: int | None = None,
    ) -> bool:
        """Set the desired count (the autoscaler's one effect) and reconcile at once. With `expected` (and
        `expected_version`), only if the desired count (and the endpoint's version) are still those: an
        operator's change made meanwhile wins, even one that set the same count. False if not set."""
        if await self._store.endpoints.set_desired(
            name, replicas, kind, message, details, list(rules), expected=expected, expected_version=expected_version
        ):
            await self.sync()
            return True
        return False

    async def wake(self, name: str) -> None:
        await self.residency.wake(name)

    async def _scale_to(self, name: str, n: int, kind: str, message: str, details: dict[str, Any], expected: int | None) -> bool:
        return await self.scale(name, n, kind, message, details, expected=expected)

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
        return self._ledger.held()

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def runs(self) -> dict[str, EndpointRun]:
        return dict(self._runs)
