"""Real vLLM (the CPU build here) as a supervised replica: serving through the gateway with the openai
SDK, and a kill -9 of the replica's leader leaving no process of its tree behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import Admin, async_wait_for, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_access import new_key
from test_supervisor import WORKERS, _alive, create, replicas, server_config, wait_status

from appliance.control.host.process import group_members
from appliance.control.scaling.signals import prometheus_value
from appliance.demo_model import write_demo_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU: plenty for the tiny model
READY = 400  # seconds: a replica is ready in about a minute on 2 idle cores
LONG = 65536  # tokens of context for the test model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_demo_model(tmp_path_factory.mktemp("vllm") / "tiny")
    # A long context lets a stream run for seconds even on a fast CPU, so a disconnect lands mid-generation.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG}))
    return folder


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": {**WORKERS, "restart_backoff_seconds": 0.5}, "autoscaling": {"interval_seconds": 0.5}}))


def sdk(admin: Admin) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(admin.client.make_url("/v1")), api_key=admin.headers["Authorization"].split()[1], max_retries=0)


async def serves(admin: Admin) -> None:
    client = sdk(admin)
    reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply.model == "tiny" and reply.usage is not None and reply.usage.completion_tokens == 4
    done = await client.completions.create(model="tiny", prompt="once upon", max_tokens=3, temperature=0)
    assert done.choices[0].text is not None and done.usage is not None and done.usage.completion_tokens == 3
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True)
    chunks = [c async for c in stream]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 1


async def test_a_vllm_replica_serves_and_a_killed_leader_takes_its_whole_tree(admin: Admin, tiny_model: Path) -> None:
    # Dev mode: the engine serves /sleep, /wake_up and /is_sleeping (on CPU a sleep pauses it and frees nothing).
    await create(admin, "tiny", tiny_model, runtime="vllm", environ={**VLLM_ENV, "VLLM_SERVER_DEV_MODE": "1"})
    await wait_status(admin, "tiny", "HEALTHY", timeout=READY)
    (rep,) = await replicas(admin, "tiny")
    assert rep["command"][1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    await serves(admin)
    # A keyed stream's tokens are counted: the gateway asks the engine for the stream's usage event.
    key = await new_key(admin, name="meter")
    keyed = openai.AsyncOpenAI(base_url=str(admin.client.make_url("/v1")), api_key=key["key"], max_retries=0)
    stream = await keyed.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True, extra_body={"ignore_eos": True}
    )
    assert all(c.choices for c in [c async for c in stream])  # the usage event stays with the gateway
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key['id']}&since=1h")
    assert status == 200 and usage["data"][0]["requests"] == 1 and usage["data"][0]["completion_tokens"] == 7
    assert usage["data"][0]["prompt_tokens"] > 0
    # A client that goes away mid-stream frees the engine: vLLM stops generating for it long before its max_tokens.
    generated = await _metric(rep["port"], "vllm:generation_tokens_total")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG - 64, "stream": True, "ignore_eos": True}
    resp = await admin.client.post("/v1/chat/completions", json=body, headers=admin.headers)
    assert resp.status == 200
    await resp.content.readline()
    await async_wait_for(lambda: _running(rep["port"], lambda n: n >= 1), timeout=30, what="the stream to run in the engine")
    resp.close()
    await async_wait_for(lambda: _running(rep["port"], lambda n: n == 0), timeout=30, what="vllm:num_requests_running back to 0")
    assert await _metric(rep["port"], "vllm:generation_tokens_total") - generated < LONG - 64  # aborted, not finished
    # Put to sleep behind the appliance's back: /health stays 200, /is_sleeping says true. The replica is
    # taken out of routing, and a request wakes the same engine instead of reaching it asleep.
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{rep['port']}/sleep?level=1") as resp:
            assert resp.status == 200, await resp.text()
        await async_wait_for(lambda: _state(admin, "tiny", "SLEEPING"), timeout=30, what="the replica seen asleep")
        status, table = await admin.call("GET", "/api/v1/endpoints/tiny")
        assert status == 200 and table["status"] == "SLEEPING", table
        await serves(admin)
        async with s.get(f"http://127.0.0.1:{rep['port']}/is_sleeping") as resp:
            assert (await resp.json())["is_sleeping"] is False
    assert [r["pid"] for r in await replicas(admin, "tiny") if r["state"] == "HEALTHY"] == [rep["pid"]]  # woken, not restarted
    # The engine runs as several processes (API server, EngineCore, Worker), all in the replica's group.
    leader = rep["pid"]
    tree = group_members(leader)
    assert len(tree) >= 3, f"expected vLLM's API server, engine core and worker in group {leader}: {tree}"
    os.kill(leader, signal.SIGKILL)
    await async_wait_for(lambda: not any(_alive(p) for p in tree), timeout=10, what="every process of the killed replica's tree to end")
    # A replacement starts (a new leader) and serves.
    await async_wait_for(lambda: _healthy_other_pid(admin, "tiny", leader), timeout=READY, what="a healthy replacement")
    await serves(admin)


async def _metric(port: int, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _state(admin: Admin, name: str, state: str) -> bool:
    return any(r["state"] == state for r in await replicas(admin, name))


async def _running(port: int, ok: Any) -> bool:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
        value = prometheus_value(await resp.text(), "vllm:num_requests_running")
    return value is not None and bool(ok(value))


async def test_a_folder_vllm_cannot_load_ends_in_error_with_the_engines_last_lines(admin: Admin, tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    await create(admin, "broken", broken, runtime="vllm", environ=VLLM_ENV)
    ep = await wait_status(admin, "broken", "ERROR", timeout=READY)
    message = ep["status_message"]
    assert "failed 3 times in a row" in message and "worker exited with code" in message
    assert "last log lines:" in message and "Error" in message  # the engine's own words


def test_kill_9_of_the_appliance_then_a_restart_leaves_no_engine_process_and_the_endpoint_returns(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    declared = f'[[endpoints]]\nname = "tiny"\nmodel_folder = "{tiny_model}"\nruntime = "vllm"\nenviron = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}\n'
    config = server_config(tmp_path, declared)
    key_file = tmp_path / "state" / "admin.key"

    def healthy(server: Any) -> dict[str, Any] | None:
        req = urllib.request.Request(server.url + "/api/v1/endpoints/tiny/replicas", headers={"Authorization": f"Bearer {key_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            reps = [r for r in json.loads(resp.read())["data"] if r["state"] == "HEALTHY"]
        return reps[0] if reps else None

    first = server_factory(config).start()
    rep = wait_for(lambda: healthy(first), timeout=READY, interval=0.5, what="a HEALTHY vLLM replica")
    tree = group_members(rep["pid"])
    assert len(tree) >= 3
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = server_factory(config).start()
    wait_for(lambda: not any(_alive(p) for p in tree), timeout=30, what="every engine process of the killed appliance to end")
    again = wait_for(lambda: healthy(second), timeout=READY, interval=0.5, what="the endpoint back with a new replica")
    assert again["pid"] != rep["pid"]
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(second.url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key_file.read_text().strip()}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] >= 1


async def test_an_inference_rule_on_vllm_num_requests_running_scales_out_under_load(admin: Admin, tiny_model: Path) -> None:
    await create(admin, "tiny", tiny_model, runtime="vllm", environ=VLLM_ENV, min_replicas=1, max_replicas=2)
    await wait_status(admin, "tiny", "HEALTHY", timeout=READY)
    (first,) = await replicas(admin, "tiny")
    status, rule = await admin.call("POST", "/api/v1/endpoints/tiny/autoscaling-rules", json_body={
        "metric_source": "inference", "metric_name": "vllm:num_requests_running", "comparator": "GREATER_THAN_OR_EQUAL",
        "threshold": 1, "step_size": 1, "cooldown_seconds": 0, "window_seconds": 1,
    })
    assert status == 201, rule
    # One long stream keeps the engine's running count at 1 until the second replica serves.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG - 64, "stream": True, "ignore_eos": True}
    resp = await admin.client.post("/v1/chat/completions", json=body, headers=admin.headers)
    assert resp.status == 200
    reading = asyncio.create_task(_drain(resp))
    try:
        # the rule's decision, from the engine's own gauge; then the load goes, so the second engine
        # does not start on two cores that the first one's generation keeps busy
        await async_wait_for(lambda: _desired(admin, 2), timeout=120, what="the rule to ask for a second replica")
    finally:
        reading.cancel()
        resp.close()
    second = await async_wait_for(lambda: _other_healthy(admin, first["id"]), timeout=READY, what="the second replica, HEALTHY")
    status, found = await admin.call("GET", "/api/v1/endpoints/tiny/decisions?limit=100")
    outs = [d for d in found["data"] if d["kind"] == "autoscale.scale_out"]
    assert any(d["details"]["rule"] == rule["id"] and d["details"]["to"] == 2 for d in outs), found
    assert second["pid"] != first["pid"]
    await serves(admin)


async def _desired(admin: Admin, n: int) -> bool:
    status, ep = await admin.call("GET", "/api/v1/endpoints/tiny")
    return status == 200 and ep["desired_replicas"] == n


async def _drain(resp: aiohttp.ClientResponse) -> None:
    async for _ in resp.content:
        pass


async def _other_healthy(admin: Admin, first: str) -> dict[str, Any] | None:
    return next((r for r in await replicas(admin, "tiny") if r["state"] == "HEALTHY" and r["id"] != first), None)


def _definition_folder(tiny_model: Path, root: Path) -> Path:
    """A Backend.AI model folder: the weights, and a definition whose start_command is vLLM's server."""
    folder = root / "bai-vllm"
    shutil.copytree(tiny_model, folder)
    service = {
        "start_command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models", "--host", "0.0.0.0", "--port", "8000",
                          "--served-model-name", "tiny-bai"],
        "port": 8000,
        "health_check": {"path": "/health", "interval": 2, "max_retries": 5, "max_wait_time": 5, "initial_delay": READY},
    }
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "tiny-bai", "model_path": "/models", "service": service}]}))
    return folder


