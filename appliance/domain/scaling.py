"""Autoscaling rules and the pure decide().

Rules follow Backend.AI's (metric source and name, comparator, threshold, step size, min/max
replicas, cooldown); its names are accepted in any case, as its enums are. Sources are stored
lowercase (its enum values), comparators uppercase (its member names).

Two policies combine an endpoint's rules (EndpointSpec.autoscaling_policy):
- "appliance" (default): scale-out beats scale-in, the largest step wins, a step that would
  leave [min, max] is clamped to the bound, cooldown per rule and per direction;
- "backend.ai": the first rule that fires wins (creation order), a step that would leave the
  rule's bounds skips that rule, cooldown per rule (its last trigger time).
Either way a rule without bounds of its own is bounded by the endpoint's range, and the metric
is averaged over the rule's window. decide() is a pure function of (rules, metrics, state, now).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from appliance.domain.specs import INT64_MAX, MAX_REPLICAS, Model

Comparator = Literal["LESS_THAN", "LESS_THAN_OR_EQUAL", "GREATER_THAN", "GREATER_THAN_OR_EQUAL"]
Source = Literal["gpu", "kernel", "inference", "gateway", "inference_framework", "prometheus"]
SOURCES: tuple[str, ...] = Source.__args__  # type: ignore[attr-defined]
COMPARATORS: tuple[str, ...] = Comparator.__args__  # type: ignore[attr-defined]
# Sources whose metric_name is any series the replicas' /metrics export.
SERIES_SOURCES = frozenset({"inference", "inference_framework", "prometheus"})

# Metrics the appliance measures itself, per source, with their unit. Kernel names are
# Backend.AI's live-stat keys, compared as its `pct` (used / capacity × 100), plus mem_rss.
KNOWN_METRICS: dict[str, dict[str, str]] = {
    "gpu": {"gpu_util": "% busy (NVML), average of the replica's GPUs", "gpu_mem": "% of GPU memory used"},
    "kernel": {
        "cpu_util": "% of one core (200 = two cores busy), the replica's whole process tree",
        "mem": "% of the replica's memory limit (resources.mem, else the box's memory) resident in its process tree",
        "cuda_util": "% busy of the replica's GPUs (NVML)",
        "cuda_mem": "% of the replica's GPU memory used (NVML)",
        "mem_rss": "bytes resident, process tree",
    },
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
_BAI_SOURCES = "KERNEL, INFERENCE_FRAMEWORK, PROMETHEUS"


def _source(value: Any) -> Any:
    # Backend.AI's AutoScalingMetricSource is a CIStrEnum: "KERNEL", "kernel" and "Kernel" are one source.
    if not isinstance(value, str):
        return value
    if value.lower() not in SOURCES:
        raise ValueError(f"unknown metric source {value!r}: the appliance's gpu, kernel, inference, gateway, or Backend.AI's {_BAI_SOURCES} (any case)")
    return value.lower()


def _comparator(value: Any) -> Any:
    # Backend.AI's comparator values are lowercase ("greater_than"); the appliance has always said GREATER_THAN.
    if not isinstance(value, str):
        return value
    if value.upper() not in COMPARATORS:
        raise ValueError(f"unknown comparator {value!r}: one of {', '.join(COMPARATORS)} (any case)")
    return value.upper()


def _threshold(value: Any) -> Any:
    # Backend.AI takes the threshold as a string (a Decimal in its database): "5" and "0.5" are numbers here too.
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"must be a number (got {value!r})") from None


SourceName = Annotated[Source, BeforeValidator(_source)]
ComparatorName = Annotated[Comparator, BeforeValidator(_comparator)]
# The validator around the whole union, so a bad value gets one message, not one per member.
OptionalSource = Annotated[Source | None, BeforeValidator(_source)]
OptionalComparator = Annotated[Comparator | None, BeforeValidator(_comparator)]
Threshold = Annotated[float, BeforeValidator(_threshold)]


def _check_metric(source: str, name: str) -> None:
    if source in SERIES_SOURCES:
        if not _PROM_NAME.match(name):
            extra = " (the appliance has no Prometheus server: a prometheus rule names a series of the replicas' /metrics)" if source == "prometheus" else ""
            raise ValueError(f"{name!r} is not a Prometheus metric name{extra}")
    elif name not in KNOWN_METRICS[source]:
        raise ValueError(f"{source} metrics are {', '.join(KNOWN_METRICS[source])} (got {name!r})")


# Backend.AI's appproxy stored a runtime's families renamed: vllm: → vllm_, sglang: → sglang_, max: → max_.
_BAI_PREFIXES = (("vllm_", "vllm:"), ("sglang_", "sglang:"), ("max_", "max:"))
# vLLM renamed its KV-cache gauge; a rule written for either name works with both versions.
_ALIASES = {"vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc": "vllm:gpu_cache_usage_perc"}


def series_names(name: str) -> tuple[str, ...]:
    """The exposition names a rule's metric may be found under, first match wins: the name as written,
    then with Backend.AI's renaming undone (vllm_num_requests_waiting → vllm:num_requests_waiting),
    then vLLM's other name for the same gauge."""
    names = [name] + [native + name[len(bai):] for bai, native in _BAI_PREFIXES if name.startswith(bai)]
    names += [_ALIASES[n] for n in names if n in _ALIASES]
    return tuple(dict.fromkeys(names))


