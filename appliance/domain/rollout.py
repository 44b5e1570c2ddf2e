"""The rollout plan: what the supervisor does next for one endpoint, as a pure function of the
desired count, the endpoint's replicas and their load.

It covers scale-out, scale-in (who goes first), rolling updates bounded by max_surge, making room
when no extra replica fits, which stops drain first, restart backoff and the wake of an endpoint
scaled to zero. The supervisor applies a plan; it decides nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from appliance.domain.states import SERVING, ReplicaState


@dataclass(frozen=True)
class ReplicaView:
    """What the plan needs to know of one replica."""

    id: str
    generation: int
    state: ReplicaState
    inflight: int = 0
    started_at: float | None = None  # when its current worker was spawned
    stopping: bool = False  # a stop was already asked for
    waiting_for_capacity: bool = False  # no GPU room yet

    @property
    def live(self) -> bool:
        return self.state is not ReplicaState.TERMINATED and not self.stopping


@dataclass(frozen=True)
class Plan:
    start: int = 0  # replicas of the current generation to create
    stop: tuple[str, ...] = ()  # replica ids to stop, in this order
    # The last replica that serves an old generation makes way for the first new one: requests
    # wait for its successor instead of failing. None leaves the flag as it is.
    awaiting: bool | None = None


_LEAVE_FIRST = (ReplicaState.FAILED, ReplicaState.PROVISIONING, ReplicaState.STARTING, ReplicaState.UNHEALTHY, ReplicaState.HEALTHY)


def leaving_order(replicas: Iterable[ReplicaView]) -> list[ReplicaView]:
    """Who goes first on scale-in: fewest requests in flight (none first), then a replica that serves
    nothing before an unhealthy one before a healthy one, then the newest."""
    return sorted(
        (r for r in replicas if r.live),
        key=lambda r: (r.inflight, _LEAVE_FIRST.index(r.state) if r.state in _LEAVE_FIRST else 0, -(r.started_at or 0.0)),
    )


def plan(desired: int, generation: int, replicas: Sequence[ReplicaView], *, max_surge: int, error: bool = False) -> Plan:
    """The next step for one endpoint. `generation` is the config the replicas should run; in ERROR
    (`error`) nothing new starts and nothing makes way until the operator retries."""
    stop: list[str] = []
    live = [r for r in replicas if r.live]
    current = [r for r in live if r.generation == generation]
    old: list[ReplicaView] = []
    for r in live:
        if r.generation == generation:
            continue
        if r.state is ReplicaState.HEALTHY:
            old.append(r)
        else:
            stop.append(r.id)  # an old replica that serves nothing goes at once
    # Rolling: new replicas start at most max_surge above the desired count. When none can start
    # beside the old ones (max_surge 0, or GPUs full), one old replica makes way, one at a time.
    wanted = desired - len(current)
    room = desired + max_surge - len(current) - len(old) if old else wanted
    by_load = leaving_order(old)
    old_leaving = bool(stop) or any(r.generation != generation and r.stopping for r in replicas)
    pending = any(r.state is not ReplicaState.HEALTHY for r in current)
    stuck = (wanted > 0 and room <= 0 and not pending) or any(r.waiting_for_capacity for r in current)
    awaiting: bool | None = None
    if by_load and stuck and not old_leaving and not error:
        awaiting = len(by_load) == 1  # the last one that serves: requests wait for its successor
        stop.append(by_load.pop(0).id)
        room += 1
    start = 0 if error else max(0, min(wanted, room))
    if len(current) > desired:
        stop += [r.id for r in leaving_order(current)[: len(current) - desired]]
    # Old replicas leave as new ones become healthy.
    healthy_new = sum(r.state is ReplicaState.HEALTHY for r in current)
    stop += [r.id for r in by_load[: max(0, len(by_load) + healthy_new - desired)]]
    return Plan(start=start, stop=tuple(dict.fromkeys(stop)), awaiting=awaiting)


def drains(state: ReplicaState, inflight: int) -> bool:
    """Whether a replica asked to stop first drains: a healthy one always (requests may be on their
    way to it), an unhealthy one while it still has requests in flight."""
    return state is ReplicaState.HEALTHY or (state in SERVING and inflight > 0)


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds before the next start after `failures` failures in a row: doubling from `base`, at most `cap`."""
    return min(cap, base * 2 ** max(0, failures - 1))


def wake_target(desired: int, min_replicas: int) -> int | None:
    """The count a request asks for when it finds the endpoint scaled to zero; None if it is not."""
    return max(1, min_replicas) if desired == 0 else None


def sleep_unsupported(log_tail: Sequence[str]) -> bool:
    """Whether an engine's last lines say it was given a sleep mode its platform lacks (vLLM on CPU)."""
    return any("Sleep mode is not supported" in line for line in log_tail)
