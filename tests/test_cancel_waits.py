"""Waits that loops and stops are built on end when they are cancelled, even when the cancel lands in the
same turn of the event loop as what they wait for. Python 3.11's `asyncio.wait_for` returns the result then
and drops the cancel: the gRPC listener's watcher, looping on the routing table, then never ended and the
appliance's stop waited for it for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import async_wait_for

from appliance.control.supervision.load import Load
from appliance.control.supervision.supervisor import Supervisor


async def _cancelled_as_it_ends(wait: Awaitable[Any], event: Callable[[], asyncio.Event | None], release: Callable[[], None]) -> None:
    """Start `wait`, then in one turn of the loop release what it waits for and cancel it: it must raise CancelledError."""
    task = asyncio.ensure_future(wait)
    await async_wait_for(lambda: bool(getattr(event(), "_waiters", None)), timeout=5, what="the wait to park on its event")
    assert not task.done()
    release()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 5)  # a dropped cancel would be a result here, not a hang


async def test_a_cancel_as_the_routing_table_changes_ends_the_wait() -> None:
    supervisor: Any = SimpleNamespace(_changed=asyncio.Event())
    await _cancelled_as_it_ends(Supervisor.wait_for_change(supervisor, 60.0), lambda: supervisor._changed, supervisor._changed.set)


async def test_a_cancel_as_a_replica_goes_idle_ends_the_wait() -> None:
    load = Load(time.monotonic)
    load.begin("e", "r")
    await _cancelled_as_it_ends(load.wait_idle("e", "r", 60.0), lambda: load._idle.get(("e", "r")), lambda: load.end("e", "r"))


async def test_the_waits_still_time_out_and_still_see_their_event() -> None:
    supervisor: Any = SimpleNamespace(_changed=asyncio.Event())
    began = time.monotonic()
    await Supervisor.wait_for_change(supervisor, 0.05)
    assert 0.04 <= time.monotonic() - began < 2
    load = Load(time.monotonic)
    load.begin("e", "r")
    assert await load.wait_idle("e", "r", 0.05) is False
    waiting = asyncio.create_task(load.wait_idle("e", "r", 60.0))
    await async_wait_for(lambda: ("e", "r") in load._idle, timeout=5, what="the wait to begin")
    load.end("e", "r")
    assert await asyncio.wait_for(waiting, 5) is True
