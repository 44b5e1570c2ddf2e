"""The autoscaling job: gather each endpoint's metrics, call scaling.decide() under the endpoint's
autoscaling_policy, hand the new count to the supervisor. The supervisor does the rest."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from appliance.control.supervision.load import Load
from appliance.control.scaling.signals import Signals
from appliance.control.supervision.supervisor import Supervisor
from appliance.control.telemetry import Telemetry
from appliance.domain.scaling import Decision, Rule, ScaleState, decide
from appliance.store import Clock, Store, parse_iso

log = logging.getLogger(__name__)


class Autoscaler:
    """Every `interval`: gather each endpoint's metrics, decide, and hand a new count to the supervisor."""

    def __init__(self, store: Store, supervisor: Supervisor, metrics: Signals, load: Load, clock: Clock, telemetry: Telemetry | None = None) -> None:
        self._telemetry = telemetry or supervisor.telemetry
        self._store = store
        self._supervisor = supervisor
        self._metrics = metrics
        self._load = load
        self._clock = clock
        self._notes: dict[str, Mapping[str, str]] = {}
        self._active_since: dict[str, float] = {}  # endpoint → when it was first seen with replicas
        self.evaluations = 0  # completed passes

    async def evaluate(self) -> None:
        try:
            await self._evaluate()
        except Exception:  # one bad pass must not stop autoscaling
            log.exception("autoscaling evaluation failed")
        self.evaluations += 1

    async def _evaluate(self) -> None:
        table = self._supervisor.table
        rows = await self._store.rules.list()  # in creation order: Backend.AI's policy takes the first rule that fires
        by_endpoint: dict[str, list[Rule]] = {}
        for row in rows:
            by_endpoint.setdefault(row["endpoint"], []).append(Rule.of(row))
        last_fired = {row["id"]: parse_iso(row["last_triggered_at"]) for row in rows if row["last_triggered_at"]}
        now = self._clock()
        self._metrics.prune(now)
        for name, config in table.endpoints.items():
            rules = by_endpoint.get(name, [])
            known = self._supervisor.desired_version(name)
            # a request's own keep_alive (Ollama's) replaces the endpoint's until a request without one comes
            idle_timeout = self._load.idle_timeout(name, config.idle_timeout_seconds, config.pin)
            if known is None or (not rules and idle_timeout is None):
                continue
            desired, version = known
            needed = {r.metric for r in rules if r.enabled}
            metrics = await self._metrics.gather(name, needed, now) if needed else {}
            if desired == 0:
                self._active_since.pop(name, None)
            else:
                self._active_since.setdefault(name, now)
            activity = max(self._load.last_request.get(name, 0.0), self._active_since.get(name, now))
            state = ScaleState(
                replicas=desired, min_replicas=config.min_replicas, max_replicas=config.max_replicas, last_fired=last_fired,
                notes=self._notes.get(name, {}), idle_timeout=idle_timeout, last_activity=activity,
                inflight=self._load.total(name) + (1 if name in table.awaiting else 0), policy=config.autoscaling_policy,  # a load in progress is not idle
            )
            decision = decide(rules, metrics, state, now)
            self._notes[name] = decision.notes
            await self._apply(name, decision, config.autoscaling_policy, version)

    async def _apply(self, name: str, decision: Decision, policy: str, version: int) -> None:
        for v in decision.record:
            kind = "autoscale.missing" if v.result == "missing" else "autoscale.suppressed"
            details = {**v.details(), "policy": policy}
            await self._store.events.add(kind, f"endpoint {name}: rule {v.rule}: {v.reason}", endpoint=name, details=details)
        w = decision.winner
        if w is None or w.to_replicas == w.from_replicas:
            return
        way = "out" if w.to_replicas > w.from_replicas else "in"
        kind = "autoscale.idle" if w.rule is None else f"autoscale.scale_{way}"
        who = "idle timeout" if w.rule is None else f"rule {w.rule}"
        others = [v.details() for v in decision.verdicts if v.result == "outvoted"]
        details = {**w.details(), "policy": policy, **({"outvoted": others} if others else {})}
        # compare-and-set: had an operator changed the count while the metrics were gathered, theirs stands
        applied = await self._supervisor.scale(
            name, w.to_replicas, kind, f"endpoint {name}: scale {way} by {who}: {w.reason}", details, [w.rule] if w.rule else [], expected=w.from_replicas,
            expected_version=version,
        )
        if applied:
            self._telemetry.decided(name, way, w.rule)
            if w.rule is None:
                self._telemetry.evicted(name, "idle")
