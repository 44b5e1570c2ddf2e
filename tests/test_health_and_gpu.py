"""Pure decision code: the health state machine and GPU placement, without sleeping."""

from __future__ import annotations

import random

import pytest

from appliance.domain.health import Health, HealthState, due_for_replacement, next_probe_delay, observe
from appliance.domain.placement import Allocation, GpuInfo, GpuRequest, Unplaceable, place, visible
from appliance.domain.specs import HealthCheck


def run_probes(check: HealthCheck, results: list[bool], start: float = 0.0) -> tuple[HealthState, float | None]:
    """Probe at start, start+interval, …; return the final state and when UNHEALTHY began."""
    state = HealthState(spawned_at=start)
    became = None
    for i, ok in enumerate(results):
        now = start + i * check.interval
        state = observe(state, check, passed=ok, detail="ok" if ok else "fail", now=now)
        if state.status is Health.UNHEALTHY and became is None:
            became = now
    return state, became


@pytest.mark.parametrize(("interval", "retries", "delay"), [(0.2, 2, 0.5), (10.0, 10, 60.0), (2.0, 3, 7.0), (1.0, 1, 0.0)])
def test_never_up_replica_is_unhealthy_at_initial_delay_plus_window(interval: float, retries: int, delay: float) -> None:
    check = HealthCheck(path="/", interval=interval, max_retries=retries, initial_delay=delay)
    state, became = run_probes(check, [False] * 200)
    assert became is not None
    expected = delay + interval * (retries + 1)
    assert abs(became - expected) <= interval + 1e-9
    assert state.status is Health.UNHEALTHY


@pytest.mark.parametrize(("interval", "retries"), [(0.2, 2), (10.0, 10), (1.0, 1)])
def test_healthy_replica_that_stops_answering_is_unhealthy_after_one_window(interval: float, retries: int) -> None:
    check = HealthCheck(path="/", interval=interval, max_retries=retries, initial_delay=1000.0)  # delay no longer matters
    state, became = run_probes(check, [True] * 3 + [False] * 50)
    last_pass = 2 * interval
    assert became is not None and abs((became - last_pass) - interval * (retries + 1)) <= interval + 1e-9


def test_early_pass_is_healthy_at_once_and_failures_in_grace_do_not_count() -> None:
    check = HealthCheck(path="/", interval=1.0, max_retries=1, initial_delay=60.0)
    state = observe(HealthState(spawned_at=0.0), check, passed=False, detail="refused", now=0.0)
    assert state.consecutive_failures == 0 and state.status is Health.UNKNOWN
    state = observe(state, check, passed=True, detail="200", now=1.0)
    assert state.status is Health.HEALTHY and state.healthy_since == 1.0  # not after 60 s
    state = observe(state, check, passed=False, detail="timeout", now=2.0)
    assert state.status is Health.HEALTHY and state.consecutive_failures == 1  # still routable: 1 ≤ max_retries
    state = observe(state, check, passed=False, detail="timeout", now=3.0)
    assert state.status is Health.UNHEALTHY and state.unhealthy_since == 3.0
    assert not due_for_replacement(state, replace_after=2.0, now=4.0)
    state = observe(state, check, passed=False, detail="timeout", now=4.0)
    assert state.unhealthy_since == 3.0 and due_for_replacement(state, replace_after=2.0, now=5.0)
    state = observe(state, check, passed=True, detail="200", now=5.0)
    assert state.status is Health.HEALTHY and state.consecutive_failures == 0 and state.unhealthy_since is None


def test_probes_never_overlap() -> None:
    assert next_probe_delay(started=10.0, finished=10.2, interval=1.0) == pytest.approx(0.8)
    assert next_probe_delay(started=10.0, finished=12.5, interval=1.0) == 0.0


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", used: int = 0, total: int = 80 << 30) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index:04d}", name=name, memory_total=total, memory_used=used)


def test_whole_gpus_are_exclusive_and_shares_fill_up_to_one() -> None:
    gpus = [gpu(0), gpu(1)]
    held: dict[str, Allocation] = {}
    held["a"] = place(GpuRequest(count=1), gpus, held)
    held["b"] = place(GpuRequest(share=0.5), gpus, held)
    held["c"] = place(GpuRequest(share=0.5), gpus, held)
    assert held["a"].uuids != held["b"].uuids and held["b"].uuids == held["c"].uuids
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(share=0.1), gpus, held)
    assert not info.value.permanent and "share free" in info.value.reason
    with pytest.raises(Unplaceable):
        place(GpuRequest(count=1), gpus, held)
    del held["a"]  # released on stop: handed out again
    assert place(GpuRequest(count=1), gpus, held).uuids == ("GPU-0000",)


def test_spread_and_binpack() -> None:
    gpus = [gpu(0), gpu(1)]
    held = {"x": Allocation(("GPU-0000",), 0.3)}
    assert place(GpuRequest(share=0.3, placement="spread"), gpus, held).uuids == ("GPU-0001",)
    assert place(GpuRequest(share=0.3, placement="binpack"), gpus, held).uuids == ("GPU-0000",)
    busy = [gpu(0, used=50 << 30), gpu(1, used=1 << 30)]
    assert place(GpuRequest(count=1), busy, {}).uuids == ("GPU-0001",)


def test_affinity_and_impossible_requests() -> None:
    gpus = [gpu(0, name="NVIDIA A10"), gpu(1), gpu(2, used=79 << 30)]
    assert place(GpuRequest(count=1, name="*H100*"), gpus, {}).uuids == ("GPU-0001",)
    assert place(GpuRequest(share=0.5, name="*H100*", min_free_memory=10 << 30, placement="binpack"), gpus, {}).uuids == ("GPU-0001",)
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(count=1, name="*B200*"), gpus, {})
    assert info.value.permanent and "none is named like '*B200*'" in info.value.reason
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(count=4), gpus, {})
    assert info.value.permanent
    with pytest.raises(Unplaceable) as info:
        place(GpuRequest(count=1), [], {})
    assert info.value.permanent and info.value.reason.startswith("no GPU available")
    assert place(GpuRequest(), [], {}) == Allocation(uuids=())


def test_visible_devices() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    assert visible(gpus, "all") == gpus and visible(gpus, "none") == []
    assert [g.index for g in visible(gpus, [2, "GPU-0000"])] == [0, 2]


def test_random_sequences_never_hand_a_gpu_out_twice() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        gpus = [gpu(i) for i in range(rng.randint(1, 4))]
        held: dict[str, Allocation] = {}
        for step in range(60):
            if held and rng.random() < 0.4:
                held.pop(rng.choice(sorted(held)))  # a replica stops (scale down)
                continue
            request = GpuRequest(count=rng.randint(1, 2)) if rng.random() < 0.4 else GpuRequest(share=rng.choice([0.1, 0.25, 0.3, 0.5, 0.7]))
            try:
                held[f"r{step}"] = place(request, gpus, held)
            except Unplaceable:
                pass
            whole: list[str] = [u for a in held.values() if a.share is None for u in a.uuids]
            assert len(whole) == len(set(whole)), "a whole GPU held twice"
            for g in gpus:
                total = sum(a.share for a in held.values() if a.share is not None and g.uuid in a.uuids)
                assert total <= 1 + 1e-9, f"{g.uuid} over-shared: {total}"
                assert not (g.uuid in whole and total > 0), f"{g.uuid} both whole and shared"
