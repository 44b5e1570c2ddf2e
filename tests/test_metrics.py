"""GET /metrics: known traffic through the gateway, then a scrape parsed with prometheus-client's own
parser, whose counters must match what was sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Admin
from prometheus_client.parser import text_string_to_metric_families
from test_gateway import healthy, sdk
from test_supervisor import WORKERS, fake_folder

from appliance.control.telemetry import Live, Telemetry
from appliance.domain.placement import Allocation, GpuInfo


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS, "gateway": {}}))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(admin: Admin, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    resp = await admin.client.get("/metrics", headers=admin.headers if headers is None else headers)
    return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_counters_match_the_traffic_sent(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "chat", fake_folder(tmp_path, "chat"))
    client = sdk(admin)
    prompt = completion = 0
    for n in range(1, 6):  # five answers, 1..5 tokens each
        reply = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=n)
        assert reply.usage is not None
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    for _ in range(3):  # three streams of 6 chunks or more
        stream = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                prompt += chunk.usage.prompt_tokens
                completion += chunk.usage.completion_tokens
    for _ in range(4):  # refused before any worker: a key that does not exist
        resp = await admin.client.post("/v1/chat/completions", json={"model": "chat", "messages": []}, headers={"Authorization": "Bearer ak-nope"})
        assert resp.status == 401

    status, ctype, text = await scrape(admin)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    got = samples(text)
    ep = (("endpoint", "chat"),)
    assert got[("appliance_requests_total", (("endpoint", "chat"), ("status", "200")))] == 8
    assert got[("appliance_prompt_tokens_total", ep)] == prompt
    assert got[("appliance_completion_tokens_total", ep)] == completion == 1 + 2 + 3 + 4 + 5 + 3 * 6
    assert got[("appliance_request_duration_seconds_count", ep)] == 8
    assert got[("appliance_request_duration_seconds_bucket", (("endpoint", "chat"), ("le", "+Inf")))] == 8
    assert got[("appliance_time_to_first_token_seconds_count", ep)] == 3  # streams only
    assert got[("appliance_inter_token_seconds_count", ep)] == 3
    assert 0 < got[("appliance_inter_token_seconds_sum", ep)] < got[("appliance_request_duration_seconds_sum", ep)]
    assert got[("appliance_rejections_total", (("code", "invalid_api_key"),))] == 4
    assert got[("appliance_replicas", (("endpoint", "chat"), ("state", "HEALTHY")))] == 1
    assert got[("appliance_requests_in_flight", ep)] == 0 and got[("appliance_requests_queued", ep)] == 0
    assert got[("appliance_health_probe_duration_seconds_count", ep)] >= 1
    assert got[("process_resident_memory_bytes", ())] > 0  # the appliance's own process
    assert not [name for name, _ in got if name.startswith("appliance_gpu_")]  # no NVML here: no GPU series


async def test_metrics_need_a_read_key(admin: Admin) -> None:
    status, _, text = await scrape(admin, headers={})
    assert status == 401 and "missing_api_key" in text
    _, key = await admin.call("POST", "/api/v1/keys", json_body={"name": "infer-only", "scopes": ["inference"]})
    assert (await scrape(admin, headers={"Authorization": f"Bearer {key['key']}"}))[0] == 403
    _, reader = await admin.call("POST", "/api/v1/keys", json_body={"name": "reader", "scopes": ["read"]})
    assert (await scrape(admin, headers={"Authorization": f"Bearer {reader['key']}"}))[0] == 200


async def test_public_metrics_need_no_key(start_inprocess_app: Any, make_config: Any) -> None:
    admin = await start_inprocess_app(make_config({"metrics": {"public": True}}))
    async with aiohttp.ClientSession() as s, s.get(admin.client.make_url("/metrics")) as resp:
        assert resp.status == 200 and "process_cpu_seconds_total" in await resp.text()


def test_gpu_series_name_the_replica_that_holds_each_gpu() -> None:
    gpus = [GpuInfo(index=0, uuid="GPU-a", name="H100", memory_total=80 << 30, memory_used=20 << 30, utilization_gpu=45),
            GpuInfo(index=1, uuid="GPU-b", name="H100", memory_total=80 << 30, memory_used=0, utilization_gpu=0)]
    live = Live(gpus=gpus, held={"chat-1": Allocation(("GPU-a",), share=0.5)}, replica_endpoint={"chat-1": "chat"})
    got = samples(Telemetry().exposition(live).decode())
    assert got[("appliance_gpu_utilization_ratio", (("gpu", "0"),))] == 0.45
    assert got[("appliance_gpu_memory_used_bytes", (("gpu", "0"),))] == 20 << 30
    assert got[("appliance_gpu_memory_total_bytes", (("gpu", "1"),))] == 80 << 30
    assert got[("appliance_gpu_allocation_share", (("endpoint", "chat"), ("gpu", "0"), ("replica", "chat-1")))] == 0.5
    assert got[("appliance_gpu_info", (("gpu", "1"), ("name", "H100"), ("uuid", "GPU-b")))] == 1


def test_restarts_probe_failures_decisions_and_rejections_are_counted_and_a_gone_replica_or_endpoint_leaves_no_series() -> None:
    t = Telemetry()
    t.restarted("chat")
    t.restarted("chat")
    for replica, passed in (("chat-1", False), ("chat-1", False), ("chat-2", False), ("chat-2", True)):
        t.probed("chat", replica, passed, 0.01)
    t.decided("chat", "out", "r1")
    t.decided("chat", "in", None)
    t.rejected("rate_limit_exceeded")
    t.request("chat", 200, 0.1, ttft=None, gap=None, prompt=3, completion=4)
    got = samples(t.exposition(Live()).decode())
    assert got[("appliance_replica_restarts_total", (("endpoint", "chat"),))] == 2
    assert got[("appliance_health_probe_failures_total", (("endpoint", "chat"), ("replica", "chat-1")))] == 2
    assert got[("appliance_health_probe_failures_total", (("endpoint", "chat"), ("replica", "chat-2")))] == 1
    assert got[("appliance_health_probe_duration_seconds_count", (("endpoint", "chat"),))] == 4
    assert got[("appliance_autoscaler_decisions_total", (("direction", "out"), ("endpoint", "chat"), ("rule", "r1")))] == 1
    assert got[("appliance_autoscaler_decisions_total", (("direction", "in"), ("endpoint", "chat"), ("rule", "idle")))] == 1
    assert got[("appliance_rejections_total", (("code", "rate_limit_exceeded"),))] == 1

    t.replica_gone("chat", "chat-1")
    got = samples(t.exposition(Live()).decode())
    assert ("appliance_health_probe_failures_total", (("endpoint", "chat"), ("replica", "chat-1"))) not in got
    assert ("appliance_health_probe_failures_total", (("endpoint", "chat"), ("replica", "chat-2"))) in got
    t.endpoint_gone("chat")
    left = [key for key in samples(t.exposition(Live()).decode()) if ("endpoint", "chat") in key[1]]
    assert left == [], left


async def test_answers_the_appliance_refuses_itself_are_counted_400_and_404_included(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "chat", fake_folder(tmp_path, "chat"))
    c, h = admin.client, admin.headers
    for body, status in ((b"{nope", 400), (b'{"messages": []}', 400), (b'{"model": "nope", "messages": []}', 404)):
        assert (await c.post("/v1/chat/completions", data=body, headers={**h, "Content-Type": "application/json"})).status == status
    assert (await c.get("/endpoints/nobody/x", headers=h)).status == 404
    assert (await c.get("/no/such/route", headers=h)).status == 404
    got = samples((await scrape(admin))[2])
    for code, n in (("invalid_json", 1), ("missing_model", 1), ("model_not_found", 1), ("endpoint_not_found", 1), ("not_found", 1)):
        assert got.get(("appliance_rejections_total", (("code", code),))) == n, code
