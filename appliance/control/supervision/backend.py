"""The seam between the replica state machine (runner.py, prober.py, sleep.py) and the workers it acts
on: every effect on a worker (start, probe, the engine's sleep calls, stop through the Worker handle)
goes through a ReplicaBackend, as Ray Serve's ActorReplicaWrapper keeps effects out of its
DeploymentState. LocalBackend runs workers as processes of this box; the tests drive the state machine
through a fake one with no process at all."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from appliance.control.host.listener import Intruder, foreign_listener
from appliance.control.host.process import Launcher, Slot, Worker
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.supervision.probe import asleep, probe
from appliance.control.supervision.replica import Replica
from appliance.domain.runtimes import WorkerSpec
from appliance.domain.specs import EndpointConfig, HealthCheck

_ENGINE_CALL = 120.0  # seconds for /sleep or /wake_up: moving tens of GiB between GPU and host takes a while


@dataclass(frozen=True)
class ProbeResult:
    passed: bool
    detail: str
    intruder: Intruder | None = None  # another program answered on the replica's port (the probe then fails)
    moved: bool = False  # the worker answers at a new address (a Ray replica restarted elsewhere): route it there


class ReplicaBackend(Protocol):
    places: bool  # it places replicas and prepares their workers where they run (Ray): the runner holds no GPU or port for them

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def place(self, config: EndpointConfig, r: Replica) -> WorkerSpec:
        """Only when `places`: what the runner needs of the worker (health check, served name); built where it runs."""
        ...

    async def start(self, argv: tuple[str, ...], *, env: dict[str, str], cwd: Path, sink: ReplicaLog, slot: Slot,
                    replica: Replica | None = None, config: EndpointConfig | None = None) -> Worker:
        """Start the worker; stopping it is the Worker's own stop()."""
        ...

    async def probe(self, r: Replica, check: HealthCheck, deep_model: str | None) -> ProbeResult:
        """One health check of the replica's worker (Backend.AI's: the caller counts)."""
        ...

    async def asleep(self, r: Replica) -> bool | None:
        """vLLM's /is_sleeping: None when the engine has no sleep API."""
        ...

    async def engine_call(self, r: Replica, path: str) -> str | None:
        """POST `path` to the engine (/sleep?level=1, /wake_up): None on 200, else what went wrong."""
        ...

    def forget(self, r: Replica) -> None:
        """The replica's worker ended: drop what was kept about it."""
        ...


class LocalBackend:
    """Workers as process trees of this box, on loopback ports; a probe passes only when the socket that
    answered belongs to the replica's own tree (control/host/listener.py)."""

    places = False

    def __init__(self, launcher: Launcher) -> None:
        self._launch = launcher
        self._session: aiohttp.ClientSession | None = None
        self._checks: dict[tuple[str, int], _ListenerCheck] = {}  # (replica, port): its HTTP port and its gRPC one

    async def open(self) -> None:
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def place(self, config: EndpointConfig, r: Replica) -> WorkerSpec:
        raise NotImplementedError("the runner places local replicas itself (ledger, ports, prepare)")

    async def start(self, argv: tuple[str, ...], *, env: dict[str, str], cwd: Path, sink: ReplicaLog, slot: Slot,
                    replica: Replica | None = None, config: EndpointConfig | None = None) -> Worker:
        return await self._launch(argv, env=env, cwd=cwd, sink=sink, slot=slot)

    async def probe(self, r: Replica, check: HealthCheck, deep_model: str | None) -> ProbeResult:
        assert self._session is not None
        passed, detail = await probe(self._session, r.url, check, deep_model=deep_model)
        worker = r.process
        if not passed or worker is None or worker.pid is None or r.port is None:
            return ProbeResult(passed, detail)  # a worker with no OS process of its own (tests' in-process ones) has no socket to check
        for port in (r.port, r.grpc_port):
            if port is None:
                continue
            mine = self._checks.setdefault((r.id, port), _ListenerCheck())
            intruder = await asyncio.to_thread(foreign_listener, port, worker.pid, worker.cgroup, mine.holders, mine.ours)
            if intruder is not None:
                return ProbeResult(False, f"port {port} is held by {intruder.describe()}", intruder)
        return ProbeResult(passed, detail)

    async def asleep(self, r: Replica) -> bool | None:
        assert self._session is not None
        return await asleep(self._session, r.url)

    async def engine_call(self, r: Replica, path: str) -> str | None:
        assert self._session is not None
        name = path.split("?")[0]
        try:
            async with self._session.post(r.url + path, timeout=aiohttp.ClientTimeout(total=_ENGINE_CALL)) as resp:
                if resp.status == 200:
                    return None
                text = (await resp.content.read(300)).decode(errors="replace")
                return f"POST {name}: HTTP {resp.status}: {text}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"POST {name}: {exc.__class__.__name__}: {exc}"

    def forget(self, r: Replica) -> None:
        self._checks = {k: v for k, v in self._checks.items() if k[0] != r.id}


class _ListenerCheck:
    """What the listener check of one replica found once and need not look up again."""

    def __init__(self) -> None:
        self.holders: dict[int, Intruder] = {}  # socket inode → its process
        self.ours: set[int] = set()  # listening sockets already found in the replica's tree
