"""Which loaded endpoints to evict so a waiting endpoint's replica fits (pure).

Memory is counted per device: a GPU by its uuid, or host memory under the id "host". The caller
states how many bytes each device that could take the replica is short of, and who holds memory
now; `choose_victims` answers the fewest endpoints to unload, idle and least recently used first,
or raises NoRoom with a sentence saying what blocks the swap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from appliance.domain.memory import fmt_bytes

HOST = "host"  # the device id of host memory (a box with no GPU, or a replica's weights in host RAM)


@dataclass(frozen=True)
class Holder:
    """An endpoint that holds memory now."""

    endpoint: str
    claims: Mapping[str, int]  # device id → bytes its live replicas claim there
    evictable: bool  # False: pinned, or held up by min_replicas > 0, or not on demand
    busy: int  # requests in flight on it
    loaded_at: float  # clock seconds when it was loaded (its oldest live replica started)
    last_used: float  # clock seconds of its last request (loaded_at when none)


@dataclass(frozen=True)
class Shortfall:
    """What must be freed: bytes on each device that could take the replica (<= 0: it fits there
    already), and how many of those devices it needs (whole GPUs: several)."""

    devices: Mapping[str, int]
    count: int = 1


class NoRoom(Exception):
    """No choice of victims makes room; `reason` is one sentence for people (the 503's message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Plan:
    """One device's outcome: the victims taken on it (None: even all of them would not free enough)."""

    device: str
    short: int
    victims: tuple[Holder, ...] | None
    freeable: int = 0  # all that the eligible holders could free there
    blocked: tuple[tuple[Holder, str], ...] = ()  # holders skipped there, and why

    def key(self) -> tuple[int, int, float, str]:
        # fewest victims, then fewest busy ones (a drain delays the swap), then the set whose most
        # recent use is oldest, then the id so that equal plans always pick the same device
        victims = self.victims or ()
        newest = max((h.last_used for h in victims), default=-math.inf)
        return (len(victims), sum(1 for h in victims if h.busy > 0), newest, self.device)


def _why_not(h: Holder, now: float, min_resident: float) -> str | None:
    """Why `h` may not be evicted now, or None when it may."""
    if not h.evictable:
        return "pinned or min_replicas > 0"
    if now - h.loaded_at < min_resident:
        # evicting what was just loaded would thrash: two endpoints taking turns at every request
        return f"loaded {max(now - h.loaded_at, 0):.0f}s ago (min_resident_seconds {min_resident:g})"
    return None


def _plan(device: str, short: int, holders: Sequence[Holder], now: float, min_resident: float, waiting: str) -> _Plan:
    if short <= 0:
        return _Plan(device, short, ())
    here = [h for h in holders if h.claims.get(device, 0) > 0 and h.endpoint != waiting]
    blocked = tuple((h, why) for h in here if (why := _why_not(h, now, min_resident)) is not None)
    skipped = {h.endpoint for h, _ in blocked}
    # idle ones first (a busy one must drain before its memory is free), then least recently used
    eligible = sorted((h for h in here if h.endpoint not in skipped), key=lambda h: (h.busy > 0, h.last_used, h.endpoint))
    taken: list[Holder] = []
    freed = 0
    for h in eligible:
        if freed >= short:
            break  # stop at the first prefix that frees enough: no victim more than needed
        taken.append(h)
        freed += h.claims[device]
    freeable = sum(h.claims[device] for h in eligible)
    return _Plan(device, short, tuple(taken) if freed >= short else None, freeable, blocked)


def choose_victims(short: Shortfall, holders: Sequence[Holder], now: float, min_resident: float, *, waiting: str) -> tuple[str, ...]:
    """The endpoints to unload so that `waiting` fits on `short.count` devices, least recently used
    first; () when it fits already. Raises NoRoom when no choice of victims frees enough."""
    if sum(1 for s in short.devices.values() if s <= 0) >= short.count:
        return ()
    plans = [_plan(d, s, holders, now, min_resident, waiting) for d, s in short.devices.items()]
    feasible = sorted((p for p in plans if p.victims is not None), key=_Plan.key)
    if len(feasible) < short.count:
        raise NoRoom(_reason(short, [p for p in plans if p.victims is None], len(feasible), waiting))
    chosen: dict[str, Holder] = {}
    for p in feasible[: short.count]:
        for h in p.victims or ():
            chosen[h.endpoint] = h  # one endpoint may hold memory on several chosen devices
    return tuple(h.endpoint for h in sorted(chosen.values(), key=lambda h: (h.last_used, h.endpoint)))


def _where(device: str) -> str:
    return "host memory" if device == HOST else device


def _reason(short: Shortfall, stuck: list[_Plan], feasible: int, waiting: str) -> str:
    """One sentence naming the device closest to fitting, how much it lacks and who holds it up."""
    head = f"no room for {waiting}"
    if short.count > 1:
        head += f" (it needs {short.count} devices and {feasible} can be freed)"
    if not stuck:
        return f"{head}: too few devices could take it"
    best = min(stuck, key=lambda p: (p.short - p.freeable, p.device))
    text = f"{head}: {fmt_bytes(best.short)} more is needed on {_where(best.device)}"
    if best.freeable > 0:
        text += f", unloading every endpoint that may go frees only {fmt_bytes(best.freeable)}"
    if not best.blocked:
        return f"{text}, and no other loaded endpoint holds memory there"
    held = "; ".join(f"{h.endpoint}: {why}" for h, why in sorted(best.blocked, key=lambda b: b[0].endpoint))
    return f"{text}, and the endpoints holding it cannot be unloaded ({held})"
