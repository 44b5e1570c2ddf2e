"""The gateway's admission queue against a routing table the test sets: first come first served under
overload, one waiter woken per release, waiters that keep their place through a new table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from conftest import async_wait_for

from appliance.api.inference.gateway import Gateway
from appliance.control.supervision.load import Load
from appliance.control.telemetry import Telemetry
from appliance.domain.routing import RoutableReplica, RoutingTable
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError

EP = "ep"
ONE = RoutableReplica("ep-1", EP, "http://127.0.0.1:9", "m")


def table(routable: tuple[RoutableReplica, ...] = (ONE,), **counts: int) -> RoutingTable:
    return RoutingTable(
        routable=MappingProxyType({EP: routable}),
        counts=MappingProxyType({EP: MappingProxyType(counts or {"HEALTHY": len(routable)})}),
        statuses=MappingProxyType({EP: "READY"}),
        desired=MappingProxyType({EP: 1}),
    )


class Tables:
    """The supervisor as admission sees it: a routing table (each read counted) and its changes."""

    def __init__(self, first: RoutingTable) -> None:
        self._table = first
        self.reads = 0
        self._changed = asyncio.Event()

    @property
    def table(self) -> RoutingTable:
        self.reads += 1
        return self._table

    def publish(self, new: RoutingTable) -> None:
        self._table = new
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def wake(self, endpoint: str) -> None:
        raise AssertionError("no endpoint here sleeps")


def config(**extra: Any) -> EndpointConfig:
    return EndpointConfig.model_construct(**{"name": EP, "max_concurrency": 1, "queue_size": 500, "queue_timeout_seconds": 600.0, **extra})


@pytest.fixture
async def gateway() -> Any:
    supervisor = Tables(table())
    services = SimpleNamespace(config=SimpleNamespace(gateway=SimpleNamespace(request_records=10)), load=Load(time.time), supervisor=supervisor)
    gw = Gateway(services, Telemetry())  # type: ignore[arg-type]
    yield gw, supervisor
    await gw.stop()


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Yield to the loop (no timer, no task) until `cond` holds."""
    await async_wait_for(cond, timeout=timeout, interval=0, what=what)


async def queue_up(gw: Gateway, n: int, cfg: EndpointConfig) -> list[asyncio.Task[Any]]:
    """n waiters, each in the queue before the next one arrives."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(gw.acquire(EP, cfg, None, set()), name=f"waiter-{i}"))
        await until(lambda: gw.queue_length(EP) == i + 1, f"waiter {i} to queue")
    return tasks


async def test_under_overload_slots_go_to_the_oldest_waiter_and_newcomers_queue_behind(gateway: Any) -> None:
    gw, _ = gateway
    cfg = config(queue_size=5)
    held = await gw.acquire(EP, cfg, None, set())
    waiters = await queue_up(gw, 5, cfg)
    with pytest.raises(ApplianceError) as full:  # the queue is full: the newest is refused, not the oldest
        await gw.acquire(EP, cfg, None, set())
    assert full.value.code == "queue_full"
    gw.release(*held)
    newcomer = asyncio.create_task(gw.acquire(EP, cfg, None, set()), name="newcomer")  # arrives just as a slot frees
    order = []
    pending = {*waiters, newcomer}
    while pending:
        done, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, f"one slot, yet {len(done)} requests got one"
        (task,) = done
        order.append(task.get_name())
        gw.release(*task.result())
    assert order == [f"waiter-{i}" for i in range(5)] + ["newcomer"]
    assert gw.queue_length(EP) == 0 and gw.inflight(EP) == {}


async def test_a_release_wakes_one_waiter_and_creates_no_task(gateway: Any) -> None:
    gw, supervisor = gateway
    cfg = config()
    held = await gw.acquire(EP, cfg, None, set())
    waiters = await queue_up(gw, 100, cfg)
    loop = asyncio.get_running_loop()
    created = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        slot = held
        for i in range(10):  # ten releases, each handing the slot to the next in line
            reads = supervisor.reads
            gw.release(*slot)
            await until(lambda i=i: sum(w.done() for w in waiters) == i + 1 and gw.queue_length(EP) == 99 - i, f"release {i} to serve one waiter")
            assert created == [], f"tasks created by release {i}: {len(created)}"
            assert supervisor.reads - reads <= 1, f"routing-table reads for release {i}: {supervisor.reads - reads}"  # not one per waiter
            assert [w.done() for w in waiters[: i + 2]] == [True] * (i + 1) + [False]  # the oldest got it
            slot = waiters[i].result()
    finally:
        loop.set_task_factory(None)
    for w in waiters[10:]:
        w.cancel()
    await asyncio.gather(*waiters[10:], return_exceptions=True)
    gw.release(*slot)
    assert gw.queue_length(EP) == 0 and gw.inflight(EP) == {}


async def test_a_waiter_that_leaves_passes_its_slot_on(gateway: Any) -> None:
    gw, _ = gateway
    cfg = config()
    held = await gw.acquire(EP, cfg, None, set())
    first, second = await queue_up(gw, 2, cfg)
    gw.release(*held)  # handed to `first`, which is cancelled before it runs (its client left)
    first.cancel()
    await until(second.done, "the slot to reach the second waiter")
    gw.release(*second.result())
    assert first.cancelled() and gw.inflight(EP) == {} and gw.queue_length(EP) == 0


async def test_waiters_for_a_starting_replica_are_served_in_order_then_refused_when_it_fails(gateway: Any) -> None:
    gw, supervisor = gateway
    supervisor.publish(table((), STARTING=1))
    cfg = config()
    waiters = await queue_up(gw, 3, cfg)
    supervisor.publish(table((ONE,)))  # the replica is up: one slot, to the oldest
    await until(lambda: any(w.done() for w in waiters), "a waiter to get the new replica")
    assert [w.done() for w in waiters] == [True, False, False] and gw.queue_length(EP) == 2
    gw.release(*waiters[0].result())
    await until(waiters[1].done, "the second waiter")
    supervisor.publish(table((), FAILED=1))  # the replica failed and nothing starts: the last waiter is told at once
    with pytest.raises(ApplianceError) as gone:
        await asyncio.wait_for(waiters[2], timeout=10)
    assert gone.value.code == "no_healthy_replica"
    gw.release(*waiters[1].result())
    assert gw.queue_length(EP) == 0 and gw.inflight(EP) == {}
