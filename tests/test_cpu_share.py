"""Workers run at a lower CPU weight than the appliance: their leader, the processes it starts and
(on kernels with autogroups) their session's scheduling group, so an engine that fills the cores
cannot starve the gateway's event loop."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import Admin, async_wait_for

from appliance.control.host.cpu_share import WORKER_NICE, lower_weight

pytestmark = pytest.mark.process

FAKE = Path(__file__).resolve().parent / "fake_worker.py"
PORTS = (10000 + (os.getpid() % 22) * 1000 + 500, 10000 + (os.getpid() % 22) * 1000 + 999)


def expected_nice(nice: int = WORKER_NICE) -> int:
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)


def autogroup_nice(pid: int) -> int | None:
    path = Path(f"/proc/{pid}/autogroup")
    if not path.exists():
        return None
    # "/autogroup-N nice K"; empty for a task in a cgroup of its own (autogroups apply to the root group only)
    fields = path.read_text().split()
    return int(fields[-1]) if fields else None


@pytest.mark.parametrize("nice", [None, 4], ids=["default", "workers.nice=4"])
async def test_a_worker_tree_and_its_session_group_run_below_the_appliance(start_app: Any, make_config: Any, tmp_path: Path, nice: int | None) -> None:
    workers: dict[str, Any] = {"port_range": list(PORTS), "stop_grace_seconds": 3.0}
    if nice is not None:
        workers["nice"] = nice
    want = expected_nice(WORKER_NICE if nice is None else nice)
    admin: Admin = await start_app(make_config({"workers": workers}))
    folder = tmp_path / "models" / "fw"
    folder.mkdir(parents=True)
    service = {
        "start_command": ["python", str(FAKE), "--port", "8000", "--spawn-child"], "port": 8000,
        "health_check": {"path": "/health", "interval": 0.2, "max_retries": 2, "max_wait_time": 1.0, "initial_delay": 0.5},
    }
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "fw", "model_path": "/models", "service": service}]}))
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "fw", "model_folder": str(folder)})
    assert status == 201, body

    async def healthy_pid() -> int | None:
        reps = (await admin.call("GET", "/api/v1/endpoints/fw/replicas"))[1]["data"]
        return next((r["pid"] for r in reps if r["state"] == "HEALTHY" and r.get("pid")), None)

    pid = await async_wait_for(healthy_pid, what="a healthy replica")
    leader = psutil.Process(pid)
    children = await async_wait_for(lambda: leader.children(recursive=True), what="the worker's child")
    # Every process of the tree, and every thread of each, started from the leader's weight.
    for proc in [leader, *children]:
        for thread in proc.threads():
            assert os.getpriority(os.PRIO_PROCESS, thread.id) == want, (proc.pid, thread.id)
    # With autogroups the scheduler weighs the worker's session as a whole: that group is lowered too
    # (the thread's nice alone counts only against the other threads of the same session).
    group = autogroup_nice(pid)
    if group is not None:
        assert group == want
        own = autogroup_nice(os.getpid())
        if own is not None:
            assert own < group  # the appliance's own group keeps its weight


def test_lowering_a_process_that_is_gone_says_so_instead_of_failing(tmp_path: Path) -> None:
    proc = psutil.Popen(["python3", "-c", "pass"])
    proc.wait()
    problems = lower_weight(proc.pid, proc=tmp_path)  # no /proc entry: only the nice value is tried
    assert problems and "nice" in problems[0]


def test_where_the_kernel_weighs_cgroups_the_replicas_cgroup_is_lowered(tmp_path: Path) -> None:
    instance = tmp_path / "appliance-x"
    leaf = instance / "replica-1"
    leaf.mkdir(parents=True)
    (instance / "cpu.weight.nice").write_text("0")  # the cpu controller is on for the replicas' cgroup
    child = psutil.Popen(["python3", "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert lower_weight(child.pid, proc=tmp_path, cgroup=leaf) == []
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == expected_nice()
    finally:
        child.communicate(b"")
    assert (instance / "cpu.weight.nice").read_text() == str(WORKER_NICE)
