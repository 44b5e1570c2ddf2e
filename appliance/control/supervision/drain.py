"""A replica's drain: out of routing already, the requests in flight get up to the endpoint's drain
timeout to finish before its worker stops or sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from appliance.control.supervision.load import Load
from appliance.control.supervision.prober import Record
from appliance.control.supervision.replica import EndpointRun, Replica
from appliance.domain.states import ReplicaState


async def drain(load: Load, record: Record, clock: Callable[[], float], run: EndpointRun, r: Replica, exited: asyncio.Future[int], why: str = "draining") -> None:
    """Record DRAINING and wait until `r` has no request in flight, its drain timeout passes or its worker exits."""
    timeout = run.config.drain_timeout_seconds
    n = load.inflight(r.endpoint).get(r.id, 0)
    await record(r, ReplicaState.DRAINING, f"{why}: {n} request(s) in flight, up to {timeout:g}s")
    if not n:
        return
    started = clock()
    idle = asyncio.ensure_future(load.wait_idle(r.endpoint, r.id, timeout))
    try:
        await asyncio.wait({idle, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        idle.cancel()
    left = load.inflight(r.endpoint).get(r.id, 0)
    took = clock() - started
    if left:
        r.log.note(f"drain ended after {took:.1f}s with {left} request(s) still in flight")
        await record(r, ReplicaState.DRAINING, f"drain timeout: {left} request(s) still in flight after {took:.1f}s", {"in_flight": left})
    else:
        r.log.note(f"drained in {took:.1f}s")
