"""decide(): the pure autoscaling decision, as tables (no servers, no sleeping)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from conftest import wait_for
from pydantic import ValidationError

from appliance.control.scaling.signals import ProcessTree, prometheus_value
from appliance.domain.scaling import Rule, RuleSpec, ScaleState, decide, percentile, window_average

NOW = 10_000.0
LAT = ("gateway", "latency_p95", 30.0)


def rule(rid: str = "r1", *, comparator: str = "GREATER_THAN", threshold: float = 0.5, step: int = 1, lo: int | None = None,
         hi: int | None = None, cooldown: float = 60.0, enabled: bool = True, metric: tuple[str, str, float] = LAT) -> Rule:
    source, name, window = metric
    return Rule(rid, source, name, comparator, threshold, step, lo, hi, cooldown, window, enabled)


def state(replicas: int = 1, lo: int = 1, hi: int = 4, **kw: object) -> ScaleState:
    return ScaleState(replicas=replicas, min_replicas=lo, max_replicas=hi, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("comparator", "value", "fires"),
    [
        ("LESS_THAN", 0.4, True), ("LESS_THAN", 0.5, False), ("LESS_THAN", 0.6, False),
        ("LESS_THAN_OR_EQUAL", 0.4, True), ("LESS_THAN_OR_EQUAL", 0.5, True), ("LESS_THAN_OR_EQUAL", 0.6, False),
        ("GREATER_THAN", 0.4, False), ("GREATER_THAN", 0.5, False), ("GREATER_THAN", 0.6, True),
        ("GREATER_THAN_OR_EQUAL", 0.4, False), ("GREATER_THAN_OR_EQUAL", 0.5, True), ("GREATER_THAN_OR_EQUAL", 0.6, True),
    ],
)
def test_every_comparator_below_at_and_above_the_threshold(comparator: str, value: float, fires: bool) -> None:
    d = decide([rule(comparator=comparator)], {LAT: value}, state(1), NOW)
    assert d.target == (2 if fires else 1)
    assert (d.winner is not None) == fires
    if fires:
        assert d.winner.result == "scale" and d.winner.value == value and d.winner.from_replicas == 1 and d.winner.to_replicas == 2


def test_scale_in_fires_below_and_respects_min() -> None:
    r = rule(comparator="LESS_THAN", threshold=0.1, step=-1)
    assert decide([r], {LAT: 0.05}, state(3), NOW).target == 2
    at_min = decide([r], {LAT: 0.05}, state(1), NOW)
    assert at_min.target == 1 and at_min.winner is None
    (v,) = at_min.record
    assert v.result == "bound" and "min_replicas 1" in v.reason


def test_cooldown_per_rule_and_per_direction_in_wall_time() -> None:
    r1, r2 = rule("r1", cooldown=60), rule("r2", cooldown=60, metric=("gateway", "queue_length", 30.0), threshold=5)
    metrics = {LAT: 1.0, ("gateway", "queue_length", 30.0): 10.0}
    # r1 fired 30 s ago: it is cooling down, and so is the endpoint's scale-out direction for r2.
    d = decide([r1, r2], metrics, state(2, last_fired={"r1": NOW - 30}), NOW)
    assert d.target == 2 and d.winner is None
    assert {v.rule: v.result for v in d.record} == {"r1": "cooldown", "r2": "cooldown"}
    assert "30s left" in d.record[0].reason
    # 60 s later both may fire again.
    assert decide([r1, r2], metrics, state(2, last_fired={"r1": NOW - 60}), NOW).target == 3
    # A scale-in rule is not held back by a recent scale-out.
    down = rule("down", comparator="LESS_THAN", threshold=0.1, step=-1, cooldown=60)
    assert decide([r1, down], {LAT: 0.05}, state(2, last_fired={"r1": NOW - 1}), NOW).target == 1


def test_a_step_beyond_the_bounds_is_clamped_to_the_bound() -> None:
    d = decide([rule(step=5, hi=3)], {LAT: 1.0}, state(1), NOW)
    assert d.target == 3 and "clamped" in d.winner.reason
    d = decide([rule(comparator="LESS_THAN", threshold=0.1, step=-5, lo=1)], {LAT: 0.0}, state(4), NOW)
    assert d.target == 1
    # Rule bounds default to the endpoint's.
    assert decide([rule(step=9)], {LAT: 1.0}, state(1, hi=2), NOW).target == 2
    # Above a rule's max already: a scale-out rule never scales in.
    d = decide([rule(hi=2)], {LAT: 1.0}, state(3), NOW)
    assert d.target == 3 and d.record[0].result == "bound"


def test_competing_rules_out_wins_and_the_largest_step_wins() -> None:
    out1 = rule("out1", step=1)
    out2 = rule("out2", step=2, metric=("kernel", "cpu_util", 30.0), threshold=80)
    down = rule("down", comparator="LESS_THAN", threshold=50, step=-1, metric=("gpu", "gpu_util", 30.0))
    metrics = {LAT: 1.0, ("kernel", "cpu_util", 30.0): 95.0, ("gpu", "gpu_util", 30.0): 10.0}
    d = decide([down, out1, out2], metrics, state(2, hi=8), NOW)
    assert d.target == 4 and d.winner.rule == "out2"
    assert {v.rule: v.result for v in d.verdicts} == {"down": "outvoted", "out1": "outvoted", "out2": "scale"}
    # Two scale-in rules: the larger step wins.
    in1 = rule("in1", comparator="LESS_THAN", threshold=0.5, step=-1)
    in2 = rule("in2", comparator="LESS_THAN", threshold=50, step=-2, metric=("gpu", "gpu_util", 30.0))
    assert decide([in1, in2], {LAT: 0.1, ("gpu", "gpu_util", 30.0): 10.0}, state(4), NOW).winner.rule == "in2"
    # Equal steps: the first rule wins, every time.
    twin = rule("twin", step=1, metric=("kernel", "cpu_util", 30.0), threshold=80)
    assert decide([out1, twin], metrics, state(2), NOW).winner.rule == "out1"


def test_disabled_rules_do_nothing() -> None:
    d = decide([rule(enabled=False)], {LAT: 9.0}, state(1), NOW)
    assert d.target == 1 and d.verdicts == () and d.record == ()


def test_missing_metrics_make_no_decision_and_are_recorded_once() -> None:
    r = rule()
    d = decide([r], {}, state(1), NOW)
    assert d.target == 1 and d.winner is None
    (v,) = d.record
    assert v.result == "missing" and "gateway/latency_p95" in v.reason
    again = decide([r], {}, state(1, notes=d.notes), NOW + 5)
    assert again.record == ()  # said once, not every interval
    back = decide([r], {LAT: 0.1}, state(1, notes=again.notes), NOW + 10)
    assert back.notes == {}  # the metric came back: a later gap is recorded again
    assert decide([r], {}, state(1, notes=back.notes), NOW + 15).record[0].result == "missing"


def test_idle_timeout_scales_to_zero_unless_busy_or_scaling_out() -> None:
    idle = dict(idle_timeout=300.0, last_activity=NOW - 301)
    d = decide([], {}, state(2, lo=0, **idle), NOW)
    assert d.target == 0 and d.winner.rule is None and "no request for 301s" in d.winner.reason
    assert decide([], {}, state(2, lo=0, idle_timeout=300.0, last_activity=NOW - 299), NOW).target == 2
    assert decide([], {}, state(2, lo=0, inflight=1, **idle), NOW).target == 2  # a long stream is not idleness
    assert decide([], {}, state(0, lo=0, **idle), NOW).winner is None  # already at zero
    assert decide([rule()], {LAT: 1.0}, state(1, lo=0, **idle), NOW).target == 2  # out beats idle


def test_helpers_average_over_the_window_and_take_nearest_rank_percentiles() -> None:
    samples = [(NOW - 40, 100.0), (NOW - 20, 10.0), (NOW - 10, 20.0)]
    assert window_average(samples, NOW, 30) == 15.0
    assert window_average(samples, NOW, 5) is None
    assert percentile([], 95) is None
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_prometheus_values_are_summed_over_labels_and_the_renamed_vllm_gauge_is_accepted() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 2.0\nvllm:num_requests_waiting{model_name="b"} 3.0\n'
        "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.25\n"
        "# TYPE vllm:request_success counter\nvllm:request_success_total 7.0\n"
    )
    assert prometheus_value(text, "vllm:num_requests_waiting") == 5.0
    assert prometheus_value(text, "vllm:kv_cache_usage_perc") == 0.25  # asked by its new name, exported by the old
    assert prometheus_value(text, "vllm:request_success_total") == 7.0
    assert prometheus_value(text, "vllm:nothing") is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"metric_source": "gpu", "metric_name": "util", "comparator": "GREATER_THAN", "threshold": 1, "step_size": 1}, "gpu metrics are"),
        ({"metric_source": "disk", "metric_name": "x", "comparator": "GREATER_THAN", "threshold": 1, "step_size": 1}, "metric_source"),
        ({"metric_source": "gateway", "metric_name": "latency_p95", "comparator": "BIGGER", "threshold": 1, "step_size": 1}, "comparator"),
        ({"metric_source": "gateway", "metric_name": "latency_p95", "comparator": "LESS_THAN", "threshold": 1, "step_size": 0}, "must not be 0"),
        ({"metric_source": "inference", "metric_name": "bad name", "comparator": "LESS_THAN", "threshold": 1, "step_size": 1}, "Prometheus"),
        ({"metric_source": "kernel", "metric_name": "cpu_util", "comparator": "LESS_THAN", "threshold": 1, "step_size": -1,
          "min_replicas": 3, "max_replicas": 2}, "min_replicas (3) must be ≤ max_replicas (2)"),
    ],
)
def test_invalid_rules_are_refused_with_the_reason(body: dict, problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        RuleSpec.model_validate(body)
    assert problem in str(info.value)


def test_process_tree_cpu_needs_two_readings_and_memory_is_resident_bytes() -> None:
    # A parent with a busy child: the child's CPU counts for the parent's tree.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'])"])
    try:
        tree = ProcessTree()
        first = tree.read([parent.pid, os.getpid()])
        assert first[parent.pid][0] is None and first[os.getpid()][1] > 1e6
        def busy() -> tuple[float, float] | None:
            cpu, rss = tree.read([parent.pid])[parent.pid]
            return (cpu, rss) if cpu is not None and cpu > 20 else None

        # Readings need time between them: poll every 0.2 s until the child's CPU shows.
        cpu, rss = wait_for(busy, timeout=10, interval=0.2, what="the busy child's CPU in its parent's tree")
        assert cpu > 20 and rss > 1e6
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
