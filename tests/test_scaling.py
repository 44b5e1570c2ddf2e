"""Autoscaling, draining, rolling updates and scale to zero against real fake-worker processes.
Every request the tests send is counted: none may fail."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Admin, async_wait_for
from test_supervisor import PORTS, WORKERS, create, endpoint, events, fake_folder, replicas, wait_status

from appliance.api.app import AUTOSCALER
from appliance.api.services import SERVICES

pytestmark = pytest.mark.process

AUTOSCALING = {"interval_seconds": 0.2}


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": WORKERS, "autoscaling": AUTOSCALING}))


class Traffic:
    """Clients that send chat requests back to back until stopped, counting every outcome."""

    def __init__(self, admin: Admin, model: str, clients: int, max_tokens: int = 2) -> None:
        self.admin, self.model, self.max_tokens = admin, model, max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self.served_by: Counter[str] = Counter()  # worker pid (the fake worker puts it in the id)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(clients)]

    async def _client(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": self.max_tokens}
        while not self._stop.is_set():
            resp = await self.admin.client.post("/v1/chat/completions", json=body, headers=self.admin.headers)
            text = await resp.text()
            if resp.status == 200:
                self.ok += 1
                self.served_by[json.loads(text)["id"]] += 1
            else:
                self.failures.append(f"{resp.status} {text}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def add_rule(admin: Admin, name: str, **rule: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", f"/api/v1/endpoints/{name}/autoscaling-rules", json_body=rule)
    assert status == 201, body
    return body


async def live(admin: Admin, name: str) -> list[dict[str, Any]]:
    return [r for r in await replicas(admin, name) if r["state"] not in ("TERMINATED",)]


async def decisions(admin: Admin, name: str) -> list[dict[str, Any]]:
    status, body = await admin.call("GET", f"/api/v1/endpoints/{name}/decisions?limit=1000")
    assert status == 200, body
    return list(reversed(body["data"]))


async def test_a_latency_rule_scales_out_under_load_and_back_in_after_it_with_no_failed_request(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "lat", fake_folder(tmp_path, "lat", "--latency", "0.25"), replicas=1, min_replicas=1, max_replicas=2)
    await wait_status(admin, "lat", "HEALTHY")
    out = await add_rule(admin, "lat", metric_source="gateway", metric_name="latency_p50", comparator="GREATER_THAN",
                         threshold=0.2, step_size=1, window_seconds=2, cooldown_seconds=1)
    back = await add_rule(admin, "lat", metric_source="gateway", metric_name="rps_per_replica", comparator="LESS_THAN",
                          threshold=0.5, step_size=-1, window_seconds=2, cooldown_seconds=1)
    traffic = Traffic(admin, "lat", clients=4)

    async def two_serving() -> bool:
        return (await endpoint(admin, "lat"))["desired_replicas"] == 2 and len(traffic.served_by) == 2

    await async_wait_for(two_serving, timeout=30, what="a second replica to be started and serving")
    await traffic.stop()

    async def back_to_one() -> bool:
        return (await endpoint(admin, "lat"))["desired_replicas"] == 1 and len(await live(admin, "lat")) == 1

    await async_wait_for(back_to_one, timeout=30, what="scale-in after the load stopped")
    assert traffic.failures == [] and traffic.ok > 10
    taken = [d for d in await decisions(admin, "lat") if d["kind"] in ("autoscale.scale_out", "autoscale.scale_in")]
    assert [(d["kind"], d["details"]["from"], d["details"]["to"], d["details"]["rule"]) for d in taken] == [
        ("autoscale.scale_out", 1, 2, out["id"]), ("autoscale.scale_in", 2, 1, back["id"]),
    ]
    first = taken[0]["details"]
    assert first["metric"] == "gateway/latency_p50" and first["value"] > 0.2 and first["threshold"] == 0.2
    assert "latency_p50" in taken[0]["message"] and "1 → 2" in taken[0]["message"]
    (rule,) = [r for r in (await admin.call("GET", "/api/v1/endpoints/lat/autoscaling-rules"))[1]["data"] if r["id"] == out["id"]]
    assert rule["last_triggered_at"] is not None
    # The scaled-in replica was drained, then stopped.
    kinds = [e["kind"] for e in await events(admin, "lat")]
    assert "replica.draining" in kinds


async def test_scale_in_drains_a_replica_with_a_stream_in_flight(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "drain", fake_folder(tmp_path, "drain", "--tokens-per-second", "20"), replicas=2)
    await wait_status(admin, "drain", "HEALTHY")

    async def stream() -> str:
        body = {"model": "drain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
        resp = await admin.client.post("/v1/chat/completions", json=body, headers=admin.headers)
        assert resp.status == 200
        return await resp.text()

    streams = [asyncio.create_task(stream()) for _ in range(2)]  # least outstanding: one on each replica
    await async_wait_for(lambda: _inflight_on_both(admin), timeout=10, what="a stream on each replica")
    status, body = await admin.call("PATCH", "/api/v1/endpoints/drain", json_body={"replicas": 1})
    assert status == 200 and body["desired_replicas"] == 1
    await async_wait_for(lambda: _state_seen(admin, "drain", "DRAINING"), timeout=10, what="a DRAINING replica")
    # A new request while one drains goes to the other replica and succeeds.
    quick = await admin.client.post("/v1/chat/completions", json={"model": "drain", "messages": [], "max_tokens": 1}, headers=admin.headers)
    assert quick.status == 200
    for text in await asyncio.gather(*streams):
        assert text.count("data: {") == 40 and text.rstrip().endswith("data: [DONE]")  # neither stream was cut
    await async_wait_for(lambda: _count_live(admin, "drain", 1), timeout=15, what="the drained replica to stop")
    drained = [e for e in await events(admin, "drain") if e["kind"] == "replica.draining"]
    assert drained and "1 request(s) in flight" in drained[0]["message"]


async def test_scale_in_keeps_an_unhealthy_replica_with_a_stream_and_drains_it_when_it_goes(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "sick", fake_folder(tmp_path, "sick", "--tokens-per-second", "10"), replicas=2, unhealthy_replace_after=600)
    await wait_status(admin, "sick", "HEALTHY")
    body = {"model": "sick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}

    async def stream() -> str:
        resp = await admin.client.post("/v1/chat/completions", json=body, headers=admin.headers)
        assert resp.status == 200
        return await resp.text()

    task = asyncio.create_task(stream())
    load = admin.client.app[SERVICES].load
    (busy,) = await async_wait_for(lambda: list(load.inflight("sick")), timeout=10, what="the stream to reach a replica")
    port = next(r["port"] for r in await replicas(admin, "sick") if r["id"] == busy)
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/_fail_health") as resp:
        assert resp.status == 200  # its probes fail from now on; the open stream goes on
    await async_wait_for(lambda: _state_of(admin, "sick", busy, "UNHEALTHY"), timeout=10, what="the streaming replica to be UNHEALTHY")
    status, _ = await admin.call("PATCH", "/api/v1/endpoints/sick", json_body={"replicas": 1})
    assert status == 200
    # The idle healthy replica goes; the unhealthy one keeps its stream.
    await async_wait_for(lambda: _live_ids(admin, "sick", {busy}), timeout=15, what="only the streaming replica left")
    assert not task.done()
    status, _ = await admin.call("PATCH", "/api/v1/endpoints/sick", json_body={"replicas": 0})
    assert status == 200
    text = await task
    assert text.count("data: {") == 40 and text.rstrip().endswith("data: [DONE]")  # not cut
    drained = [e for e in await events(admin, "sick") if e["kind"] == "replica.draining" and e["details"]["replica"] == busy]
    assert drained and "1 request(s) in flight" in drained[0]["message"]


async def _state_of(admin: Admin, name: str, rid: str, state: str) -> bool:
    return any(r["id"] == rid and r["state"] == state for r in await replicas(admin, name))


async def _live_ids(admin: Admin, name: str, ids: set[str]) -> bool:
    return {r["id"] for r in await live(admin, name)} == ids


def _inflight_on_both(admin: Admin) -> bool:
    return sorted(admin.client.app[SERVICES].load.inflight("drain").values()) == [1, 1]


async def _state_seen(admin: Admin, name: str, state: str) -> bool:
    return any(r["state"] == state for r in await replicas(admin, name))


async def _count_live(admin: Admin, name: str, n: int) -> bool:
    return len(await live(admin, name)) == n


@pytest.mark.parametrize("surge", [1, 0])
async def test_a_rolling_update_under_load_fails_no_request(admin: Admin, tmp_path: Path, surge: int) -> None:
    await create(admin, "roll", fake_folder(tmp_path, "roll", "--latency", "0.05"), replicas=2, max_surge=surge)
    await wait_status(admin, "roll", "HEALTHY")
    before = {r["id"] for r in await live(admin, "roll")}
    traffic = Traffic(admin, "roll", clients=3)
    await async_wait_for(lambda: traffic.ok >= 10, timeout=10, what="traffic flowing")
    status, body = await admin.call("PATCH", "/api/v1/endpoints/roll", json_body={"environ": {"FAKE_VERSION": "2"}})
    assert status == 200 and body["generation"] == 2

    async def rolled() -> bool:
        now = await live(admin, "roll")
        return len(now) == 2 and all(r["generation"] == 2 and r["state"] == "HEALTHY" for r in now)

    await async_wait_for(rolled, timeout=40, what="both replicas replaced by generation 2")
    served_before = traffic.ok
    await async_wait_for(lambda: traffic.ok >= served_before + 10, timeout=10, what="traffic on the new generation")
    await traffic.stop()
    assert traffic.failures == []
    assert not before & {r["id"] for r in await live(admin, "roll")}
    assert len(traffic.served_by) >= 3  # old and new workers both answered
    if surge == 0:  # never more than two replicas at a time: the roll drained before it started
        started = [e for e in await events(admin, "roll") if e["message"].endswith("replica created")]
        assert len(started) == 4


async def test_scale_to_zero_after_idle_then_requests_share_one_wake(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "nap", fake_folder(tmp_path, "nap", "--startup-delay", "0.5"), replicas=1, min_replicas=0, idle_timeout_seconds=1)
    await wait_status(admin, "nap", "HEALTHY")
    ep = await wait_status(admin, "nap", "SCALED_TO_ZERO", timeout=20)
    assert ep["desired_replicas"] == 0 and await live(admin, "nap") == []
    body = {"model": "nap", "messages": [{"role": "user", "content": "wake up"}], "max_tokens": 2}
    answers = await asyncio.gather(*(admin.client.post("/v1/chat/completions", json=body, headers=admin.headers) for _ in range(3)))
    assert [a.status for a in answers] == [200, 200, 200]
    kinds = [d["kind"] for d in await decisions(admin, "nap")]
    assert kinds.count("autoscale.idle") == 1 and kinds.count("autoscale.wake") == 1
    assert (await endpoint(admin, "nap"))["desired_replicas"] == 1 and len(await live(admin, "nap")) == 1


async def test_a_wake_that_cannot_start_fails_clearly(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "never", fake_folder(tmp_path, "never", "--refuse-to-start"), replicas=0, min_replicas=0,
                 idle_timeout_seconds=60, wake_timeout_seconds=30)
    await wait_status(admin, "never", "SCALED_TO_ZERO")
    resp = await admin.client.post("/v1/chat/completions", json={"model": "never", "messages": []}, headers=admin.headers)
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "no_healthy_replica" and "ERROR" in body["error"]["message"]


async def test_rule_api_validation_and_errors(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "r", fake_folder(tmp_path, "r"), replicas=0)
    good = {"metric_source": "inference", "metric_name": "vllm:num_requests_waiting", "comparator": "GREATER_THAN", "threshold": 4, "step_size": 1}
    rule = await add_rule(admin, "r", **good)
    assert rule["id"].startswith("asr-") and rule["window_seconds"] == 30 and rule["cooldown_seconds"] == 300 and rule["enabled"] is True
    status, body = await admin.call("PATCH", f"/api/v1/endpoints/r/autoscaling-rules/{rule['id']}", json_body={"enabled": False, "threshold": 8})
    assert status == 200 and body["enabled"] is False and body["threshold"] == 8
    status, body = await admin.call("PATCH", f"/api/v1/endpoints/r/autoscaling-rules/{rule['id']}", json_body={"min_replicas": 5, "max_replicas": 2})
    assert status == 422 and "min_replicas (5) must be ≤ max_replicas (2)" in body["error"]["message"]
    status, body = await admin.call("POST", "/api/v1/endpoints/r/autoscaling-rules", json_body={**good, "metric_source": "gpu"})
    assert status == 422 and "gpu metrics are gpu_util, gpu_mem" in body["error"]["message"]
    status, body = await admin.call("POST", "/api/v1/endpoints/r/autoscaling-rules", json_body={**good, "extra": 1})
    assert status == 422 and body["error"]["param"] == "extra"
    status, body = await admin.call("POST", "/api/v1/endpoints/r/autoscaling-rules", data=b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = await admin.call("POST", "/api/v1/endpoints/nope/autoscaling-rules", json_body=good)
    assert status == 404 and body["error"]["code"] == "endpoint_not_found"
    status, body = await admin.call("GET", "/api/v1/endpoints/r/autoscaling-rules/asr-00000000")
    assert status == 404 and body["error"]["code"] == "rule_not_found"
    status, body = await admin.call("GET", "/api/v1/endpoints/bad%20name/decisions")
    assert status == 422 or status == 400
    status, body = await admin.call("DELETE", f"/api/v1/endpoints/r/autoscaling-rules/{rule['id']}")
    assert status == 200 and body == {"id": rule["id"], "object": "autoscaling_rule", "deleted": True}
    assert (await admin.call("GET", "/api/v1/endpoints/r/autoscaling-rules"))[1]["data"] == []
    # Rules go with their endpoint.
    await add_rule(admin, "r", **good)
    assert (await admin.call("DELETE", "/api/v1/endpoints/r"))[0] == 200
    await create(admin, "r", fake_folder(tmp_path, "r2"), replicas=0)
    assert (await admin.call("GET", "/api/v1/endpoints/r/autoscaling-rules"))[1]["data"] == []


async def test_missing_metrics_and_bounds_are_recorded_once(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "quiet", fake_folder(tmp_path, "quiet"), replicas=1)
    await wait_status(admin, "quiet", "HEALTHY")
    await add_rule(admin, "quiet", metric_source="gpu", metric_name="gpu_util", comparator="GREATER_THAN", threshold=50, step_size=1)
    await add_rule(admin, "quiet", metric_source="inference", metric_name="vllm:num_requests_running", comparator="GREATER_THAN_OR_EQUAL",
                   threshold=0, step_size=1, cooldown_seconds=0)
    rss = await add_rule(admin, "quiet", metric_source="kernel", metric_name="mem_rss", comparator="GREATER_THAN", threshold=1e6,
                         step_size=1, cooldown_seconds=0)

    async def recorded() -> list[dict[str, Any]] | None:
        found = await decisions(admin, "quiet")
        return found if [d["kind"] for d in found].count("autoscale.suppressed") == 2 and "autoscale.missing" in {d["kind"] for d in found} else None

    found = await async_wait_for(recorded, timeout=10, what="a missing metric and bounds recorded")
    missing = [d for d in found if d["kind"] == "autoscale.missing"]
    bound = [d for d in found if d["kind"] == "autoscale.suppressed"]
    assert "gpu/gpu_util" in missing[0]["message"]  # no GPU held: no value, no decision
    assert all(d["details"]["result"] == "bound" and "max_replicas 1" in d["message"] for d in bound)
    by_rule = {d["details"]["rule"]: d["details"] for d in bound}
    assert any(d["metric"] == "inference/vllm:num_requests_running" and d["value"] == 0.0 for d in by_rule.values())  # its /metrics
    assert by_rule[rss["id"]]["value"] > 1e6  # the worker's resident memory, through psutil
    # Recorded once each, however many intervals pass.
    autoscaler = admin.client.app[AUTOSCALER]
    seen = autoscaler.evaluations
    await async_wait_for(lambda: autoscaler.evaluations >= seen + 5, timeout=10, what="five more evaluations")
    assert len(await decisions(admin, "quiet")) == len(found)


async def test_idle_timeout_needs_min_replicas_zero(admin: Admin, tmp_path: Path) -> None:
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "x", "model_folder": str(fake_folder(tmp_path, "x")),
                                                                           "idle_timeout_seconds": 60})
    assert status == 422 and "needs min_replicas = 0 (min_replicas is 1)" in body["error"]["message"]


async def test_a_roll_with_no_room_for_one_more_replica_makes_room_without_failures(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    # One worker port in all: the new replica cannot start beside the old one (as with a full GPU).
    port = PORTS[1]
    admin = await start_app(make_config({"workers": {**WORKERS, "port_range": [port, port]}, "autoscaling": AUTOSCALING}))
    # The new replica takes longer to start than requests may queue: they wait for it all the same.
    await create(admin, "tight", fake_folder(tmp_path, "tight", "--startup-delay", "1.5", health={"initial_delay": 10}), replicas=1, queue_timeout_seconds=0.5)
    await wait_status(admin, "tight", "HEALTHY")
    traffic = Traffic(admin, "tight", clients=2)
    await async_wait_for(lambda: traffic.ok >= 5, timeout=10, what="traffic flowing")
    await admin.call("PATCH", "/api/v1/endpoints/tight", json_body={"environ": {"FAKE_VERSION": "2"}})

    async def rolled() -> bool:
        now = await live(admin, "tight")
        return len(now) == 1 and now[0]["generation"] == 2 and now[0]["state"] == "HEALTHY"

    await async_wait_for(rolled, timeout=40, what="the old replica to make way and the new one to serve")
    served = traffic.ok
    await async_wait_for(lambda: traffic.ok >= served + 5, timeout=10, what="traffic on the new replica")
    await traffic.stop()
    assert traffic.failures == []
    messages = [e["message"] for e in await events(admin, "tight")]
    assert any("waiting for a free port" in m for m in messages) and any("draining" in m for m in messages)


# --- Backend.AI's terms ----------------------------------------------------------------------------


async def test_an_inference_framework_rule_in_backend_ais_terms_scales_out_under_load(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "bai", fake_folder(tmp_path, "bai", "--latency", "0.3"), replicas=1, min_replicas=1, max_replicas=2,
                 autoscaling_policy="backend.ai")
    await wait_status(admin, "bai", "HEALTHY")
    # As a Backend.AI user writes it: enum names in any case, the appproxy's renamed vLLM metric.
    rule = await add_rule(admin, "bai", metric_source="INFERENCE_FRAMEWORK", metric_name="vllm_num_requests_running", comparator="greater_than",
                          threshold="0.5", step_size=1, window_seconds=2, cooldown_seconds=60)
    assert (rule["metric_source"], rule["comparator"], rule["threshold"], rule["bounds"], rule["warnings"]) == (
        "inference_framework", "GREATER_THAN", 0.5, [1, 2], [])
    traffic = Traffic(admin, "bai", clients=4)

    async def two_serving() -> bool:
        return (await endpoint(admin, "bai"))["desired_replicas"] == 2 and len(traffic.served_by) == 2

    await async_wait_for(two_serving, timeout=30, what="a second replica started by the INFERENCE_FRAMEWORK rule, serving")
    await traffic.stop()
    assert traffic.failures == []
    (out,) = [d for d in await decisions(admin, "bai") if d["kind"] == "autoscale.scale_out"]
    details = out["details"]
    assert (details["rule"], details["metric"], details["policy"], details["from"], details["to"]) == (
        rule["id"], "inference_framework/vllm_num_requests_running", "backend.ai", 1, 2)
    # vllm:num_requests_running summed over the replicas ÷ routes: the four clients' requests on the one replica.
    assert details["value"] > 0.5
    (shown,) = (await admin.call("GET", "/api/v1/endpoints/bai/autoscaling-rules"))[1]["data"]
    assert shown["last_triggered_at"] is not None


@pytest.mark.parametrize("policy", ["appliance", "backend.ai"])
async def test_a_rule_without_min_or_max_scales_out_to_the_endpoints_max(admin: Admin, tmp_path: Path, policy: str) -> None:
    await create(admin, "free", fake_folder(tmp_path, "free"), replicas=1, min_replicas=1, max_replicas=3, autoscaling_policy=policy)
    await wait_status(admin, "free", "HEALTHY")
    # KERNEL mem: % of the replica's memory limit (here the box's memory) resident in its process tree; always > 0.
    rule = await add_rule(admin, "free", metric_source="KERNEL", metric_name="mem", comparator="GREATER_THAN", threshold=0, step_size=1,
                          window_seconds=1, cooldown_seconds=0)
    assert rule["min_replicas"] is None and rule["max_replicas"] is None and rule["bounds"] == [1, 3]

    async def held_at_max() -> list[dict[str, Any]] | None:
        found = await decisions(admin, "free")
        return found if any(d["kind"] == "autoscale.suppressed" for d in found) else None

    found = await async_wait_for(held_at_max, timeout=20, what="scale-out to the endpoint's max_replicas, then held there")
    assert [(d["details"]["from"], d["details"]["to"]) for d in found if d["kind"] == "autoscale.scale_out"] == [(1, 2), (2, 3)]
    assert all(0 < d["details"]["value"] < 100 and d["details"]["policy"] == policy for d in found)
    (held,) = [d for d in found if d["kind"] == "autoscale.suppressed"]
    words = "already at the endpoint's max_replicas 3" if policy == "appliance" else "3 → 4 would leave the endpoint's bounds [1, 3]: rule skipped"
    assert held["details"]["result"] == "bound" and words in held["message"]
    await async_wait_for(lambda: _count_live(admin, "free", 3), timeout=20, what="three replicas")
    assert (await endpoint(admin, "free"))["desired_replicas"] == 3


async def test_backend_ai_names_the_policy_and_bad_input_through_the_api(admin: Admin, tmp_path: Path) -> None:
    ep = await create(admin, "names", fake_folder(tmp_path, "names"), replicas=0)
    assert ep["autoscaling_policy"] == "appliance"
    rule = await add_rule(admin, "names", metric_source="kernel", metric_name="cpu_util", comparator="Greater_Than", threshold=80, step_size=1)
    assert (rule["metric_source"], rule["comparator"], rule["bounds"]) == ("kernel", "GREATER_THAN", [0, 0])
    # The endpoint states no range, so it is held at its replicas: the rule is accepted, as Backend.AI would, and says why it cannot act.
    (warning,) = rule["warnings"]
    assert "no max_replicas of its own and the endpoint's range is [0, 0]" in warning and "cannot scale out" in warning
    status, body = await admin.call("PATCH", "/api/v1/endpoints/names", json_body={"max_replicas": 3, "autoscaling_policy": "backend.ai"})
    assert status == 200 and body["autoscaling_policy"] == "backend.ai" and body["generation"] == 1  # no worker restarts for it
    status, body = await admin.call("PATCH", f"/api/v1/endpoints/names/autoscaling-rules/{rule['id']}", json_body={"comparator": "less_than_or_equal"})
    assert status == 200 and body["comparator"] == "LESS_THAN_OR_EQUAL" and body["bounds"] == [0, 3] and body["warnings"] == []
    good = {"metric_source": "KERNEL", "metric_name": "mem", "comparator": "greater_than", "threshold": 90, "step_size": 1}
    status, body = await admin.call("POST", "/api/v1/endpoints/names/autoscaling-rules", json_body={**good, "metric_source": "DISK"})
    assert status == 422 and body["error"]["param"] == "metric_source"
    assert "unknown metric source 'DISK': the appliance's gpu, kernel, inference, gateway, or Backend.AI's KERNEL, INFERENCE_FRAMEWORK, PROMETHEUS" in body["error"]["message"]
    status, body = await admin.call("POST", "/api/v1/endpoints/names/autoscaling-rules", json_body={**good, "metric_name": "gpu_util"})
    assert status == 422 and "kernel metrics are cpu_util, mem, cuda_util, cuda_mem, mem_rss (got 'gpu_util')" in body["error"]["message"]
    status, body = await admin.call("PATCH", f"/api/v1/endpoints/names/autoscaling-rules/{rule['id']}", json_body={"metric_source": "nope"})
    assert status == 422 and "unknown metric source 'nope'" in body["error"]["message"]
    status, body = await admin.call("PATCH", "/api/v1/endpoints/names", json_body={"autoscaling_policy": "kubernetes"})
    assert status == 422 and body["error"]["param"] == "autoscaling_policy"
    prom = await add_rule(admin, "names", **{**good, "metric_source": "Prometheus", "metric_name": "vllm:num_requests_waiting"})
    assert prom["metric_source"] == "prometheus"


async def test_scraping_vllm_sized_metrics_never_blocks_the_event_loop(admin: Admin, tmp_path: Path) -> None:
    # Four replicas, each exporting a few thousand series (vLLM-sized): a parse on the event loop takes
    # tens of milliseconds each, and every stream through the gateway would stall while it runs.
    await create(admin, "wide", fake_folder(tmp_path, "wide", "--metrics-padding", "4000"), replicas=4, min_replicas=4, max_replicas=5)
    await wait_status(admin, "wide", "HEALTHY", timeout=60)
    # A step of the event loop that itself runs for 0.1 s: measured in the loop thread's CPU time, so a box
    # too busy to schedule the process (another test's engine still stopping) does not count as blocking.
    slow: list[str] = []
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        began = time.thread_time()
        try:
            run(handle)
        finally:
            spent = time.thread_time() - began
            if spent > 0.1:
                slow.append(f"{handle!r} ran {spent:.3f} s on the event loop")

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    try:
        await add_rule(admin, "wide", metric_source="inference", metric_name="vllm:num_requests_waiting", comparator="GREATER_THAN",
                       threshold=100, step_size=1, window_seconds=1, cooldown_seconds=0)

        autoscaler = admin.client.app[AUTOSCALER]
        seen = autoscaler.evaluations
        # several evaluations, each reading the four replicas' metrics
        await async_wait_for(lambda: autoscaler.evaluations >= seen + 5, timeout=30, what="five evaluations of the rule")
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
    assert not slow, slow
