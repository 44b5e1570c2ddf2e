"""A usage flush that is cancelled (the appliance stopping) still lands its batch, once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.security.usage import Accounting
from appliance.store import Store


async def test_a_cancelled_flush_keeps_its_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", time.time)
    await store.open()
    try:
        accounting = Accounting(store, time.time, 10)
        accounting.record(time.time(), None, "chat", failed=False, prompt_tokens=5, completion_tokens=7)
        slow_add, started, release = store.usage.add, asyncio.Event(), asyncio.Event()

        async def add(*args: Any) -> None:  # a disk that takes its time: the write lands when the test says
            started.set()
            await release.wait()
            await slow_add(*args)

        store.usage.add = add  # type: ignore[method-assign]
        flush = asyncio.create_task(accounting.flush())
        await started.wait()
        flush.cancel()
        release.set()
        try:
            await flush
        except asyncio.CancelledError:
            pass
        await accounting.flush()  # nothing left to write twice
        rows = await store.usage.query(key_id=None, endpoint="chat", since=None, until=None)
        assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(1, 5, 7)]
    finally:
        await store.close()


async def test_a_flush_whose_last_used_write_fails_does_not_count_its_usage_twice(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", time.time)
    await store.open()
    try:
        accounting = Accounting(store, time.time, 10)
        accounting.record(time.time(), "key_x", "chat", failed=False, prompt_tokens=5, completion_tokens=7)
        touch, calls = store.keys.touch, []

        async def failing_once(*args: Any) -> None:  # the usage rows are written, the last-used times are not
            calls.append(args)
            if len(calls) == 1:
                raise ApplianceError("the disk is full", status=507, code="disk_full")
            await touch(*args)

        store.keys.touch = failing_once  # type: ignore[method-assign]
        await accounting.flush()
        await accounting.flush()  # writes the last-used time it kept, and no usage again
        rows = await store.usage.query(key_id="key_x", endpoint="chat", since=None, until=None)
        assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(1, 5, 7)]
        assert len(calls) == 2 and "key_x" in calls[1][0]
    finally:
        await store.close()
