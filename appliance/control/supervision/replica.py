"""A replica and an endpoint as the supervisor knows them, and what a replica's runner
(control/supervision/runner.py) reports back. Only the runner changes a replica's state, through the
transition table in domain/states.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.control.host.process import Worker
from appliance.control.host.replica_log import ReplicaLog
from appliance.domain.health import HealthState
from appliance.domain.placement import Allocation, GpuInfo, GpuRequest
from appliance.domain.specs import EndpointConfig
from appliance.domain.states import EndpointStatus, ReplicaState

GpuSource = Callable[[], Awaitable[list[GpuInfo]]]  # the GPU inventory, read off the event loop


@dataclass
class Replica:
    id: str
    endpoint: str
    generation: int
    work_dir: Path
    log: ReplicaLog
    state: ReplicaState = ReplicaState.PROVISIONING
    port: int | None = None
    grpc_port: int | None = None  # its worker's gRPC port, when its definition declares one
    exited: bool = False  # its leader process exited: never routed again while the rest of its tree ends
    address: str | None = None  # its base URL when not a port of this box (a Ray Serve replica's route)
    allocation: Allocation | None = None
    process: Worker | None = None
    health: HealthState | None = None
    argv: tuple[str, ...] = ()
    restarts: int = 0
    failures: int = 0  # consecutive
    next_start_at: float = 0.0
    started_at: float | None = None
    last_error: str = ""
    waiting_for_capacity: bool = False  # no GPU room yet: during a roll an old replica makes way
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # retry or stop while parked
    room: asyncio.Event = field(default_factory=asyncio.Event)  # another replica let go of its holdings: place again now
    sleeps: bool | None = None  # its engine answers vLLM's /is_sleeping (None: not asked yet)
    nap: asyncio.Event = field(default_factory=asyncio.Event)  # evicted by sleep: drain and sleep (or found asleep by a probe)
    rouse: asyncio.Event = field(default_factory=asyncio.Event)  # asleep, and a request (or /load) wants it back
    found_asleep: bool = False  # the engine was put to sleep by someone else: nothing to drain, no /sleep to send
    task: asyncio.Task[None] | None = None
    wants: tuple[GpuRequest, int | None, list[GpuInfo]] | None = None  # its last placement: GPUs, host bytes, the GPUs seen
    watch: asyncio.Queue[tuple[str, str]] | None = None  # (state, reason) of every record, for a validation's stream

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.HEALTHY and not self.stop_requested.is_set() and not self.nap.is_set() and not self.exited

    @property
    def live(self) -> bool:
        return self.state is not ReplicaState.TERMINATED and not self.stop_requested.is_set()

    @property
    def url(self) -> str:
        return self.address or f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"127.0.0.1:{self.grpc_port}"

    async def wait_for_room(self, seconds: float, *also: asyncio.Future[int]) -> None:
        """Up to `seconds`, or until another replica lets go of what it held, a stop, or one of `also` ends."""
        waits = [asyncio.ensure_future(self.stop_requested.wait()), asyncio.ensure_future(self.room.wait())]
        try:
            await asyncio.wait([*waits, *also], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


@dataclass
class EndpointRun:
    """What the supervisor knows of one endpoint beyond its stored config."""

    name: str
    config: EndpointConfig
    generation: int
    desired: int  # the autoscaler's count, else config.replicas
    updated_at: str = ""
    version: int = 0  # the stored row's: an operator's change bumps it, the autoscaler's count does not
    error: str | None = None
    replicas: dict[str, Replica] = field(default_factory=dict)
    finished: list[Replica] = field(default_factory=list)
    status: tuple[EndpointStatus, str] | None = None
    awaiting: bool = False  # capacity taken away on purpose (wake, roll without room) until a replica is HEALTHY
    blocked: str | None = None  # why it cannot be loaded now (nothing can be evicted for it): requests get 503 at once
    loading_since: float | None = None  # when a request (or /load) asked for it while it had no replica
    sleep_frees: bool | None = None  # False: a sleep of its engine freed no GPU memory (or failed): evictions stop it


class RunnerHost(Protocol):
    """What a runner tells the supervisor."""

    async def recorded(self, r: Replica, changed: bool) -> None: ...

    def poke(self) -> None: ...

    def unrouted(self, r: Replica) -> None: ...

    def finished(self, run: EndpointRun, r: Replica) -> None: ...

    def released(self, by: Replica) -> None: ...

    async def make_room(self, run: EndpointRun, r: Replica, request: GpuRequest, host_claim: int | None, inventory: Sequence[GpuInfo]) -> None: ...

    async def sleep_failed(self, run: EndpointRun, why: str) -> None: ...


