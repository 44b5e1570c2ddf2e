"""Endpoint and replica states, the one table of allowed replica transitions, and an
endpoint's status derived from its replicas. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType

from appliance.errors import ApplianceError


class EndpointStatus(StrEnum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    UNHEALTHY = "UNHEALTHY"
    ERROR = "ERROR"
    SCALED_TO_ZERO = "SCALED_TO_ZERO"
    SLEEPING = "SLEEPING"  # every replica asleep (evicted by sleep): the next request wakes them


class ReplicaState(StrEnum):
    PROVISIONING = "PROVISIONING"
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    SLEEPING = "SLEEPING"  # evicted by the engine's sleep: its process lives on, its weights in host RAM; never routed to
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"


_S = ReplicaState
# Where a replica may go from each state. Staying in a state is always allowed (a note with a new
# reason, e.g. "waiting for a free port"). TERMINATED is final; every other state may end in it,
# since a stop or an internal error can come at any point of a start.
TRANSITIONS: Mapping[ReplicaState, frozenset[ReplicaState]] = MappingProxyType({
    _S.PROVISIONING: frozenset({_S.STARTING, _S.FAILED, _S.TERMINATED}),
    # PROVISIONING again: the port was taken by another program before the worker bound it.
    _S.STARTING: frozenset({_S.HEALTHY, _S.UNHEALTHY, _S.PROVISIONING, _S.FAILED, _S.TERMINATING, _S.TERMINATED}),
    # SLEEPING: found asleep by a probe (put to sleep by someone else), or sent to sleep with nothing in flight.
    _S.HEALTHY: frozenset({_S.UNHEALTHY, _S.DRAINING, _S.SLEEPING, _S.FAILED, _S.TERMINATED}),
    # TERMINATING: replaced after unhealthy_replace_after; DRAINING: stopped with requests in flight.
    _S.UNHEALTHY: frozenset({_S.HEALTHY, _S.DRAINING, _S.TERMINATING, _S.FAILED, _S.TERMINATED}),
    # SLEEPING: drained for a sleep.
    _S.DRAINING: frozenset({_S.SLEEPING, _S.TERMINATING, _S.TERMINATED}),
    # HEALTHY: woken; DRAINING/TERMINATING: stopped while asleep; FAILED: its worker died asleep.
    _S.SLEEPING: frozenset({_S.HEALTHY, _S.DRAINING, _S.TERMINATING, _S.FAILED, _S.TERMINATED}),
    # FAILED: the stop was a replacement, which counts as a failure and restarts.
    _S.TERMINATING: frozenset({_S.FAILED, _S.TERMINATED}),
    _S.FAILED: frozenset({_S.PROVISIONING, _S.TERMINATED}),
    _S.TERMINATED: frozenset(),
})
SERVING = frozenset({_S.HEALTHY, _S.UNHEALTHY})  # a worker that answered once, and may hold requests


def check_transition(old: ReplicaState, new: ReplicaState) -> None:
    """Raise unless a replica may go from `old` to `new`."""
    if new is not old and new not in TRANSITIONS[old]:
        raise ApplianceError(f"replica state {old} cannot become {new}", status=500, code="illegal_transition")


def derive_status(desired: int, states: Sequence[ReplicaState], error: str | None, leaving: int = 0) -> tuple[EndpointStatus, str]:
    """Endpoint status from its live replicas and the number still stopping."""
    if error:
        return EndpointStatus.ERROR, error
    if desired == 0 and not states and leaving:
        return EndpointStatus.HEALTHY, f"scaling to zero: {leaving} replica(s) draining or stopping"
    counts: dict[str, int] = {}
    for s in states:
        counts[s.value] = counts.get(s.value, 0) + 1
    healthy = counts.get(ReplicaState.HEALTHY.value, 0)
    others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s != ReplicaState.HEALTHY.value)
    if desired == 0 and not states:
        return EndpointStatus.SCALED_TO_ZERO, "no replicas desired"
    asleep = counts.get(ReplicaState.SLEEPING.value, 0)
    if asleep and asleep == len(states):
        return EndpointStatus.SLEEPING, f"{asleep} replica(s) asleep: the next request wakes them"
    if healthy >= desired and not others:
        return EndpointStatus.HEALTHY, f"{healthy}/{desired} healthy"
    if healthy > 0:
        return EndpointStatus.DEGRADED, f"{healthy} healthy, {len(states) - healthy} not ({others}); {desired} desired"
    if not states:
        return EndpointStatus.PENDING, f"0/{desired} replicas started"
    starting = {ReplicaState.PROVISIONING.value, ReplicaState.STARTING.value}
    if set(counts) <= starting:
        return EndpointStatus.PROVISIONING, f"0/{desired} healthy ({others})"
    return EndpointStatus.UNHEALTHY, f"0/{desired} healthy ({others})"
