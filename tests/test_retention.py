"""Retention: events by age and count, usage hours by age, finished replicas' logs by size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appliance.config import RetentionConfig
from appliance.control.ops.retention import Retention, prune_logs
from appliance.store import Store
from appliance.store.codec import iso


def test_finished_logs_go_oldest_first_until_each_endpoint_fits_and_live_ones_stay(tmp_path: Path) -> None:
    def log(name: str, size: int, age: int) -> Path:
        f = tmp_path / name
        f.write_bytes(b"x" * size)
        os.utime(f, (1_000_000 - age, 1_000_000 - age))
        return f

    old = log("chat-aaaaaa.log", 400, 50)
    rotated = log("chat-bbbbbb.log.1", 400, 40)
    newer = log("chat-bbbbbb.log", 400, 30)
    live = log("chat-cccccc.log", 5000, 60)  # the oldest and biggest, but its replica runs
    other = log("embed-dddddd.log", 900, 100)  # another endpoint, under the cap on its own
    removed = prune_logs(tmp_path, 1000, {live})
    assert removed == [old, rotated, newer] and live.exists() and other.exists()  # chat had 6200 bytes: only `live` is left


async def test_events_by_age_and_count_and_usage_by_age(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    store = Store(tmp_path / "db.sqlite", lambda: now[0])
    await store.open()
    try:
        await store.events.add("old", "from long ago")
        now[0] += 100 * 86400
        for i in range(1200):
            await store.events.add("recent", f"event {i}")
        recent_hour = iso(now[0] - 86400)[:13]
        await store.usage.add([("2026-01-01T00", "", "chat", 1, 1, 1, 0), (recent_hour, "", "chat", 2, 2, 2, 0)], [])
        retention = Retention(RetentionConfig(events_max_age_days=30, events_max_count=1000, usage_max_age_days=30), store, lambda: now[0], tmp_path / "logs", set)
        await retention.prune()
        kept = await store.events.list(limit=5000)
        assert len(kept) == 1000 and {e["kind"] for e in kept} == {"recent"} and kept[-1]["message"] == "event 200"
        rows = await store.usage.query(key_id=None, endpoint="chat", since=None, until=None)
        assert [r["requests"] for r in rows] == [2]  # the hour of 2026-01-01 is more than 30 days old
    finally:
        await store.close()


async def test_usage_without_since_is_the_last_30_days_not_the_whole_table(start_inprocess_app: Any, make_config: Any) -> None:
    import time

    from appliance.api.services import SERVICES

    admin = await start_inprocess_app(make_config())
    store = admin.client.app[SERVICES].store
    old_hour = iso(time.time() - 40 * 86400)[:13]
    new_hour = iso(time.time() - 3600)[:13]
    await store.usage.add([(old_hour, "", "chat", 1, 0, 0, 0), (new_hour, "", "chat", 2, 0, 0, 0)], [])
    status, body = await admin.call("GET", "/api/v1/usage")
    assert status == 200 and [r["requests"] for r in body["data"]] == [2]
    _, body = await admin.call("GET", "/api/v1/usage?since=60d")
    assert sorted(r["requests"] for r in body["data"]) == [1, 2]
