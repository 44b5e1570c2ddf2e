"""The rollout plan and the replica transition table, as tables of pure cases."""

from __future__ import annotations

import pytest

from appliance.domain.rollout import Plan, ReplicaView, backoff_delay, drains, leaving_order, plan, wake_target
from appliance.domain.states import TRANSITIONS, EndpointStatus, ReplicaState, check_transition, derive_status
from appliance.errors import ApplianceError

S = ReplicaState
H, U, P, ST, F, D, T = S.HEALTHY, S.UNHEALTHY, S.PROVISIONING, S.STARTING, S.FAILED, S.DRAINING, S.TERMINATED


def rv(rid: str, state: ReplicaState = H, gen: int = 1, inflight: int = 0, started: float = 0.0, **kw: bool) -> ReplicaView:
    return ReplicaView(rid, gen, state, inflight, started, **kw)


# --- scale out and in ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "replicas", "expected"),
    [
        (2, [], Plan(start=2)),
        (2, [rv("a")], Plan(start=1)),
        (2, [rv("a"), rv("b", ST)], Plan()),
        (0, [], Plan()),
        # stopping replicas do not count: the count is made up again
        (1, [rv("a", stopping=True)], Plan(start=1)),
        (1, [rv("a", T)], Plan(start=1)),
    ],
)
def test_scale_out(desired: int, replicas: list[ReplicaView], expected: Plan) -> None:
    assert plan(desired, 1, replicas, max_surge=1) == expected


def test_scale_in_takes_replicas_with_nothing_in_flight_first_whatever_their_health() -> None:
    # An unhealthy replica still finishing a stream stays; an idle healthy one goes.
    replicas = [rv("busy-unhealthy", U, inflight=2), rv("idle-healthy", H), rv("busy-healthy", H, inflight=1)]
    assert plan(2, 1, replicas, max_surge=1).stop == ("idle-healthy",)
    assert plan(1, 1, replicas, max_surge=1).stop == ("idle-healthy", "busy-healthy")


def test_scale_in_order_among_idle_replicas() -> None:
    replicas = [rv("old-h", H, started=1.0), rv("new-h", H, started=5.0), rv("u", U, started=2.0), rv("s", ST), rv("f", F), rv("p", P)]
    order = [r.id for r in leaving_order(replicas)]
    assert order == ["f", "p", "s", "u", "new-h", "old-h"]  # serving nothing first, then unhealthy, then the newest healthy
    assert plan(0, 1, replicas, max_surge=0).stop == tuple(order)


def test_replicas_already_stopping_are_not_stopped_twice() -> None:
    assert plan(0, 1, [rv("a", D, stopping=True), rv("b")], max_surge=0) == Plan(stop=("b",))


# --- drain ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "inflight", "expected"),
    [(H, 0, True), (H, 3, True), (U, 2, True), (U, 0, False), (ST, 0, False), (P, 0, False), (F, 0, False)],
)
def test_a_replica_with_requests_in_flight_drains_healthy_or_not(state: ReplicaState, inflight: int, expected: bool) -> None:
    assert drains(state, inflight) is expected


# --- rolling updates --------------------------------------------------------------------------------


def test_roll_with_surge_1_starts_one_new_then_retires_old_as_new_ones_become_healthy() -> None:
    old = [rv("o1", gen=1), rv("o2", gen=1, inflight=1)]
    assert plan(2, 2, old, max_surge=1) == Plan(start=1)
    one_new_starting = old + [rv("n1", ST, gen=2)]
    assert plan(2, 2, one_new_starting, max_surge=1) == Plan()
    one_new_healthy = old + [rv("n1", H, gen=2)]
    # at the surge bound with the new one healthy: the idle old one leaves and the next new one starts
    assert plan(2, 2, one_new_healthy, max_surge=1) == Plan(start=1, stop=("o1",), awaiting=False)
    after = [rv("o2", gen=1, inflight=1), rv("n1", H, gen=2), rv("o1", D, gen=1, stopping=True)]
    assert plan(2, 2, after, max_surge=1) == Plan(start=1)


