"""SIGHUP while the appliance is still starting: the reload waits for startup reconciliation to end,
so the two never reconcile declared endpoints at the same time."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from aiohttp import web

from appliance.api.services import SERVICES, Readiness
from appliance.config import Config
from appliance.service import Reloader


async def test_a_reload_requested_during_startup_waits_for_it() -> None:
    readiness = Readiness()
    app = web.Application()
    app[SERVICES] = SimpleNamespace(readiness=readiness)  # type: ignore[assignment]
    done_at: list[float] = []

    def startup_done() -> None:
        readiness.ready = True
        done_at.append(time.monotonic())

    asyncio.get_running_loop().call_later(0.2, startup_done)
    assert await Reloader(app, Config()).reload() is False  # no config file to read: returns at once once started
    assert done_at, "the reload went ahead while startup was still running"


async def test_a_reload_after_a_failed_startup_still_runs() -> None:
    readiness = Readiness(failure="store unreadable")
    app = web.Application()
    app[SERVICES] = SimpleNamespace(readiness=readiness)  # type: ignore[assignment]
    assert await asyncio.wait_for(Reloader(app, Config()).reload(), timeout=5) is False
