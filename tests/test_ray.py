"""Endpoints on Ray Serve: the export (`appliance export ray-serve`) against a golden file and Ray's own
schema, and the exported config deployed with `serve deploy` on a real local Ray cluster, whose replicas
run the appliance's workers: served and streamed through Serve's proxy, replaced after a kill -9 of the
worker or of the replica's actor, and gone with the application."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from conftest import async_wait_for, wait_for
from pydantic import ValidationError
from test_supervisor import FAKE, WORKERS, fake_folder, server_config

from appliance.demo_model import write_demo_model
from appliance.config import Config
from appliance.control.ray.policy import AppliancePolicy, figures
from appliance.domain.scaling import Rule, RuleSpec, declared_rule_rows
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
    _endpoint("busy", runtime="custom", replicas=1, min_replicas=1, max_replicas=3, autoscaling_policy="backend.ai"),
]
RULES = {"busy": [Rule.of(row) for row in declared_rule_rows("busy", [
    RuleSpec(metric_source="inference", metric_name="vllm:num_requests_waiting", comparator="GREATER_THAN", threshold=4, step_size=1, window_seconds=20),
    RuleSpec(metric_source="gateway", metric_name="latency_p95", comparator="LESS_THAN", threshold=0.5, step_size=-1, max_replicas=5, cooldown_seconds=60),
])]}


def test_the_export_matches_the_golden_file_field_by_field_warnings_included() -> None:
    document, warnings = serve_config(EXAMPLES, host="127.0.0.1", port=8000, rules=RULES)
    golden = yaml.safe_load(GOLDEN.read_text())
    assert warnings == golden["warnings"]
    for i, (app, want) in enumerate(zip(document["applications"], golden["config"]["applications"], strict=True)):
        for field in ("name", "route_prefix", "import_path"):
            assert app[field] == want[field], (i, field)
        assert app["deployments"] == want["deployments"], app["name"]
        assert app["args"] == want["args"] | {"endpoint": EXAMPLES[i].model_dump(mode="json")}  # the whole endpoint travels: the replica needs all of it
    assert {k: v for k, v in document.items() if k != "applications"} == {k: v for k, v in golden["config"].items() if k != "applications"}


def test_the_export_validates_against_rays_serve_deploy_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    document, _ = serve_config(EXAMPLES, rules=RULES)
    schema.ServeDeploySchema.model_validate(document)
    public, warnings = serve_config(EXAMPLES[:1], host="0.0.0.0")
    assert any("answers anyone" in w for w in warnings)


async def test_a_serve_replica_records_what_its_rules_need_and_counts_every_request_it_relays() -> None:
    from appliance.control.ray.stats import ReplicaStats

    stats = ReplicaStats([["gateway", "latency_p95", 30.0], ["gateway", "inflight_per_replica", 2.0]], mem_limit=None)
    finished = [stats.started() for _ in range(3)]
    stats.finished(finished[0] - 0.5, finished[0] - 0.4, ok=True)  # 0.5 s, first byte after 0.1 s
    stats.finished(finished[1] - 2.0, None, ok=True)
    stats.finished(finished[2], None, ok=False)  # failed: counted as served, not in the latencies
    stats.started()
    async with aiohttp.ClientSession() as session:
        figures = await stats.sample(None, session, "http://127.0.0.1:9")
    assert figures["gateway/inflight_per_replica"] == 1 and figures["gateway/served_total"] == 3
    assert 2.0 <= figures["gateway/latency_p95/30"] < 2.1
    assert "kernel/cpu_util" not in figures  # not asked for, not measured


def test_the_serve_router_keeps_a_key_on_its_replica_and_moves_only_that_replicas_keys() -> None:
    pytest.importorskip("ray")
    from ray.serve._private.common import StreamingHTTPRequest

    from appliance.control.ray.router import rank, route_key

    ids = ["r1", "r2", "r3", "r4"]
    rng = random.Random(7)
    homes = {k: rank("session_affinity", ids, k, {}, 2.0, rng)[0][0] for k in (f"user-{n}" for n in range(200))}
    assert set(homes.values()) == set(ids)  # keys spread over the replicas
    assert all(rank("session_affinity", ids, k, {}, 2.0, rng)[0] == [home] for k, home in homes.items())  # and stay put
    gone = [i for i in ids if i != "r2"]
    for k, home in homes.items():  # r2 leaves: only its keys move
        order = rank("session_affinity", gone, k, {}, 2.0, rng)
        assert order[0] == [home] if home != "r2" else order[0][0] != "r2"
        assert sorted(i for (i,) in order) == sorted(gone)  # a full first choice falls through to the rest, one by one
    # Prefix routing leaves a first choice with more than overload × the least load; no key: Serve's two choices.
    key = "system:you are terse"
    first = rank("prefix", ids, key, {}, 2.0, rng)[0][0]
    busy = {i: (9 if i == first else 2) for i in ids}
    assert rank("prefix", ids, key, busy, 2.0, rng)[-1] == [first] and first not in rank("prefix", ids, key, busy, 2.0, rng)[0]
    assert rank("prefix", ids, key, {**busy, first: 4}, 2.0, rng)[0] == [first]
    assert len(rank("session_affinity", ids, None, {}, 2.0, rng)) == 1 and len(rank("session_affinity", ids, None, {}, 2.0, rng)[0]) == 2
    # The key comes from the headers of the ASGI scope Serve's proxy pickles for the replica.
    scope = {"type": "http", "headers": [(b"content-type", b"application/json"), (b"x-session-id", b"conv-42")]}
    assert route_key([pickle.dumps(StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="p"))]) == "conv-42"
    scope["headers"].append((b"x-appliance-route-key", b"prefix-key"))
    assert route_key([pickle.dumps(StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="p"))]) == "prefix-key"
    assert route_key([b"not a pickle"]) is None and route_key([]) is None


SCALES_BY_INFLIGHT = "".join(
    f'[[endpoints.autoscaling_rules]]\nmetric_source = "gateway"\nmetric_name = "inflight_per_replica"\ncomparator = "{c}"\nthreshold = {t}\n'
    f'step_size = {step}\nwindow_seconds = 2\ncooldown_seconds = 0\n' for c, t, step in (("GREATER_THAN_OR_EQUAL", 1, 1), ("LESS_THAN_OR_EQUAL", 0, -1))
)


def _ctx(now: float, raw: dict[str, dict[str, list[tuple[float, float]]]], target: int, state: dict[str, Any] | None = None,
         requests: float = 0, queued: float = 0) -> SimpleNamespace:
    """What Serve's controller hands a custom policy each tick (AutoscalingContext's fields the policy reads)."""
    series = {name: {rid: [SimpleNamespace(timestamp=t, value=v) for t, v in points] for rid, points in per.items()} for name, per in raw.items()}
    replicas = sorted({rid for per in raw.values() for rid in per}) or [f"r{i}" for i in range(target)]
    return SimpleNamespace(current_time=now, policy_state=state or {}, raw_metrics=series, running_replicas=replicas, total_num_requests=requests,
                           total_queued_requests=queued, target_num_replicas=target, app_name="busy")


def _rule(**fields: Any) -> dict[str, Any]:
    return declared_rule_rows("busy", [RuleSpec(**fields)])[0]


def test_the_serve_policy_scales_out_by_the_rules_figures_and_keeps_its_cooldown_between_ticks() -> None:
    out = _rule(metric_source="gateway", metric_name="inflight_per_replica", comparator="GREATER_THAN_OR_EQUAL", threshold=2, step_size=1,
                window_seconds=10, cooldown_seconds=60)
    policy = AppliancePolicy([out], min_replicas=1, max_replicas=3)
    busy = {"gateway/inflight_per_replica": {"a": [(95.0, 3.0), (99.0, 2.0)]}}
    target, state = policy(_ctx(100.0, busy, target=1, requests=3))
    assert target == 2 and state["appliance"]["last_fired"] == {out["id"]: 100.0}
    both = {"gateway/inflight_per_replica": {"a": [(105.0, 3.0)], "b": [(105.0, 2.0)]}}
    assert policy(_ctx(110.0, both, target=2, state=state, requests=5))[0] == 2  # the rule's cooldown holds
    assert policy(_ctx(161.0, {"gateway/inflight_per_replica": {"a": [(160.0, 3.0)], "b": [(160.0, 2.0)]}}, target=2, state=state))[0] == 3
    old = {"gateway/inflight_per_replica": {"a": [(80.0, 9.0)]}}  # outside the rule's window: missing, nothing changes
    assert policy(_ctx(100.0, old, target=1))[0] == 1


def test_the_serve_policy_combines_replicas_as_on_one_box_under_either_policy() -> None:
    per_route = _rule(metric_source="inference_framework", metric_name="vllm:num_requests_waiting", comparator="GREATER_THAN", threshold=3, step_size=1)
    per_replica = _rule(metric_source="inference", metric_name="vllm:num_requests_waiting", comparator="GREATER_THAN", threshold=3, step_size=2)
    raw = {"series/vllm:num_requests_waiting": {"a": [(99.0, 4.0)], "b": [(99.0, 0.0)]}}
    figures_ = figures([Rule.of(per_route), Rule.of(per_replica)], _ctx(100.0, raw, 2).raw_metrics, 100.0, running=2, queued=0)
    assert figures_ == {Rule.of(per_route).metric: 2.0, Rule.of(per_replica).metric: 2.0}  # total ÷ routes, and the mean
    raw = {"series/vllm:num_requests_waiting": {"a": [(99.0, 8.0)], "b": [(99.0, 2.0)]}}
    assert AppliancePolicy([per_route, per_replica], min_replicas=1, max_replicas=9)(_ctx(100.0, raw, 2))[0] == 4  # largest step wins
    assert AppliancePolicy([per_route, per_replica], policy="backend.ai", min_replicas=1, max_replicas=9)(_ctx(100.0, raw, 2))[0] == 3  # first rule
    rps = _rule(metric_source="gateway", metric_name="rps_per_replica", comparator="GREATER_THAN", threshold=4, step_size=1)
    served = {"gateway/served_total": {"a": [(80.0, 0.0), (90.0, 100.0)], "b": [(80.0, 0.0), (90.0, 20.0)]}}
    assert figures([Rule.of(rps)], _ctx(100.0, served, 2).raw_metrics, 100.0, running=2, queued=0) == {Rule.of(rps).metric: 6.0}


def test_the_serve_policy_scales_to_zero_after_the_idle_timeout() -> None:
    rule = _rule(metric_source="gateway", metric_name="queue_length", comparator="GREATER_THAN", threshold=10, step_size=1)
    policy = AppliancePolicy([rule], min_replicas=0, max_replicas=2, idle_timeout=60.0)
    _, state = policy(_ctx(100.0, {}, target=1, requests=1))
    assert policy(_ctx(150.0, {}, target=1, state=state))[0] == 1
    assert policy(_ctx(161.0, {}, target=1, state=state))[0] == 0
    assert policy(_ctx(100.0, {}, target=1, queued=11))[0] == 2  # Serve's queued requests are the queue length


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
    state: dict[str, Any] = {"temp": temp, "env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "serve_port": _free_port(), "key": key}
    state["start"] = lambda: subprocess.run(args, env=env, check=True, capture_output=True, timeout=120)
    yield state
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    subprocess.run(["rm", "-rf", str(temp)], check=False)


def _worker_pids(app: str, program: str = "fake_worker.py") -> list[int]:
    """The workers a Serve replica of `app` started (children of its ServeReplica actor running `program`); `app` ending
    in "-" names every application it begins."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"ServeReplica:{app}" + ("" if app.endswith("-") else ":") in part for part in p.info["cmdline"] or []):
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
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[[endpoints]]\nname = "fake"\nmodel_folder = "{folder}"\nrouting = "session_affinity"\n'
                      'secret_environ = { HF_TOKEN = "hf_from_the_vault" }\n'
                      f'[[endpoints]]\nname = "other"\nmodel_folder = "{folder}"\nmin_replicas = 1\nmax_replicas = 2\n' + SCALES_BY_INFLIGHT +
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

    # A stream arrives chunk by chunk (the fake worker writes 20 tokens a second), through the appliance's router.
    body = json.dumps({"model": "served-name", "prompt": "hi", "max_tokens": 6, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json", "X-Session-ID": "conv-1"})
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
    # The appliance's rules in Serve's controller: a stream in flight scales `other` 1 → 2, its end back to 1.
    def running() -> int:
        status, text = _get(cluster["dashboard"] + "/api/serve/applications/")
        replicas = json.loads(text)["applications"]["other"]["deployments"]["Worker"]["replicas"] if status == 200 else []
        return sum(1 for r in replicas if r["state"] == "RUNNING")

    assert running() == 1
    long = json.dumps({"model": "served-name", "prompt": "hi", "max_tokens": 600, "stream": True}).encode()  # 30 s at 20 tokens/s
    stream = threading.Thread(target=lambda: urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{cluster['serve_port']}/endpoints/other/v1/completions", data=long, headers={"Content-Type": "application/json"}), timeout=60).read())
    stream.start()
    wait_for(lambda: running() == 2, timeout=40, interval=0.5, what="other scaled out to 2 by its in-flight rule")
    said = "".join(p.read_text(errors="replace") for p in cluster["temp"].glob("session_latest/logs/serve/controller_*.log"))
    assert "appliance policy, other: gateway/inflight_per_replica" in said, said[-2000:]
    stream.join(timeout=60)
    wait_for(lambda: running() == 1 and len(_worker_pids("other")) == 1, timeout=40, interval=0.5, what="other scaled back in to 1")

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


def _call(url: str, path: str, key: str | None, body: dict[str, Any] | None = None, method: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, method=method or ("POST" if body is not None else "GET"),
                                 data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:
        return 0, None


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_appliance_serve_runs_its_replicas_on_a_ray_cluster_behind_its_own_gateway(cluster: dict[str, Any], server_factory: Any, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "fake"
    folder.mkdir(parents=True)
    service = {"start_command": ["python", str(FAKE), "--port", "8000", "--model", "served-name", "--tokens-per-second", "20"], "port": 8000,
               "health_check": {"path": "/health", "interval": 0.5, "max_retries": 2, "initial_delay": 30}}
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "served-name", "model_path": "/models", "service": service}]}))
    cluster["start"]()
    config = server_config(tmp_path, f'[backend]\nkind = "ray"\naddress = "{cluster["dashboard"]}"\nproxy = "http://127.0.0.1:{cluster["serve_port"]}"\n'
                           '[autoscaling]\ninterval_seconds = 0.5\n'
                           f'[[endpoints]]\nname = "fake"\nmodel_folder = "{folder}"\naliases = ["fake-alias"]\nmin_replicas = 1\nmax_replicas = 2\n'
                           'unhealthy_replace_after = 30\n' + SCALES_BY_INFLIGHT)
    server = server_factory(config).start(timeout=60)
    admin = (tmp_path / "state" / "admin.key").read_text().strip()

    def view() -> dict[str, Any]:
        return _call(server.url, "/api/v1/endpoints/fake", admin)[1] or {}

    def healthy() -> int:
        return int((view().get("replica_counts") or {}).get("HEALTHY", 0))

    def apps() -> dict[str, Any]:
        status, text = _get(cluster["dashboard"] + "/api/serve/applications/")
        return json.loads(text)["applications"] if status == 200 else {}

    def until(predicate: Any, timeout: float, what: str) -> Any:
        try:
            return wait_for(predicate, timeout=timeout, interval=0.5, what=what)
        except AssertionError as exc:
            states = {a: v.get("status") for a, v in apps().items()}
            raise AssertionError(f"{exc}\nreplicas: {view().get('replica_counts')}; Serve: {states}\n{server.output()[-4000:]}") from None

    until(lambda: view().get("status") == "HEALTHY", 60, "the endpoint HEALTHY on Ray")
    assert [a for a in apps() if a.startswith("fake-")], apps()  # one Serve application per replica
    created, key = _call(server.url, "/api/v1/keys", admin, {"name": "client"})
    assert created == 201, key
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, answer = _call(server.url, "/v1/chat/completions", key["key"], chat)
    assert status == 200 and answer["model"] == "fake", answer  # the worker's served-name renamed to the endpoint's
    assert _call(server.url, "/v1/chat/completions", None, chat)[0] == 401
    assert _call(server.url, "/v1/chat/completions", key["key"], {**chat, "model": "fake-alias"})[0] == 200

    # A stream arrives chunk by chunk through the gateway, Serve's proxy and the replica.
    body = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 6, "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json",
                                                                                      "Authorization": f"Bearer {key['key']}"})
    arrivals = []
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 0.15, arrivals

    # kill -9 of the worker: Serve replaces its replica, and the endpoint answers again.
    (worker,) = wait_for(lambda: _worker_pids("fake-"), timeout=10, what="the worker under its Serve replica")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200 and _worker_pids("fake-") not in ([], [worker]),
             timeout=20, interval=0.5, what="serving again after kill -9 of the worker")
    # kill -9 of the replica's actor: Ray ends its group (the worker with it), Serve starts another, the endpoint answers again.
    (second,) = _worker_pids("fake-")
    actor = psutil.Process(second).parent()
    assert actor is not None and "ServeReplica" in " ".join(actor.cmdline())
    actor.kill()
    wait_for(lambda: not _alive(second), timeout=15, what="the killed actor's worker gone")
    until(lambda: _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200 and _worker_pids("fake-") not in ([], [second]), 60,
          "serving again after kill -9 of the replica's actor")

    # The appliance's autoscaler: a stream in flight scales 1 → 2 (a second Serve application), its end back to 1.
    long = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 500, "stream": True}).encode()  # 25 s at 20 tokens/s
    stream = threading.Thread(target=lambda: urllib.request.urlopen(urllib.request.Request(
        server.url + "/v1/completions", data=long, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key['key']}"}),
        timeout=60).read())
    stream.start()
    until(lambda: healthy() == 2 and len([a for a in apps() if a.startswith("fake-")]) == 2, 40, "fake scaled out to 2 replicas on Ray")
    stream.join(timeout=60)
    until(lambda: healthy() == 1 and len([a for a in apps() if a.startswith("fake-")]) == 1, 40, "back to 1")

    # Deleted: its Serve applications and every worker process go.
    assert _call(server.url, "/api/v1/endpoints/fake", admin, method="DELETE")[0] in (200, 202, 204)
    until(lambda: not [a for a in apps() if a.startswith("fake-")] and not _worker_pids("fake-"), 40, "the endpoint's applications and workers gone")
    assert server.stop() == 0

    # route = "direct": the gateway calls the worker at the address its replica gives, and finds it again after a kill -9.
    (tmp_path / "direct").mkdir()
    config = server_config(tmp_path / "direct", f'[backend]\nkind = "ray"\naddress = "{cluster["dashboard"]}"\nproxy = "http://127.0.0.1:{cluster["serve_port"]}"\n'
                           f'route = "direct"\n[[endpoints]]\nname = "fake"\nmodel_folder = "{folder}"\nunhealthy_replace_after = 30\n')
    server = server_factory(config, tmp_path / "direct" / "state").start(timeout=60)
    admin = (tmp_path / "direct" / "state" / "admin.key").read_text().strip()

    def address() -> str:
        rows = (_call(server.url, "/api/v1/endpoints/fake/replicas", admin)[1] or {}).get("data", [])
        return next((r["address"] or "" for r in rows if r["state"] == "HEALTHY"), "")

    until(lambda: address().startswith("http://127.0.0.1:") and "/replicas/" not in address(), 60, "the worker's own address, routed to")
    first = address()
    key = _call(server.url, "/api/v1/keys", admin, {"name": "client"})[1]
    assert _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200
    (worker,) = _worker_pids("fake-")
    os.kill(worker, signal.SIGKILL)
    until(lambda: address() not in ("", first) and _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200, 40,
          "serving at the restarted worker's new address")
    assert server.stop() == 0


