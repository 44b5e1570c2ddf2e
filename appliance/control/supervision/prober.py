"""The health checks of one running worker: probes on Backend.AI's schedule (domain/health.py decides),
a fast readiness poll while it was never healthy, and a squatter on its port reported once. Each probe
is the replica backend's (backend.py). The runner creates one per worker and records what it reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import WorkersConfig
from appliance.control.host.listener import Intruder
from appliance.control.supervision.backend import ReplicaBackend
from appliance.control.supervision.replica import Replica
from appliance.control.telemetry import Telemetry
from appliance.domain.health import Health, due_for_replacement, next_probe_delay, observe
from appliance.domain.specs import EndpointConfig, HealthCheck
from appliance.domain.states import ReplicaState

Record = Callable[..., Awaitable[None]]  # the runner's _record(r, state, message, details=None, kind=None)
_READY_POLL = 0.05  # seconds between readiness polls of a starting replica
_MIN_INTERVAL = 0.1  # seconds: Backend.AI allows interval 0, which would probe in a busy loop


class Prober:
    def __init__(
        self, backend: ReplicaBackend, config: EndpointConfig, workers: WorkersConfig, r: Replica, *, deep_model: str | None,
        clock: Callable[[], float], telemetry: Telemetry, record: Record,
    ) -> None:
        self._backend = backend
        self._config = config
        self._workers = workers
        self._r = r
        self._deep = deep_model
        self._clock = clock
        self._telemetry = telemetry
        self._record = record
        self._intruder: Intruder | None = None  # the last one reported, so a squatter is one event, not one per probe

    async def run(self, replace: asyncio.Event) -> None:
        """Probe until the replica is due for replacement (then set `replace` and return). An exception
        here ends the loop: the runner treats it as the replica's crash."""
        r = self._r
        check = self._config.health_check
        while True:
            started = self._clock()
            sent = time.monotonic()
            passed, detail = await self._probe(check)
            self._telemetry.probed(r.endpoint, r.id, passed, time.monotonic() - sent)
            now = self._clock()
            before = r.health
            assert before is not None
            r.health = after = observe(before, check, passed=passed, detail=detail, now=now)
            if after.status is not before.status:
                if after.status is Health.HEALTHY:
                    await self._learn_sleep()
                    await self._record(r, ReplicaState.HEALTHY, detail)
                elif after.status is Health.UNHEALTHY:
                    await self._record(r, ReplicaState.UNHEALTHY, f"{after.consecutive_failures} failed probes in a row: {detail}")
            if after.healthy_since is not None and now - after.healthy_since >= self._workers.restart_backoff_reset_seconds:
                r.failures = 0
            if due_for_replacement(after, self._config.unhealthy_replace_after, now):
                replace.set()
                return
            if passed and r.state is ReplicaState.HEALTHY and await self._found_asleep():
                return  # the runner puts it to sleep in its books: not routed to until a request wakes it
            delay = next_probe_delay(started, self._clock(), max(check.interval, _MIN_INTERVAL))
            if not after.ever_healthy:
                delay = await self._poll_until_ready(check, self._clock() + delay)
            await asyncio.sleep(delay)

    async def _learn_sleep(self) -> None:
        """Before it is first routed to: whether its engine has vLLM's sleep API (an eviction may then put it to sleep)."""
        if self._r.sleeps is None:
            self._r.sleeps = await self._backend.asleep(self._r) is not None

    async def _found_asleep(self) -> bool:
        """Whether an engine with the sleep API sleeps (someone sent it /sleep): asked at every passing probe."""
        r = self._r
        if not r.sleeps:
            return False
        state = await self._backend.asleep(r)
        if state:
            r.found_asleep = True
            r.nap.set()
        return bool(state)

    async def _poll_until_ready(self, check: HealthCheck, until: float) -> float:
        """Between the counted probes of a replica that was never healthy, poll every _READY_POLL:
        a pass makes it HEALTHY at once (a wake or a roll waits less); failures here count for nothing.
        Returns the time left until the next counted probe."""
        r = self._r
        assert r.health is not None
        while (left := until - self._clock()) > 0:
            await asyncio.sleep(min(_READY_POLL, left))
            passed, detail = await self._probe(check)
            if passed:
                r.health = observe(r.health, check, passed=True, detail=detail, now=self._clock())
                await self._learn_sleep()
                await self._record(r, ReplicaState.HEALTHY, detail)
                break
        return max(0.0, until - self._clock())

    async def _probe(self, check: HealthCheck) -> tuple[bool, str]:
        """One probe; a pass counts only when what answered is the replica's own worker."""
        r = self._r
        result = await self._backend.probe(r, check, self._deep)
        if result.moved:
            await self._record(r, r.state, f"its worker answers at {r.url}", kind="replica.moved")
        intruder = result.intruder
        if intruder is not None and intruder != self._intruder:
            r.log.note(f"not routed to: {result.detail}")
            details: dict[str, Any] = {"port": r.port, "intruder_pid": intruder.pid, "intruder_program": intruder.program, "intruder_uid": intruder.uid}
            await self._record(r, r.state, result.detail, details, kind="replica.foreign_listener")
        if intruder is not None or result.passed:
            self._intruder = intruder
        return result.passed, result.detail
