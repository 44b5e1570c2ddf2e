"""A usage flush that is cancelled (the appliance stopping) still lands its batch, once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

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
