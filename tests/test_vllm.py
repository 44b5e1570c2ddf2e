"""Real vLLM (the CPU build here) as a supervised replica: serving through the gateway with the openai
SDK, and a kill -9 of the replica's leader leaving no process of its tree behind."""

from __future__ import annotations

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
from conftest import Admin, async_wait_for, wait_for
from test_access import new_key
from test_supervisor import WORKERS, _alive, create, replicas, server_config, wait_status

from appliance.control.process import group_members
from appliance.control.signals import prometheus_value
from appliance.demo_model import write_demo_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU: plenty for the tiny model
READY = 400  # seconds: a replica is ready in about a minute on 2 idle cores


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("vllm") / "tiny")


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": {**WORKERS, "restart_backoff_seconds": 0.5}}))


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
    await create(admin, "tiny", tiny_model, runtime="vllm", environ=VLLM_ENV)
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
    # A client that goes away mid-stream frees the engine: its running count returns to 0.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True, "ignore_eos": True}
    resp = await admin.client.post("/v1/chat/completions", json=body, headers=admin.headers)
    assert resp.status == 200
    await resp.content.readline()
    await async_wait_for(lambda: _running(rep["port"], lambda n: n >= 1), timeout=30, what="the stream to run in the engine")
    resp.close()
    await async_wait_for(lambda: _running(rep["port"], lambda n: n == 0), timeout=30, what="vllm:num_requests_running back to 0")
    # The engine runs as several processes (API server, EngineCore, Worker), all in the replica's group.
    leader = rep["pid"]
    tree = group_members(leader)
    assert len(tree) >= 3, f"expected vLLM's API server, engine core and worker in group {leader}: {tree}"
    os.kill(leader, signal.SIGKILL)
    await async_wait_for(lambda: not any(_alive(p) for p in tree), timeout=10, what="every process of the killed replica's tree to end")
    # A replacement starts (a new leader) and serves.
    await async_wait_for(lambda: _replacement_healthy(admin, leader), timeout=READY, what="a healthy replacement")
    await serves(admin)


async def _replacement_healthy(admin: Admin, old: int) -> bool:
    return any(r["state"] == "HEALTHY" and r["pid"] != old for r in await replicas(admin, "tiny"))


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
