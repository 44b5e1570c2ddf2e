"""GPU inventory records and placement (pure): which GPUs a replica gets.

Placement never hands a GPU out twice: it is a function of the inventory and of what is
currently held, and the supervisor is the only code that adds or releases holdings.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

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

    @property
    def wants_gpu(self) -> bool:
        return self.count > 0 or self.share is not None


@dataclass(frozen=True)
class Allocation:
    uuids: tuple[str, ...]
    share: float | None = None  # None: the GPUs are held whole

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


def _usage(held: Mapping[str, Allocation]) -> tuple[set[str], dict[str, float]]:
    whole: set[str] = set()
    shares: dict[str, float] = {}
    for alloc in held.values():
        for uuid in alloc.uuids:
            if alloc.share is None:
                whole.add(uuid)
            else:
                shares[uuid] = shares.get(uuid, 0.0) + alloc.share
    return whole, shares


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
    roomy = [g for g in named if request.min_free_memory is None or g.memory_free >= request.min_free_memory]
    whole, shares = _usage(held)
    if request.count:
        free = [g for g in roomy if g.uuid not in whole and shares.get(g.uuid, 0.0) <= _EPS]
        free.sort(key=lambda g: (g.memory_used, g.index) if request.placement == "spread" else (g.index,))
        if len(free) < request.count:
            raise Unplaceable(f"waiting for GPUs: {request.count} needed, {len(free)} of {len(named)} matching are free")
        return Allocation(uuids=tuple(g.uuid for g in free[: request.count]))
    assert request.share is not None
    fits = [g for g in roomy if g.uuid not in whole and shares.get(g.uuid, 0.0) + request.share <= 1 + _EPS]
    if not fits:
        raise Unplaceable(f"waiting for GPUs: no matching GPU has a {request.share:g} share free")
    if request.placement == "binpack":
        fits.sort(key=lambda g: (-shares.get(g.uuid, 0.0), g.index))
    else:
        fits.sort(key=lambda g: (shares.get(g.uuid, 0.0), g.memory_used, g.index))
    return Allocation(uuids=(fits[0].uuid,), share=request.share)
