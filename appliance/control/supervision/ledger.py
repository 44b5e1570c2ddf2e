"""The GPU and port ledger: which replica holds which GPUs and which port. The one record of
holdings; only replica runners change it, on the event loop, so a GPU or a port is never handed
out twice."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.control.host.process import pick_port
from appliance.domain.memory import fmt_bytes
from appliance.domain.placement import Allocation, GpuInfo, GpuRequest, Unplaceable, place

PORT_QUARANTINE = 60.0  # a port another program took is skipped this long


class Ledger:
    def __init__(self, port_range: tuple[int, int]) -> None:
        self._range = port_range
        self._held: dict[str, Allocation] = {}  # replica id → the GPUs it holds (or has reserved while victims leave)
        self._host: dict[str, int] = {}  # replica id → bytes of host memory it claims ([residency] host_memory_budget)
        self._ports: dict[int, str] = {}  # port → the replica holding it
        self._quarantine: dict[int, float] = {}
        self._last_port: int | None = None

    def hold_gpus(self, replica: str, request: GpuRequest, inventory: Sequence[GpuInfo]) -> Allocation:
        """Place `request` beside what the other replicas hold, and record it. Raises Unplaceable."""
        allocation = Allocation(uuids=())
        if request.wants_gpu:
            allocation = place(request, inventory, {k: v for k, v in self._held.items() if k != replica})
        self._held[replica] = allocation
        return allocation

    def hold_host(self, replica: str, claim: int | None, budget: int | None) -> None:
        """Claim host memory for `replica` beside the others' claims. Raises Unplaceable."""
        self._host.pop(replica, None)
        if budget is None or not claim:
            return
        if claim > budget:
            raise Unplaceable(
                f"no room in host memory: a replica claims {fmt_bytes(claim)}, more than the whole budget of {fmt_bytes(budget)} ([residency] host_memory_budget)",
                permanent=True,
            )
        others = sum(self._host.values())
        if others + claim > budget:
            raise Unplaceable(
                f"waiting for host memory: a replica claims {fmt_bytes(claim)}, and {fmt_bytes(others)} of the {fmt_bytes(budget)} budget is claimed"
            )
        self._host[replica] = claim

    def reserve(self, replica: str, allocation: Allocation | None, host: int | None) -> None:
        """Hold what evicted endpoints are freeing for the replica they leave for: no other replica takes
        it meanwhile, and the replica's own placement sees it as its own."""
        if allocation is not None:
            self._held[replica] = allocation
        if host:
            self._host[replica] = host

    def take_port(self, replica: str, now: float) -> int:
        return self.take_ports(replica, now, 1)[0]

    def take_ports(self, replica: str, now: float, count: int) -> list[int]:
        """The next `count` free ports of the range, reserved at once for `replica` (in place of those it
        held): replicas starting together never share one. All or none."""
        self._drop_port(replica)
        self._quarantine = {p: t for p, t in self._quarantine.items() if t > now}
        first, last = self._range
        taken: list[int] = []
        for _ in range(count):
            port = pick_port(first, last, set(self._ports) | set(self._quarantine), start=self._last_port)
            if port is None:
                self._drop_port(replica)
                raise Unplaceable(f"waiting for {count} free ports in {first}-{last}" if count > 1 else f"waiting for a free port in {first}-{last}")
            self._ports[port] = replica
            self._last_port = port
            taken.append(port)
        return taken

    def quarantine(self, port: int, now: float) -> None:
        """Another program took `port` before our worker bound it: skip it for a while."""
        self._quarantine[port] = now + PORT_QUARANTINE

    def release(self, replica: str) -> None:
        """Free what `replica` holds: by holder, never by number, so a port that has since gone to
        another replica stays with it."""
        self._held.pop(replica, None)
        self._host.pop(replica, None)
        self._drop_port(replica)

    def _drop_port(self, replica: str) -> None:
        self._ports = {p: holder for p, holder in self._ports.items() if holder != replica}

    def held(self) -> dict[str, Allocation]:
        return dict(self._held)

    def host_claims(self) -> dict[str, int]:
        return dict(self._host)