def test_roll_with_surge_0_makes_way_one_old_replica_at_a_time() -> None:
    old = [rv("o1", gen=1, inflight=3), rv("o2", gen=1)]
    first = plan(2, 2, old, max_surge=0)
    assert first == Plan(start=1, stop=("o2",), awaiting=False)  # the idle one makes way; o1 still serves
    # while o2 leaves, nothing else makes way
    leaving = [rv("o1", gen=1, inflight=3), rv("o2", D, gen=1, stopping=True), rv("n1", ST, gen=2)]
    assert plan(2, 2, leaving, max_surge=0) == Plan()


def test_roll_of_the_last_serving_replica_lets_requests_wait_for_its_successor() -> None:
    assert plan(1, 2, [rv("o1", gen=1, inflight=1)], max_surge=0) == Plan(start=1, stop=("o1",), awaiting=True)


def test_no_capacity_for_an_extra_replica_makes_room() -> None:
    # surge allows one more, but the new replica waits for a GPU: the idle old replica makes way
    waiting = [rv("o1", gen=1), rv("o2", gen=1, inflight=2), rv("n1", P, gen=2, waiting_for_capacity=True)]
    assert plan(2, 2, waiting, max_surge=1) == Plan(start=1, stop=("o1",), awaiting=False)
    # once it leaves, nothing more makes way until a new replica is healthy
    leaving = [rv("o1", D, gen=1, stopping=True), rv("o2", gen=1, inflight=2), rv("n1", P, gen=2, waiting_for_capacity=True), rv("n2", P, gen=2)]
    assert plan(2, 2, leaving, max_surge=1) == Plan()


def test_old_replicas_that_serve_nothing_go_at_once() -> None:
    step = plan(1, 2, [rv("o-starting", ST, gen=1), rv("o-unhealthy", U, gen=1, inflight=1)], max_surge=1)
    assert step == Plan(start=1, stop=("o-starting", "o-unhealthy"))


def test_in_error_nothing_starts_and_nothing_makes_way() -> None:
    assert plan(2, 1, [], max_surge=1, error=True) == Plan()
    assert plan(1, 2, [rv("o1", gen=1)], max_surge=0, error=True) == Plan()


# --- wake and backoff -------------------------------------------------------------------------------


def test_wake_and_backoff() -> None:
    assert wake_target(0, 0) == 1 and wake_target(0, 2) == 2 and wake_target(1, 0) is None
    assert [backoff_delay(n, 1.0, 10.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_derive_status_and_backoff() -> None:
    H, S, U, F = ReplicaState.HEALTHY, ReplicaState.STARTING, ReplicaState.UNHEALTHY, ReplicaState.FAILED
    assert derive_status(2, [H, H], None) == (EndpointStatus.HEALTHY, "2/2 healthy")
    assert derive_status(2, [H, S], None) == (EndpointStatus.DEGRADED, "1 healthy, 1 not (1 starting); 2 desired")
    assert derive_status(2, [U, U], None)[0] is EndpointStatus.UNHEALTHY
    assert derive_status(1, [S], None)[0] is EndpointStatus.PROVISIONING
    assert derive_status(1, [F], None)[0] is EndpointStatus.UNHEALTHY
    assert derive_status(1, [], None)[0] is EndpointStatus.PENDING
    assert derive_status(0, [], None)[0] is EndpointStatus.SCALED_TO_ZERO
    assert derive_status(1, [H], "boom") == (EndpointStatus.ERROR, "boom")
    assert [backoff_delay(n, 1.0, 300.0) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]


# --- the transition table -----------------------------------------------------------------------------

EDGES = [(a, b) for a, targets in TRANSITIONS.items() for b in targets]


@pytest.mark.parametrize(("old", "new"), EDGES, ids=[f"{a}->{b}" for a, b in EDGES])
def test_every_allowed_transition_passes(old: ReplicaState, new: ReplicaState) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [(T, P), (T, H), (P, H), (D, H), (D, U), (F, H), (H, P), (H, ST), (P, D), (ST, D)],
)
def test_forbidden_transitions_raise(old: ReplicaState, new: ReplicaState) -> None:
    with pytest.raises(ApplianceError) as info:
        check_transition(old, new)
    assert info.value.code == "illegal_transition" and str(old) in info.value.message


def test_the_table_covers_every_state_and_staying_is_allowed() -> None:
    assert set(TRANSITIONS) == set(ReplicaState)
    for s in ReplicaState:
        check_transition(s, s)
        if s is not T:
            assert T in TRANSITIONS[s]  # whatever happens, a replica can end
