"""Endpoints as a Ray Serve config (Serve's `ServeDeploySchema`): one application per endpoint, whose one
deployment runs the appliance's own worker (control/ray/replica.py). Pure: the endpoints in, the config
and a warning for every setting Serve has no equivalent for (never a silent drop).

docs/ray.md has the mapping as a table; keep the two in step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.domain.scaling import Rule
from appliance.domain.specs import MAX_REPLICAS, EndpointConfig

IMPORT_PATH = "appliance.control.ray.replica:build"  # the application builder each node imports
POLICY_PATH = "appliance.control.ray.policy:AppliancePolicy"  # the autoscaling policy Serve's controller runs the rules with
WORKER_PATH = "/-/appliance/worker"  # a replica whose worker listens on its node's address answers it here (the Ray backend's direct route)
ROUTER_PATH = "appliance.control.ray.router:ApplianceRouter"  # session affinity and prefix routing in Serve's routers
DEPLOYMENT = "Worker"  # the deployment class in control/ray/replica.py
UNBOUNDED_ONGOING = 1000  # max_concurrency unset: Serve has no "unlimited" (its default is 5)
_HEALTH_MARGIN = 1.0  # seconds Serve waits beyond the probe's own max_wait_time


def serve_config(endpoints: Sequence[EndpointConfig], *, host: str = "127.0.0.1", port: int = 8000,
                 rules: Mapping[str, Sequence[Rule]] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The Serve config for `endpoints`, proxied on `host:port` (the head node only), and the warnings.
    `rules`: each endpoint's autoscaling rules, run by the appliance's policy in Serve's controller."""
    warnings = [
        "Serve's HTTP port has no API keys, limits or usage accounting: keep it private "
        f"(it listens on {host}:{port}) and put the appliance's gateway in front of it",
    ]
    if host in ("0.0.0.0", "::"):
        warnings.append(f"http_options.host {host}: Serve's proxy answers anyone who can reach this box")
    apps = []
    for c in endpoints:
        own = [r for r in (rules or {}).get(c.name, ()) if r.enabled]
        deployment, notes = _deployment(c, own)
        warnings += [f"endpoint {c.name}: {n}" for n in notes]
        args: dict[str, Any] = {"endpoint": c.model_dump(mode="json")}
        if own:
            args["stats"] = [list(m) for m in dict.fromkeys(r.metric for r in own)]
        apps.append({"name": c.name, "route_prefix": f"/endpoints/{c.name}", "import_path": IMPORT_PATH, "args": args, "deployments": [deployment]})
    config = {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": apps}
    return config, warnings


def replica_application(c: EndpointConfig, name: str, *, direct: bool = False) -> dict[str, Any]:
    """One replica of `c` as a Serve application of its own, route prefix `/replicas/{name}`: the Ray backend
    of `appliance serve` (control/ray/backend.py), where the appliance scales, routes and drains, and Serve
    places, restarts and checks the health of that one replica. `direct`: its worker listens on its node's
    address, for a gateway that calls it there."""
    deployment, _ = _deployment(c, [])
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 1
    deployment["max_surge_percent"] = 0  # one replica, replaced in place (the appliance rolls endpoints itself)
    args: dict[str, Any] = {"endpoint": c.model_dump(mode="json"), **({"listen": "node"} if direct else {})}
    return {"name": name, "route_prefix": f"/replicas/{name}", "import_path": IMPORT_PATH, "args": args, "deployments": [deployment]}


def _deployment(c: EndpointConfig, rules: Sequence[Rule]) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    d: dict[str, Any] = {"name": DEPLOYMENT}
    scales = c.min_replicas != c.max_replicas or c.wakes
    if rules:
        d["autoscaling_config"] = _by_rules(c, rules)
        notes.append(f"scales by its {len(rules)} autoscaling rule(s), run by the appliance's policy in Serve's controller; "
                     "gateway latency and TTFT are each replica's own, averaged over the replicas")
    elif scales:
        auto: dict[str, Any] = {
            "min_replicas": c.min_replicas, "max_replicas": c.max_replicas, "initial_replicas": 0 if c.on_demand else c.replicas,
            "target_ongoing_requests": max(1, c.max_concurrency // 2) if c.max_concurrency else 2,  # Serve's default without a cap
        }
        if c.idle_timeout_seconds is not None and c.min_replicas == 0:
            auto["downscale_to_zero_delay_s"] = c.idle_timeout_seconds  # keep_alive
        d["autoscaling_config"] = auto
        notes.append(
            "scales by Serve's own policy (requests in flight per replica, target_ongoing_requests) between "
            f"{c.min_replicas} and {c.max_replicas}; only rules declared in the config file are exported, not those made through the API"
        )
    else:
        d["num_replicas"] = c.replicas
    if c.routing != "least_outstanding":
        d["request_router_config"] = {"request_router_class": ROUTER_PATH,
                                      "request_router_kwargs": {"routing": c.routing, "overload_factor": c.prefix_overload_factor}}
        notes.append(f"routing {c.routing}: by the key in X-Appliance-Route-Key or X-Session-ID (Serve routes before the body is read"
                     + (": a prompt's prefix is a key only when the appliance's gateway sets it)" if c.routing == "prefix" else ")"))
    d["max_ongoing_requests"] = c.max_concurrency or UNBOUNDED_ONGOING
    d["max_queued_requests"] = c.queue_size
    d["graceful_shutdown_timeout_s"] = c.drain_timeout_seconds
    d["max_surge_percent"] = min(100, math.ceil(100 * c.max_surge / max(1, c.replicas)))
    check = c.health_check
    d["health_check_period_s"] = max(check.interval, 0.1)
    d["health_check_timeout_s"] = check.max_wait_time + _HEALTH_MARGIN
    d["ray_actor_options"], more = _actor_options(c)
    notes += more
    notes += _unmapped(c)
    return d, notes


def _by_rules(c: EndpointConfig, rules: Sequence[Rule]) -> dict[str, Any]:
    """Serve's autoscaling config that hands every decision to the appliance's policy: Serve's own delays off
    (the rules' cooldowns and windows brake), the bounds the widest of the rules' and the endpoint's."""
    idle = c.idle_timeout_seconds if c.min_replicas == 0 else None
    low = min([c.min_replicas] + [r.min_replicas for r in rules if r.min_replicas is not None])
    high = min(MAX_REPLICAS, max([c.max_replicas] + [r.max_replicas for r in rules if r.max_replicas is not None]))
    window = max(r.window_seconds for r in rules)
    return {
        "min_replicas": low, "max_replicas": high, "initial_replicas": 0 if c.on_demand else c.replicas,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "look_back_period_s": window,
        "metrics_interval_s": max(0.5, min(10.0, min(r.window_seconds for r in rules) / 4)),  # several figures per window
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {
                "rules": [dataclasses.asdict(r) for r in rules], "policy": c.autoscaling_policy,
                "min_replicas": c.min_replicas, "max_replicas": c.max_replicas, "idle_timeout": idle,
            },
        },
    }


def _actor_options(c: EndpointConfig) -> tuple[dict[str, Any], list[str]]:
    res = c.resources
    notes: list[str] = []
    options: dict[str, Any] = {"num_cpus": res.cpu if res.cpu is not None else 1}
    if res.gpus:
        options["num_gpus"] = res.gpus
    elif res.gpu_share:
        options["num_gpus"] = res.gpu_share
        notes.append(f"gpu_share {res.gpu_share:g}: Ray does not isolate fractional GPUs; the engine is told its share (vLLM: --gpu-memory-utilization)")
    if res.mem:
        options["memory"] = int(res.mem)
    if res.gpu_memory:
        notes.append("resources.gpu_memory is not counted by Ray: place by gpu_share or whole GPUs")
    if res.gpu_name:
        notes.append(f"resources.gpu_name {res.gpu_name!r}: Ray places by GPU count; use a node label instead")
    return options, notes


def _unmapped(c: EndpointConfig) -> list[str]:
    """Settings with no Serve equivalent, when set to anything but their default."""
    notes = []
    if c.aliases:
        notes.append(f"aliases {', '.join(c.aliases)} are the appliance gateway's: Serve knows the endpoint by its route only")
    if c.queue_timeout_seconds != 30.0:
        notes.append(f"queue_timeout_seconds {c.queue_timeout_seconds:g}: Serve has no queue timeout")
    if c.wakes and c.wake_timeout_seconds != 600.0:
        notes.append(f"wake_timeout_seconds {c.wake_timeout_seconds:g}: Serve has no start timeout")
    if c.pin or c.priority:
        notes.append("pin and priority: Serve evicts nothing for another application")
    if c.runtime == "vllm" and c.sleep and c.resources.gpu_share:
        notes.append("sleep: Serve stops evicted replicas; vLLM's sleep mode is not used")
    return notes
