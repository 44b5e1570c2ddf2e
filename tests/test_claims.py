"""GPU memory claims: the estimate from a model folder, placement by claims against each GPU's budget,
the vLLM flag, the 422s at create, and the views — on a fake NVML inventory (no GPU here)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from test_supervisor import FAST, WORKERS, fake_folder

from appliance.api.app import make_app
from appliance.control.host.gpus import GpuMonitor
from appliance.control.models.weights import estimate_folder, read_header
from appliance.demo_model import write_demo_model
from appliance.domain.memory import claim, estimate, kv_cache
from appliance.domain.placement import Allocation, GpuInfo, GpuRequest, Unplaceable, place
from appliance.domain.runtimes import Placement, build_worker_spec
from appliance.domain.specs import EndpointConfig, HealthCheck, MemoryEstimate, Resources

GIB = 1 << 30


def gpu(index: int = 0, total: int = 24 * GIB) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index:04d}", name="NVIDIA L4", memory_total=total, memory_used=0)


# --- the estimate ----------------------------------------------------------------------------


def test_estimate_of_the_demo_model_is_its_safetensors_data_and_config_kv_cache(tmp_path: Path) -> None:
    folder = write_demo_model(tmp_path / "demo")
    (weights_file,) = folder.glob("*.safetensors")
    header_len = struct.unpack("<Q", weights_file.read_bytes()[:8])[0]
    data_bytes = weights_file.stat().st_size - 8 - header_len  # what the tensors take in the file
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_element = {"float32": 4, "float16": 2, "bfloat16": 2}[config["torch_dtype"]]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * per_element * config["max_position_embeddings"]

    got = estimate_folder(folder)
    assert got == MemoryEstimate(weights=data_bytes, kv_cache=kv, max_model_len=config["max_position_embeddings"])
    # --max-model-len in extra_args sets the context the KV cache is counted at
    half = estimate_folder(folder, ["--max-model-len", "256"])
    assert half is not None and half.kv_cache == kv * 256 // config["max_position_embeddings"] and half.max_model_len == 256


def test_estimate_reads_sharded_folders_by_their_index_and_config_shapes(tmp_path: Path) -> None:
    def shard(name: str, tensors: dict[str, Any]) -> None:
        header = json.dumps(tensors).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header)  # the header alone: tensors are never read

    shard("model-00001-of-00002.safetensors", {"a": {"dtype": "BF16", "shape": [1024, 1024], "data_offsets": [0, 2 << 20]}, "__metadata__": {}})
    shard("model-00002-of-00002.safetensors", {"b": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}})
    shard("stray.safetensors", {"c": {"dtype": "F32", "shape": [99], "data_offsets": [0, 396]}})  # not in the index
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    llama_8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
                "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(llama_8b))
    got = estimate_folder(tmp_path)
    assert got is not None and got.weights == (2 << 20) + 40
    assert got.kv_cache == 2 * 32 * 8 * 128 * 2 * 131072 == 16 * GIB  # Llama-3-8B at its full context
    assert read_header(tmp_path / "stray.safetensors")["c"]["shape"] == [99]
    assert kv_cache(llama_8b, ["--max-model-len=8192", "--kv-cache-dtype", "fp8"]) == (2 * 32 * 8 * 128 * 1 * 8192, 8192)
    assert estimate([], llama_8b) is None  # no weights: no estimate


def test_claim_is_stated_else_estimate_plus_overhead_else_share() -> None:
    est = MemoryEstimate(weights=4 * GIB, kv_cache=2 * GIB, max_model_len=4096)
    assert claim(Resources(gpu_memory=10 * GIB), est, GIB) == 10 * GIB
    assert claim(Resources(gpu_share=0.5), est, GIB) == 7 * GIB
    assert claim(Resources(gpu_share=0.5), None, GIB) is None  # share × budget, decided at placement
    assert claim(Resources(), est, GIB) is None  # asks for no GPU: claims none


# --- placement -------------------------------------------------------------------------------


def test_claims_add_up_per_gpu_against_its_budget() -> None:
    gpus = [gpu()]
    held: dict[str, Allocation] = {}
    ten = GpuRequest(memory=10 * GIB, reserve=GIB)
    held["a"] = place(ten, gpus, held)
    held["b"] = place(ten, gpus, held)
    assert held["a"].claim == held["b"].claim == 10 * GIB and held["a"].fraction == pytest.approx(10 / 24)
    with pytest.raises(Unplaceable) as info:
        place(ten, gpus, held)
    assert not info.value.permanent
    assert info.value.reason == "waiting for GPUs: a replica claims 10 GiB of GPU memory, and no matching GPU has it free (GPU 0: 20 GiB of 23 GiB claimed)"
    # a share claims share × budget, counted with the memory claims
    with pytest.raises(Unplaceable):
        place(GpuRequest(share=0.2, reserve=GIB), gpus, held)
    assert place(GpuRequest(share=0.1, reserve=GIB), gpus, held).claim == int(0.1 * 23 * GIB)
    # a claimed GPU is not free for a whole-GPU request
    with pytest.raises(Unplaceable):
        place(GpuRequest(count=1), gpus, held)


def test_a_claim_larger_than_any_gpu_is_permanent_naming_both_numbers() -> None:
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(memory=30 * GIB, reserve=GIB), [gpu(0), gpu(1, total=16 * GIB)], {})
    assert info.value.permanent
    assert "claims 30 GiB" in info.value.reason and "budget is 23 GiB (GPU 0: 24 GiB less the 1 GiB reserve)" in info.value.reason
    # split over whole GPUs, it fits
    assert len(place(GpuRequest(count=2, memory=30 * GIB, reserve=GIB), [gpu(0), gpu(1)], {}).uuids) == 2


def test_a_share_claims_its_slice_or_the_estimate_if_more_and_whole_gpus_keep_the_engine_default() -> None:
    small, big = GpuRequest(share=0.5, needs=3 * GIB, reserve=GIB), GpuRequest(share=0.25, needs=20 * GIB, reserve=GIB)
    assert place(small, [gpu()], {}).claim == int(0.5 * 23 * GIB)  # the slice the user asked for
    held = {"big": place(big, [gpu()], {})}
    assert held["big"].claim == 20 * GIB and held["big"].share == 0.25  # what the model needs, though the share is smaller
    with pytest.raises(Unplaceable) as info:  # shares 0.75 would fit; memory does not
        place(small, [gpu()], held)
    assert "GPU 0: 20 GiB of 23 GiB claimed, 0.25 share held" in info.value.reason
    whole = place(GpuRequest(count=1, needs=20 * GIB, reserve=GIB), [gpu()], {})
    assert whole.whole and whole.fraction is None  # held whole: vLLM's own default
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(count=1, needs=40 * GIB, reserve=GIB), [gpu()], {})
    assert info.value.permanent and "claims 40 GiB" in info.value.reason


def _vllm(fraction: float | None, share: float | None = None) -> list[str]:
    config = EndpointConfig(
        name="m", model_folder="/models/m", runtime="vllm", definition_file=None, served_model_name="m", aliases=[], replicas=1,
        min_replicas=1, max_replicas=1, resources=Resources(), environ={}, extra_args=[], continuous_batching=False,
        health_check=HealthCheck(path="/health"), unhealthy_replace_after=10.0, public=False, description="",
    )
    spec = build_worker_spec(config, None, Placement(port=1, replica_id="m-1", work_dir="/w", gpu_share=share, memory_fraction=fraction))
    return list(spec.argv)


def test_vllm_gets_claim_over_total() -> None:
    alloc = place(GpuRequest(memory=10 * GIB, reserve=GIB), [gpu()], {})
    argv = _vllm(alloc.fraction)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.416"  # 10/24, rounded down
    shared = place(GpuRequest(share=0.5, reserve=GIB), [gpu()], {})
    argv = _vllm(shared.fraction, share=0.5)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.479"  # 0.5 × 23 GiB of 24
    assert "--gpu-memory-utilization" not in _vllm(None)  # whole GPU: vLLM's own default


# --- through the API, with a fake NVML -------------------------------------------------------


class FakeNvml:
    def __init__(self, gpus: list[GpuInfo]) -> None:
        self.gpus = gpus

    def inventory(self) -> list[GpuInfo]:
        return list(self.gpus)


@pytest.fixture
async def box(launcher: Any, aiohttp_client: Any, make_config: Any) -> Admin:
    """The appliance on a box with one 24 GiB GPU (default reserve 1 GiB: a 23 GiB budget), workers in-process."""
    config = make_config({"workers": WORKERS})
    app = make_app(config, gpus=GpuMonitor(FakeNvml([gpu()]), ttl=0.0), launcher=launcher)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await async_wait_for(ready, timeout=10, what="/readyz")
    return Admin(client, config)


async def _create(admin: Admin, name: str, folder: Path, memory: str) -> tuple[int, Any]:
    return await admin.call("POST", "/api/v1/endpoints", json_body={"name": name, "model_folder": str(folder), "resources": {"gpu_memory": memory}})


async def _get(admin: Admin, name: str) -> dict[str, Any]:
    status, body = await admin.call("GET", f"/api/v1/endpoints/{name}")
    assert status == 200, body
    return body


async def test_two_10gib_claims_fit_a_24gib_gpu_a_third_waits(box: Admin, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        status, body = await _create(box, name, fake_folder(tmp_path, name, health=FAST), "10gb")
        assert status == 201, body
    await async_wait_for(lambda: _healthy(box, "a"), timeout=20, what="a healthy")
    await async_wait_for(lambda: _healthy(box, "b"), timeout=20, what="b healthy")

    async def waiting() -> str | None:
        status, reps = await box.call("GET", "/api/v1/endpoints/c/replicas")
        return next((r["last_error"] for r in reps["data"] if "waiting for GPUs" in r["last_error"]), None)

    message = await async_wait_for(waiting, timeout=20, what="c waiting for GPUs")
    assert "claims 10 GiB" in message and "GPU 0: 20 GiB of 23 GiB claimed" in message, message

    a = await _get(box, "a")
    assert a["gpu_memory_claim"] == 10 * GIB and a["claim_source"] == "stated" and a["memory_estimate"] is None
    assert a["gpu_budgets"] == [{"index": 0, "uuid": "GPU-0000", "memory_total": 24 * GIB, "budget": 23 * GIB, "claimed": 20 * GIB}]
    status, reps = await box.call("GET", "/api/v1/endpoints/a/replicas")
    assert [r["gpu_memory"] for r in reps["data"]] == [10 * GIB] and reps["data"][0]["gpus"] == ["GPU-0000"]
    status, gpus = await box.call("GET", "/api/v1/gpus")
    (view,) = gpus["data"]
    assert view["budget"] == 23 * GIB and view["claimed"] == 20 * GIB
    assert sorted(h["claim"] for h in view["held_by"]) == [10 * GIB, 10 * GIB]

    # Freed claims are handed out again: deleting a lets c start.
    assert (await box.call("DELETE", "/api/v1/endpoints/a"))[0] == 200
    await async_wait_for(lambda: _healthy(box, "c"), timeout=20, what="c healthy once a's claim is freed")


async def _healthy(admin: Admin, name: str) -> bool:
    return (await _get(admin, name))["status"] == "HEALTHY"


async def test_a_stated_claim_above_every_gpu_is_422_at_create_and_update(box: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "big", health=FAST)
    status, body = await _create(box, "big", folder, "30gb")
    assert status == 422, body
    message = body["error"]["message"]
    assert body["error"]["param"] == "resources.gpu_memory" and "30 GiB" in message and "largest budget is 23 GiB" in message, message
    # An update is checked too.
    status, _ = await box.call("POST", "/api/v1/endpoints", json_body={"name": "big", "model_folder": str(folder), "resources": {"gpu_share": 0.5}})
    assert status == 201
    status, body = await box.call("PATCH", "/api/v1/endpoints/big", json_body={"resources": {"gpu_memory": "30gb"}})
    assert status == 422 and "30 GiB" in body["error"]["message"]


async def test_a_claim_below_the_weights_is_422(box: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "weighty", health=FAST)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    status, body = await _create(box, "weighty", folder, "1mb")
    assert status == 422, body
    assert "1 MiB is less than the model's weights alone (4 MiB" in body["error"]["message"], body
    status, body = await box.call("POST", "/api/v1/endpoints", json_body={"name": "weighty", "model_folder": str(folder), "resources": {"gpu_share": 0.5}})
    assert status == 201, body
    ep = await _get(box, "weighty")
    assert ep["memory_estimate"] == {"weights": 4 << 20, "kv_cache": 0, "max_model_len": None}
    assert ep["claim_source"] == "estimate" and ep["gpu_memory_claim"] == (4 << 20) + box.config.gpus.claim_overhead


async def test_an_estimated_claim_above_every_gpu_puts_the_endpoint_in_error(box: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "huge", health=FAST)
    weights = 30 * GIB - box.config.gpus.claim_overhead  # 28 GiB of bf16 tensors: with the overhead, a 30 GiB claim
    header = json.dumps({"w": {"dtype": "BF16", "shape": [weights // 2], "data_offsets": [0, weights]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    status, body = await box.call("POST", "/api/v1/endpoints", json_body={"name": "huge", "model_folder": str(folder), "resources": {"gpu_share": 0.5}})
    assert status == 201, body

    async def error() -> dict[str, Any] | None:
        ep = await _get(box, "huge")
        return ep if ep["status"] == "ERROR" else None

    ep = await async_wait_for(error, timeout=20, what="huge in ERROR")
    assert ep["gpu_memory_claim"] == 30 * GIB and ep["claim_source"] == "estimate"
    assert "claims 30 GiB" in ep["status_message"] and "budget is 23 GiB (GPU 0: 24 GiB less the 1 GiB reserve)" in ep["status_message"], ep


def test_doctor_shows_each_budget_and_each_declared_claim(make_config: Any, tmp_path: Path) -> None:
    from appliance.control.ops.doctor import GpuView, _claims, gpu_warnings

    demo = write_demo_model(tmp_path / "demo")
    config = make_config({"endpoints": [
        {"name": "demo", "model_folder": str(demo), "runtime": "transformers", "resources": {"gpu_share": 0.5}},
        {"name": "big", "model_folder": str(demo), "runtime": "transformers", "resources": {"gpu_memory": "30gb"}},
    ]})
    check = _claims(GpuView(gpus=[gpu()]), config)
    est = estimate_folder(demo)
    assert est is not None and est.max_model_len is not None
    assert check.status == "problem" and check.fix
    assert "big claims 30 GiB of GPU memory per GPU; the largest budget here is 23 GiB (GPU 0: 24 GiB less the 1 GiB reserve)" in check.detail
    assert "GPU 0 budget 23 GiB" in check.detail and f"at {est.max_model_len} tokens + 2 GiB overhead" in check.detail, check.detail
    ok = _claims(GpuView(gpus=[gpu(total=80 * GIB)]), config)
    assert ok.status == "ok" and "big: claims 30 GiB (stated)" in ok.detail
    # check-config's warnings on resolved endpoints say the same
    from appliance.control.endpoints import resolve

    resolved = [resolve(e.spec())[0] for e in config.endpoints]
    assert [w.split(":")[0] for w in gpu_warnings(config, resolved, GpuView(gpus=[gpu()]))] == ["endpoints[1] (big)"]


def test_cli_shows_the_claim_the_estimate_and_the_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli.endpoint import _memory_lines

    ep = {"memory_estimate": {"weights": 4 * GIB, "kv_cache": GIB, "max_model_len": 4096}, "gpu_memory_claim": 7 * GIB, "claim_source": "estimate",
          "gpu_budgets": [{"index": 0, "uuid": "GPU-0000", "memory_total": 24 * GIB, "budget": 23 * GIB, "claimed": 7 * GIB}]}
    assert dict(_memory_lines(ep)) == {
        "GPU memory claim": "7 GiB per replica (estimate + [gpus] claim_overhead, at least)",
        "memory estimate": "weights 4 GiB + KV cache 1 GiB at 4096 tokens",
        "GPU budgets": "GPU 0: 7 GiB of 23 GiB claimed",
    }


def test_gpu_list_shows_claimed_of_budget_and_each_claim(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    import appliance.cli.gpu as cli_gpu

    answer = {"available": True, "data": [{
        "index": 0, "uuid": "GPU-0000", "name": "NVIDIA L4", "memory_used": 0, "memory_total": 24 * GIB, "utilization_gpu": None,
        "mig_mode": "disabled", "allowed": True, "budget": 23 * GIB, "claimed": 20 * GIB,
        "held_by": [{"replica": "a-1", "share": None, "claim": 10 * GIB}, {"replica": "b-1", "share": 0.5, "claim": 10 * GIB}],
    }]}

    class Client:
        def request(self, *args: Any) -> dict[str, Any]:
            return answer

    monkeypatch.setattr(cli_gpu, "admin_client", lambda args: Client())
    assert cli_gpu.cmd_gpu_list(argparse.Namespace(json=False, output="table")) == 0
    out = capsys.readouterr().out
    assert "CLAIMED/BUDGET" in out and "20 GiB/23 GiB" in out and "a-1 (10 GiB), b-1 (10 GiB)" in out
