"""The gRPC port with real Triton servers (PyTriton on the CPU, tests/triton_worker.py) as an endpoint's two
replicas, and tritonclient as the client, as a Triton user calls it: readiness, inference, streams, keys,
a kill -9 under a stream, big messages, deadlines, cancels, balancing, health."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from conftest import ServerProcess, admin_api, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from test_supervisor import FAKE, PORTS

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parent.parent
TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
WORKER = REPO / "tests" / "triton_worker.py"
# The last model the worker binds: Triton answers /v2/health/ready before PyTriton has loaded its models.
CHECK = {"path": "/v2/models/slow/ready", "interval": 0.5, "max_retries": 3, "max_wait_time": 2.0, "initial_delay": 90}


class Box:
    def __init__(self, server: ServerProcess, state: Path) -> None:
        self.server = server
        self.grpc = json.loads((state / "server.json").read_text())["grpc"]
        self.admin = (state / "admin.key").read_text().strip()
        self.keys: dict[str, str] = {}

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return admin_api(self.server.url + path, self.admin, method, body)

    def replicas(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/api/v1/endpoints/g/replicas")["data"])

    def healthy(self) -> list[dict[str, Any]]:
        return [r for r in self.replicas() if r["state"] == "HEALTHY"]


def headers(key: str | None, endpoint: str | None = "g") -> dict[str, str]:
    return {**({"authorization": f"Bearer {key}"} if key else {}), **({"x-endpoint": endpoint} if endpoint else {})}


def data(payload: bytes) -> triton.InferInput:
    item = triton.InferInput("data", [len(payload)], "UINT8")
    item.set_data_from_numpy(np.frombuffer(payload, dtype=np.uint8))
    return item


def int32(name: str, value: int) -> triton.InferInput:
    item = triton.InferInput(name, [1], "INT32")
    item.set_data_from_numpy(np.array([value], dtype=np.int32))
    return item


def status(err: InferenceServerException) -> str:
    return str(err.status()).removeprefix("StatusCode.")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    if not TRITON_PYTHON.exists():
        pytest.skip("no .venv-triton: scripts/setup.sh --with-tests makes it (PyTriton)")
    root = tmp_path_factory.mktemp("triton")
    folder = root / "models" / "g"
    folder.mkdir(parents=True)
    service = {"start_command": [str(TRITON_PYTHON), str(WORKER)], "port": 8000, "grpc_port": 8001, "health_check": CHECK}
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "g", "model_path": "/models", "service": service}]}))
    other = root / "models" / "other"
    other.mkdir(parents=True)
    fake = {"start_command": ["python", str(FAKE), "--port", "8000"], "port": 8000, "health_check": {**CHECK, "path": "/health"}}
    (other / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "other", "model_path": "/models", "service": fake}]}))
    state = root / "state"
    config = root / "config.toml"
    config.write_text(
        f'[server]\nport = 0\nstate_dir = "{state}"\n[workers]\nport_range = [{PORTS[0]}, {PORTS[1]}]\nstop_grace_seconds = 15\n'
        'restart_backoff_seconds = 0.2\n[gpus]\ndevices = "none"\n[grpc]\nport = 0\nmax_message_bytes = "20MiB"\n'
        f'[[endpoints]]\nname = "g"\nmodel_folder = "{folder}"\nreplicas = 2\n'
        f'[[endpoints]]\nname = "other"\nmodel_folder = "{other}"\n'
    )
    server = ServerProcess(config, state, {"TMPDIR": str(root)}).start(timeout=60)
    try:
        b = Box(server, state)
        wait_for(lambda: len(b.healthy()) == 2, timeout=120, what="two Triton replicas to be HEALTHY")
        for name, endpoints in (("inference", None), ("elsewhere", ["other"])):
            b.keys[name] = b.api("POST", "/api/v1/keys", {"name": name, **({"endpoints": endpoints} if endpoints else {})})["key"]
        yield b
    finally:
        server.stop(timeout=60)


def test_a_triton_client_gets_readiness_inference_and_streams(box: Box) -> None:
    client = triton.InferenceServerClient(box.grpc)
    key = box.keys["inference"]
    assert client.is_server_live(headers=headers(key)) and client.is_server_ready(headers=headers(key))
    assert client.is_model_ready("identity", headers=headers(key)) and client.is_model_ready("counter", headers=headers(key))
    assert client.get_model_metadata("identity", headers=headers(key)).name == "identity"
    result = client.infer("identity", [data(b"through the appliance")], headers=headers(key))
    assert result.as_numpy("data").tobytes() == b"through the appliance"
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers(key))
    client.async_stream_infer("counter", [int32("n", 5)])
    values = []
    for _ in range(5):
        result, error = answers.get(timeout=10)
        assert error is None, error
        values.append(int(result.as_numpy("value")[0]))
    client.stop_stream()
    assert values == [0, 1, 2, 3, 4]
    # 16 MiB each way; past [grpc] max_message_bytes (20 MiB), RESOURCE_EXHAUSTED
    big = os.urandom(16 << 20)
    assert client.infer("identity", [data(big)], headers=headers(key)).as_numpy("data").tobytes() == big
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity", [data(bytes(21 << 20))], headers=headers(key))
    assert status(info.value) == "RESOURCE_EXHAUSTED"


def test_credentials_endpoints_and_admin_calls_are_refused_as_status_codes(box: Box) -> None:
    client = triton.InferenceServerClient(box.grpc)
    for sent in (headers(None), headers("ak-wrong"), headers(None, "no-such-endpoint")):
        with pytest.raises(InferenceServerException) as info:
            client.is_server_ready(headers=sent)
        assert status(info.value) == "UNAUTHENTICATED", sent
    with pytest.raises(InferenceServerException) as info:
        client.is_server_ready(headers=headers(box.keys["elsewhere"]))
    assert status(info.value) == "PERMISSION_DENIED"
    for sent in (headers(box.keys["inference"], "no-such-endpoint"), headers(box.keys["inference"], None)):
        with pytest.raises(InferenceServerException) as info:
            client.is_server_ready(headers=sent)
        assert status(info.value) == "NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index(headers=headers(box.keys["inference"]))
    assert status(info.value) == "PERMISSION_DENIED"
    index = client.get_model_repository_index(headers=headers(box.admin), as_json=True)
    assert isinstance(index, dict), index  # the worker's own answer (PyTriton loads models from no repository: it may be empty)


def test_one_channel_spreads_calls_and_deadlines_and_cancels_reach_the_worker(box: Box) -> None:
    client = triton.InferenceServerClient(box.grpc)  # one channel
    key = box.keys["inference"]
    for _ in range(200):
        client.infer("identity", [data(b"x")], headers=headers(key))
    records = box.api("GET", "/api/v1/requests?endpoint=g&limit=200")["data"]
    served = Counter(r["replica"] for r in records if r["status"] == 200)
    assert len(served) == 2 and min(served.values()) >= 50, served
    began = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [int32("delay_ms", 5000)], headers=headers(key), client_timeout=1.0)
    assert status(info.value) == "DEADLINE_EXCEEDED" and 0.8 < time.monotonic() - began < 2.5
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers(key))
    client.async_stream_infer("counter", [int32("n", 100), int32("delay_ms", 100)])
    assert answers.get(timeout=10)[1] is None
    assert sum(r["inflight"] for r in box.replicas()) == 1
    client.stop_stream(cancel_requests=True)
    wait_for(lambda: sum(r["inflight"] for r in box.replicas()) == 0, timeout=5, what="the cancelled stream's slot to free")


def test_a_kill_9_under_a_stream_ends_it_unavailable_and_the_replica_is_replaced(box: Box) -> None:
    client = triton.InferenceServerClient(box.grpc)
    key = box.keys["inference"]
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers(key))
    client.async_stream_infer("counter", [int32("n", 30), int32("delay_ms", 200)])
    for expected in range(3):
        result, error = answers.get(timeout=10)
        assert error is None and int(result.as_numpy("value")[0]) == expected
    serving = next(r for r in box.replicas() if r["inflight"])
    killed = time.monotonic()
    os.kill(serving["pid"], signal.SIGKILL)
    while True:
        result, error = answers.get(timeout=5)
        if error is not None:
            break
    assert status(error) == "UNAVAILABLE" and time.monotonic() - killed < 2.0, error
    client.stop_stream()
    for _ in range(10):
        assert client.infer("identity", [data(b"after")], headers=headers(key)).as_numpy("data").tobytes() == b"after"
    def replaced() -> bool:
        healthy = box.healthy()
        again = next((r for r in healthy if r["id"] == serving["id"]), None)
        return len(healthy) == 2 and (again is None or again["pid"] != serving["pid"])

    wait_for(replaced, timeout=120, what="the killed replica to be replaced")


def test_health_is_serving_then_not_serving_at_zero_replicas(box: Box) -> None:
    with grpc.insecure_channel(box.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        sent = [("authorization", f"Bearer {box.keys['inference']}")]
        assert health.Check(health_pb2.HealthCheckRequest(service="g"), metadata=sent, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        box.api("PATCH", "/api/v1/endpoints/g", {"replicas": 0, "min_replicas": 0})
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="g"), metadata=sent, timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=60, what="NOT_SERVING at 0 replicas")
