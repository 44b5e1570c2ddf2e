"""The replica state machine against a fake replica backend: no process, no HTTP, no port answered. The
test decides what each worker does (exit, fail its probes, sleep) and reads the states the supervisor
records; the local backend's own tests are everywhere else."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from test_supervisor import FAST, WORKERS, fake_folder

from appliance.api.app import make_app
from appliance.api.services import SERVICES
from appliance.control.host.process import Slot
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.supervision.backend import ProbeResult
from appliance.control.supervision.replica import Replica
from appliance.domain.specs import HealthCheck


class FakeWorker:
    pid: int | None = None
    cgroup = None

    def __init__(self) -> None:
        self.started_at = time.time()
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stopped = False

    @property
    def returncode(self) -> int | None:
        return self.exit.result() if self.exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, grace: float) -> int:
        self.stopped = True
        if not self.exit.done():
            self.exit.set_result(-15)
        return self.exit.result()


class FakeBackend:
    """Workers that are only objects: each starts healthy unless its endpoint is in `sick`."""

    def __init__(self) -> None:
        self.workers: dict[str, FakeWorker] = {}  # replica id (from the slot) → its latest worker
        self.sick: set[str] = set()  # endpoints whose probes fail
        self.crashing: set[str] = set()  # endpoints whose workers exit as soon as they start
        self.sleeping: set[str] = set()  # replica ids whose engine says it sleeps
        self.calls: list[tuple[str, str]] = []

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    places = False

    async def place(self, config: Any, r: Replica) -> Any:
        raise NotImplementedError

    async def start(self, argv: tuple[str, ...], *, env: dict[str, str], cwd: Path, sink: ReplicaLog, slot: Slot, replica: Replica | None = None,
                    config: Any = None) -> FakeWorker:
        worker = self.workers[slot.name] = FakeWorker()
        if slot.name.rsplit("-", 1)[0] in self.crashing:
            worker.exit.set_result(1)
        return worker

    async def probe(self, r: Replica, check: HealthCheck, deep_model: str | None) -> ProbeResult:
        if r.endpoint in self.sick:
            return ProbeResult(False, "HTTP 503 (fake)")
        return ProbeResult(True, "HTTP 200 (fake)")

    async def asleep(self, r: Replica) -> bool | None:
        return r.id in self.sleeping

    async def engine_call(self, r: Replica, path: str) -> str | None:
        self.calls.append((r.id, path))
        if path.startswith("/wake_up"):
            self.sleeping.discard(r.id)
        return None

    def forget(self, r: Replica) -> None: ...


@pytest.fixture
async def fake(aiohttp_client: Any, make_config: Any) -> tuple[Admin, FakeBackend]:
    backend = FakeBackend()
    config = make_config({"workers": WORKERS})
    client = await aiohttp_client(make_app(config, backend=backend))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await async_wait_for(ready, timeout=10, what="/readyz")
    return Admin(client, config), backend


async def _create(admin: Admin, root: Path, name: str, **extra: Any) -> None:
    body = {"name": name, "model_folder": str(fake_folder(root, name, health=FAST)), **extra}
    status, created = await admin.call("POST", "/api/v1/endpoints", json_body=body)
    assert status == 201, created


def _states(admin: Admin, name: str) -> list[str]:
    return [r.state.value for r in admin.client.app[SERVICES].supervisor.replicas(name)]


async def _until(admin: Admin, name: str, want: Any, what: str, timeout: float = 10) -> Any:
    async def check() -> Any:
        live = [r for r in admin.client.app[SERVICES].supervisor.replicas(name) if r.live]
        return (live or True) if want(live) else None  # an empty list is a result too

    return await async_wait_for(check, timeout=timeout, what=what)


async def test_a_replica_is_started_probed_and_routed_with_no_process(fake: tuple[Admin, FakeBackend], tmp_path: Path) -> None:
    admin, backend = fake
    await _create(admin, tmp_path, "a")
    (r,) = await _until(admin, "a", lambda live: len(live) == 1 and live[0].state.value == "HEALTHY", "a HEALTHY")
    assert r.id in backend.workers and r.process is backend.workers[r.id]
    await async_wait_for(lambda: [x.id for x in admin.client.app[SERVICES].supervisor.table.routable.get("a", ())] == [r.id], timeout=5, what="a routed to")
    status, events = await admin.call("GET", "/api/v1/endpoints/a/events")
    kinds = [e["kind"] for e in reversed(events["data"]) if e["kind"].startswith("replica.")]
    assert kinds[:3] == ["replica.note", "replica.starting", "replica.healthy"], kinds  # created (PROVISIONING), spawned, probed


async def test_a_crash_restarts_with_backoff_and_too_many_end_in_error(fake: tuple[Admin, FakeBackend], tmp_path: Path) -> None:
    admin, backend = fake
    await _create(admin, tmp_path, "c")
    (r,) = await _until(admin, "c", lambda live: live and live[0].state.value == "HEALTHY", "c HEALTHY")
    first = backend.workers[r.id]
    first.exit.set_result(1)  # the worker dies
    await _until(admin, "c", lambda live: live and live[0].restarts == 1 and live[0].state.value == "HEALTHY", "a restart")
    assert backend.workers[r.id] is not first
    backend.crashing.add("c")  # from now on every start of c exits at once
    backend.workers[r.id].exit.set_result(1)
    await async_wait_for(lambda: _status(admin, "c", "ERROR"), timeout=10, what="ERROR after repeated failures")
    status, body = await admin.call("GET", "/api/v1/endpoints/c")
    assert f"failed {WORKERS['max_consecutive_failures']} times in a row" in body["status_message"], body


async def _status(admin: Admin, name: str, want: str) -> bool:
    status, body = await admin.call("GET", f"/api/v1/endpoints/{name}")
    return bool(status == 200 and body["status"] == want)


async def test_failing_probes_take_it_out_of_routing_and_replace_it(fake: tuple[Admin, FakeBackend], tmp_path: Path) -> None:
    admin, backend = fake
    await _create(admin, tmp_path, "u")
    (r,) = await _until(admin, "u", lambda live: live and live[0].state.value == "HEALTHY", "u HEALTHY")
    worker = backend.workers[r.id]
    backend.sick.add("u")
    await _until(admin, "u", lambda live: live and live[0].state.value == "UNHEALTHY", "UNHEALTHY after max_retries failed probes")
    assert not admin.client.app[SERVICES].supervisor.table.routable.get("u")
    await async_wait_for(lambda: worker.stopped, timeout=15, what="the unhealthy worker replaced (stopped)")
    backend.sick.discard("u")
    await _until(admin, "u", lambda live: live and live[0].state.value == "HEALTHY" and live[0].process is not worker, "a healthy replacement")


async def test_scale_to_zero_drains_and_stops_the_worker(fake: tuple[Admin, FakeBackend], tmp_path: Path) -> None:
    admin, backend = fake
    await _create(admin, tmp_path, "s")
    (r,) = await _until(admin, "s", lambda live: live and live[0].state.value == "HEALTHY", "s HEALTHY")
    worker = backend.workers[r.id]
    status, body = await admin.call("PATCH", "/api/v1/endpoints/s", json_body={"replicas": 0, "min_replicas": 0})
    assert status == 200, body
    await _until(admin, "s", lambda live: not live, "no live replica")
    await async_wait_for(lambda: _states(admin, "s") == ["TERMINATED"], timeout=10, what="TERMINATED")
    assert worker.stopped
    seen = [e["kind"] for e in reversed((await admin.call("GET", "/api/v1/endpoints/s/events"))[1]["data"])]
    assert seen.index("replica.draining") < seen.index("replica.terminating") < seen.index("replica.terminated"), seen


async def test_an_engine_found_asleep_leaves_routing_and_a_wake_brings_it_back(fake: tuple[Admin, FakeBackend], tmp_path: Path) -> None:
    admin, backend = fake
    await _create(admin, tmp_path, "z")
    (r,) = await _until(admin, "z", lambda live: live and live[0].state.value == "HEALTHY", "z HEALTHY")
    assert r.sleeps is True  # asked before it was first routed to
    backend.sleeping.add(r.id)
    await _until(admin, "z", lambda live: live and live[0].state.value == "SLEEPING", "SLEEPING")
    assert not admin.client.app[SERVICES].supervisor.table.routable.get("z")
    await admin.client.app[SERVICES].supervisor.wake("z")
    await _until(admin, "z", lambda live: live and live[0].state.value == "HEALTHY", "awake")
    assert (r.id, "/wake_up") in backend.calls and r.process is backend.workers[r.id]  # the same worker, woken
