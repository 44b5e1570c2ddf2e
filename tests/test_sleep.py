"""Evictions by the engine's sleep (vLLM's sleep API, served here by the fake worker's --sleep-api) on
a fake 24 GiB GPU whose processes hold their claim while awake and 512 MiB asleep: the victim's worker
lives on, SLEEPING and never routed to, its claim shrinks to what NVML shows, and a request wakes it in
place. A sleep that frees nothing stops the replica instead, as every later eviction of it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from test_residency import GIB, ClaimsNvml, _chat, _create, _loaded, _ps, _wait_ps, gpu_box
from test_supervisor import WORKERS

from appliance.api.services import SERVICES
from appliance.domain.placement import GpuInfo, GpuProcess
from appliance.domain.rollout import sleep_unsupported
from appliance.domain.runtimes import Placement, build_worker_spec
from appliance.domain.specs import EndpointConfig, HealthCheck, Resources
from appliance.domain.states import EndpointStatus, ReplicaState, check_transition, derive_status

ASLEEP = 512 << 20  # what a sleeping engine still holds on the GPU (its CUDA context)


class SleepyNvml(ClaimsNvml):
    """ClaimsNvml with a process per running replica, holding its claim, or ASLEEP while its engine
    says it sleeps (asked over HTTP: this runs in a thread, as NVML calls do). `frees` False: a sleep
    frees nothing, as vLLM's does without --enable-sleep-mode."""

    def __init__(self, frees: bool = True) -> None:
        super().__init__()
        self.frees = frees

    def inventory(self) -> list[GpuInfo]:
        (gpu,) = super().inventory()
        processes = []
        for run in list(self.supervisor.runs().values()) if self.supervisor else []:
            for r in list(run.replicas.values()):
                if r.process is None or r.process.pid is None or r.allocation is None or not r.allocation.claim or r.port is None:
                    continue
                held = ASLEEP if self.frees and _asleep(r.port) else (r.wants[0].memory if r.wants and r.wants[0].memory else r.allocation.claim)
                processes.append(GpuProcess(pid=r.process.pid, used_memory=held))
        used = sum(p.used_memory or 0 for p in processes)
        return [GpuInfo(index=0, uuid=gpu.uuid, name=gpu.name, memory_total=gpu.memory_total, memory_used=used, processes=tuple(processes))]


