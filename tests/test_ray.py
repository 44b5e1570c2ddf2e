"""Endpoints on Ray Serve: the export (`appliance export ray-serve`) against a golden file and Ray's own
schema, and the exported config deployed with `serve deploy` on a real local Ray cluster, whose replicas
run the appliance's workers: served and streamed through Serve's proxy, replaced after a kill -9 of the
worker or of the replica's actor, and gone with the application."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import wait_for
from test_supervisor import FAKE

from appliance.demo_model import write_demo_model
from appliance.domain.serve_export import IMPORT_PATH, serve_config
from appliance.domain.specs import EndpointConfig, HealthCheck, Resources

GOLDEN = Path(__file__).parent / "golden" / "ray_serve.yaml"
BIN = Path(sys.executable).parent


def _endpoint(name: str, **fields: Any) -> EndpointConfig:
    base: dict[str, Any] = dict(
        name=name, model_folder=f"/srv/models/{name}", runtime="vllm", definition_file=None, served_model_name=name, aliases=[], replicas=1,
        min_replicas=1, max_replicas=1, resources=Resources(), environ={}, extra_args=[], continuous_batching=False,
        health_check=HealthCheck(path="/health"), unhealthy_replace_after=10.0, public=False, description="",
    )
    return EndpointConfig(**{**base, **fields})


EXAMPLES = [
    _endpoint("chat", aliases=["gpt"], resources=Resources(gpu_share=0.5), max_concurrency=16, routing="session_affinity"),
    _endpoint("big", resources=Resources(gpus=2, cpu=4, mem="32gb"), replicas=2, min_replicas=1, max_replicas=4, max_surge=1, drain_timeout_seconds=30.0),
    _endpoint("lazy", runtime="transformers", on_demand=True, min_replicas=0, replicas=1, idle_timeout_seconds=600.0, pin=True, queue_timeout_seconds=5.0),
]


def test_the_export_matches_the_golden_file_field_by_field_warnings_included() -> None:
    document, warnings = serve_config(EXAMPLES, host="127.0.0.1", port=8000)
    golden = yaml.safe_load(GOLDEN.read_text())
    assert warnings == golden["warnings"]
    for i, (app, want) in enumerate(zip(document["applications"], golden["config"]["applications"], strict=True)):
        for field in ("name", "route_prefix", "import_path"):
            assert app[field] == want[field], (i, field)
        assert app["deployments"] == want["deployments"], app["name"]
        assert app["args"]["endpoint"] == EXAMPLES[i].model_dump(mode="json")  # the whole endpoint travels: the replica needs all of it
    assert {k: v for k, v in document.items() if k != "applications"} == {k: v for k, v in golden["config"].items() if k != "applications"}


def test_the_export_validates_against_rays_serve_deploy_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    document, _ = serve_config(EXAMPLES)
    schema.ServeDeploySchema.model_validate(document)
    public, warnings = serve_config(EXAMPLES[:1], host="0.0.0.0")
    assert any("answers anyone" in w for w in warnings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    """A Ray head node on loopback with free ports; stopped (and every process of it gone) afterwards."""
    pytest.importorskip("ray")
    key = tmp_path / "state" / "secret.key"
    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port")}
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path("/tmp") / f"ray-{os.getpid()}-{ports['port']}"  # Ray's socket paths must stay short
    args = [str(BIN / "ray"), "start", "--head", "--num-cpus", "4", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--disable-usage-stats", "--temp-dir", str(temp), *[f"--{k}={v}" for k, v in ports.items()]]
    state: dict[str, Any] = {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "serve_port": _free_port(), "key": key}
    state["start"] = lambda: subprocess.run(args, env=env, check=True, capture_output=True, timeout=120)
    yield state
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    subprocess.run(["rm", "-rf", str(temp)], check=False)


def _worker_pids(app: str, program: str = "fake_worker.py") -> list[int]:
    """The workers a Serve replica of `app` started (children of its ServeReplica actor running `program`)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"ServeReplica:{app}:" in part for part in p.info["cmdline"] or []):
                out += [c.pid for c in p.children(recursive=True) if program in " ".join(c.cmdline())]
        except psutil.Error:
            pass
    return out


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_exported_endpoints_run_on_a_local_ray_cluster(cluster: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "models" / "fake"
    folder.mkdir(parents=True)
    service = {"start_command": ["python", str(FAKE), "--port", "8000", "--model", "served-name", "--tokens-per-second", "20"], "port": 8000,
               "health_check": {"path": "/health", "interval": 0.5, "max_retries": 2, "initial_delay": 30}}
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "served-name", "model_path": "/models", "service": service}]}))
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[[endpoints]]\nname = "fake"\nmodel_folder = "{folder}"\n'
                      'secret_environ = { HF_TOKEN = "hf_from_the_vault" }\n'
                      f'[[endpoints]]\nname = "other"\nmodel_folder = "{folder}"\n'
                      f'[[endpoints]]\nname = "tiny"\nmodel_folder = "{write_demo_model(tmp_path / "tiny")}"\nruntime = "transformers"\n')
    out = tmp_path / "serve.yaml"
    done = subprocess.run([sys.executable, "-m", "appliance", "export", "ray-serve", "--config", str(config), "--port", str(cluster["serve_port"]), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "keep it private" in done.stderr and "APPLIANCE_SECRET_KEY" in done.stderr
    document = yaml.safe_load(out.read_text())
    assert document["applications"][0]["import_path"] == IMPORT_PATH
    assert "hf_from_the_vault" not in out.read_text()  # sealed: Serve's dashboard shows its config
    # The nodes open sealed values with the appliance's key, from their environment.
    cluster["env"]["APPLIANCE_SECRET_KEY"] = cluster["key"].read_text().strip()
    cluster["start"]()
    deploy = subprocess.run([str(BIN / "serve"), "deploy", "--address", cluster["dashboard"], str(out)], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr
    base = f"http://127.0.0.1:{cluster['serve_port']}/endpoints/fake"
    wait_for(lambda: _get(base + "/health")[0] == 200, timeout=60, what="the endpoint RUNNING on Ray Serve")

    status, body = _get(base + "/whoami")
    (worker,) = _worker_pids("fake")
    assert status == 200 and json.loads(body)["pid"] == worker
    environ = open(f"/proc/{worker}/environ", "rb").read().split(b"\0")
    assert b"HF_TOKEN=hf_from_the_vault" in environ  # opened on the node, never in plain in Serve's config

    # A stream arrives chunk by chunk (the fake worker writes 20 tokens a second).
    body = json.dumps({"model": "served-name", "prompt": "hi", "max_tokens": 6, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    arrivals = []
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers.get_all("Date") and len(resp.headers.get_all("Date")) == 1
        for line in resp:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 0.15, arrivals

    # kill -9 of the worker: the replica's health check fails, Serve replaces it, it serves again.
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: _worker_pids("fake") not in ([], [worker]) and _get(base + "/health")[0] == 200, timeout=30, what="a new worker after kill -9")
    (second,) = _worker_pids("fake")
    # kill -9 of the replica's actor: Ray ends its process group, the worker with it; a new replica serves.
    actor = psutil.Process(second).parent()
    assert actor is not None and "ServeReplica" in " ".join(actor.cmdline())
    actor.kill()
    wait_for(lambda: not _alive(second), timeout=15, what="the killed actor's worker gone")
    wait_for(lambda: _get(base + "/health")[0] == 200 and _worker_pids("fake") not in ([], [second]), timeout=60, what="serving again after the actor's kill")

    # A real engine on Ray: the demo model on `transformers serve`, started by its Serve replica meanwhile.
    chat = json.dumps({"model": str(tmp_path / "tiny"), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()

    def answered() -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{cluster['serve_port']}/endpoints/tiny/v1/chat/completions", data=chat,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    reply = wait_for(answered, timeout=240, interval=1.0, what="transformers serve answering through Serve")
    assert reply["usage"]["completion_tokens"] == 4, reply
    # An application left out of the next deploy is deleted, and its worker ends with it.
    (other,) = _worker_pids("other")
    document["applications"] = [a for a in document["applications"] if a["name"] != "other"]
    out.write_text(yaml.safe_dump(document))
    deploy = subprocess.run([str(BIN / "serve"), "deploy", "--address", cluster["dashboard"], str(out)], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr
    wait_for(lambda: not _alive(other), timeout=30, what="the deleted application's worker gone")
    # `ray stop --force` kills the raylet that would end the replicas' groups: the workers still end with their replica.
    (third,) = _worker_pids("fake")
    engines = _worker_pids("tiny", "transformers")
    assert engines, "the transformers serve worker of tiny"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=cluster["env"], capture_output=True, timeout=120)
    wait_for(lambda: not any(_alive(p) for p in [third, *engines]), timeout=15, what="every worker gone after ray stop --force")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
