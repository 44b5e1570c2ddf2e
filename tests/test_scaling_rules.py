"""Autoscaling rules in Backend.AI's terms, without servers: names accepted in any case, KERNEL and
INFERENCE_FRAMEWORK metrics as Backend.AI computes them, and decide() under both policies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from pydantic import ValidationError

from appliance.control.scaling.signals import Signals, prometheus_value
from appliance.domain.placement import GpuInfo
from appliance.domain.scaling import Rule, RulePatch, RuleSpec, ScaleState, decide, pct, per_route, series_names
from appliance.domain.specs import MAX_REPLICAS
from appliance.domain.states import ReplicaState

NOW = 10_000.0
Q = ("gateway", "queue_length", 30.0)
CPU = ("kernel", "cpu_util", 30.0)
WAIT = ("inference_framework", "vllm_num_requests_waiting", 30.0)
GOOD = {"metric_name": "cpu_util", "threshold": 80, "step_size": 1}


def rule(rid: str, *, step: int = 1, threshold: float = 0.5, comparator: str = "GREATER_THAN", lo: int | None = None, hi: int | None = None,
         cooldown: float = 60.0, metric: tuple[str, str, float] = Q) -> Rule:
    source, name, window = metric
    return Rule(rid, source, name, comparator, threshold, step, lo, hi, cooldown, window)


def bai(replicas: int, lo: int = 1, hi: int = 8, **kw: Any) -> ScaleState:
    return ScaleState(replicas=replicas, min_replicas=lo, max_replicas=hi, policy="backend.ai", **kw)


def appliance(replicas: int, lo: int = 1, hi: int = 8, **kw: Any) -> ScaleState:
    return ScaleState(replicas=replicas, min_replicas=lo, max_replicas=hi, **kw)


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("KERNEL", "kernel"), ("kernel", "kernel"), ("Kernel", "kernel"),
        ("INFERENCE_FRAMEWORK", "inference_framework"), ("inference_framework", "inference_framework"),
        ("PROMETHEUS", "prometheus"), ("prometheus", "prometheus"),
        ("gpu", "gpu"), ("GATEWAY", "gateway"), ("inference", "inference"),
    ],
)
def test_sources_are_accepted_in_any_case_and_stored_lowercase(sent: str, stored: str) -> None:
    name = {"gpu": "gpu_util", "gateway": "queue_length"}.get(stored, "cpu_util" if stored == "kernel" else "vllm_num_requests_waiting")
    spec = RuleSpec.model_validate({**GOOD, "metric_source": sent, "metric_name": name, "comparator": "GREATER_THAN"})
    assert spec.metric_source == stored


@pytest.mark.parametrize("sent", ["greater_than", "GREATER_THAN", "Greater_Than"])
def test_comparators_are_accepted_in_any_case_and_stored_uppercase(sent: str) -> None:
    spec = RuleSpec.model_validate({**GOOD, "metric_source": "KERNEL", "comparator": sent})
    assert spec.comparator == "GREATER_THAN"
    patch = RulePatch.model_validate({"comparator": sent.lower().replace("greater", "less"), "metric_source": "Inference_Framework"})
    assert patch.comparator == "LESS_THAN" and patch.metric_source == "inference_framework"
    assert RulePatch.model_validate({}).metric_source is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"metric_source": "disk"}, "unknown metric source 'disk': the appliance's gpu, kernel, inference, gateway, or Backend.AI's KERNEL, INFERENCE_FRAMEWORK"),
        ({"metric_source": "KERNEL", "metric_name": "cpu"}, "kernel metrics are cpu_util, mem, cuda_util, cuda_mem, mem_rss (got 'cpu')"),
        ({"metric_source": "KERNEL", "comparator": "bigger"}, "unknown comparator 'bigger'"),
        ({"metric_source": "PROMETHEUS", "metric_name": "rate(x[5m])"}, "the appliance has no Prometheus server"),
        ({"metric_source": "INFERENCE_FRAMEWORK", "metric_name": "not a name"}, "is not a Prometheus metric name"),
    ],
)
def test_unknown_sources_metrics_and_comparators_are_refused_clearly(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        RuleSpec.model_validate({**GOOD, "comparator": "GREATER_THAN", **body})
    assert problem in str(info.value)
    assert len(info.value.errors()) == 1  # one message, not one per union member


def test_a_threshold_may_be_a_numeric_string_as_backend_ai_takes_it() -> None:
    assert RuleSpec.model_validate({**GOOD, "metric_source": "KERNEL", "comparator": "greater_than", "threshold": "80.5"}).threshold == 80.5
    assert RulePatch.model_validate({"threshold": "5"}).threshold == 5.0
    with pytest.raises(ValidationError, match=r"must be a number \(got 'high'\)"):
        RuleSpec.model_validate({**GOOD, "metric_source": "KERNEL", "comparator": "greater_than", "threshold": "high"})


@pytest.mark.parametrize("name", ["cpu_util", "mem", "cuda_util", "cuda_mem", "mem_rss"])
def test_kernel_takes_backend_ai_live_stat_names_and_the_appliances_mem_rss(name: str) -> None:
    assert RuleSpec.model_validate({**GOOD, "metric_source": "KERNEL", "metric_name": name, "comparator": "GREATER_THAN"}).metric_name == name


@pytest.mark.parametrize(
    ("name", "names"),
    [
        ("vllm_num_requests_waiting", ("vllm_num_requests_waiting", "vllm:num_requests_waiting")),
        ("vllm:num_requests_waiting", ("vllm:num_requests_waiting",)),
        ("sglang_num_queue_reqs", ("sglang_num_queue_reqs", "sglang:num_queue_reqs")),
        ("max_num_requests_running", ("max_num_requests_running", "max:num_requests_running")),
        ("tgi_queue_size", ("tgi_queue_size",)),
        ("vllm_gpu_cache_usage_perc", ("vllm_gpu_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")),
    ],
)
def test_backend_ai_renamed_metric_names_map_back_to_the_exported_series(name: str, names: tuple[str, ...]) -> None:
    assert series_names(name) == names


def test_renamed_names_and_counter_family_names_find_the_same_series() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 2.0\nvllm:num_requests_waiting{model_name="b"} 3.0\n'
        "# TYPE vllm:request_success_total counter\n"
        'vllm:request_success_total{finished_reason="stop"} 7.0\nvllm:request_success_total{finished_reason="length"} 1.0\n'
        "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 4.0\n"
    )
    assert prometheus_value(text, "vllm_num_requests_waiting") == prometheus_value(text, "vllm:num_requests_waiting") == 5.0
    assert prometheus_value(text, "vllm_request_success") == 8.0  # Backend.AI's parser names a counter without _total
    assert prometheus_value(text, "sglang_num_queue_reqs") == 4.0
    assert prometheus_value(text, "vllm_nothing") is None


def test_backend_ai_aggregation_is_the_total_over_replicas_divided_by_the_routes() -> None:
    assert per_route([3.0, 1.0, None], routes=4) == 1.0  # a replica without the metric adds nothing; routes divide
    assert per_route([3.0], routes=0) == 3.0  # no route at all: divided by 1, as Backend.AI does
    assert per_route([None, None], routes=2) is None  # nobody reports it: the rule is skipped
    assert pct(512, 2048) == 25.0 and pct(1, 0) is None


# --- signals: inference vs inference_framework, KERNEL in Backend.AI's units ------------------------


def _replica(rid: str, state: ReplicaState, running: float | None = None, *, pid: int | None = None, gpus: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(
        id=rid, state=state, live=True, url=f"http://{rid}", running=running,
        process=SimpleNamespace(pid=pid) if pid else None, allocation=SimpleNamespace(uuids=gpus) if gpus else None,
    )


def _signals(replicas: list[Any], *, mem: int | None = None, gpus: Callable[[], Awaitable[list[GpuInfo]]] | None = None) -> Signals:
    resources = SimpleNamespace(mem=mem)
    supervisor = SimpleNamespace(
        replicas=lambda name: replicas, table=SimpleNamespace(endpoints={"ep": SimpleNamespace(resources=resources)}, routable={}),
    )

    async def no_gpus() -> list[GpuInfo]:
        raise RuntimeError("no NVML")

    signals = Signals(supervisor, SimpleNamespace(records=[], queue_length=lambda n: 0), SimpleNamespace(), gpus or no_gpus,  # type: ignore[arg-type]
                      scrape_timeout=1.0, history_seconds=60.0)
    by_url = {r.url: r for r in replicas}

    async def scrape(url: str) -> str | None:
        running = by_url[url].running
        return None if running is None else f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {running}\n"

    signals._scrape = scrape  # type: ignore[method-assign]
    return signals


async def test_inference_averages_per_replica_and_inference_framework_divides_the_total_by_the_routes() -> None:
    replicas = [
        _replica("a", ReplicaState.HEALTHY, 3.0), _replica("b", ReplicaState.HEALTHY, 1.0),
        _replica("c", ReplicaState.STARTING), _replica("d", ReplicaState.DRAINING, 50.0),  # c is a route; d is leaving, neither is read
    ]
    signals = _signals(replicas)
    mine, theirs = ("inference", "vllm:num_requests_waiting", 5.0), ("inference_framework", "vllm_num_requests_waiting", 5.0)
    got = await signals.gather("ep", {mine, theirs}, NOW)
    assert got[mine] == 2.0  # mean over the healthy replicas that report it
    assert got[theirs] == pytest.approx(4.0 / 3)  # (3 + 1) over 3 routes: healthy a, b and starting c


async def test_kernel_metrics_are_percentages_of_the_limit_as_backend_ai_reports_them() -> None:
    # A process of its own (no children) stands in for a replica's tree: the test runner's tree changes
    # size whenever another test leaves a worker behind for a moment.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"], stdout=subprocess.PIPE)  # noqa: ASYNC220
    try:
        assert stand_in.stdout is not None and stand_in.stdout.readline() == b"up\n"  # started: its memory stays put now
        me = stand_in.pid
        rss = psutil.Process(me).memory_info().rss
        needed = {("kernel", n, 5.0) for n in ("mem", "mem_rss", "cpu_util", "cuda_util", "cuda_mem")}
        got = await _signals([_replica("a", ReplicaState.HEALTHY, pid=me)], mem=4 * rss).gather("ep", needed, NOW)
        assert got[("kernel", "mem", 5.0)] == pytest.approx(25.0, rel=0.2)  # resources.mem is four times the tree's rss
        assert got[("kernel", "mem_rss", 5.0)] == pytest.approx(rss, rel=0.2)
        assert ("kernel", "cpu_util", 5.0) not in got  # the first reading only starts measuring
        assert ("kernel", "cuda_util", 5.0) not in got  # no NVML: missing, and the rule says so
        # Without resources.mem the capacity is the box's memory.
        box = await _signals([_replica("a", ReplicaState.HEALTHY, pid=me)]).gather("ep", {("kernel", "mem", 5.0)}, NOW)
        assert box[("kernel", "mem", 5.0)] == pytest.approx(100.0 * rss / psutil.virtual_memory().total, rel=0.2)
    finally:
        stand_in.kill()
        stand_in.wait()


async def test_cuda_metrics_are_the_replicas_gpus_from_nvml() -> None:
    inventory = [
        GpuInfo(0, "GPU-a", "H100", memory_total=80, memory_used=20, utilization_gpu=90),
        GpuInfo(1, "GPU-b", "H100", memory_total=80, memory_used=60, utilization_gpu=30),
        GpuInfo(2, "GPU-c", "H100", memory_total=80, memory_used=80, utilization_gpu=100),  # another replica's
    ]

    async def gpus() -> list[GpuInfo]:
        return inventory

    signals = _signals([_replica("a", ReplicaState.HEALTHY, gpus=("GPU-a", "GPU-b"))], gpus=gpus)
    got = await signals.gather("ep", {("kernel", "cuda_util", 5.0), ("kernel", "cuda_mem", 5.0)}, NOW)
    assert got == {("kernel", "cuda_util", 5.0): 60.0, ("kernel", "cuda_mem", 5.0): 50.0}


# --- decide(): the appliance's policy stays the default ---------------------------------------------


def test_the_default_policy_is_the_appliances() -> None:
    assert ScaleState(replicas=1, min_replicas=1, max_replicas=2).policy == "appliance"
    small, big = rule("small", step=1), rule("big", step=3, metric=CPU, threshold=80)
    metrics = {Q: 1.0, CPU: 95.0}
    d = decide([small, big], metrics, appliance(2, hi=4), NOW)
    assert d.target == 4 and d.winner.rule == "big" and "clamped" in d.winner.reason  # largest step, clamped to the bound
    assert {v.rule: v.result for v in d.verdicts} == {"small": "outvoted", "big": "scale"}


@pytest.mark.parametrize("policy", [appliance, bai])
def test_a_rule_without_bounds_of_its_own_is_bounded_by_the_endpoints_range(policy: Callable[..., ScaleState]) -> None:
    r = rule("free", step=1, cooldown=0)
    n, seen = 1, []
    for tick in range(5):
        d = decide([r], {Q: 1.0}, policy(n, lo=1, hi=3), NOW + tick)
        n = d.target
        seen.append(n)
    assert seen == [2, 3, 3, 3, 3]  # out to the endpoint's max_replicas, then no further
    (stuck,) = decide([r], {Q: 1.0}, policy(3, lo=1, hi=3), NOW).record
    assert stuck.result == "bound" and "the endpoint's" in stuck.reason


@pytest.mark.parametrize("policy", [appliance, bai])
def test_a_rules_own_huge_bound_scales_no_further_than_max_replicas(policy: Callable[..., ScaleState]) -> None:
    """A large max_replicas on a rule (Backend.AI users write one for "no limit") acts as MAX_REPLICAS: a
    step of millions would otherwise ask the supervisor for a replica, a log file and pipes each."""
    r = rule("huge", step=10**9, hi=10**15, cooldown=0)
    d = decide([r], {Q: 1.0}, policy(1, hi=1), NOW)
    assert d.target <= MAX_REPLICAS
    assert decide([rule("wide", step=MAX_REPLICAS - 1, hi=10**15)], {Q: 1.0}, policy(1, hi=1), NOW).target == MAX_REPLICAS


# --- decide(): Backend.AI's policy -------------------------------------------------------------------


def test_backend_ai_the_first_rule_that_fires_wins_in_creation_order() -> None:
    down = rule("down", step=-1, comparator="LESS_THAN", threshold=50, metric=CPU)
    out = rule("out", step=3)
    metrics = {Q: 1.0, CPU: 10.0}
    d = decide([down, out], metrics, bai(3), NOW)
    assert d.target == 2 and d.winner.rule == "down"  # created first: it wins though the other scales out
    assert [v.rule for v in d.verdicts] == ["down"]  # later rules are not looked at
    assert decide([out, down], metrics, bai(3), NOW).target == 6
    # The appliance's policy on the same rules: scaling out wins.
    assert decide([down, out], metrics, appliance(3), NOW).winner.rule == "out"


def test_backend_ai_a_step_leaving_the_rules_bounds_skips_the_rule_and_the_next_one_may_fire() -> None:
    big = rule("big", step=3, hi=4)
    small = rule("small", step=1, metric=CPU, threshold=80)
    metrics = {Q: 1.0, CPU: 95.0}
    d = decide([big, small], metrics, bai(2), NOW)
    assert d.target == 3 and d.winner.rule == "small"
    (skipped,) = d.record
    assert skipped.rule == "big" and skipped.result == "bound" and "2 → 5 would leave the rule's and the endpoint's bounds [1, 4]: rule skipped" in skipped.reason
    # The appliance clamps the same step to the bound instead.
    assert decide([big, small], metrics, appliance(2), NOW).target == 4
    # A scale-in below the rule's min is skipped too; at 0 a scale-in changes nothing and is skipped.
    down = rule("down", step=-2, comparator="LESS_THAN", threshold=5, lo=2)
    assert decide([down], {Q: 1.0}, bai(3), NOW).winner is None
    assert decide([rule("z", step=-1, comparator="LESS_THAN", threshold=5)], {Q: 1.0}, bai(0, lo=0), NOW).record[0].result == "bound"


def test_backend_ai_cooldown_is_per_rule_from_its_last_trigger() -> None:
    r1, r2 = rule("r1", cooldown=60), rule("r2", cooldown=60, metric=CPU, threshold=80)
    metrics = {Q: 1.0, CPU: 95.0}
    fired = {"r1": NOW - 30}
    d = decide([r1, r2], metrics, bai(2, last_fired=fired), NOW)
    assert d.winner.rule == "r2" and d.target == 3  # r1 cools down; r2 did not fire lately, so it may
    assert d.record[0].rule == "r1" and d.record[0].result == "cooldown" and "30s left" in d.record[0].reason
    # The appliance's policy holds the whole scale-out direction back.
    assert decide([r1, r2], metrics, appliance(2, last_fired=fired), NOW).winner is None
    assert decide([r1, r2], metrics, bai(2, last_fired={"r1": NOW - 60}), NOW).winner.rule == "r1"


def test_backend_ai_missing_metrics_skip_the_rule_and_suppressions_are_recorded_once() -> None:
    gone, out = rule("gone", metric=WAIT), rule("out", step=1, hi=2)
    d = decide([gone, out], {Q: 1.0}, bai(2), NOW)
    assert d.winner is None and [(v.rule, v.result) for v in d.record] == [("gone", "missing"), ("out", "bound")]
    again = decide([gone, out], {Q: 1.0}, bai(2, notes=d.notes), NOW + 1)
    assert again.record == ()
    # A rule after the winner is not looked at: its note stays, so it is not recorded again later.
    first = rule("first", step=1, metric=CPU, threshold=80)
    won = decide([first, gone, out], {Q: 1.0, CPU: 95.0}, bai(1, notes=d.notes), NOW + 2)
    assert won.winner.rule == "first" and won.notes == {"gone": "missing", "out": "bound"} and won.record == ()


def test_backend_ai_idle_timeout_still_beats_a_scale_in_but_not_a_scale_out() -> None:
    idle = {"idle_timeout": 60.0, "last_activity": NOW - 61}
    down = rule("down", step=-1, comparator="LESS_THAN", threshold=5)
    assert decide([down], {Q: 1.0}, bai(2, lo=0, **idle), NOW).target == 0
    assert decide([rule("out")], {Q: 1.0}, bai(2, lo=0, **idle), NOW).target == 3