def test_the_ray_backend_without_ray_installed_is_a_one_line_error(tmp_path: Path) -> None:
    hide = tmp_path / "no-ray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    config = server_config(tmp_path, '[backend]\nkind = "ray"\n')
    env = {**os.environ, "PYTHONPATH": f"{hide}:{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "appliance", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "pip install 'appliance[ray]'" in said[0] and "Traceback" not in done.stderr, done.stderr


def test_the_ray_backends_addresses_must_be_urls() -> None:
    with pytest.raises(ValidationError, match="(?s)backend.address.*must be an http:// or https:// URL"):
        Config.model_validate({"backend": {"kind": "ray", "address": "127.0.0.1:8265"}})
    assert Config.model_validate({"backend": {"kind": "ray", "proxy": "http://10.0.0.5:8000/"}}).backend.proxy == "http://10.0.0.5:8000"


async def test_an_unreachable_ray_cluster_fails_the_replica_and_says_why(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve.schema")
    closed = _free_port()
    admin = await start_app(make_config({"workers": WORKERS, "backend": {"kind": "ray", "address": f"http://127.0.0.1:{closed}"}}))
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "far", "model_folder": str(fake_folder(tmp_path, "far"))})
    assert status == 201, body

    async def failed() -> Any:
        rows = (await admin.call("GET", "/api/v1/endpoints/far/replicas"))[1]["data"]
        return [r for r in rows if f"Ray's dashboard at http://127.0.0.1:{closed} could not be reached" in (r.get("last_error") or "")]

    await async_wait_for(failed, timeout=20, what="the replica's failure naming the unreachable dashboard")


