"""Workers yield the CPU to the appliance: a saturated engine must not starve the front door.

Each worker runs in a session of its own, and on Linux with autogroups (the default on most
distributions) every session is one scheduling group, weighed as a whole against the others. An
engine's tree (its API server, engine core and busy-polling compute threads) then gets as much CPU
as the appliance's whole session, whatever the nice value of its threads, and on a box whose cores
it fills the appliance's event loop waits on the run queue for hundreds of milliseconds: streams
arrive in one lump at their end. So each worker's session group, and its leader (whose threads and
children inherit it), run at WORKER_NICE above the appliance: the appliance wins the CPU when both
want it, the engine keeps every cycle the appliance leaves idle. Where the cpu controller is
delegated, the kernel weighs cgroups instead, and the cgroup holding the replicas' cgroups gets the
same nice (`cpu.weight.nice`) against the appliance's own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from appliance.control.host.process import Launcher, Slot, Worker
from appliance.control.host.replica_log import ReplicaLog

log = logging.getLogger(__name__)

WORKER_NICE = 10  # nice 10 weighs 110 against nice 0's 1024: about a tenth of a contended core
_MAX_NICE = 19


def lower_weight(pid: int, nice: int = WORKER_NICE, proc: Path = Path("/proc"), cgroup: Path | None = None) -> list[str]:
    """Runs process `pid` (a worker's leader, just started) and its session's scheduling group at
    `nice` above the appliance, and the cgroup that holds the replicas' cgroups (`cgroup`'s parent)
    at that weight against the appliance's own, where the cpu controller is on: there the kernel
    weighs cgroups, not sessions. Returns what could not be done, in words (nothing when all went)."""
    problems = []
    weight = cgroup.parent / "cpu.weight.nice" if cgroup is not None else None
    if weight is not None and weight.exists():
        try:
            weight.write_text(str(min(_MAX_NICE, nice)))
        except OSError as exc:
            problems.append(f"{weight} {nice}: {exc.strerror or exc}")
    target = min(_MAX_NICE, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < target:
            os.setpriority(os.PRIO_PROCESS, pid, target)  # the leader's threads and children start from it
    except OSError as exc:
        problems.append(f"nice {target}: {exc.strerror or exc}")
    try:
        (proc / str(pid) / "autogroup").write_text(str(target))  # the session's group, as a whole
    except FileNotFoundError:
        pass  # a kernel without autogroups: nice alone sets the weight
    except OSError as exc:
        problems.append(f"autogroup nice {target}: {exc.strerror or exc}")
    return problems


class YieldingLauncher:
    """A launcher whose workers run at a lower CPU weight than the appliance (see the module)."""

    def __init__(self, inner: Launcher, nice: int = WORKER_NICE) -> None:
        self._inner = inner
        self._nice = nice

    async def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, slot: Slot) -> Worker:
        worker = await self._inner(argv, env=env, cwd=cwd, sink=sink, slot=slot)
        if worker.pid is not None:
            problems = lower_weight(worker.pid, self._nice, cgroup=worker.cgroup)  # a few syscalls: no thread needed
            if problems:
                sink.note(f"could not lower the worker's CPU weight ({'; '.join(problems)}): it competes with the appliance for the CPU")
        return worker
