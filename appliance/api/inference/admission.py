"""Admission: requests in flight per replica, a bounded first-come first-served queue per endpoint,
and a wait for a starting replica instead of an instant 503.

A slot that frees up goes straight to the oldest waiter that can use it (its future gets the replica,
already counted in flight), so a newcomer never takes it first and one release wakes one waiter. A new
routing table (a replica started or failed, the endpoint gave up) makes the waiters look again, in
order, each keeping its place in the queue.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

from appliance.api.services import Services
from appliance.domain.routing import RoutableReplica, RoutingTable, pick
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError

_STARTING = ("PROVISIONING", "STARTING")
_WATCH_SECONDS = 5.0  # a watcher with no waiters left ends within this long


_NO_ROOM_RETRY = 30  # seconds: an operator's unload or an idle unload is what frees room


class _Waiter:
    """One queued request. Its future resolves to a replica (the slot already counted in flight), or to
    None: look at the routing table again (a new table, or its deadline came)."""

    __slots__ = ("config", "exclude", "future", "key")

    def __init__(self, config: EndpointConfig, key: str | None, exclude: set[str]) -> None:
        self.config = config
        self.key = key
        self.exclude = exclude
        self.future: asyncio.Future[RoutableReplica | None] = asyncio.get_running_loop().create_future()


class EndpointQueue:
    __slots__ = ("endpoint", "inflight", "waiters", "watcher")

    def __init__(self, endpoint: str, inflight: dict[str, int]) -> None:
        self.endpoint = endpoint
        self.inflight = inflight  # the live counts kept by Load
        self.waiters: deque[_Waiter] = deque()  # oldest first
        self.watcher: asyncio.Task[None] | None = None  # re-checks the waiters when a new routing table comes


def _free(table: RoutingTable, endpoint: str, config: EndpointConfig, exclude: set[str], inflight: dict[str, int]) -> list[RoutableReplica]:
    routable = table.routable.get(endpoint, ())
    limit = config.max_concurrency
    return [r for r in routable if r.id not in exclude and (limit is None or inflight.get(r.id, 0) < limit)]


def _recheck(future: asyncio.Future[RoutableReplica | None]) -> None:
    if not future.done():
        future.set_result(None)


class Admission:
    def __init__(self, services: Services, rng: random.Random | None = None) -> None:
        self._services = services
        self._rng = rng or random.Random()
        self._queues: dict[str, EndpointQueue] = {}

    def queue_length(self, endpoint: str) -> int:
        q = self._queues.get(endpoint)
        return len(q.waiters) if q else 0

    async def close(self) -> None:
        for q in self._queues.values():
            if q.watcher is not None:
                q.watcher.cancel()
        watchers = [q.watcher for q in self._queues.values() if q.watcher is not None]
        await asyncio.gather(*watchers, return_exceptions=True)

    async def acquire(self, endpoint: str, config: EndpointConfig, key: str | None, exclude: set[str]) -> tuple[EndpointQueue, RoutableReplica]:
        """A replica with room for one more request, counted in flight until release()."""
        q = self._queues.get(endpoint)
        if q is None:
            q = self._queues[endpoint] = EndpointQueue(endpoint, self._services.load.inflight(endpoint))
        if q.waiters:
            self._dispatch(q)  # whatever is free now goes to those already waiting
        return q, await self._acquire(q, config, key, exclude)

    def release(self, q: EndpointQueue, replica: RoutableReplica) -> None:
        self._services.load.end(replica.endpoint, replica.id)
        if q.waiters:
            self._dispatch(q)  # the slot goes straight to the oldest waiter that can use it

    def _take(self, q: EndpointQueue, candidates: list[RoutableReplica], config: EndpointConfig, key: str | None) -> RoutableReplica:
        replica = pick(config.routing, candidates, q.inflight, key=key, overload_factor=config.prefix_overload_factor, rng=self._rng)
        self._services.load.begin(q.endpoint, replica.id)  # no await since the pick: a DRAINING replica is never chosen
        return replica

    def _dispatch(self, q: EndpointQueue) -> None:
        """Free slots to waiters, oldest first: one pass that stops at the first waiter finding none."""
        table = self._services.supervisor.table
        served = []
        for w in q.waiters:
            if w.future.done():
                continue  # handed a slot, or about to look again: it keeps its place meanwhile
            free = _free(table, q.endpoint, w.config, w.exclude, q.inflight)
            if not free:
                if w.exclude and _free(table, q.endpoint, w.config, set(), q.inflight):
                    continue  # slots are free, only not on replicas this one failed to reach
                break
            w.future.set_result(self._take(q, free, w.config, w.key))
            served.append(w)
        for w in served:
            q.waiters.remove(w)  # near the front: cheap

    def _watch(self, q: EndpointQueue) -> None:
        if q.watcher is None or q.watcher.done():
            q.watcher = asyncio.create_task(self._watch_table(q), name=f"admission-{q.endpoint}")

    async def _watch_table(self, q: EndpointQueue) -> None:
        supervisor = self._services.supervisor
        while q.waiters:
            seen = supervisor.table
            await supervisor.wait_for_change(_WATCH_SECONDS)
            if supervisor.table is seen:
                continue
            self._dispatch(q)
            for w in q.waiters:  # a replica failed, the endpoint gave up, a start finished: each looks again
                _recheck(w.future)

    async def _acquire(self, q: EndpointQueue, config: EndpointConfig, key: str | None, exclude: set[str]) -> RoutableReplica:
        endpoint = q.endpoint
        supervisor = self._services.supervisor
        deadline = patient = 0.0
        woke = False
        waiter: _Waiter | None = None
        try:
            while True:
                table: RoutingTable = supervisor.table
                if waiter is None:  # a newcomer takes a free slot only when no one waiting could (dispatched above)
                    free = _free(table, endpoint, config, exclude, q.inflight)
                    if free:
                        return self._take(q, free, config, key)
                else:  # a waiter looking again: slots go in queue order, this one's included
                    waiter.future = asyncio.get_running_loop().create_future()
                    self._dispatch(q)
                    if waiter.future.done():
                        got = waiter.future.result()
                        assert got is not None
                        waiter = None  # served: nothing to give back
                        return got
                routable = [r for r in table.routable.get(endpoint, ()) if r.id not in exclude]
                if not deadline:  # from here on the request waits: its clock starts
                    now = time.monotonic()
                    deadline = now + config.queue_timeout_seconds
                    # With nothing routable after a wake, or a roll that had to stop the last serving replica first, the
                    # new replica is worth waiting for as long as a start may take; otherwise queue_timeout applies.
                    patient = now + max(config.queue_timeout_seconds, config.wake_timeout_seconds)
                counts = table.counts.get(endpoint, {})
                starting = sum(counts.get(s, 0) for s in _STARTING)
                asleep = counts.get("SLEEPING", 0)  # evicted by sleep: woken in place
                if woke and table.statuses.get(endpoint) != "ERROR":
                    starting += counts.get("FAILED", 0) + asleep  # a woken replica that failed is restarted; wait unless the endpoint gave up
                if not routable and not starting and not woke and (asleep or (config.wakes and table.desired.get(endpoint) == 0)):
                    woke = True
                    await supervisor.wake(endpoint)  # requests arriving meanwhile see it STARTING and wait for the same replica
                    continue
                if not routable and not starting:
                    raise no_replica(endpoint, counts, table)
                if not routable and (blocked := table.blocked.get(endpoint)):
                    raise ApplianceError(
                        f"endpoint {endpoint} cannot be loaded now: {blocked}", status=503, code="no_room", headers={"Retry-After": str(_NO_ROOM_RETRY)},
                    )
                if waiter is None and len(q.waiters) >= config.queue_size:
                    raise ApplianceError(
                        f"endpoint {endpoint} is at capacity: {len(q.waiters)} requests already waiting (queue_size {config.queue_size})",
                        status=429, code="queue_full", headers={"Retry-After": "1"},
                    )
                remaining = (patient if not routable and (woke or endpoint in table.awaiting) else deadline) - time.monotonic()
                if remaining <= 0:
                    if routable:
                        raise ApplianceError(
                            f"endpoint {endpoint} is at capacity: waited {config.queue_timeout_seconds:g}s for a free replica",
                            status=429, code="queue_timeout", headers={"Retry-After": "1"},
                        )
                    raise no_replica(endpoint, counts, table)
                if waiter is None:
                    waiter = _Waiter(config, key, exclude)
                    q.waiters.append(waiter)
                    self._watch(q)
                timer = asyncio.get_running_loop().call_later(remaining, _recheck, waiter.future)
                try:
                    got = await waiter.future
                finally:
                    timer.cancel()
                if got is not None:
                    waiter = None
                    return got
        finally:
            if waiter is not None:
                self._leave(q, waiter)

    def _leave(self, q: EndpointQueue, waiter: _Waiter) -> None:
        """A waiter that gives up (an error, a timeout, its client gone): out of the queue, and a slot it
        was handed but never took goes on to the next."""
        try:
            q.waiters.remove(waiter)
        except ValueError:
            pass  # handed a slot: the dispatch took it out
        f = waiter.future
        if f.done() and not f.cancelled() and f.result() is not None:
            self.release(q, f.result())  # type: ignore[arg-type]


def no_replica(endpoint: str, counts: Any, table: RoutingTable) -> ApplianceError:
    detail = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s != "HEALTHY") or "none running"
    status = table.statuses.get(endpoint, "")
    extra = f"; endpoint status {status}" if status == "ERROR" else ""
    return ApplianceError(f"endpoint {endpoint} has no healthy replica ({detail}){extra}", status=503, code="no_healthy_replica", headers={"Retry-After": "5"})
