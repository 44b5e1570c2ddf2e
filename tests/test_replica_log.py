"""A replica log's live followers: one that falls behind skips lines and is told, and the end of the
log reaches it even when its queue is full."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_for

from appliance.control import replica_log
from appliance.control.replica_log import ReplicaLog

BACKLOG = 50


@pytest.fixture
async def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(replica_log, "FOLLOW_BACKLOG", BACKLOG)
    log = ReplicaLog(tmp_path / "r.log", max_bytes=1 << 20, backups=1)
    yield log
    log.close_now()


def _last(queue: asyncio.Queue[str | None]) -> str | None:
    items = list(queue._queue)  # type: ignore[attr-defined]
    return items[-1] if items else "nothing yet"


def _drain(queue: asyncio.Queue[str | None]) -> list[str | None]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def _write(log: ReplicaLog, queue: asyncio.Queue[str | None], count: int) -> None:
    await asyncio.to_thread(lambda: [log.write(f"line {i}") for i in range(count)])  # nobody reads meanwhile
    await async_wait_for(lambda: _last(queue) == f"line {count - 1}", timeout=10, what="the last line to reach the follower")


async def test_a_follower_that_falls_behind_skips_lines_and_is_told(log: ReplicaLog) -> None:
    _, follower = await asyncio.to_thread(log.follow_from, 0, asyncio.get_running_loop())
    await _write(log, follower, 500)
    assert follower.qsize() <= BACKLOG + 2, "the follower's queue grew past its bound"
    got = _drain(follower)
    assert got[0] is not None and "fell behind" in got[0] and "lines skipped" in got[0], got[:2]
    assert got[-1] == "line 499"


async def test_the_end_of_the_log_reaches_a_follower_whose_queue_is_full(log: ReplicaLog) -> None:
    _, follower = await asyncio.to_thread(log.follow_from, 0, asyncio.get_running_loop())
    await _write(log, follower, BACKLOG + 2)
    assert follower.full()
    log.end_followers()
    await async_wait_for(lambda: _last(follower) is None, timeout=10, what="the end of the log")
