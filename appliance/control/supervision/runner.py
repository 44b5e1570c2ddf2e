"""A replica's runner: the task that walks one replica through its states.

PROVISIONING → STARTING → HEALTHY ⇄ UNHEALTHY and, on a crash, FAILED → (backoff) →
PROVISIONING again; a stop takes it through DRAINING (when it serves or has requests in flight)
and TERMINATING to TERMINATED. Every change goes through `_record`, which refuses a transition
that is not in domain.states.TRANSITIONS. The runner owns the replica's worker process; the
supervisor only creates runners and asks them to stop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from appliance.config import Config
from appliance.control.host.identity import WorkerIdentity
from appliance.control.supervision.ledger import Ledger
from appliance.control.supervision.load import Load
from appliance.control.models.gate import wait_for_model
from appliance.control.host.process import Slot, looks_like_port_conflict
from appliance.control.supervision.backend import ReplicaBackend
from appliance.control.supervision.drain import drain
from appliance.control.supervision.prepare import prepare_worker, read_definition
from appliance.control.supervision.prober import Prober
from appliance.control.supervision.sleep import Sleeper
from appliance.control.supervision.replica import EndpointRun, GpuSource, Replica, RunnerHost
from appliance.control.telemetry import Telemetry
from appliance.domain.health import HealthState
from appliance.domain.memory import host_claim
from appliance.domain.memory import need as memory_need
from appliance.domain.placement import GpuInfo, GpuRequest, Unplaceable, visible
from appliance.domain.residency import NoRoom
from appliance.domain.rollout import backoff_delay, drains, sleep_unsupported
from appliance.domain.runtimes import Placement, WorkerSpec
from appliance.domain.states import ReplicaState, check_transition
from appliance.errors import ApplianceError
from appliance.security.vault import mask_argv
from appliance.store import Clock, Store

log = logging.getLogger(__name__)

Outcome = Literal["stopped", "crashed", "retry"]
_WAIT_FOR_CAPACITY = 1.0  # seconds between placement attempts while memory is short (a release retries at once)
_ORPHAN_GRACE = 2.0  # seconds a tree whose leader died gets to end on its own: no graceful stop is coming


class ReplicaRunner:
    def __init__(
        self, config: Config, store: Store, clock: Clock, load: Load, ledger: Ledger, gpus: GpuSource, backend: ReplicaBackend,
        unseal: Callable[[Mapping[str, str]], dict[str, str]], host: RunnerHost, identity: WorkerIdentity | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or Telemetry()
        self._identity = identity  # the account workers and pre-start commands run as, if not the appliance's
        self._config = config
        self._store = store
        self._clock = clock
        self._load = load
        self._ledger = ledger
        self._gpus = gpus
        self._backend = backend
        self._unseal = unseal  # secret environ values are decrypted only into the worker's environment
        self._host = host
        self._sleeper = Sleeper(config, backend, ledger, load, gpus, host, self._record, clock, self._telemetry)

    async def open(self) -> None:
        await self._backend.open()

    async def close(self) -> None:
        await self._backend.close()

    async def run(self, run: EndpointRun, r: Replica) -> None:
        try:
            await self._record(r, ReplicaState.PROVISIONING, "replica created")
            while not r.stop_requested.is_set():
                if run.error and r.failures:
                    r.wake.clear()
                    await r.wake.wait()  # restart budget spent: wait for retry or stop
                    continue
                delay = r.next_start_at - self._clock()
                if delay > 0 and await _wait_or_stop(r, delay):
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

    def _count_failure(self, run: EndpointRun, r: Replica) -> None:
        w = self._config.workers
        r.failures += 1
        r.restarts += 1
        self._telemetry.restarted(r.endpoint)
        if r.failures >= w.max_consecutive_failures:
            tail = "\n".join(r.log.last_lines(10))
            run.error = f"replica {r.id} failed {r.failures} times in a row; last error: {r.last_error}" + (f"\nlast log lines:\n{tail}" if tail else "")
            r.next_start_at = 0.0
        else:
            r.next_start_at = self._clock() + backoff_delay(r.failures, w.restart_backoff_seconds, w.restart_backoff_max_seconds)
        self._host.poke()

    async def _run_once(self, run: EndpointRun, r: Replica) -> Outcome:
        """Provision, spawn and watch one worker of `r`."""
        if r.state is not ReplicaState.PROVISIONING:
            await self._record(r, ReplicaState.PROVISIONING, f"restarting (attempt {r.restarts + 1})")
        config = run.config
        r.room.clear()  # a release from here on is seen by the wait for room below
        try:
            prepared = await self._provision_unless_stopped(run, r)
            if prepared is None:
                self._release(r)
                return "stopped"
            spec, env = prepared
        except Unplaceable as exc:
            self._release(r)  # hold nothing while waiting (but what evicted endpoints free for it, reserved below)
            r.waiting_for_capacity = not exc.permanent
            if r.waiting_for_capacity:
                self._host.poke()
                if r.wants is not None:
                    try:
                        await self._host.make_room(run, r, *r.wants)
                    except NoRoom as blocked:
                        exc = Unplaceable(f"{exc.reason}; {blocked.reason}")
            if exc.permanent:
                run.error = exc.reason
                r.last_error = exc.reason
                r.failures = max(r.failures, 1)
                await self._record(r, ReplicaState.FAILED, exc.reason)
                return "retry"
            if r.last_error != exc.reason:
                r.last_error = exc.reason
                await self._record(r, ReplicaState.PROVISIONING, exc.reason)
            await r.wait_for_room(_WAIT_FOR_CAPACITY)
            return "retry"
        except (ApplianceError, OSError) as exc:  # a failed start, counted: a lasting cause ends in ERROR
            return await self._failed(r, exc.message if isinstance(exc, ApplianceError) else f"could not prepare the replica: {exc}")
        r.waiting_for_capacity = False
        try:
            if not self._backend.places:
                r.log.note(f"starting: {' '.join(mask_argv(spec.argv))} (port {r.port})")
            res = config.resources
            slot = Slot(r.id, cpu=res.cpu, mem=int(res.mem) if res.mem else None)
            r.exited = False
            r.process = await self._backend.start(spec.argv, env=env, cwd=Path(spec.cwd) if spec.cwd else r.work_dir, sink=r.log, slot=slot,
                                                  replica=r, config=config)
        except ApplianceError as exc:
            return await self._failed(r, exc.message)
        r.started_at = self._clock()
        r.health = HealthState(spawned_at=r.started_at)
        started = f"spawned pid {r.process.pid} on port {r.port}" if r.process.pid else f"started at {r.url}" if r.address else f"started on port {r.port}"
        await self._record(r, ReplicaState.STARTING, started)
        replace = asyncio.Event()
        deep = spec.served_model_name if config.deep_probe else None  # asked for: the operator knows it speaks OpenAI
        checks = Prober(self._backend, config, self._config.workers, r, deep_model=deep, clock=self._clock, telemetry=self._telemetry, record=self._record)
        exited = asyncio.create_task(r.process.wait())
        stop = asyncio.create_task(r.stop_requested.wait())
        swap = asyncio.create_task(replace.wait())
        try:
            while True:  # around again after each sleep the replica woke from
                prober = asyncio.create_task(checks.run(replace), name=f"probe-{r.id}")
                nap = asyncio.create_task(r.nap.wait())
                try:
                    await asyncio.wait({exited, stop, swap, prober, nap}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    await cancel_and_wait(prober, nap)
                if not r.nap.is_set() or exited.done() or stop.done() or swap.done():
                    break
                r.nap.clear()
                woke = await self._sleeper.nap(run, r, exited)
                if woke:  # the engine would not wake: a crash of the replica
                    exited.cancel()
                    await r.process.stop(self._config.workers.stop_grace_seconds)
                    return await self._failed(r, woke)
                if woke is not None:
                    break
        finally:
            await cancel_and_wait(stop, swap)
        process = r.process
        if exited.done():
            # The leader is gone (wait() returns at its exit); its helpers (an engine's core and workers) may not be, and nobody will stop
            # them gracefully now: a short grace, then the whole tree ends, before its GPUs and port are
            # handed out again. Out of routing at once: what is left of it may still accept connections.
            r.exited = True
            self._host.unrouted(r)
            await process.stop(min(_ORPHAN_GRACE, self._config.workers.stop_grace_seconds))
            return await self._exited(run, r, spec, exited.result())
        broken = prober.exception() if prober.done() and not prober.cancelled() and not replace.is_set() else None
        if broken is not None and not r.stop_requested.is_set():
            # Without its health checks a replica could stay routable while it fails: a crash of the replica.
            log.error("replica %s: health checks stopped: %r", r.id, broken, exc_info=broken)
            exited.cancel()
            await process.stop(self._config.workers.stop_grace_seconds)
            return await self._failed(r, f"health checks failed: {broken.__class__.__name__}: {broken}")
        if r.stop_requested.is_set() and drains(r.state, self._load.inflight(r.endpoint).get(r.id, 0)):
            await drain(self._load, self._record, self._clock, run, r, exited)
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

    async def _exited(self, run: EndpointRun, r: Replica, spec: WorkerSpec, code: int) -> Outcome:
        tail = r.log.last_lines(10)
        if not r.stop_requested.is_set() and r.health and not r.health.ever_healthy and looks_like_port_conflict(tail):
            self._release(r)
            bad = spec.port
            for port in (spec.port, spec.grpc_port):  # which of its ports was taken, the log may not say
                if port is not None:
                    self._ledger.quarantine(port, self._clock())
            r.log.note(f"port {bad} was taken by another program; starting again on another port")
            await self._record(r, ReplicaState.PROVISIONING, f"port {bad} in use by another program; respawning on another port")
            return "retry"
        if r.stop_requested.is_set():
            self._release(r)
            return "stopped"
        if "--enable-sleep-mode" in r.argv and "--enable-sleep-mode" not in run.config.extra_args and sleep_unsupported(tail):
            self._release(r)  # not the replica's fault: the engine has no sleep mode here; start it again without
            run.sleep_frees = False
            await self._record(r, ReplicaState.PROVISIONING, "the engine has no sleep mode on this platform: starting it without; evictions stop it")
            return "retry"
        early = " before becoming healthy" if r.health and not r.health.ever_healthy else ""
        return await self._failed(r, f"worker exited with code {code}{early}", {"exit_code": code, "last_log_lines": tail})

    async def _failed(self, r: Replica, reason: str, details: dict[str, Any] | None = None) -> Outcome:
        """A failed start or a crash: free what it held and say why. Counted by the caller."""
        self._release(r)
        r.last_error = reason
        await self._record(r, ReplicaState.FAILED, reason, details)
        return "crashed"

    async def _provision_unless_stopped(self, run: EndpointRun, r: Replica) -> tuple[WorkerSpec, dict[str, str]] | None:
        """_provision, abandoned (a hanging pre-start command ended with its tree) when a stop comes first."""
        work = asyncio.ensure_future(self._provision(run, r))
        stop = asyncio.ensure_future(r.stop_requested.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        await cancel_and_wait(work)
        return None

    async def _provision(self, run: EndpointRun, r: Replica) -> tuple[WorkerSpec, dict[str, str]]:
        config = run.config
        if self._backend.places:  # placed and prepared where it runs (a Ray node): nothing of this box is held for it
            return await self._backend.place(config, r), {}
        await wait_for_model(self._store, config, r.log.note)  # a model still warming: wait here, holding no GPU and no port
        res = config.resources
        gpus = self._config.gpus
        request = GpuRequest(
            count=res.gpus, share=res.gpu_share, name=res.gpu_name, min_free_memory=res.gpu_min_free_mem, placement=res.placement,
            memory=res.gpu_memory, needs=memory_need(res, config.memory_estimate, gpus.claim_overhead), reserve=gpus.memory_reserve,
        )
        inventory: list[GpuInfo] = []
        if request.wants_gpu:
            try:
                inventory = visible(await self._gpus(), self._config.gpus.devices)
            except ApplianceError as exc:
                raise Unplaceable(exc.message, permanent=True) from None
        # A GPU replica's estimate is GPU memory: in host memory it claims only resources.mem.
        estimate = None if request.wants_gpu else config.memory_estimate
        host = host_claim(res, estimate, gpus.claim_overhead) if self._config.residency.host_memory_budget is not None else None
        r.wants = (request, host, inventory)
        r.allocation = allocation = self._ledger.hold_gpus(r.id, request, inventory)
        self._ledger.hold_host(r.id, host, self._config.residency.host_memory_budget)
        grpc = config.grpc_port is not None
        ports = self._ledger.take_ports(r.id, self._clock(), 2 if grpc else 1)
        r.port = port = ports[0]
        r.grpc_port = ports[1] if grpc else None
        await asyncio.to_thread(r.work_dir.mkdir, parents=True, exist_ok=True)
        definition = await read_definition(config)
        placement = Placement(port=port, grpc_port=r.grpc_port, replica_id=r.id, work_dir=str(r.work_dir), gpu_share=allocation.share, runtime_path=sys.executable,
                              memory_fraction=allocation.fraction, sleep_mode=config.sleep and run.sleep_frees is not False and bool(allocation.claim))
        spec, env = await prepare_worker(
            config, definition, placement, work_dir=r.work_dir, sink=r.log, grace=self._config.workers.stop_grace_seconds, identity=self._identity,
            device_env={"CUDA_VISIBLE_DEVICES": allocation.cuda_visible_devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, secrets=self._unseal(config.secret_environ),
        )
        r.argv = spec.argv
        return spec, env

    def _release(self, r: Replica) -> None:
        if (r.allocation is not None and r.allocation.uuids) or r.port is not None or r.id in self._ledger.host_claims():
            self._host.released(r)  # replicas waiting for room look again at once
        self._ledger.release(r.id)
        self._backend.forget(r)
        r.port = r.grpc_port = None  # no longer ours: a later release or record must not name it
        r.allocation = None
        r.process = None

    async def _finish(self, run: EndpointRun, r: Replica) -> None:
        if r.process is not None:
            await r.process.stop(self._config.workers.stop_grace_seconds)
        self._release(r)
        await self._record(r, ReplicaState.TERMINATED, "replica stopped")
        r.log.close()
        await asyncio.to_thread(shutil.rmtree, r.work_dir, True)  # its log stays in log_dir
        self._host.finished(run, r)

    async def _record(self, r: Replica, state: ReplicaState, message: str, details: dict[str, Any] | None = None, kind: str | None = None) -> None:
        check_transition(r.state, state)
        changed = r.state is not state
        was = r.state
        r.state = state
        if changed and was is ReplicaState.HEALTHY:
            self._host.unrouted(r)  # out of routing now, before the record is written
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
        if r.watch is not None:
            r.watch.put_nowait((state.value, message))
        kind = kind or (f"replica.{state.value.lower()}" if changed else "replica.note")
        await self._store.replicas.save(row, kind, f"replica {r.id}: {message}", {"replica": r.id, **(details or {})})
        await self._host.recorded(r, changed or kind == "replica.moved")  # a worker that moved is routed at its new address


async def _wait_or_stop(r: Replica, seconds: float) -> bool:
    """Wait `seconds`; True if a stop was asked for meanwhile."""
    try:
        async with asyncio.timeout(seconds):  # not wait_for: on 3.11 it can drop a cancel (Supervisor.wait_for_change)
            await r.stop_requested.wait()
        return True
    except TimeoutError:
        return False


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and return once all have ended. A task can swallow a cancel (on Python 3.11 a
    timeout that fires at the same moment turns it into a TimeoutError that code then handles), and a
    probe loop that did would run on forever, with the stop of its replica waiting for it: so cancel
    again every second until each one is done."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: nothing to log about a task we ended
