"""Autoscaling rules and the pure decide().

Rules follow Backend.AI's (metric source and name, comparator, threshold, step size,
min/max replicas, cooldown), with two differences: a step that would leave [min, max] is
clamped to the bound instead of being skipped, and the metric is averaged over a window.
decide() is a pure function of (rules, metrics, state, now).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from appliance.domain.specs import Model

Comparator = Literal["LESS_THAN", "LESS_THAN_OR_EQUAL", "GREATER_THAN", "GREATER_THAN_OR_EQUAL"]
Source = Literal["gpu", "kernel", "inference", "gateway"]

# Metrics the appliance measures itself, per source, with their unit. `inference` takes any
# Prometheus metric name the replicas export.
KNOWN_METRICS: dict[str, dict[str, str]] = {
    "gpu": {"gpu_util": "% busy (NVML), average of the replica's GPUs", "gpu_mem": "% of GPU memory used"},
    "kernel": {"cpu_util": "% of one core, the replica's whole process tree", "mem_rss": "bytes resident, process tree"},
    "gateway": {
        "latency_p50": "seconds, request latency median over the window",
        "latency_p95": "seconds, request latency 95th percentile",
        "ttft_p95": "seconds, time to first token (streams) / first byte, 95th percentile",
        "inflight_per_replica": "requests in flight per routable replica",
        "rps_per_replica": "requests per second per routable replica",
        "queue_length": "requests waiting for a replica",
    },
}
_PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _check_metric(source: str, name: str) -> None:
    if source == "inference":
        if not _PROM_NAME.match(name):
            raise ValueError(f"{name!r} is not a Prometheus metric name")
    elif name not in KNOWN_METRICS[source]:
        raise ValueError(f"{source} metrics are {', '.join(KNOWN_METRICS[source])} (got {name!r})")


class RuleSpec(Model):
    """An autoscaling rule as a user states it."""

    metric_source: Source = Field(description="gpu | kernel | inference (the replicas' /metrics) | gateway (measured by the appliance)")
    metric_name: str = Field(min_length=1, description="e.g. gpu_util, cpu_util, vllm:num_requests_waiting, latency_p95")
    comparator: Comparator
    threshold: float
    step_size: int = Field(description="replicas added (positive) or removed (negative) when the rule fires")
    min_replicas: int | None = Field(None, ge=0, description="lower bound; default the endpoint's min_replicas")
    max_replicas: int | None = Field(None, ge=0, description="upper bound; default the endpoint's max_replicas")
    cooldown_seconds: float = Field(300.0, ge=0, description="after the rule fired, or the endpoint scaled the same way, wait this long")
    window_seconds: float = Field(30.0, gt=0, description="the metric is averaged over this many seconds")
    enabled: bool = True

    @field_validator("step_size")
    @classmethod
    def _step(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must not be 0: positive scales out, negative scales in")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RuleSpec":
        _check_metric(self.metric_source, self.metric_name)
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be ≤ max_replicas ({self.max_replicas})")
        return self


class RulePatch(Model):
    """Fields of a rule to change; the result is validated as a whole."""

    metric_source: Source | None = None
    metric_name: str | None = None
    comparator: Comparator | None = None
    threshold: float | None = None
    step_size: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    cooldown_seconds: float | None = None
    window_seconds: float | None = None
    enabled: bool | None = None


def new_rule_id() -> str:
    return f"asr-{secrets.token_hex(4)}"


# --- the pure decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    id: str
    metric_source: str
    metric_name: str
    comparator: str
    threshold: float
    step_size: int
    min_replicas: int | None
    max_replicas: int | None
    cooldown_seconds: float
    window_seconds: float
    enabled: bool = True

    @property
    def metric(self) -> tuple[str, str, float]:
        return (self.metric_source, self.metric_name, self.window_seconds)

    @property
    def direction(self) -> int:
        return 1 if self.step_size > 0 else -1

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> "Rule":
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ScaleState:
    replicas: int  # the desired count now
    min_replicas: int  # the endpoint's bounds: defaults of rules that state none
    max_replicas: int
    last_fired: Mapping[str, float] = field(default_factory=dict)  # rule id → when it last changed the count
    notes: Mapping[str, str] = field(default_factory=dict)  # rule id → suppression last recorded (said once, not every tick)
    idle_timeout: float | None = None
    last_activity: float | None = None  # last request, or when the endpoint last woke
    inflight: int = 0


@dataclass(frozen=True)
class Verdict:
    rule: str | None  # None: the idle timeout
    metric: str
    value: float | None
    comparator: str | None
    threshold: float | None
    result: Literal["scale", "cooldown", "bound", "missing", "outvoted"]
    from_replicas: int
    to_replicas: int
    reason: str

    def details(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "metric": self.metric, "value": self.value, "comparator": self.comparator, "threshold": self.threshold,
            "result": self.result, "from": self.from_replicas, "to": self.to_replicas, "reason": self.reason,
        }


@dataclass(frozen=True)
class Decision:
    target: int
    winner: Verdict | None
    verdicts: tuple[Verdict, ...]  # every rule that fired, was suppressed or had no metric
    notes: Mapping[str, str]  # the next state's notes
    record: tuple[Verdict, ...]  # suppressions not recorded before


_COMPARE = {
    "LESS_THAN": (lambda v, t: v < t, "<"),
    "LESS_THAN_OR_EQUAL": (lambda v, t: v <= t, "≤"),
    "GREATER_THAN": (lambda v, t: v > t, ">"),
    "GREATER_THAN_OR_EQUAL": (lambda v, t: v >= t, "≥"),
}


def fires(comparator: str, value: float, threshold: float) -> bool:
    return _COMPARE[comparator][0](value, threshold)


def _last_in_direction(rules: Sequence[Rule], last_fired: Mapping[str, float], direction: int) -> float | None:
    times = [last_fired[r.id] for r in rules if r.direction == direction and r.id in last_fired]
    return max(times) if times else None


def _judge(rule: Rule, rules: Sequence[Rule], metrics: Mapping[tuple[str, str, float], float], state: ScaleState, now: float) -> Verdict | None:
    name = f"{rule.metric_source}/{rule.metric_name}"
    n = state.replicas

    def verdict(result: Any, to: int, reason: str, value: float | None = None) -> Verdict:
        return Verdict(rule.id, name, value, rule.comparator, rule.threshold, result, n, to, reason)

    value = metrics.get(rule.metric)
    if value is None:
        return verdict("missing", n, f"no value of {name} over the last {rule.window_seconds:g}s")
    if not fires(rule.comparator, value, rule.threshold):
        return None
    cond = f"{name} = {value:.4g} {_COMPARE[rule.comparator][1]} {rule.threshold:g} over {rule.window_seconds:g}s"
    low = state.min_replicas if rule.min_replicas is None else rule.min_replicas
    high = state.max_replicas if rule.max_replicas is None else rule.max_replicas
    if rule.direction > 0:
        target = min(n + rule.step_size, high)
        if target <= n:
            return verdict("bound", n, f"{cond}, but already at max_replicas {high}", value)
    else:
        target = max(n + rule.step_size, low)
        if target >= n:
            return verdict("bound", n, f"{cond}, but already at min_replicas {low}", value)
    clamped = f" (step {rule.step_size:+d} clamped to the bound)" if target != n + rule.step_size else ""
    for since, what in ((state.last_fired.get(rule.id), "this rule"), (_last_in_direction(rules, state.last_fired, rule.direction), "the endpoint")):
        if since is not None and now - since < rule.cooldown_seconds:
            way = "out" if rule.direction > 0 else "in"
            wait = rule.cooldown_seconds - (now - since)
            return verdict("cooldown", n, f"{cond}, but {what} scaled {way} {now - since:.0f}s ago (cooldown {rule.cooldown_seconds:g}s, {wait:.0f}s left)", value)
    return verdict("scale", target, f"{cond}: {n} → {target}{clamped}", value)


def decide(rules: Sequence[Rule], metrics: Mapping[tuple[str, str, float], float], state: ScaleState, now: float) -> Decision:
    """The next desired count of one endpoint. Scaling out beats scaling in; within one direction the
    largest step wins. Suppressed changes and missing metrics come back once each in `record`."""
    active = [r for r in rules if r.enabled]
    verdicts = [v for v in (_judge(r, active, metrics, state, now) for r in active) if v is not None]
    out = [v for v in verdicts if v.result == "scale" and v.to_replicas > state.replicas]
    inward = [v for v in verdicts if v.result == "scale" and v.to_replicas < state.replicas]
    winner: Verdict | None = None
    if out:
        winner = max(out, key=lambda v: v.to_replicas)  # max() keeps the first of equals: rule order breaks ties
    else:
        idle = _idle(state, now)
        if idle is not None:
            winner = idle
        elif inward:
            winner = min(inward, key=lambda v: v.to_replicas)
    if winner is not None:
        verdicts = [v if v is winner or v.result != "scale" else replace(v, result="outvoted", to_replicas=state.replicas) for v in verdicts]
        if winner.rule is None:
            verdicts.append(winner)
    notes: dict[str, str] = {}
    record: list[Verdict] = []
    for v in verdicts:
        if v.rule is None or v.result in ("scale", "outvoted"):
            continue
        notes[v.rule] = v.result
        if state.notes.get(v.rule) != v.result:
            record.append(v)
    target = winner.to_replicas if winner is not None else state.replicas
    return Decision(target, winner, tuple(verdicts), notes, tuple(record))


def _idle(state: ScaleState, now: float) -> Verdict | None:
    if state.idle_timeout is None or state.replicas == 0 or state.inflight or state.last_activity is None:
        return None
    quiet = now - state.last_activity
    if quiet < state.idle_timeout:
        return None
    reason = f"no request for {quiet:.0f}s (idle_timeout_seconds {state.idle_timeout:g}): {state.replicas} → 0"
    return Verdict(None, "idle", quiet, "GREATER_THAN_OR_EQUAL", state.idle_timeout, "scale", state.replicas, 0, reason)


def window_average(samples: Sequence[tuple[float, float]], now: float, window: float) -> float | None:
    """Mean of the (time, value) samples taken in the last `window` seconds; None if there are none."""
    values = [v for t, v in samples if now - t <= window]
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats going astray
    return ordered[int(rank) - 1]
