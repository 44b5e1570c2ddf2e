"""Validate an endpoint before exposing it (Backend.AI's "validate", with live logs): one temporary
replica of the spec, outside routing, whose log lines and state changes are reported as they happen,
ending in a verdict. Its process tree, port and GPUs are released whatever happens, the caller
going away included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.control.supervision.replica import EndpointRun
from appliance.control.supervision.supervisor import Supervisor
from appliance.domain.specs import EndpointConfig
from appliance.domain.states import ReplicaState

LAST_LINES = 20  # of the log, in a failed verdict
_MERGED_MAX = 1000  # steps waiting for the caller
_FAILED = (ReplicaState.FAILED.value, ReplicaState.UNHEALTHY.value)


@dataclass
class Step:
    """One thing to tell the caller: a log line, a state change, or the verdict (always last)."""

    kind: Literal["log", "state", "verdict"]
    data: dict[str, Any] = field(default_factory=dict)


def default_timeout(config: EndpointConfig) -> float:
    """Long enough for the health check to pass at its slowest: its initial delay, then every allowed retry."""
    check = config.health_check
    return check.initial_delay + (check.max_retries + 1) * (check.interval + check.max_wait_time) + 30.0


async def validate(supervisor: Supervisor, name: str, config: EndpointConfig, timeout: float) -> AsyncIterator[Step]:
    run = EndpointRun(f"validate-{name}", config, generation=0, desired=1)
    replica = supervisor.start_detached(run)
    assert replica.watch is not None
    started = time.monotonic()
    # Bounded: a caller that reads slowly holds the log pump back, and the replica's follower queue then
    # skips lines (and says so) instead of this queue growing until the timeout.
    merged: asyncio.Queue[Step] = asyncio.Queue(maxsize=_MERGED_MAX)
    loop = asyncio.get_running_loop()
    follower: asyncio.Queue[str | None] | None = None
    pumps: list[asyncio.Task[None]] = []

    async def states() -> None:
        assert replica.watch is not None
        while True:
            state, reason = await replica.watch.get()
            seconds = round(time.monotonic() - started, 2)
            await merged.put(Step("state", {"state": state, "reason": reason, "seconds": seconds, "replica": replica.id}))

    async def logs(follower: asyncio.Queue[str | None]) -> None:
        while (line := await follower.get()) is not None:
            await merged.put(Step("log", {"line": line}))

    try:  # from the replica's start on: a caller cancelled at any await still gets it torn down
        lines, follower = await asyncio.to_thread(replica.log.follow_from, 0, loop)
        pumps = [asyncio.create_task(states()), asyncio.create_task(logs(follower))]
        for line in lines:
            yield Step("log", {"line": line})
        deadline = started + timeout
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # not wait_for: on 3.11 it can drop a cancel
                    step = await merged.get()
            except TimeoutError:
                yield _verdict(False, f"not healthy after {timeout:g} s", started, replica.log.last_lines(LAST_LINES))
                return
            yield step
            state = step.data.get("state") if step.kind == "state" else None
            if state == ReplicaState.HEALTHY.value:
                yield _verdict(True, f"healthy after {time.monotonic() - started:.1f} s", started, [])
                return
            if state in _FAILED or (state == ReplicaState.PROVISIONING.value and replica.waiting_for_capacity):
                reason = step.data["reason"]
                yield _verdict(False, reason, started, replica.log.last_lines(LAST_LINES))
                return
    finally:
        if follower is not None:
            replica.log.unfollow(follower)
        for pump in pumps:
            pump.cancel()
        # shielded: a caller that went away (its handler cancelled) still gets its replica torn down
        await asyncio.shield(supervisor.stop_detached(replica))


def _verdict(ok: bool, reason: str, started: float, last_lines: list[str]) -> Step:
    data: dict[str, Any] = {"ok": ok, "reason": reason, "seconds": round(time.monotonic() - started, 2)}
    if not ok:
        data["last_lines"] = last_lines
    return Step("verdict", data)