async def test_a_replica_whose_serve_application_fails_or_vanishes_ends_as_a_crash(tmp_path: Path) -> None:
    """The Ray backend's reading of Serve's statuses, with no cluster: DEPLOY_FAILED, or gone after it was seen."""
    from appliance.control.host.replica_log import ReplicaLog
    from appliance.control.ray.backend import RayBackend, RayWorker

    backend = RayBackend(f"http://127.0.0.1:{_free_port()}", "http://127.0.0.1:8000")  # nothing listens: every put is refused, and said
    await backend.open()
    try:
        sinks = {name: ReplicaLog(tmp_path / f"{name}.log", 1 << 20, 1) for name in ("failed", "gone", "fine")}
        workers = {name: RayWorker(backend, name, sinks[name]) for name in sinks}
        backend._workers.update(workers)
        backend._apps.update({name: {"name": name} for name in workers})
        backend._statuses = {"failed": {"status": "DEPLOY_FAILED", "message": "worker of x exited with code 3 before it was ready"},
                             "gone": {"status": "RUNNING"}, "fine": {"status": "RUNNING"}}
        backend._judge()
        assert workers["failed"].returncode == 1 and "failed" not in backend._apps
        assert workers["gone"].returncode is None and workers["gone"].seen
        backend._statuses = {"fine": {"status": "DEPLOYING"}}  # Serve restarting its replica: still the same worker
        backend._judge()
        assert workers["gone"].returncode == 1 and workers["fine"].returncode is None
        assert await asyncio.wait_for(workers["failed"].wait(), 1) == 1
        await async_wait_for(lambda: any("exited with code 3" in line for line in sinks["failed"].last_lines(5)), timeout=5, what="why, in its log")
        await async_wait_for(lambda: any("gone from the cluster" in line for line in sinks["gone"].last_lines(5)), timeout=5, what="why, in its log")
    finally:
        await backend.close()
