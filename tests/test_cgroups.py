"""One cgroup v2 per replica: choosing the mechanism, limits, and (where this machine has a writable
cgroup2 hierarchy) real workers whose whole tree, even a process in a session of its own, ends with
its replica, its endpoint, or an appliance killed with -9 and started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for, wait_for
from test_supervisor import WORKERS, _alive, create, fake_folder, replicas, server_config, wait_status

from appliance.control.host.cgroups import Cgroups, open_isolation, own_cgroup
from appliance.errors import ApplianceError


def _usable() -> str | None:
    own = own_cgroup()
    if own is None:
        return "no cgroup v2 hierarchy is mounted"
    probe = own / "appliance-probe"
    try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as exc:
        return f"cannot create cgroups under {own}: {exc}"
    return None


NO_CGROUPS = _usable()
needs_cgroups = pytest.mark.skipif(NO_CGROUPS is not None, reason=f"needs a writable cgroup v2 hierarchy: {NO_CGROUPS}")


def _fake_proc(root: Path, mountinfo: str, cgroup: str) -> Path:
    proc = root / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_own_cgroup_is_read_from_mountinfo_and_the_unified_line(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    (mount / "system.slice" / "appliance.service").mkdir(parents=True)
    proc = _fake_proc(
        tmp_path,
        f"30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n35 25 0:31 / {mount} rw,relatime - cgroup2 cgroup2 rw\n",
        "4:memory:/x\n0::/system.slice/appliance.service\n",
    )
    assert own_cgroup(proc) == mount / "system.slice" / "appliance.service"
    (tmp_path / "v1").mkdir()
    v1_only = _fake_proc(tmp_path / "v1", "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "4:memory:/x\n")
    assert own_cgroup(v1_only) is None


def test_without_cgroups_auto_falls_back_and_cgroup_mode_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.control.host.cgroups.own_cgroup", lambda: None)
    iso = open_isolation("auto", tmp_path)
    assert iso.mechanism == "process-group" and iso.cgroups is None and "no cgroup v2 hierarchy is mounted" in iso.detail
    with pytest.raises(ApplianceError, match='workers.isolation = "cgroup", but no cgroup v2 hierarchy is mounted'):
        open_isolation("cgroup", tmp_path)
    assert open_isolation("process-group", tmp_path).mechanism == "process-group"


def test_limits_become_cpu_max_and_memory_max_only_where_the_controller_is_delegated(tmp_path: Path) -> None:
    # cgroupfs creates the interface files itself; here a plain directory stands in, so create them
    both = Cgroups(tmp_path / "both", frozenset({"cpu", "memory"}))
    both.instance.mkdir()
    leaf = both.leaf("chat-1a2b3c", cpu=1.5, mem=2 << 30)
    assert (leaf / "cpu.max").read_text() == "150000 100000"  # 1.5 cores: 150 ms of CPU per 100 ms
    assert (leaf / "memory.max").read_text() == str(2 << 30)
    tiny = both.leaf("chat-4d5e6f", cpu=0.001)
    assert (tiny / "cpu.max").read_text() == "1000 100000"  # the kernel's floor is 1 ms per period
    none = Cgroups(tmp_path / "none", frozenset())
    none.instance.mkdir()
    bare = none.leaf("chat-9a9a9a", cpu=2, mem=1 << 30)
    assert not (bare / "cpu.max").exists() and not (bare / "memory.max").exists()


@pytest.fixture
async def cg_admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": {**WORKERS, "isolation": "cgroup"}}))


def _cgroup_of(pid: int) -> str:
    return next(line[3:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if line.startswith("0::"))


def _at_least(found: list[int], n: int) -> list[int] | None:
    return found if len(found) >= n else None


def _children(log: Path) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if " child " in line]


@needs_cgroups
@pytest.mark.process
async def test_a_replica_is_its_cgroup_and_a_killed_leader_takes_even_a_detached_child(cg_admin: Admin, tmp_path: Path) -> None:
    await create(cg_admin, "boxed", fake_folder(tmp_path, "boxed", "--spawn-child", "--spawn-detached"))
    await wait_status(cg_admin, "boxed", "HEALTHY")
    (rep,) = await replicas(cg_admin, "boxed")
    leaf = Path(rep["cgroup"])
    assert leaf.name == rep["id"] and leaf.is_dir()
    assert _cgroup_of(rep["pid"]).endswith(f"/{rep['id']}")
    helpers = await async_wait_for(lambda: _at_least(_children(Path(rep["log_path"])), 2), what="both helpers started")
    members = set(Cgroups.members(leaf))
    assert {rep["pid"], *helpers} <= members  # the detached one too: it left the group, not the cgroup
    os.kill(rep["pid"], signal.SIGKILL)
    await async_wait_for(lambda: not any(_alive(p) for p in members), timeout=10, what="every process of the killed replica's cgroup to end")
    new = await async_wait_for(lambda: _restarted(cg_admin, rep["pid"]), timeout=30, what="the replica restarted and healthy")
    assert new["cgroup"] == str(leaf)  # the same replica, in a fresh cgroup of the same name
    new_members = set(Cgroups.members(leaf))
    assert new["pid"] in new_members and not new_members & members
    status, _ = await cg_admin.call("DELETE", "/api/v1/endpoints/boxed")
    assert status == 200
    await async_wait_for(lambda: not any(_alive(p) for p in new_members), timeout=10, what="the deleted endpoint's tree to end")
    await async_wait_for(lambda: not leaf.exists(), timeout=10, what="its cgroup to be removed")


async def _restarted(admin: Admin, old_pid: int) -> dict[str, Any] | None:
    return next((r for r in await replicas(admin, "boxed") if r["state"] == "HEALTHY" and r["pid"] != old_pid), None)


@needs_cgroups
@pytest.mark.process
def test_kill_9_of_the_appliance_then_a_restart_ends_what_its_cgroups_held(server_factory: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "kept", "--spawn-detached")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "kept"\nmodel_folder = "{folder}"\n')
    config.write_text(config.read_text().replace("[workers]\n", '[workers]\nisolation = "cgroup"\n'))
    key_file = tmp_path / "state" / "admin.key"

    def api(server: Any, path: str) -> Any:
        req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def healthy(server: Any) -> dict[str, Any] | None:
        return next((r for r in api(server, "/api/v1/endpoints/kept/replicas")["data"] if r["state"] == "HEALTHY"), None)

    first = server_factory(config).start()
    rep = wait_for(lambda: healthy(first), timeout=30, what="a healthy replica")
    leaf = Path(rep["cgroup"])
    members = wait_for(lambda: _at_least(Cgroups.members(leaf), 2), what="the worker and its detached helper")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert any(_alive(p) for p in members)  # the detached helper outlived its worker: only its cgroup knows it
    second = server_factory(config).start()
    again = wait_for(lambda: healthy(second), timeout=30, what="the endpoint back")
    assert not any(_alive(p) for p in members) and not leaf.exists()
    events = api(second, "/api/v1/events?kind=replica.orphan_stopped")["data"]
    assert len(events) == 1 and rep["id"] in events[0]["message"]
    assert second.stop() == 0
    assert not Path(again["cgroup"]).exists() and not leaf.parent.exists()  # a clean stop removes its subtree


@needs_cgroups
async def test_a_worker_stopped_right_after_its_start_is_ended_even_before_it_joined_its_cgroup(tmp_path: Path) -> None:
    from appliance.control.host.process import ProcessLauncher, Slot
    from appliance.control.host.replica_log import ReplicaLog

    iso = open_isolation("cgroup", tmp_path)
    launcher = ProcessLauncher(iso)
    sink = ReplicaLog(tmp_path / "w.log", 1 << 20, 1)
    try:
        for i in range(15):  # the stop races the worker's join of its cgroup: every outcome must end it
            worker = await launcher([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ), cwd=tmp_path, sink=sink, slot=Slot(f"race-{i}"))
            await asyncio.wait_for(worker.stop(1.0), timeout=20)
            assert worker.pid is not None and not _alive(worker.pid)
            assert worker.cgroup is not None and not worker.cgroup.exists()
    finally:
        sink.close()
        assert iso.cgroups is not None
        iso.cgroups.close()
