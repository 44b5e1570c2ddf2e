"""The appliance's autoscaling rules as a Ray Serve autoscaling policy: Serve's controller calls it every
tick with the figures the replicas recorded (stats.py), and it answers with the count the same pure
`decide()` gives on one box: both policies (appliance, backend.ai), bounds, cooldowns per rule and per
direction, windows, the idle timeout.

Serve instantiates the class once per deployment with `policy_kwargs` (the endpoint's rules, written by
domain/serve_export.py) and keeps what it returns as state between ticks. Serve's own delays are set to 0
in the export: the rules' cooldowns and windows are the only brakes, as on one box."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.control.ray.stats import SERVED, key, windowed
from appliance.control.scaling.signals import mean
from appliance.domain.scaling import Rule, ScaleState, decide, per_route, window_average

log = logging.getLogger("ray.serve")
_STATE = "appliance"  # our part of Serve's policy_state (Serve keeps its own keys beside it)


class AppliancePolicy:
    def __init__(self, rules: Sequence[Mapping[str, Any]], policy: str = "appliance", min_replicas: int = 1, max_replicas: int = 1,
                 idle_timeout: float | None = None) -> None:
        self.rules = [Rule.of(r) for r in rules]
        self.policy = policy
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.idle_timeout = idle_timeout

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if getattr(ctx, "current_time", None) else time.time()
        policy_state = dict(ctx.policy_state or {})
        mine = dict(policy_state.get(_STATE) or {})
        raw = ctx.raw_metrics or {}
        running = max(1, len(ctx.running_replicas or ()))
        if ctx.total_num_requests > 0 or "last_activity" not in mine:
            mine["last_activity"] = now
        state = ScaleState(
            replicas=ctx.target_num_replicas, min_replicas=self.min_replicas, max_replicas=self.max_replicas,
            last_fired=dict(mine.get("last_fired") or {}), notes=dict(mine.get("notes") or {}), idle_timeout=self.idle_timeout,
            last_activity=mine["last_activity"], inflight=int(ctx.total_num_requests), policy=self.policy,
        )
        metrics = figures(self.rules, raw, now, running, queued=ctx.total_queued_requests)
        decision = decide(self.rules, metrics, state, now)
        mine["notes"] = dict(decision.notes)
        w = decision.winner
        if w is not None and w.to_replicas != w.from_replicas:
            log.info("appliance policy, %s: %s", ctx.app_name, w.reason)
            if w.rule is not None:
                mine["last_fired"] = {**state.last_fired, w.rule: now}
            mine["last_reason"] = w.reason
        policy_state[_STATE] = mine
        return decision.target, policy_state


def figures(rules: Sequence[Rule], raw: Mapping[str, Mapping[Any, Sequence[Any]]], now: float, running: int,
            queued: float) -> dict[tuple[str, str, float], float]:
    """Each enabled rule's metric over its window, combined over the replicas as the appliance's autoscaler
    does on one box; a metric no replica reported is left out (the rule says it is missing)."""
    out: dict[tuple[str, str, float], float] = {}
    for rule in rules:
        if not rule.enabled:
            continue
        s, n, w = rule.metric
        value: float | None
        if s == "gateway" and n == "queue_length":
            value = float(queued)
        elif s == "gateway" and n == "rps_per_replica":
            value = mean([_rate(series, now, w) for series in raw.get(SERVED, {}).values()])
        elif windowed(s, n):
            value = mean([series[-1].value for series in raw.get(key(s, n, w), {}).values() if series])
        else:
            per_replica = [window_average([(p.timestamp, p.value) for p in series], now, w) for series in raw.get(key(s, n), {}).values()]
            value = per_route(per_replica, running) if s == "inference_framework" else mean(per_replica)
        if value is not None:
            out[rule.metric] = value
    return out


def _in_window(series: Sequence[Any], now: float, window: float) -> list[Any]:
    return [p for p in series if now - p.timestamp <= window]


def _rate(series: Sequence[Any], now: float, window: float) -> float | None:
    """Requests per second from a replica's running total of requests served."""
    points = _in_window(series, now, window)
    if len(points) < 2 or points[-1].timestamp <= points[0].timestamp:
        return None
    return (points[-1].value - points[0].value) / (points[-1].timestamp - points[0].timestamp)
