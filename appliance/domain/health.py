"""The health state machine of one replica (Backend.AI semantics), as pure functions of time.

Probes run from spawn. A pass makes the replica HEALTHY and clears the failure count.
A failure counts only once `initial_delay` has passed since spawn (or at once, if the
replica was ever healthy); the (max_retries+1)-th counted failure in a row makes it
UNHEALTHY. So a replica that never answers is UNHEALTHY at about
`initial_delay + interval × (max_retries + 1)`, and a healthy one that stops answering
at about `interval × (max_retries + 1)` after its last pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from appliance.domain.specs import HealthCheck


class Health(StrEnum):
    UNKNOWN = "UNKNOWN"  # no pass yet and not yet failed out
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True)
class HealthState:
    spawned_at: float
    status: Health = Health.UNKNOWN
    consecutive_failures: int = 0  # counted failures only
    ever_healthy: bool = False
    healthy_since: float | None = None
    unhealthy_since: float | None = None
    last_probe_at: float | None = None
    last_result: str = ""


def observe(state: HealthState, check: HealthCheck, *, passed: bool, detail: str, now: float) -> HealthState:
    """The state after one probe result at time `now`."""
    if passed:
        return replace(
            state,
            status=Health.HEALTHY,
            consecutive_failures=0,
            ever_healthy=True,
            healthy_since=state.healthy_since if state.status is Health.HEALTHY else now,
            unhealthy_since=None,
            last_probe_at=now,
            last_result=detail,
        )
    grace = not state.ever_healthy and now - state.spawned_at <= check.initial_delay
    failures = state.consecutive_failures if grace else state.consecutive_failures + 1
    status = state.status
    if failures > check.max_retries and status is not Health.UNHEALTHY:
        status = Health.UNHEALTHY
    return replace(
        state,
        status=status,
        consecutive_failures=failures,
        healthy_since=None if status is not Health.HEALTHY else state.healthy_since,
        unhealthy_since=(state.unhealthy_since or now) if status is Health.UNHEALTHY else None,
        last_probe_at=now,
        last_result=detail,
    )


def due_for_replacement(state: HealthState, replace_after: float, now: float) -> bool:
    return state.status is Health.UNHEALTHY and state.unhealthy_since is not None and now - state.unhealthy_since >= replace_after


def next_probe_delay(started: float, finished: float, interval: float) -> float:
    """Probes start every `interval`; one that overran is followed at once, never overlapped."""
    return max(0.0, started + interval - finished)


def probe_access_line(check: HealthCheck) -> Callable[[str], bool] | None:
    """A test for the worker's own access-log line of a passing probe of `check`: the wall of them hides
    everything else in a replica's log. Knows uvicorn's (vLLM, SGLang, transformers serve:
    `"GET /health HTTP/1.1" 200 OK`), the common log format's (aiohttp, http.server: `"GET /health HTTP/1.1" 200 -`)
    and llama.cpp's (`request: GET /health 127.0.0.1 200`). None when the check is a TCP connect (no line to hide).
    A probe answered with another status is not matched: a failing probe's line stays in sight."""
    if check.path is None:
        return None
    path, status = re.escape(check.path), check.expected_status_code
    pattern = re.compile(rf'"GET {path}(?:\?[^" ]*)? HTTP/[0-9.]+" {status}(?!\d)|\bGET {path}(?:\?\S*)? \S+ {status}(?!\d)')
    needle = check.path

    def matches(line: str) -> bool:
        return needle in line and pattern.search(line) is not None

    return matches
