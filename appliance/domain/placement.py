"""GPU inventory records and placement (pure): which GPUs a replica gets.

Placement never hands a GPU out twice: it is a function of the inventory and of what is
currently held, and the supervisor is the only code that adds or releases holdings.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from appliance.domain.memory import budget, fmt_bytes

_EPS = 1e-9  # shares are decimals such as 0.1 + 0.2: compare with a tolerance


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory: int | None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    utilization_gpu: int | None = None
    utilization_memory: int | None = None
    mig_mode: Literal["enabled", "disabled", "unsupported"] = "unsupported"
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_used


def visible(gpus: Sequence[GpuInfo], devices: str | Sequence[int | str]) -> list[GpuInfo]:
    """The GPUs the config lets the appliance use ([gpus] devices)."""
    if devices == "all":
        return list(gpus)
    if devices == "none":
        return []
    wanted = {str(d) for d in devices}
    return [g for g in gpus if str(g.index) in wanted or g.uuid in wanted]


# --- placement (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRequest:
    count: int = 0
    share: float | None = None
    name: str | None = None
    min_free_memory: int | None = None
    placement: Literal["spread", "binpack"] = "spread"
    memory: int | None = None  # bytes stated (split over `count` whole GPUs): the claim, exactly
    needs: int | None = None  # bytes estimated: a share claims the larger of this and share × the GPU's budget
    reserve: int = 0  # bytes of each GPU never handed out ([gpus] memory_reserve)

    @property
    def wants_gpu(self) -> bool:
        return self.count > 0 or self.share is not None or self.memory is not None

    @property
    def per_gpu(self) -> int | None:
        wanted = self.memory if self.memory is not None else self.needs
        return None if wanted is None else -(-wanted // max(1, self.count))


@dataclass(frozen=True)
class Allocation:
    uuids: tuple[str, ...]
    share: float | None = None  # None, with no claim: the GPUs are held whole
    claim: int | None = None  # bytes of memory claimed on each GPU, when the GPU is shared
    fraction: float | None = None  # the claim ÷ the GPU's total memory, as engines take it

    @property
    def whole(self) -> bool:
        return self.share is None and self.claim is None

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.uuids)


@dataclass(frozen=True)
class Unplaceable(Exception):
    """No GPU fits now. `permanent`: none ever could on this box (the endpoint goes to ERROR)."""

    reason: str
    permanent: bool = field(default=False)

    def __str__(self) -> str:
        return self.reason


def _usage(held: Mapping[str, Allocation]) -> tuple[set[str], dict[str, float], dict[str, int]]:
    whole: set[str] = set()
    shares: dict[str, float] = {}
    claims: dict[str, int] = {}
    for alloc in held.values():
        for uuid in alloc.uuids:
            if alloc.whole:
                whole.add(uuid)
                continue
            if alloc.share is not None:
                shares[uuid] = shares.get(uuid, 0.0) + alloc.share
            claims[uuid] = claims.get(uuid, 0) + (alloc.claim or 0)
    return whole, shares, claims


def claimed(held: Mapping[str, Allocation]) -> dict[str, int]:
    """Bytes claimed on each GPU by the replicas sharing it (a GPU held whole is not in it)."""
    return _usage(held)[2]


def _too_big(per_gpu: int, named: Sequence[GpuInfo], reserve: int) -> Unplaceable | None:
    largest = max(named, key=lambda g: budget(g.memory_total, reserve))
    room = budget(largest.memory_total, reserve)
    if per_gpu <= room:
        return None
    return Unplaceable(
        f"no GPU available: a replica claims {fmt_bytes(per_gpu)} of GPU memory, and the largest GPU's budget is {fmt_bytes(room)} "
        f"(GPU {largest.index}: {fmt_bytes(largest.memory_total)} less the {fmt_bytes(reserve)} reserve)",
        permanent=True,
    )


def _busy(g: GpuInfo, shares: Mapping[str, float], claims: Mapping[str, int], reserve: int) -> str:
    share = shares.get(g.uuid, 0.0)
    held = f", {share:g} share held" if share > _EPS else ""
    return f"GPU {g.index}: {fmt_bytes(claims.get(g.uuid, 0))} of {fmt_bytes(budget(g.memory_total, reserve))} claimed{held}"


def claim_on_gpu(request: GpuRequest, g: GpuInfo) -> int:
    """Bytes a shared-GPU replica claims on `g`."""
    if request.memory is not None:
        return request.memory
    return max(int((request.share or 0.0) * budget(g.memory_total, request.reserve)), request.per_gpu or 0)


def holdings(held: Mapping[str, Allocation], gpus: Sequence[GpuInfo], reserve: int) -> dict[str, dict[str, int]]:
    """Bytes each holder claims on each GPU; a GPU held whole counts as its whole budget."""
    totals = {g.uuid: budget(g.memory_total, reserve) for g in gpus}
    return {
        holder: {uuid: (totals.get(uuid, 0) if alloc.whole else (alloc.claim or 0)) for uuid in alloc.uuids}
        for holder, alloc in held.items()
    }


def claims_by_device(held: Mapping[str, Allocation], gpus: Sequence[GpuInfo], reserve: int) -> dict[str, int]:
    """Bytes claimed on each GPU by all holders together (a GPU held whole: its whole budget)."""
    taken: dict[str, int] = {}
    for per in holdings(held, gpus, reserve).values():
        for uuid, n in per.items():
            taken[uuid] = taken.get(uuid, 0) + n
    return taken


def shortfall(request: GpuRequest, gpus: Sequence[GpuInfo], held: Mapping[str, Allocation]) -> dict[str, int]:
    """Bytes that must be freed on each GPU that could take the replica (≤ 0: its claim fits beside what
    `held` holds). A replica of whole GPUs needs every claim on a GPU gone."""
    if not request.wants_gpu:
        return {}
    taken = claims_by_device(held, gpus, request.reserve)
    out: dict[str, int] = {}
    for g in gpus:
        if request.name is not None and not fnmatch.fnmatch(g.name, request.name):
            continue
        here = taken.get(g.uuid, 0)
        out[g.uuid] = here if request.count else here + claim_on_gpu(request, g) - budget(g.memory_total, request.reserve)
    return out


def place(request: GpuRequest, gpus: Sequence[GpuInfo], held: Mapping[str, Allocation]) -> Allocation:
    """Choose GPUs for one replica, given what other replicas hold."""
    if not request.wants_gpu:
        return Allocation(uuids=())
    if not gpus:
        raise Unplaceable("no GPU available: the appliance may use no GPU on this box ([gpus] devices)", permanent=True)
    named = [g for g in gpus if request.name is None or fnmatch.fnmatch(g.name, request.name)]
    if not named:
        names = ", ".join(sorted({g.name for g in gpus}))
        raise Unplaceable(f"no GPU available: none is named like {request.name!r} (this box has {names})", permanent=True)
    if request.count > len(named):
        raise Unplaceable(f"no GPU available: {request.count} GPUs asked for, this box has {len(named)} that match", permanent=True)
    reserve = request.reserve
    per_gpu = request.per_gpu
    if per_gpu is not None and (problem := _too_big(per_gpu, named, reserve)):
        raise problem
    roomy = [g for g in named if request.min_free_memory is None or g.memory_free >= request.min_free_memory]
    whole, shares, claims = _usage(held)
    if request.count:
        unheld = [g for g in roomy if g.uuid not in whole and shares.get(g.uuid, 0.0) <= _EPS and not claims.get(g.uuid)]
        # With a known claim, free in fact too: a stopped engine's memory can stay held for seconds after its exit.
        free = [g for g in unheld if per_gpu is None or g.memory_free >= per_gpu]
        free.sort(key=lambda g: (g.memory_used, g.index) if request.placement == "spread" else (g.index,))
        if len(free) < request.count:
            raise Unplaceable(f"waiting for GPUs: {request.count} needed, {len(free)} of {len(named)} matching are free")
        chosen = free[: request.count]
        # whole GPUs: the engine's own default, unless a claim was stated
        fraction = None if request.memory is None or per_gpu is None else min(per_gpu / g.memory_total for g in chosen)
        return Allocation(uuids=tuple(g.uuid for g in chosen), fraction=fraction)

    def claim_on(g: GpuInfo) -> int:
        return claim_on_gpu(request, g)

    free_gpus = [g for g in roomy if g.uuid not in whole]
    by_share = [g for g in free_gpus if request.share is None or shares.get(g.uuid, 0.0) + request.share <= 1 + _EPS]
    by_claims = [g for g in by_share if claims.get(g.uuid, 0) + claim_on(g) <= budget(g.memory_total, reserve)]
    # A claim must also be free in fact: a stopped engine's memory can stay held for seconds after its exit.
    fits = [g for g in by_claims if g.memory_free >= claim_on(g)]
    if not fits:
        if not by_share:
            what = "every matching GPU is held whole" if request.share is None else f"no matching GPU has a {request.share:g} share free"
            raise Unplaceable(f"waiting for GPUs: {what}")
        if by_claims:
            states = "; ".join(f"GPU {g.index}: {fmt_bytes(g.memory_free)} free" for g in by_claims)
            raise Unplaceable(f"waiting for GPUs: a replica claims {fmt_bytes(claim_on(by_claims[0]))}, not yet free by NVML ({states})")
        states = "; ".join(_busy(g, shares, claims, reserve) for g in by_share)
        raise Unplaceable(f"waiting for GPUs: a replica claims {fmt_bytes(claim_on(by_share[0]))} of GPU memory, and no matching GPU has it free ({states})")
    if request.placement == "binpack":
        fits.sort(key=lambda g: (-shares.get(g.uuid, 0.0), -claims.get(g.uuid, 0), g.index))
    else:
        fits.sort(key=lambda g: (shares.get(g.uuid, 0.0), claims.get(g.uuid, 0), g.memory_used, g.index))
    g = fits[0]
    claim = claim_on(g)
    return Allocation(uuids=(g.uuid,), share=request.share, claim=claim, fraction=claim / g.memory_total if g.memory_total else None)
