"""A real engine under supervision (CPU); real GPU pinning through NVML and GPU-driven autoscaling (-m gpu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Admin, async_wait_for, run_cli
from test_supervisor import WORKERS, create, fake_folder, replicas, wait_status


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": WORKERS}))


@pytest.mark.slow
async def test_transformers_serve_replica_becomes_healthy_on_cpu(admin: Admin, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    assert run_cli("demo-model", str(folder)).returncode == 0
    await create(admin, "tiny", folder, runtime="transformers",
                 health_check={"path": "/health", "interval": 0.5, "max_retries": 5, "max_wait_time": 5.0, "initial_delay": 120.0})
    await wait_status(admin, "tiny", "HEALTHY", timeout=180)
    (rep,) = await replicas(admin, "tiny")
    assert Path(rep["command"][0]).name == "transformers" and rep["command"][1:3] == ["serve", str(folder)]
    body = {"model": str(folder), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{rep['port']}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert reply["usage"]["completion_tokens"] <= 3

    # The same calls through the appliance's one URL with the official SDK.
    import openai

    client = openai.AsyncOpenAI(base_url=str(admin.client.make_url("/v1")), api_key=admin.headers["Authorization"].split()[1], max_retries=0)
    answer = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.usage and answer.usage.completion_tokens <= 4
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
    chunks = [c async for c in stream]
    assert chunks and any(c.choices and c.choices[0].finish_reason for c in chunks)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.gpu
async def test_gpu_shares_and_whole_gpus_are_pinned_by_uuid(admin: Admin, tmp_path: Path) -> None:
    status, gpus = await admin.call("GET", "/api/v1/gpus")
    assert status == 200 and gpus["available"], gpus
    first = gpus["data"][0]["uuid"]
    folder = fake_folder(tmp_path, "gpuworker", "--report-gpu", health={"initial_delay": 60.0})

    async def whoami(port: int) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/whoami") as resp:
            return await resp.json()

    await create(admin, "halves", folder, replicas=2, max_replicas=2, resources={"gpu_share": 0.5, "placement": "binpack"})
    await wait_status(admin, "halves", "HEALTHY", timeout=120)
    reps = await replicas(admin, "halves")
    assert {tuple(r["gpus"]) for r in reps} == {(first,)} and all(r["gpu_share"] == 0.5 for r in reps)
    seen = [await whoami(r["port"]) for r in reps]
    assert all(w["cuda_visible_devices"] == first and len(w["torch_devices"]) == 1 for w in seen)

    async def listed() -> bool:
        _, now = await admin.call("GET", "/api/v1/gpus")
        pids = {p["pid"] for g in now["data"] if g["uuid"] == first for p in g["processes"]}
        holders = {h["replica"] for g in now["data"] if g["uuid"] == first for h in g["held_by"]}
        return {w["pid"] for w in seen} <= pids and holders == {r["id"] for r in reps}

    await async_wait_for(listed, timeout=30, what="NVML to list both worker pids on the shared GPU")

    await admin.call("PATCH", "/api/v1/endpoints/halves", json_body={"replicas": 0, "min_replicas": 0})
    await create(admin, "whole", folder, resources={"gpus": 1})
    await wait_status(admin, "whole", "HEALTHY", timeout=120)
    (rep,) = await replicas(admin, "whole")
    assert rep["gpu_share"] is None and len(rep["gpus"]) == 1
    assert (await whoami(rep["port"]))["cuda_visible_devices"] == rep["gpus"][0]


@pytest.mark.gpu
async def test_a_gpu_utilisation_rule_reacts_to_a_real_gpu_load(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_app(make_config({"workers": WORKERS, "autoscaling": {"interval_seconds": 0.5}}))
    folder = fake_folder(tmp_path, "burner", "--report-gpu", health={"initial_delay": 60.0})
    await create(admin, "burner", folder, replicas=1, max_replicas=2, resources={"gpu_share": 0.4, "placement": "binpack"})
    await wait_status(admin, "burner", "HEALTHY", timeout=120)
    status, rule = await admin.call("POST", "/api/v1/endpoints/burner/autoscaling-rules", json_body={
        "metric_source": "kernel", "metric_name": "cuda_util", "comparator": "GREATER_THAN", "threshold": 50, "step_size": 1,
        "window_seconds": 2, "cooldown_seconds": 0,
    })
    assert status == 201, rule
    (rep,) = await replicas(admin, "burner")
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{rep['port']}/_burn?seconds=60") as resp:
        assert resp.status == 200

    async def scaled_out() -> list[dict[str, Any]] | None:
        found = [d for d in (await admin.call("GET", "/api/v1/endpoints/burner/decisions"))[1]["data"] if d["kind"] == "autoscale.scale_out"]
        return found or None

    (decision,) = await async_wait_for(scaled_out, timeout=60, what="the GPU load to scale the endpoint out")
    details = decision["details"]
    assert details["metric"] == "kernel/cuda_util" and details["value"] > 50 and (details["from"], details["to"]) == (1, 2)
    await wait_status(admin, "burner", "HEALTHY", timeout=120)
    assert len(await replicas(admin, "burner")) == 2
