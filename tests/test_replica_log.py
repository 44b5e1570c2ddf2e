"""A replica log's live followers: one that falls behind skips lines and is told, and the end of the
log reaches it even when its queue is full. The worker's output is cut into lines in bounded memory:
\r ends a line, and a line that never ends is cut."""

from __future__ import annotations

import asyncio
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_for, wait_for

from appliance.control.host import replica_log
from appliance.control.host.replica_log import ReplicaLog

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


# --- the worker's output, cut into lines in bounded memory ---------------------------------------------


class Pumped:
    """A pipe whose reading end a pump thread sends into a log, as a worker's output is."""

    def __init__(self, log: ReplicaLog) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=replica_log._pump, args=(self.read_fd, log), daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def close(self) -> None:
        os.close(self.write_fd)
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_a_line_that_never_ends_is_cut_and_shown_while_it_grows(log: ReplicaLog) -> None:
    """10 MB without a newline, the pipe still open: the start of the line is in the log, cut and marked,
    and the pump never held more than a few chunks."""
    pumped = Pumped(log)
    data = b"0123456789" * 1_000_000
    tracemalloc.start()  # the 10 MB written are not counted: they were made before
    try:
        writer = threading.Thread(target=pumped.send, args=(data,))
        writer.start()
        writer.join(30)
        wait_for(lambda: log.last_lines(5), timeout=10, what="the cut line while the writer still holds the pipe")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (line,) = log.last_lines(5)
    assert line.startswith("0123456789") and line.endswith(f"[appliance: line cut at {replica_log.MAX_LINE:,} bytes]")
    assert len(line) < replica_log.MAX_LINE + 100
    assert peak < 2 << 20, f"the pump held {peak} bytes for a 10 MB line"
    pumped.send(b"more of the same line\nnext line\n")
    pumped.close()
    assert log.last_lines(5) == [line, "next line"]  # the rest of the cut line is dropped, the next kept


def test_carriage_returns_end_lines(log: ReplicaLog) -> None:
    """A progress bar redraws its line with \\r: each state is a line of its own, shown as it comes."""
    pumped = Pumped(log)
    pumped.send(b"Downloading\r\n\r  10%|#         |\r  50%|#####     |")
    wait_for(lambda: log.last_lines(5) == ["Downloading", "  10%|#         |"], timeout=10, what="the progress so far")
    pumped.send(b"\r 100%|##########|\nloaded\n\nready")
    pumped.close()
    assert log.last_lines(10) == ["Downloading", "  10%|#         |", "  50%|#####     |", " 100%|##########|", "loaded", "", "ready"]


def test_line_splitter_keeps_bytes_across_chunks() -> None:
    out: list[str] = []
    lines = replica_log.LineSplitter(out.append, limit=8)
    for piece in (b"ab", b"c\r", b"\nde", b"\xc3", b"\xa9\n", b"123456789abc", b"\r\nok"):
        lines.feed(piece)
    lines.flush()
    assert out == ["abc", "de\u00e9", "12345678 [appliance: line cut at 8 bytes]", "ok"]
