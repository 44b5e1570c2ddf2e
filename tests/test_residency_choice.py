"""The victim chooser (pure): which loaded endpoints to evict so a waiting one fits. Property tests over
random holders and shortfalls (hypothesis, derandomized), a brute-force oracle for when no choice fits,
and a few worked examples."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.domain.residency import Holder, NoRoom, Shortfall, choose_victims

GIB = 1 << 30
NOW = 1000.0
DEVICES = ("GPU-0", "GPU-1", "GPU-2", "host")
NAMES = ("a", "b", "c", "d", "e", "f")
WAITING = "w"  # the waiting endpoint's name (it may also hold memory itself: see holders())

PROFILE = settings(max_examples=300, derandomize=True, deadline=None)


@st.composite
def holder(draw: st.DrawFn, name: str) -> Holder:
    devices = draw(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=len(DEVICES), unique=True))
    loaded_at = draw(st.integers(900, 1000))
    return Holder(
        endpoint=name,
        claims={d: draw(st.integers(1, 12)) for d in devices},
        evictable=draw(st.booleans()),
        busy=draw(st.integers(0, 2)),
        loaded_at=float(loaded_at),
        last_used=float(draw(st.integers(loaded_at, 1000))),
    )


@st.composite
def holders(draw: st.DrawFn) -> list[Holder]:
    names = draw(st.lists(st.sampled_from((*NAMES, WAITING)), max_size=len(NAMES) + 1, unique=True))
    return [draw(holder(n)) for n in names]


def shortfalls(devices: Sequence[str] = DEVICES, max_count: int = 3) -> st.SearchStrategy[Shortfall]:
    return st.builds(
        Shortfall,
        devices=st.dictionaries(st.sampled_from(devices), st.integers(-4, 40), min_size=1, max_size=len(devices)),
        count=st.integers(1, max_count),
    )


RESIDENT = st.sampled_from((0.0, 30.0, 60.0))


def eligible(h: Holder, min_resident: float) -> bool:
    return h.evictable and h.endpoint != WAITING and NOW - h.loaded_at >= min_resident


def freed(victims: Sequence[Holder], device: str) -> int:
    return sum(h.claims.get(device, 0) for h in victims)


def oracle_fits(short: Shortfall, hs: Sequence[Holder], min_resident: float) -> bool:
    """Brute force: a device can take the replica iff evicting every eligible holder frees enough there."""
    ok = sum(1 for d, s in short.devices.items() if freed([h for h in hs if eligible(h, min_resident)], d) >= s)
    return ok >= short.count


def take_order(h: Holder) -> tuple[bool, float, str]:
    return (h.busy > 0, h.last_used, h.endpoint)


@PROFILE
@given(short=shortfalls(), hs=holders(), min_resident=RESIDENT)
def test_victims_are_eligible_and_free_enough(short: Shortfall, hs: list[Holder], min_resident: float) -> None:
    fits = oracle_fits(short, hs, min_resident)
    try:
        names = choose_victims(short, hs, NOW, min_resident, waiting=WAITING)
    except NoRoom as exc:
        assert not fits, "NoRoom although evicting every eligible holder would make room"
        assert str(exc) == exc.reason and exc.reason.startswith(f"no room for {WAITING}")
        return
    assert fits
    by_name = {h.endpoint: h for h in hs}
    victims = [by_name[n] for n in names]
    assert len(set(names)) == len(names)
    # never pinned / held by min_replicas, never the waiting endpoint, never one loaded too recently
    assert all(eligible(h, min_resident) for h in victims)
    # least recently used first
    assert [h.endpoint for h in sorted(victims, key=lambda h: (h.last_used, h.endpoint))] == list(names)
    # enough freed on `count` devices; nothing evicted when it fits already
    assert sum(1 for d, s in short.devices.items() if freed(victims, d) >= s) >= short.count
    if sum(1 for s in short.devices.values() if s <= 0) >= short.count:
        assert names == ()
    # every victim frees memory somewhere that is short
    assert all(any(h.claims.get(d, 0) > 0 for d, s in short.devices.items() if s > 0) for h in victims)


@PROFILE
@given(short=shortfalls(max_count=1), hs=holders(), min_resident=RESIDENT)
def test_one_device_victims_are_a_minimal_prefix(short: Shortfall, hs: list[Holder], min_resident: float) -> None:
    """With one device to free, the victims all come from one device and are the shortest prefix of its
    candidates (idle before busy, least recently used first) that frees enough: no victim more than needed."""
    try:
        names = choose_victims(short, hs, NOW, min_resident, waiting=WAITING)
    except NoRoom:
        return
    if not names:
        return
    by_name = {h.endpoint: h for h in hs}
    victims = sorted((by_name[n] for n in names), key=take_order)

    def holds_on(d: str) -> bool:
        s = short.devices[d]
        if s <= 0 or not all(h.claims.get(d, 0) > 0 for h in victims) or freed(victims, d) < s:
            return False
        minimal = freed(victims[:-1], d) < s  # without the last one taken it would be short
        skipped = [h for h in hs if eligible(h, min_resident) and h.claims.get(d, 0) > 0 and h.endpoint not in names]
        # a skipped candidate on that device never comes before a victim in the order (so: an older idle one
        # is never passed over for a more recent idle one, and a busy one never for an idle one)
        ordered = all(take_order(u) > take_order(v) for u in skipped for v in victims)
        return minimal and ordered

    assert any(holds_on(d) for d in short.devices), (names, short)


@PROFILE
@given(s=st.integers(1, 40), hs=holders(), min_resident=RESIDENT)
def test_idle_and_least_recently_used_first_on_one_device(s: int, hs: list[Holder], min_resident: float) -> None:
    device = "GPU-0"
    try:
        names = choose_victims(Shortfall({device: s}), hs, NOW, min_resident, waiting=WAITING)
    except NoRoom:
        assert not oracle_fits(Shortfall({device: s}), hs, min_resident)
        return
    candidates = [h for h in hs if eligible(h, min_resident) and h.claims.get(device, 0) > 0]
    victims = [h for h in candidates if h.endpoint in names]
    others = [h for h in candidates if h.endpoint not in names]
    assert len(victims) == len(names)
    for v in victims:
        for u in others:
            if v.busy == 0 and u.busy == 0:
                assert (u.last_used, u.endpoint) > (v.last_used, v.endpoint), "a more recently used idle holder went first"
            if v.busy > 0:
                assert u.busy > 0, "a busy holder was evicted while an idle one on the same device was not"
    last = max(victims, key=take_order)
    assert freed(victims, device) >= s > freed([v for v in victims if v is not last], device)


# --- examples ------------------------------------------------------------------------------------------


def h(name: str, gib: float, *, device: str = "GPU-0", evictable: bool = True, busy: int = 0, loaded_at: float = 0.0, last_used: float | None = None) -> Holder:
    return Holder(name, {device: int(gib * GIB)}, evictable, busy, loaded_at, loaded_at if last_used is None else last_used)


def test_pinned_one_stays_and_the_other_goes() -> None:
    # a 24 GiB GPU holding A (pinned, 10 GiB) and B (10 GiB): C needs 10 GiB, 4 are free, 6 must go
    hs = [h("A", 10, evictable=False), h("B", 10)]
    assert choose_victims(Shortfall({"GPU-0": 6 * GIB}), hs, NOW, 30, waiting="C") == ("B",)


def test_everything_pinned_says_why() -> None:
    hs = [h("A", 10, evictable=False), h("B", 10, evictable=False)]
    with pytest.raises(NoRoom) as caught:
        choose_victims(Shortfall({"GPU-0": 6 * GIB}), hs, NOW, 30, waiting="C")
    reason = caught.value.reason
    assert reason == str(caught.value)
    assert reason.startswith("no room for C: 6 GiB more is needed on GPU-0")
    assert "A: pinned or min_replicas > 0" in reason and "B: pinned or min_replicas > 0" in reason


def test_recently_loaded_is_not_evicted() -> None:
    # host memory on a box with no GPU
    hs = [h("A", 10, device="host", evictable=False), h("B", 10, device="host", loaded_at=NOW - 12)]
    with pytest.raises(NoRoom) as caught:
        choose_victims(Shortfall({"host": 6 * GIB}), hs, NOW, 30, waiting="C")
    assert caught.value.reason == (
        "no room for C: 6 GiB more is needed on host memory, and the endpoints holding it cannot be unloaded "
        "(A: pinned or min_replicas > 0; B: loaded 12s ago (min_resident_seconds 30))"
    )
    assert choose_victims(Shortfall({"host": 6 * GIB}), [h("B", 10, device="host", loaded_at=NOW - 31)], NOW, 30, waiting="C") == ("B",)


def test_idle_before_busy_and_oldest_first() -> None:
    hs = [h("old-busy", 8, busy=2, last_used=10), h("new-idle", 8, last_used=500), h("old-idle", 8, last_used=100)]
    assert choose_victims(Shortfall({"GPU-0": 8 * GIB}), hs, NOW, 0, waiting="C") == ("old-idle",)
    assert choose_victims(Shortfall({"GPU-0": 12 * GIB}), hs, NOW, 0, waiting="C") == ("old-idle", "new-idle")
    assert choose_victims(Shortfall({"GPU-0": 20 * GIB}), hs, NOW, 0, waiting="C") == ("old-busy", "old-idle", "new-idle")


def test_fits_already_or_on_the_cheapest_devices() -> None:
    hs = [h("a", 8, device="GPU-0", last_used=100), h("b", 8, device="GPU-1", last_used=50), h("c", 4, device="GPU-2"), h("d", 4, device="GPU-2")]
    assert choose_victims(Shortfall({"GPU-0": 0, "GPU-1": 5 * GIB}), hs, NOW, 0, waiting="w") == ()
    # one GPU: GPU-1's single victim is older than GPU-0's; GPU-2 would take two
    assert choose_victims(Shortfall({"GPU-0": 5 * GIB, "GPU-1": 5 * GIB, "GPU-2": 6 * GIB}), hs, NOW, 0, waiting="w") == ("b",)
    # two whole GPUs: both single-victim devices
    assert choose_victims(Shortfall({"GPU-0": 5 * GIB, "GPU-1": 5 * GIB, "GPU-2": 6 * GIB}, count=2), hs, NOW, 0, waiting="w") == ("b", "a")


def test_several_devices_name_the_closest_one() -> None:
    hs = [h("a", 8, device="GPU-0", evictable=False), h("b", 2, device="GPU-1", evictable=False)]
    with pytest.raises(NoRoom) as caught:
        choose_victims(Shortfall({"GPU-0": 20 * GIB, "GPU-1": 3 * GIB, "GPU-2": 0}, count=2), hs, NOW, 0, waiting="w")
    assert caught.value.reason == (
        "no room for w (it needs 2 devices and 1 can be freed): 3 GiB more is needed on GPU-1, "
        "and the endpoints holding it cannot be unloaded (b: pinned or min_replicas > 0)"
    )
