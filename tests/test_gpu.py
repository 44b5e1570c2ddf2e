"""On a real GPU (-m gpu; skipped without NVML and a GPU): a `transformers serve` replica pinned by the UUID
the ledger gave it, seen by NVML on that GPU, its memory back within 10 s of a kill -9 of its leader and a
replacement serving; and GPU shares placed together with a third replica waiting and saying why.
Run by the GPU kit (scripts/gpu_check.sh, docs/gpu.md)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Admin, async_wait_for
from test_supervisor import WORKERS, create, fake_folder, replicas, wait_status

from appliance.control.host.gpus import Nvml
from appliance.demo_model import write_demo_model

pytestmark = pytest.mark.gpu
SLOW_START = {"path": "/health", "interval": 0.5, "max_retries": 5, "max_wait_time": 5.0, "initial_delay": 300.0}


def _tree(pid: int) -> set[int]:
    try:
        leader = psutil.Process(pid)
        return {pid, *(c.pid for c in leader.children(recursive=True))}
    except psutil.Error:
        return set()


def _held(uuid: str, pids: set[int]) -> int:
    """Bytes of GPU `uuid` that NVML says the processes `pids` hold (0 when it lists none of them)."""
    (gpu,) = [g for g in Nvml().inventory() if g.uuid == uuid]
    return sum(p.used_memory or 0 for p in gpu.processes if p.pid in pids)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


async def _chat(admin: Admin, model: str) -> int:
    status, _ = await admin.call("POST", "/v1/chat/completions", json_body={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                                            "max_tokens": 4})
    return status


async def test_a_transformers_replica_is_pinned_by_uuid_and_its_memory_is_back_after_a_kill(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_app(make_config({"workers": WORKERS}))
    folder = write_demo_model(tmp_path / "tiny")
    await create(admin, "tiny", folder, runtime="transformers", resources={"gpus": 1}, health_check=SLOW_START)
    await wait_status(admin, "tiny", "HEALTHY", timeout=240)
    (rep,) = await replicas(admin, "tiny")
    (uuid,) = rep["gpus"]
    assert _environ(rep["pid"])["CUDA_VISIBLE_DEVICES"] == uuid
    assert await _chat(admin, "tiny") == 200  # transformers serve loads the model on its first request
    tree = _tree(rep["pid"])
    held = await async_wait_for(lambda: _held(uuid, tree), timeout=30, what=f"NVML to list the worker's tree on {uuid}")
    view = (await admin.call("GET", "/api/v1/endpoints/tiny"))[1]
    claim = view["gpu_memory_claim"]
    assert 0 < held <= claim, (held, claim)  # the claim (estimate + overhead) covers what the engine really took, by NVML's count

    os.kill(rep["pid"], signal.SIGKILL)
    killed = time.monotonic()
    await async_wait_for(lambda: _held(uuid, tree) == 0, timeout=10, what="the killed tree's GPU memory back within 10 s")
    freed_in = time.monotonic() - killed
    await async_wait_for(lambda: _new_healthy(admin, rep["pid"]), timeout=240, interval=0.5, what="a replacement replica")
    assert await _chat(admin, "tiny") == 200
    print(f"GPU memory held by the worker: {held / 2**20:.0f} MiB (claimed {claim / 2**20:.0f} MiB), back {freed_in:.2f} s after kill -9 of its leader")


async def _new_healthy(admin: Admin, old_pid: int) -> bool:
    reps = [r for r in await replicas(admin, "tiny") if r["state"] == "HEALTHY"]
    return any(r["pid"] != old_pid for r in reps)


async def test_two_half_shares_fit_on_one_gpu_and_a_third_waits_saying_why(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_app(make_config({"workers": WORKERS, "gpus": {"devices": [0]}}))
    folder = fake_folder(tmp_path, "halves", "--report-gpu", health={"initial_delay": 60.0})
    await create(admin, "halves", folder, replicas=3, max_replicas=3, resources={"gpu_share": 0.5, "placement": "binpack"})

    async def placed() -> list[dict[str, Any]] | None:
        reps = await replicas(admin, "halves")
        healthy = [r for r in reps if r["state"] == "HEALTHY"]
        waiting = [r for r in reps if r["state"] == "PROVISIONING" and r["last_error"]]
        return reps if len(healthy) == 2 and len(waiting) == 1 else None

    reps = await async_wait_for(placed, timeout=120, interval=0.5, what="two replicas on the GPU, the third waiting")
    healthy = [r for r in reps if r["state"] == "HEALTHY"]
    (waiting,) = [r for r in reps if r["state"] == "PROVISIONING"]
    assert len({tuple(r["gpus"]) for r in healthy}) == 1 and all(r["gpu_share"] == 0.5 for r in healthy)
    assert "gpu" in waiting["last_error"].lower(), waiting["last_error"]
    assert (await admin.call("GET", "/api/v1/endpoints/halves"))[1]["status"] in ("DEGRADED", "PROVISIONING")
