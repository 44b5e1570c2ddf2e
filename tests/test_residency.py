"""More models than memory: load on demand, least-recently-used eviction with drain, requests that wait
through a swap, pin, load/unload, `ps` and the metrics, on a fake 24 GiB GPU whose used memory is what
the running replicas claim (freed a second after a worker ends, as a CUDA context is), and on host
memory with real worker processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Admin, async_wait_for
from test_supervisor import FAST, WORKERS, fake_folder

from appliance.api.app import make_app
from appliance.api.services import SERVICES
from appliance.control.host.gpus import GpuMonitor
from appliance.control.supervision.supervisor import Supervisor
from appliance.domain.placement import GpuInfo

GIB = 1 << 30
_LINGER = 1.0  # seconds a stopped worker's GPU memory stays in use


class ClaimsNvml:
    """One 24 GiB GPU whose used memory is the sum of the claims of replicas with a running worker."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self._running: dict[str, int] = {}
        self._gone: dict[str, tuple[int, float]] = {}

    def inventory(self) -> list[GpuInfo]:
        now = time.monotonic()
        running: dict[str, int] = {}
        if self.supervisor is not None:
            for run in list(self.supervisor.runs().values()):
                for r in list(run.replicas.values()):
                    if r.process is not None and r.allocation is not None and r.allocation.claim:
                        running[r.id] = r.allocation.claim
        for rid, claim in self._running.items():
            if rid not in running:
                self._gone.setdefault(rid, (claim, now))
        self._running = running
        self._gone = {rid: (c, t) for rid, (c, t) in self._gone.items() if now - t < _LINGER}
        used = sum(running.values()) + sum(c for c, _ in self._gone.values())
        return [GpuInfo(index=0, uuid="GPU-0000", name="NVIDIA L4", memory_total=24 * GIB, memory_used=used)]


@pytest.fixture
def residency() -> dict[str, Any]:
    return {"min_resident_seconds": 0}


@pytest.fixture
async def box(launcher: Any, aiohttp_client: Any, make_config: Any, residency: dict[str, Any]) -> Admin:
    return await gpu_box(aiohttp_client, make_config({"workers": WORKERS, "residency": residency}), ClaimsNvml(), launcher=launcher)


async def gpu_box(aiohttp_client: Any, config: Any, nvml: ClaimsNvml, **app: Any) -> Admin:
    """The appliance on `nvml`'s one fake GPU (which reads the replicas' claims from its supervisor)."""
    made = make_app(config, gpus=GpuMonitor(nvml, ttl=0.0), **app)
    client = await aiohttp_client(made, server_kwargs={"handler_cancellation": True})
    nvml.supervisor = made[SERVICES].supervisor

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await async_wait_for(ready, timeout=10, what="/readyz")
    return Admin(client, config)


async def _create(admin: Admin, root: Path, name: str, memory: str, *knobs: str, **extra: Any) -> tuple[int, Any]:
    body = {"name": name, "model_folder": str(fake_folder(root, name, *knobs, health=FAST)), "resources": {"gpu_memory": memory}, "public": True, **extra}
    return await admin.call("POST", "/api/v1/endpoints", json_body=body)


async def _chat(admin: Admin, model: str, **extra: Any) -> tuple[int, Any]:
    resp = await admin.client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
    return resp.status, await resp.json()


async def _ps(admin: Admin) -> dict[str, Any]:
    status, body = await admin.call("GET", "/api/v1/ps")
    assert status == 200, body
    return body


def _loaded(ps: dict[str, Any]) -> set[str]:
    return {e["endpoint"] for e in ps["data"]}


