"""What the appliance keeps, and for how long: events by age and count, usage rows by age, and
the logs of finished replicas by total size per endpoint. One job runs it (`retention.prune`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from appliance.config import RetentionConfig
from appliance.store import Clock, Store
from appliance.store.codec import iso

log = logging.getLogger(__name__)
_DAY = 86400.0


def _endpoint_of(log_file: Path) -> str:
    # <endpoint>-<6 hex>.log, .log.1 …
    return log_file.name.split(".log", 1)[0].rsplit("-", 1)[0]


def prune_logs(log_dir: Path, cap: int, live: set[Path]) -> list[Path]:
    """Delete finished replicas' log files, oldest first, until each endpoint's total is at most `cap`
    bytes; the logs of live replicas are kept whatever their size (blocking)."""
    by_endpoint: dict[str, list[tuple[float, int, Path]]] = {}
    for f in log_dir.glob("*.log*"):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        by_endpoint.setdefault(_endpoint_of(f), []).append((st.st_mtime, st.st_size, f))
    removed = []
    for files in by_endpoint.values():
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= cap:
                break
            if f in live or f.with_name(f.name.split(".log", 1)[0] + ".log") in live:
                continue
            f.unlink(missing_ok=True)
            total -= size
            removed.append(f)
    return removed


class Retention:
    def __init__(self, config: RetentionConfig, store: Store, clock: Clock, log_dir: Path, live_logs: Callable[[], set[Path]]) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._log_dir = log_dir
        self._live_logs = live_logs

    async def prune(self) -> None:
        c, now = self._config, self._clock()
        events = await self._store.events.prune(iso(now - c.events_max_age_days * _DAY), c.events_max_count)
        hours = await self._store.usage.prune(iso(now - c.usage_max_age_days * _DAY)[:13])
        logs = await asyncio.to_thread(prune_logs, self._log_dir, c.replica_logs_max_bytes, self._live_logs()) if self._log_dir.is_dir() else []
        if events or hours or logs:
            log.info("retention: deleted %d events, %d usage hours, %d replica log files", events, hours, len(logs))