def _asleep(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/is_sleeping", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("is_sleeping"))
    except OSError:
        return False


async def _box(aiohttp_client: Any, make_config: Any, nvml: SleepyNvml) -> Admin:
    """Real worker processes (NVML lists processes by pid), one fake GPU."""
    return await gpu_box(aiohttp_client, make_config({"workers": WORKERS, "residency": {"min_resident_seconds": 0}}), nvml)


async def _replica(admin: Admin, name: str) -> dict[str, Any]:
    status, body = await admin.call("GET", f"/api/v1/endpoints/{name}/replicas")
    assert status == 200, body
    live = [r for r in body["data"] if r["state"] != "TERMINATED"]
    assert len(live) == 1, body
    return dict(live[0])


async def _state(admin: Admin, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await _replica(admin, name)
        return r if r["state"] == state else None

    found: dict[str, Any] = await async_wait_for(check, timeout=timeout, what=f"{name} {state}")
    return found


async def _events(admin: Admin, name: str, kind: str) -> list[dict[str, Any]]:
    status, body = await admin.call("GET", f"/api/v1/endpoints/{name}/events")
    assert status == 200, body
    return [e for e in body["data"] if e["kind"] == kind]


def _series(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


async def test_an_evicted_engine_sleeps_and_a_request_wakes_it_in_place(aiohttp_client: Any, make_config: Any, tmp_path: Path) -> None:
    box = await _box(aiohttp_client, make_config, SleepyNvml())
    assert (await _create(box, tmp_path, "a", "10gb", pin=True))[0] == 201
    assert (await _create(box, tmp_path, "b", "10gb", "--sleep-api", on_demand=True, keep_alive="1h"))[0] == 201
    assert (await _create(box, tmp_path, "c", "10gb", on_demand=True, keep_alive="1h"))[0] == 201
    await _wait_ps(box, timeout=30, what="a loaded", until=lambda ps: _loaded(ps) == {"a"})
    assert (await _chat(box, "b"))[0] == 200
    b = await _replica(box, "b")

    # c does not fit beside a and b: b's engine sleeps instead of stopping; its process lives on, unroutable.
    status, body = await _chat(box, "c")
    assert status == 200, body
    asleep = await _state(box, "b", "SLEEPING")
    assert asleep["pid"] == b["pid"], (asleep, b)
    (evicted,) = await _events(box, "b", "residency.evicted")
    assert evicted["details"]["by"] == "sleep" and evicted["details"]["waiting"] == "c", evicted
    ps = await _ps(box)
    (row,) = [e for e in ps["data"] if e["endpoint"] == "b"]
    assert row["status"] == EndpointStatus.SLEEPING.value and row["gpu_claim"] == ASLEEP, row  # its claim is what NVML shows it holds
    assert ps["memory"] == [{"device": "0", "claimed": 20 * GIB + ASLEEP, "budget": 23 * GIB}]

    # A request for b wakes it where it is: c (no sleep API) is stopped for the room, b answers with the same process.
    status, body = await _chat(box, "b")
    assert status == 200, body
    awake = await _replica(box, "b")
    assert awake["state"] == "HEALTHY" and awake["pid"] == b["pid"], awake
    assert _loaded(await _ps(box)) == {"a", "b"}
    (stopped,) = await _events(box, "c", "residency.evicted")
    assert stopped["details"]["by"] == "stop" and stopped["details"]["waiting"] == "b", stopped
    series = _series(await (await box.client.get("/metrics", headers=box.headers)).text())
    assert series['appliance_replica_sleeps_total{endpoint="b"}'] == 1
    assert series['appliance_replica_wake_seconds_count{endpoint="b"}'] == 1
    log = (await box.client.get(f"/api/v1/endpoints/b/replicas/{b['id']}/logs", headers=box.headers))
    assert log.status == 200
    text = await log.text()
    assert "sleep level 1" in text and "wake_up" in text, text[-2000:]


async def test_an_engine_put_to_sleep_from_outside_is_not_routed_to_until_a_request_wakes_it(
    aiohttp_client: Any, make_config: Any, tmp_path: Path,
) -> None:
    box = await _box(aiohttp_client, make_config, SleepyNvml())
    assert (await _create(box, tmp_path, "b", "10gb", "--sleep-api", replicas=1))[0] == 201
    b = await _state(box, "b", "HEALTHY")
    req = urllib.request.Request(f"http://127.0.0.1:{b['port']}/sleep?level=1", method="POST")
    urllib.request.urlopen(req, timeout=5).read()  # an operator, straight to the engine
    await _state(box, "b", "SLEEPING")
    # Asleep, the fake engine answers 503: a 200 means the request waited for the wake, not for luck.
    for _ in range(3):
        status, body = await _chat(box, "b")
        assert status == 200, body
    assert (await _replica(box, "b"))["pid"] == b["pid"]


async def test_a_sleep_that_frees_nothing_stops_the_replica_instead(aiohttp_client: Any, make_config: Any, tmp_path: Path) -> None:
    box = await _box(aiohttp_client, make_config, SleepyNvml(frees=False))
    assert (await _create(box, tmp_path, "a", "10gb", pin=True))[0] == 201
    assert (await _create(box, tmp_path, "b", "10gb", "--sleep-api", on_demand=True, keep_alive="1h"))[0] == 201
    assert (await _create(box, tmp_path, "c", "10gb", on_demand=True, keep_alive="1h"))[0] == 201
    await _wait_ps(box, timeout=30, what="a loaded", until=lambda ps: _loaded(ps) == {"a"})
    assert (await _chat(box, "b"))[0] == 200
    status, body = await _chat(box, "c")
    assert status == 200, body
    assert _loaded(await _ps(box)) == {"a", "c"}
    kinds = [e["details"].get("by") for e in await _events(box, "b", "residency.evicted")]
    assert "stop" in kinds, kinds
    run = box.client.app[SERVICES].supervisor.runs()["b"]
    assert run.sleep_frees is False  # from now on evictions of b stop it at once
    status, body = await _chat(box, "b")
    assert status == 200, body


def test_sleeping_is_a_state_of_its_own() -> None:
    S = ReplicaState
    for old, new in ((S.HEALTHY, S.SLEEPING), (S.DRAINING, S.SLEEPING), (S.SLEEPING, S.HEALTHY), (S.SLEEPING, S.TERMINATING), (S.SLEEPING, S.FAILED)):
        check_transition(old, new)
    for old, new in ((S.SLEEPING, S.STARTING), (S.STARTING, S.SLEEPING), (S.UNHEALTHY, S.SLEEPING)):
        with pytest.raises(Exception):
            check_transition(old, new)
    assert derive_status(1, [S.SLEEPING], None)[0] is EndpointStatus.SLEEPING
    assert derive_status(2, [S.SLEEPING, S.HEALTHY], None)[0] is EndpointStatus.DEGRADED


def test_vllm_on_a_shared_gpu_gets_sleep_mode_and_its_routes() -> None:
    config = EndpointConfig(
        name="m", model_folder="/models/m", runtime="vllm", definition_file=None, served_model_name="m", aliases=[], replicas=1,
        min_replicas=1, max_replicas=1, resources=Resources(), environ={}, extra_args=[], continuous_batching=False,
        health_check=HealthCheck(path="/health"), unhealthy_replace_after=10.0, public=False, description="",
    )
    spec = build_worker_spec(config, None, Placement(port=9000, replica_id="m-1", work_dir="/tmp/w", memory_fraction=0.4, sleep_mode=True))
    assert "--enable-sleep-mode" in spec.argv and spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    plain = build_worker_spec(config, None, Placement(port=9000, replica_id="m-1", work_dir="/tmp/w"))
    assert "--enable-sleep-mode" not in plain.argv and "VLLM_SERVER_DEV_MODE" not in plain.env
    assert sleep_unsupported(["INFO ...", "ValueError: Sleep mode is not supported on current platform."])
    assert not sleep_unsupported(["ValueError: something else"])