async def _wait_ps(admin: Admin, until: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        ps = await _ps(admin)
        return ps if until(ps) else None

    found: dict[str, Any] = await async_wait_for(check, timeout=timeout, what=what)
    return found


async def test_a_request_evicts_the_least_recently_used_and_requests_wait_through_the_swap(box: Admin, tmp_path: Path) -> None:
    assert (await _create(box, tmp_path, "a", "10gb", pin=True, on_demand=True))[0] == 201
    for name in ("b", "c"):
        status, body = await _create(box, tmp_path, name, "10gb", "--tokens-per-second", "40", on_demand=True, keep_alive="1h")
        assert status == 201, body
    status, body = await _create(box, tmp_path, "d", "30gb", on_demand=True)
    assert status == 422 and "30 GiB" in body["error"]["message"] and "23 GiB" in body["error"]["message"], body

    # A is pinned: loaded at once; B and C wait for their first request.
    await _wait_ps(box, timeout=20, what="ps", until=lambda ps: _loaded(ps) == {"a"})
    assert (await _chat(box, "b"))[0] == 200
    assert _loaded(await _ps(box)) == {"a", "b"}

    # C does not fit beside A and B (30 of 23 GiB): B, not the pinned A, is unloaded for it.
    status, body = await _chat(box, "c")
    assert status == 200, body
    assert _loaded(await _ps(box)) == {"a", "c"}
    status, events = await box.call("GET", "/api/v1/endpoints/b/events")
    evicted = [e for e in events["data"] if e["kind"] == "residency.evicted"]
    assert evicted and evicted[0]["details"]["waiting"] == "c" and evicted[0]["details"]["reason"] == "room", events

    # A slow stream on C; 20 requests for B meanwhile: C drains (its stream completes), B loads, all answer 200.
    stream = await box.client.post("/v1/chat/completions", json={"model": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True})
    assert stream.status == 200
    first = await stream.content.readline()
    assert first.startswith(b"data: ")
    answers = await asyncio.gather(*(_chat(box, "b") for _ in range(20)))
    body_rest = await stream.read()
    assert b"[DONE]" in body_rest  # the victim's request finished before it stopped
    assert [s for s, _ in answers] == [200] * 20, answers
    assert _loaded(await _ps(box)) == {"a", "b"}

    # Unload and load by hand; the pinned one refuses.
    status, body = await box.call("POST", "/api/v1/endpoints/a/unload")
    assert status == 409 and body["error"]["code"] == "endpoint_pinned", body
    status, body = await box.call("POST", "/api/v1/endpoints/b/unload")
    assert status == 202 and body["changed"], body
    await _wait_ps(box, timeout=20, what="b unloaded", until=lambda ps: _loaded(ps) == {"a"})
    status, body = await box.call("POST", "/api/v1/endpoints/c/load")
    assert status == 202, body
    ps = await _wait_ps(box, timeout=20, what="c loaded", until=lambda ps: any(e["endpoint"] == "c" and e["status"] == "HEALTHY" for e in ps["data"]))

    # ps agrees with /metrics: the claims on the GPU, the budget, the evictions and loads.
    metrics = await (await box.client.get("/metrics", headers=box.headers)).text()
    claimed = sum(e["gpu_claim"] or 0 for e in ps["data"])
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert claimed == 20 * GIB and series['appliance_memory_claimed_bytes{device="0"}'] == claimed
    assert series['appliance_memory_budget_bytes{device="0"}'] == 23 * GIB
    assert ps["memory"] == [{"device": "0", "claimed": claimed, "budget": 23 * GIB}]
    assert series['appliance_endpoint_evictions_total{endpoint="b",reason="room"}'] == 1
    assert series['appliance_endpoint_evictions_total{endpoint="c",reason="room"}'] == 1
    assert series['appliance_endpoint_evictions_total{endpoint="b",reason="unload"}'] == 1
    assert series['appliance_endpoint_load_seconds_count{endpoint="b"}'] == 2


async def test_no_room_when_everything_is_pinned_answers_503_at_once(box: Admin, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert (await _create(box, tmp_path, name, "10gb", pin=True))[0] == 201
    assert (await _create(box, tmp_path, "c", "10gb", on_demand=True))[0] == 201
    await _wait_ps(box, timeout=20, what="ps", until=lambda ps: _loaded(ps) == {"a", "b"})
    started = time.monotonic()
    status, body = await _chat(box, "c")
    assert status == 503 and body["error"]["code"] == "no_room", body
    assert "pinned" in body["error"]["message"], body
    assert time.monotonic() - started < 10  # not the wake timeout


async def test_keep_alive_per_request_is_honoured_and_not_forwarded(box: Admin, tmp_path: Path) -> None:
    assert (await _create(box, tmp_path, "b", "10gb", on_demand=True))[0] == 201
    status, body = await _chat(box, "b", keep_alive="soon")
    assert status == 400 and body["error"]["code"] == "invalid_keep_alive" and "5m" in body["error"]["message"], body
    status, body = await _chat(box, "b", keep_alive=0)  # unload as soon as it is idle
    assert status == 200, body
    await _wait_ps(box, timeout=30, what="b unloaded by keep_alive 0", until=lambda ps: not ps["data"])
    status, body = await box.call("PATCH", "/api/v1/endpoints/b", json_body={"keep_alive": "sometime"})
    assert status == 422, body


@pytest.mark.parametrize("residency", [{"min_resident_seconds": 3600}])
async def test_an_endpoint_loaded_moments_ago_is_not_evicted_and_the_load_waits_instead_of_503(box: Admin, tmp_path: Path) -> None:
    assert (await _create(box, tmp_path, "b", "15gb", on_demand=True))[0] == 201
    assert (await _create(box, tmp_path, "c", "15gb", on_demand=True, wake_timeout_seconds=1.5, queue_timeout_seconds=1.0))[0] == 201
    assert (await _chat(box, "b"))[0] == 200
    status, body = await _chat(box, "c")
    assert status == 503 and body["error"]["code"] != "no_room", body  # waited for its wake, then gave up: not refused at once
    assert _loaded(await _ps(box)) >= {"b"}
    status, reps = await box.call("GET", "/api/v1/endpoints/c/replicas")
    assert any("min_resident_seconds" in r["last_error"] for r in reps["data"]), reps


async def test_at_start_the_higher_priority_is_placed_first(launcher: Any, aiohttp_client: Any, make_config: Any, tmp_path: Path) -> None:
    nvml = ClaimsNvml()
    endpoints = [
        {"name": name, "model_folder": str(fake_folder(tmp_path, name, health=FAST)), "resources": {"gpu_memory": "15gb"}, "priority": priority}
        for name, priority in (("alpha", 0), ("zulu", 5))  # zulu comes last by name and in the file: priority decides
    ]
    app = make_app(make_config({"workers": WORKERS, "endpoints": endpoints}), gpus=GpuMonitor(nvml, ttl=0.0), launcher=launcher)
    nvml.supervisor = app[SERVICES].supervisor
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    admin = Admin(client, app[SERVICES].config)

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await async_wait_for(ready, timeout=10, what="/readyz")
    ps = await _wait_ps(admin, until=lambda ps: bool(ps["data"]), what="one loaded")
    assert _loaded(ps) == {"zulu"}
    status, reps = await admin.call("GET", "/api/v1/endpoints/alpha/replicas")
    assert any("waiting for GPUs" in r["last_error"] for r in reps["data"]), reps


async def test_unload_of_an_endpoint_that_is_not_on_demand_is_refused(box: Admin, tmp_path: Path) -> None:
    assert (await _create(box, tmp_path, "x", "5gb"))[0] == 201
    status, body = await box.call("POST", "/api/v1/endpoints/x/unload")
    assert status == 409 and body["error"]["code"] == "not_on_demand", body
    status, body = await box.call("POST", "/api/v1/endpoints/nope/load")
    assert status == 404, body


@pytest.mark.process
async def test_host_memory_budget_swaps_real_workers_on_a_box_without_gpu(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    """A CPU-only box: each replica claims its resources.mem against [residency] host_memory_budget."""
    config = make_config({"workers": WORKERS, "gpus": {"devices": "none"}, "residency": {"host_memory_budget": "1gb", "min_resident_seconds": 0}})
    admin: Admin = await start_app(config)
    for name in ("a", "b"):
        body = {"name": name, "model_folder": str(fake_folder(tmp_path, name, health=FAST)), "resources": {"mem": "600mb"}, "public": True, "on_demand": True}
        status, created = await admin.call("POST", "/api/v1/endpoints", json_body=body)
        assert status == 201, created
    assert (await _ps(admin))["data"] == []  # nothing loaded before a request
    assert (await _chat(admin, "a"))[0] == 200
    ps = await _ps(admin)
    assert _loaded(ps) == {"a"} and ps["data"][0]["host_claim"] == 600 << 20
    pid_a = next(r["pid"] for r in (await admin.call("GET", "/api/v1/endpoints/a/replicas"))[1]["data"] if r["state"] == "HEALTHY")
    status, body = await _chat(admin, "b")  # 1.2 GB of 1 GB: a goes
    assert status == 200, body
    ps = await _ps(admin)
    assert _loaded(ps) == {"b"} and ps["memory"] == [{"device": "host", "claimed": 600 << 20, "budget": 1 << 30}]
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == psutil.STATUS_ZOMBIE  # a's worker is gone


def test_doctor_weighs_the_host_budget_against_the_box_and_the_pinned_claims(make_config: Any, tmp_path: Path) -> None:
    from appliance.control.ops.doctor import _residency

    folder = str(fake_folder(tmp_path, "m", health=FAST))

    def endpoint(name: str, pin: bool) -> dict[str, Any]:
        return {"name": name, "model_folder": folder, "resources": {"mem": "600mb"}, "pin": pin}

    assert _residency(make_config({}), 8 << 30) is None  # host memory not counted: nothing to say
    ok = _residency(make_config({"residency": {"host_memory_budget": "4gb"}, "endpoints": [endpoint("a", True), endpoint("b", False)]}), 8 << 30)
    assert ok is not None and ok.status == "ok" and "pinned endpoints claim 600 MiB (a 600 MiB)" in ok.detail, ok
    too_big = _residency(make_config({"residency": {"host_memory_budget": "16gb"}}), 8 << 30)
    assert too_big is not None and too_big.status == "problem" and "16 GiB of 8 GiB" in too_big.detail, too_big
    pinned = _residency(make_config({"residency": {"host_memory_budget": "1gb"}, "endpoints": [endpoint("a", True), endpoint("c", True)]}), 8 << 30)
    assert pinned is not None and pinned.status == "problem" and "never loads" in pinned.detail, pinned


async def test_a_load_waiting_for_a_draining_victim_does_not_spin(launcher: Any, start_app: Any, make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host memory: b waits while a finishes a 3 s stream; its runner looks again once a second or when
    something is released, not in a loop."""
    from appliance.control.supervision.residency import Residency

    config = make_config({"workers": WORKERS, "gpus": {"devices": "none"}, "residency": {"host_memory_budget": "1gb", "min_resident_seconds": 0}})
    admin: Admin = await start_app(config, launcher=launcher)
    for name in ("a", "b"):
        body = {"name": name, "model_folder": str(fake_folder(tmp_path, name, "--tokens-per-second", "20", health=FAST)), "resources": {"mem": "600mb"},
                "public": True, "on_demand": True}
        assert (await admin.call("POST", "/api/v1/endpoints", json_body=body))[0] == 201
    assert (await _chat(admin, "a"))[0] == 200
    calls = 0
    make_room = Residency._make_room

    async def counted(self: Residency, *args: Any) -> None:
        nonlocal calls
        calls += 1
        await make_room(self, *args)

    monkeypatch.setattr(Residency, "_make_room", counted)
    stream = await admin.client.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True})
    assert (await stream.content.readline()).startswith(b"data: ")
    status, body = await _chat(admin, "b")
    assert status == 200, body
    assert b"[DONE]" in await stream.read()
    assert 1 <= calls <= 10, calls  # about 3 s of drain


async def test_a_pinned_endpoint_is_never_unloaded_for_idleness_and_keep_alive_null_is_400(box: Admin, tmp_path: Path) -> None:
    from appliance.domain.specs import EndpointSpec

    assert EndpointSpec(name="p", model_folder="/m", on_demand=True, pin=True).idle_seconds() is None
    assert EndpointSpec(name="q", model_folder="/m", on_demand=True).idle_seconds() == 300
    assert EndpointSpec(name="r", model_folder="/m", on_demand=True, keep_alive="1h30m").idle_seconds() == 5400
    assert (await _create(box, tmp_path, "b", "10gb", on_demand=True))[0] == 201
    for bad in (None, True, [1], "soon"):
        status, body = await _chat(box, "b", keep_alive=bad)
        assert status == 400 and body["error"]["code"] == "invalid_keep_alive", (bad, body)


def test_whole_gpus_with_a_known_claim_wait_until_nvml_shows_it_free() -> None:
    from appliance.domain.placement import GpuRequest, Unplaceable, place

    held_late = GpuInfo(index=0, uuid="GPU-0000", name="NVIDIA L4", memory_total=24 * GIB, memory_used=20 * GIB)  # a stopped engine's memory
    with pytest.raises(Unplaceable, match="waiting for GPUs"):
        place(GpuRequest(count=1, memory=10 * GIB, reserve=GIB), [held_late], {})
    freed = GpuInfo(index=0, uuid="GPU-0000", name="NVIDIA L4", memory_total=24 * GIB, memory_used=GIB // 2)
    assert place(GpuRequest(count=1, memory=10 * GIB, reserve=GIB), [freed], {}).uuids == ("GPU-0000",)
    assert place(GpuRequest(count=1, reserve=GIB), [held_late], {}).uuids == ("GPU-0000",)  # no claim known: the GPU as NVML has it


async def test_a_blocked_load_placed_once_room_appears_is_waited_for_again(box: Admin, tmp_path: Path) -> None:
    """c was refused (everything pinned); b is deleted, c's replica places on its own retry, and a request
    sent while c starts waits for it instead of reading the old refusal from the routing table."""
    for name in ("a", "b"):
        assert (await _create(box, tmp_path, name, "10gb", pin=True))[0] == 201
    slow = {"name": "c", "model_folder": str(fake_folder(tmp_path, "c", "--startup-delay", "2", health={**FAST, "initial_delay": 10})),
            "resources": {"gpu_memory": "10gb"}, "public": True, "on_demand": True}
    assert (await box.call("POST", "/api/v1/endpoints", json_body=slow))[0] == 201
    await _wait_ps(box, timeout=20, what="a and b loaded", until=lambda ps: _loaded(ps) == {"a", "b"})
    status, body = await _chat(box, "c")
    assert status == 503 and body["error"]["code"] == "no_room", body
    assert (await box.call("DELETE", "/api/v1/endpoints/b"))[0] == 200

    async def starting() -> bool:
        reps = (await box.call("GET", "/api/v1/endpoints/c/replicas"))[1]["data"]
        return any(r["state"] == "STARTING" for r in reps)

    await async_wait_for(starting, timeout=20, what="c starting")
    status, body = await _chat(box, "c")
    assert status == 200, body
