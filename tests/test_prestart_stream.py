"""A pre-start run_command's output reaches the replica log as it comes (a long download shows its
progress), line by line in bounded memory, and its result still carries what it printed."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import async_wait_for

from appliance.control.host.prestart import RESULT_BYTES, run_pre_start_actions
from appliance.control.host.replica_log import ReplicaLog
from appliance.domain.definitions import PreStartAction

pytestmark = pytest.mark.process

# Prints a line, then waits until the test lets it go on (opening the "go" FIFO blocks until the test
# opens its other end); progress with \r; a last line.
COMMAND = """
import sys
print("first line", flush=True)
open("go").close()
sys.stderr.write("\\r 50%\\r100%\\n"); sys.stderr.flush()
print("x" * 3_000_000)
print("done")
"""


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[ReplicaLog]:
    log = ReplicaLog(tmp_path / "replica.log", 1 << 24, 1)
    yield log
    log.close()


async def test_output_is_in_the_log_while_the_command_runs(tmp_path: Path, sink: ReplicaLog) -> None:
    work = tmp_path / "work"
    work.mkdir()
    os.mkfifo(work / "go")
    variables: dict[str, object] = {}
    action = PreStartAction(action="run_command", args={"command": [sys.executable, "-c", COMMAND]}, ref="fetched")
    running = asyncio.create_task(
        run_pre_start_actions([action], work_dir=work, variables=variables, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, sink=sink)
    )
    try:
        await async_wait_for(lambda: "first line" in sink.last_lines(), timeout=30, what="the first line while the command runs")
        assert not running.done()
    finally:
        await asyncio.to_thread(lambda: open(work / "go", "w").close())  # returns once the command has opened it too
    await asyncio.wait_for(running, 60)
    # Notes reach the log through the log's note thread: wait for the last one, not for the moment it was sent.
    await async_wait_for(lambda: sink.last_lines(1)[-1].endswith("exited with code 0"), timeout=30, what="the exit note in the log")
    lines = sink.last_lines(20)
    assert " 50%" in lines and "100%" in lines and "done" in lines  # \r ends a line
    assert any(line.startswith("xxxx") and "line cut at" in line for line in lines)  # a long line is cut
    result = variables["fetched"]
    assert isinstance(result, dict) and result["out"].endswith("done\n") and len(result["out"]) == RESULT_BYTES  # the end of it
    assert result["err"] == "\r 50%\r100%\n"
    assert any("the result keeps the last" in line for line in lines)
