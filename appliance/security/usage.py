"""Usage per key, endpoint and hour, last-used times, and auth failures: counted in memory on the
hot path, written to SQLite in one transaction by a scheduled flush (never per request)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError
from appliance.security.sessions import Origin
from appliance.store import Clock, Store, iso

log = logging.getLogger(__name__)

_Bucket = tuple[int, str, str]  # (hour since the epoch, key id or "", endpoint)


@dataclass
class _Pending:
    usage: dict[_Bucket, list[int]] = field(default_factory=dict)  # requests, prompt, completion, errors
    last_used: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    suppressed: int = 0


def hour_label(hour: int) -> str:
    return iso(hour * 3600.0)[:13]  # '2026-11-23T11'


class Accounting:
    def __init__(self, store: Store, clock: Clock, failure_events_per_minute: int) -> None:
        self._store = store
        self._clock = clock
        self._budget = failure_events_per_minute
        self._minute = -1
        self._in_minute = 0
        self._pending = _Pending()
        self._flushing = asyncio.Lock()

    def record(self, now: float, key_id: str | None, endpoint: str, *, failed: bool, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        bucket = (int(now // 3600), key_id or "", endpoint)
        totals = self._pending.usage.get(bucket)
        if totals is None:
            totals = self._pending.usage[bucket] = [0, 0, 0, 0]
        totals[0] += 1
        totals[1] += prompt_tokens or 0
        totals[2] += completion_tokens or 0
        totals[3] += failed
        if key_id:
            self._pending.last_used[key_id] = now

    def auth_failure(self, code: str, request: Origin, credential_prefix: str | None) -> None:
        """One event per failure, at most `failure_events_per_minute`; the rest are counted in one event."""
        now = self._clock()
        minute = int(now // 60)
        if minute != self._minute:
            self._minute, self._in_minute = minute, 0
        self._in_minute += 1
        if self._in_minute > self._budget:
            self._pending.suppressed += 1
            return
        remote = request.remote or ""
        details = {"code": code, "method": request.method, "path": request.path, "remote": remote, "credential_prefix": credential_prefix}
        self._pending.failures.append((iso(now), "auth.failure", f"{code} from {remote or 'unknown'} on {request.method} {request.path}", details))

    async def flush(self) -> None:
        async with self._flushing:
            pending, self._pending = self._pending, _Pending()
            # Shielded: once the batch is taken it is written or merged back, even when the flush is
            # cancelled (at shutdown); a cancelled await would otherwise drop it on the floor.
            write = asyncio.ensure_future(self._write(pending))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait({write})
                raise

    async def _write(self, pending: _Pending) -> None:
        rows = [(hour_label(h), key, ep, *totals) for (h, key, ep), totals in pending.usage.items()]
        events = list(pending.failures)
        if pending.suppressed:
            events.append((iso(self._clock()), "auth.failure.suppressed", f"{pending.suppressed} more auth failures not recorded one by one",
                           {"count": pending.suppressed}))
        if not rows and not events and not pending.last_used:
            return
        if (rows or events) and not await self._written(self._store.usage.add(rows, events), f"usage ({len(rows)} buckets)"):
            self._merge_back(pending)
            return
        # Two transactions: when only the second fails, only its part is kept (the totals are written).
        if pending.last_used and not await self._written(self._store.keys.touch(pending.last_used), "last-used times"):
            self._merge_back(_Pending(last_used=pending.last_used))

    @staticmethod
    async def _written(write: Awaitable[Any], what: str) -> bool:
        try:
            await write
            return True
        except ApplianceError as exc:  # the disk is full: the store said so once, this says what waits
            log.warning("%s not written yet, kept for the next flush: %s", what, exc.message)
        except Exception:
            log.exception("%s not written, kept for the next flush", what)
        return False

    def _merge_back(self, old: _Pending) -> None:
        for bucket, totals in old.usage.items():
            current = self._pending.usage.setdefault(bucket, [0, 0, 0, 0])
            for i, v in enumerate(totals):
                current[i] += v
        for key_id, t in old.last_used.items():
            self._pending.last_used[key_id] = max(t, self._pending.last_used.get(key_id, t))
        self._pending.failures[:0] = old.failures
        self._pending.suppressed += old.suppressed
