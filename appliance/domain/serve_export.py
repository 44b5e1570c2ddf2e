"""Endpoints as a Ray Serve config (Serve's `ServeDeploySchema`): one application per endpoint, whose one
deployment runs the appliance's own worker (control/ray/replica.py). Pure: the endpoints in, the config
and a warning for every setting Serve has no equivalent for (never a silent drop).

docs/ray.md has the mapping as a table; keep the two in step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from appliance.domain.specs import EndpointConfig

IMPORT_PATH = "appliance.control.ray.replica:build"  # the application builder each node imports
DEPLOYMENT = "Worker"  # the deployment class in control/ray/replica.py
UNBOUNDED_ONGOING = 1000  # max_concurrency unset: Serve has no "unlimited" (its default is 5)
_HEALTH_MARGIN = 1.0  # seconds Serve waits beyond the probe's own max_wait_time


def serve_config(endpoints: Sequence[EndpointConfig], *, host: str = "127.0.0.1", port: int = 8000) -> tuple[dict[str, Any], list[str]]:
    """The Serve config for `endpoints`, proxied on `host:port` (the head node only), and the warnings."""
    warnings = [
        "Serve's HTTP port has no API keys, limits or usage accounting: keep it private "
        f"(it listens on {host}:{port}) and put the appliance's gateway in front of it",
    ]
    if host in ("0.0.0.0", "::"):
        warnings.append(f"http_options.host {host}: Serve's proxy answers anyone who can reach this box")
    apps = []
    for c in endpoints:
        deployment, notes = _deployment(c)
        warnings += [f"endpoint {c.name}: {n}" for n in notes]
        apps.append({
            "name": c.name,
            "route_prefix": f"/endpoints/{c.name}",
            "import_path": IMPORT_PATH,
            "args": {"endpoint": c.model_dump(mode="json")},
            "deployments": [deployment],
        })
    config = {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": apps}
    return config, warnings


def _deployment(c: EndpointConfig) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    d: dict[str, Any] = {"name": DEPLOYMENT}
    scales = c.min_replicas != c.max_replicas or c.wakes
    if scales:
        auto: dict[str, Any] = {
            "min_replicas": c.min_replicas, "max_replicas": c.max_replicas, "initial_replicas": 0 if c.on_demand else c.replicas,
            "target_ongoing_requests": max(1, c.max_concurrency // 2) if c.max_concurrency else 2,  # Serve's default without a cap
        }
        if c.idle_timeout_seconds is not None and c.min_replicas == 0:
            auto["downscale_to_zero_delay_s"] = c.idle_timeout_seconds  # keep_alive
        d["autoscaling_config"] = auto
        notes.append(
            "scales by Serve's own policy (requests in flight per replica, target_ongoing_requests) between "
            f"{c.min_replicas} and {c.max_replicas}; autoscaling rules made through the API are not exported"
        )
    else:
        d["num_replicas"] = c.replicas
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
    if c.routing != "least_outstanding":
        notes.append(f"routing {c.routing}: Serve routes by its own choice of two replicas")
    if c.queue_timeout_seconds != 30.0:
        notes.append(f"queue_timeout_seconds {c.queue_timeout_seconds:g}: Serve has no queue timeout")
    if c.wakes and c.wake_timeout_seconds != 600.0:
        notes.append(f"wake_timeout_seconds {c.wake_timeout_seconds:g}: Serve has no start timeout")
    if c.pin or c.priority:
        notes.append("pin and priority: Serve evicts nothing for another application")
    if c.autoscaling_policy != "appliance":
        notes.append(f"autoscaling_policy {c.autoscaling_policy}: not exported (Serve's own policy scales)")
    if c.runtime == "vllm" and c.sleep and c.resources.gpu_share:
        notes.append("sleep: Serve stops evicted replicas; vLLM's sleep mode is not used")
    return notes
