"""Requests in flight per replica, and when each endpoint last got one.

The gateway counts (begin/end); the supervisor reads the counts to pick the replica to
scale in and to wait for a DRAINING replica to go idle; the autoscaler reads them as a
metric and for idle detection. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from appliance.store import Clock


class Load:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._inflight: dict[str, dict[str, int]] = {}
        self._idle: dict[tuple[str, str], asyncio.Event] = {}
        self.last_request: dict[str, float] = {}  # endpoint → wall time its last request arrived
        # endpoint → the keep_alive its last request asked for (seconds; None: no idle unload); absent: the endpoint's own
        self.keep_alive: dict[str, float | None] = {}

    def inflight(self, endpoint: str) -> dict[str, int]:
        """The live counts of one endpoint (the gateway's pick reads this dict; do not change it)."""
        counts = self._inflight.get(endpoint)
        if counts is None:
            counts = self._inflight[endpoint] = {}
        return counts

    def total(self, endpoint: str) -> int:
        return sum(self._inflight.get(endpoint, {}).values())

    def arrived(self, endpoint: str) -> None:
        self.last_request[endpoint] = self._clock()

    def keep(self, endpoint: str, seconds: float | None | Literal[False]) -> None:
        """A request's own keep_alive (False: it gave none, and the endpoint's own applies again, as in Ollama)."""
        if seconds is False:
            self.keep_alive.pop(endpoint, None)
        else:
            self.keep_alive[endpoint] = seconds

    def idle_timeout(self, endpoint: str, configured: float | None, pinned: bool) -> float | None:
        """How long `endpoint` stays loaded without a request: its last request's keep_alive, else its own;
        never unloaded for idleness when pinned."""
        if pinned:
            return None
        return self.keep_alive[endpoint] if endpoint in self.keep_alive else configured

    def begin(self, endpoint: str, replica: str) -> None:
        counts = self.inflight(endpoint)
        counts[replica] = counts.get(replica, 0) + 1

    def end(self, endpoint: str, replica: str) -> None:
        counts = self._inflight[endpoint]
        left = counts[replica] - 1
        if left:
            counts[replica] = left
            return
        del counts[replica]
        self.last_request[endpoint] = self._clock()  # idle (keep_alive) counts from a request's end, as in Ollama
        idle = self._idle.pop((endpoint, replica), None)
        if idle is not None:
            idle.set()

    async def wait_idle(self, endpoint: str, replica: str, timeout: float) -> bool:
        """True once `replica` has no request in flight; False if `timeout` seconds pass first."""
        if not self._inflight.get(endpoint, {}).get(replica):
            return True
        idle = self._idle.setdefault((endpoint, replica), asyncio.Event())
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can drop a cancel (Supervisor.wait_for_change)
                await idle.wait()
            return True
        except TimeoutError:
            return False