def per_route(values: Sequence[float | None], routes: int) -> float | None:
    """Backend.AI's INFERENCE_FRAMEWORK value: the total over the replicas that report the metric,
    divided by the endpoint's active routes (1 when there are none); None when no replica reports it."""
    present = [v for v in values if v is not None]
    return sum(present) / max(routes, 1) if present else None


def pct(used: float, capacity: float) -> float | None:
    """Backend.AI's live-stat `pct`: used / capacity × 100; None without a capacity."""
    return 100.0 * used / capacity if capacity > 0 else None


class RuleSpec(Model):
    """An autoscaling rule as a user states it."""

    metric_source: SourceName = Field(
        description="gpu | kernel (Backend.AI's KERNEL) | inference (the replicas' /metrics, mean per replica) | "
        "inference_framework (the same series, total ÷ routes as Backend.AI) | prometheus (a series of the replicas' /metrics) | gateway; any case"
    )
    metric_name: str = Field(min_length=1, description="e.g. cpu_util, mem, gpu_util, vllm:num_requests_waiting or vllm_num_requests_waiting, latency_p95")
    comparator: ComparatorName
    threshold: Threshold = Field(description="a number, or a numeric string as Backend.AI takes it")
    step_size: int = Field(ge=-INT64_MAX, le=INT64_MAX, description="replicas added (positive) or removed (negative) when the rule fires")
    min_replicas: int | None = Field(None, ge=0, le=INT64_MAX, description="lower bound; default the endpoint's min_replicas")
    max_replicas: int | None = Field(None, ge=0, le=INT64_MAX, description=f"upper bound; default the endpoint's max_replicas; at most {MAX_REPLICAS} acts")
    cooldown_seconds: float = Field(300.0, ge=0, description="after the rule fired (appliance policy: or the endpoint scaled the same way), wait this long")
    window_seconds: float = Field(30.0, gt=0, description="the metric is averaged over this many seconds")
    enabled: bool = True

    @field_validator("step_size")
    @classmethod
    def _step(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must not be 0: positive scales out, negative scales in")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RuleSpec:
        _check_metric(self.metric_source, self.metric_name)
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be ≤ max_replicas ({self.max_replicas})")
        return self


class RulePatch(Model):
    """Fields of a rule to change; the result is validated as a whole."""

    metric_source: OptionalSource = None
    metric_name: str | None = None
    comparator: OptionalComparator = None
    threshold: Threshold | None = None
    step_size: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    cooldown_seconds: float | None = None
    window_seconds: float | None = None
    enabled: bool | None = None


def new_rule_id() -> str:
    return f"asr-{secrets.token_hex(4)}"


def declared_rule_prefix(endpoint: str) -> str:
    return f"asr-cfg-{endpoint}-"


def declared_rule_rows(endpoint: str, specs: Sequence[RuleSpec]) -> list[dict[str, Any]]:
    """The rules declared with an endpoint in the config file, as stored: ids stable by their place in the file."""
    return [{"id": f"{declared_rule_prefix(endpoint)}{i + 1}", "endpoint": endpoint, **r.model_dump()} for i, r in enumerate(specs)]


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
    def of(cls, row: Mapping[str, Any]) -> Rule:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ScaleState:
    replicas: int  # the desired count now
    min_replicas: int  # the endpoint's bounds: those of rules that state none
    max_replicas: int
    last_fired: Mapping[str, float] = field(default_factory=dict)  # rule id → when it last changed the count
    notes: Mapping[str, str] = field(default_factory=dict)  # rule id → suppression last recorded (said once, not every tick)
    idle_timeout: float | None = None
    last_activity: float | None = None  # last request, or when the endpoint last woke
    inflight: int = 0
    policy: str = "appliance"  # how rules combine: "appliance" or "backend.ai"


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


def bounds(rule: Rule, state: ScaleState) -> tuple[int, int, str]:
    """The rule's [low, high], each its own or else the endpoint's, and words saying whose. A rule's own
    bound may be any number (Backend.AI users write a large one for "no limit"); no more than MAX_REPLICAS acts."""
    low = min(state.min_replicas if rule.min_replicas is None else rule.min_replicas, MAX_REPLICAS)
    high = min(state.max_replicas if rule.max_replicas is None else rule.max_replicas, MAX_REPLICAS)
    own = (rule.min_replicas is not None, rule.max_replicas is not None)
    whose = {(True, True): "the rule's", (False, False): "the endpoint's"}.get(own, "the rule's and the endpoint's")
    return low, high, whose


def _last_in_direction(rules: Sequence[Rule], last_fired: Mapping[str, float], direction: int) -> float | None:
    times = [last_fired[r.id] for r in rules if r.direction == direction and r.id in last_fired]
    return max(times) if times else None


def _judge(rule: Rule, rules: Sequence[Rule], metrics: Mapping[tuple[str, str, float], float], state: ScaleState, now: float) -> Verdict | None:
    """One rule's verdict under either policy; None when its condition does not hold."""
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
    low, high, whose = bounds(rule, state)
    way = "out" if rule.direction > 0 else "in"
    if state.policy == "backend.ai":
        # Backend.AI: new = max(0, current + step); outside the rule's bounds the rule is skipped, not clamped.
        target = max(0, n + rule.step_size)
        if target == n:
            return verdict("bound", n, f"{cond}, but already at 0 replicas", value)
        if not low <= target <= high:
            return verdict("bound", n, f"{cond}, but {n} → {target} would leave {whose} bounds [{low}, {high}]: rule skipped", value)
        clamped = ""
        waits = [(state.last_fired.get(rule.id), "this rule")]  # cooldown per rule, from its last trigger time
    else:
        if rule.direction > 0:
            target = min(n + rule.step_size, high)
            if target <= n:
                return verdict("bound", n, f"{cond}, but already at {whose} max_replicas {high}", value)
        else:
            target = max(n + rule.step_size, low)
            if target >= n:
                return verdict("bound", n, f"{cond}, but already at {whose} min_replicas {low}", value)
        clamped = f" (step {rule.step_size:+d} clamped to the bound)" if target != n + rule.step_size else ""
        waits = [(state.last_fired.get(rule.id), "this rule"), (_last_in_direction(rules, state.last_fired, rule.direction), "the endpoint")]
    for since, what in waits:
        if since is not None and now - since < rule.cooldown_seconds:
            wait = rule.cooldown_seconds - (now - since)
            return verdict("cooldown", n, f"{cond}, but {what} scaled {way} {now - since:.0f}s ago (cooldown {rule.cooldown_seconds:g}s, {wait:.0f}s left)", value)
    return verdict("scale", target, f"{cond}: {n} → {target}{clamped}", value)


def _largest_step(verdicts: Sequence[Verdict], state: ScaleState, now: float) -> Verdict | None:
    # The appliance's policy: scaling out beats the idle timeout, which beats scaling in; the largest step wins.
    out = [v for v in verdicts if v.result == "scale" and v.to_replicas > state.replicas]
    inward = [v for v in verdicts if v.result == "scale" and v.to_replicas < state.replicas]
    if out:
        return max(out, key=lambda v: v.to_replicas)  # max() keeps the first of equals: rule order breaks ties
    return _idle(state, now) or (min(inward, key=lambda v: v.to_replicas) if inward else None)


def decide(rules: Sequence[Rule], metrics: Mapping[tuple[str, str, float], float], state: ScaleState, now: float) -> Decision:
    """The next desired count of one endpoint under its policy (see the module's docstring). Rules come
    in creation order. Suppressed changes and missing metrics come back once each in `record`."""
    active = [r for r in rules if r.enabled]
    verdicts: list[Verdict] = []
    winner: Verdict | None = None
    looked = {r.id for r in active}
    if state.policy == "backend.ai":
        looked = set()
        for rule in active:  # the first rule that fires and passes its bounds and cooldown wins; later ones are not looked at
            looked.add(rule.id)
            v = _judge(rule, active, metrics, state, now)
            if v is not None:
                verdicts.append(v)
                if v.result == "scale":
                    winner = v
                    break
        if winner is None or winner.to_replicas < state.replicas:  # the idle timeout is the appliance's: it beats a scale-in here too
            winner = _idle(state, now) or winner
    else:
        verdicts = [v for v in (_judge(r, active, metrics, state, now) for r in active) if v is not None]
        winner = _largest_step(verdicts, state, now)
    if winner is not None:
        verdicts = [v if v is winner or v.result != "scale" else replace(v, result="outvoted", to_replicas=state.replicas) for v in verdicts]
        if winner.rule is None:
            verdicts.append(winner)
    # A rule not looked at (after the winner, Backend.AI's way) keeps its note, so it is not recorded again.
    notes: dict[str, str] = {r.id: state.notes[r.id] for r in active if r.id not in looked and r.id in state.notes}
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
