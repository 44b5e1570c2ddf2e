"""Periodic jobs on the event loop (APScheduler 3): one instance at a time, missed runs coalesced."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)


class Jobs:
    def __init__(self) -> None:
        self._scheduler: AsyncIOScheduler | None = None
        self._pending: list[tuple[str, float, Callable[[], Awaitable[object]]]] = []

    def every(self, job_id: str, seconds: float, fn: Callable[[], Awaitable[object]]) -> None:
        if self._scheduler is None:
            self._pending.append((job_id, seconds, fn))
        else:
            self._add(job_id, seconds, fn)

    def _add(self, job_id: str, seconds: float, fn: Callable[[], Awaitable[object]]) -> None:
        assert self._scheduler is not None
        self._scheduler.add_job(fn, "interval", seconds=seconds, id=job_id, max_instances=1, coalesce=True, misfire_grace_time=None, replace_existing=True)

    def start(self) -> None:
        """Start on the running loop (call from a coroutine)."""
        self._scheduler = AsyncIOScheduler()
        for job in self._pending:
            self._add(*job)
        self._pending.clear()
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None