async def test_a_backend_ai_folder_that_starts_vllm_ends_its_whole_tree_on_kill_and_on_delete(admin: Admin, tiny_model: Path, tmp_path: Path) -> None:
    folder = _definition_folder(tiny_model, tmp_path)
    await create(admin, "bai", folder, environ=VLLM_ENV)
    await wait_status(admin, "bai", "HEALTHY", timeout=READY)
    (rep,) = await replicas(admin, "bai")
    assert rep["command"][1:6] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host"]

    async def chat() -> None:
        body = {"model": "tiny-bai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        resp = await admin.client.post("/endpoints/bai/v1/chat/completions", json=body, headers=admin.headers)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["completion_tokens"] == 3

    await chat()
    tree = group_members(rep["pid"])
    assert len(tree) >= 3, tree
    os.kill(rep["pid"], signal.SIGKILL)
    await async_wait_for(lambda: not any(_alive(p) for p in tree), timeout=10, what="every process of the killed replica's tree to end")
    again = await async_wait_for(lambda: _healthy_other_pid(admin, "bai", rep["pid"]), timeout=READY, what="a healthy replacement")
    await chat()
    tree = group_members(again["pid"])
    assert len(tree) >= 3, tree
    status, _ = await admin.call("DELETE", "/api/v1/endpoints/bai")
    assert status == 200
    grace = WORKERS["stop_grace_seconds"]
    await async_wait_for(lambda: not any(_alive(p) for p in tree), timeout=grace + 10, what="the deleted endpoint's engine processes to end")
    if again["cgroup"]:  # removed once empty
        await async_wait_for(lambda: not Path(again["cgroup"]).exists(), timeout=10, what="the replica's cgroup to be removed")


async def _healthy_other_pid(admin: Admin, name: str, old: int) -> dict[str, Any] | None:
    return next((r for r in await replicas(admin, name) if r["state"] == "HEALTHY" and r["pid"] != old), None)
