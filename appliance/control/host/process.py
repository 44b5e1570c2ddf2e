"""One worker subprocess: spawn, logs, stop, and the stop of one left by an earlier run.
No decisions are made here.

Each worker runs in its own session (so its process group can be signalled as a whole),
dies with the appliance (parent-death signal), and writes stdout+stderr into a pipe that a
thread copies into a size-capped, rotating log file — the event loop never touches it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from appliance.control.host.cgroups import KILL_WAIT, Cgroups, Isolation
from appliance.control.host.identity import WorkerIdentity
from appliance.control.host.replica_log import ReplicaLog, _pump
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

# Runs as the worker's pid before exec: asks the kernel to SIGKILL it when the appliance dies
# (the setting survives exec), joins the replica's cgroup when it has one (before any child
# exists, so none can start outside it), drops to the worker's uid and gid when it has its own
# (after the join, which needs the privileges; with the account's groups, or none for a uid with
# no account), then becomes the worker. A preexec_fn would do the same
# inside fork, where a lock held by another thread of the appliance can deadlock the child.
_TRAMPOLINE = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 9)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "try:\n    sys.argv[2] and open(sys.argv[2] + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
    "except OSError as e:\n    print(f'could not join cgroup {sys.argv[2]}: {e.strerror}', flush=True); os._exit(126)\n"
    "if sys.argv[3]:\n    uid, gid, user = sys.argv[3].split(':', 2)\n"
    "    os.initgroups(user, int(gid)) if user else os.setgroups([])\n"
    "    os.setgid(int(gid)); os.setuid(int(uid))\n"
    "try:\n    os.execv(sys.argv[4], sys.argv[4:])\n"
    "except OSError as e:\n    print(f'could not start {sys.argv[4]}: {e.strerror}', flush=True); os._exit(127)\n"
)


def resolve_executable(name: str) -> str:
    """`python` is the appliance's own interpreter; other bare names are looked up beside it, then on PATH."""
    if name in ("python", "python3"):
        return sys.executable
    if "/" in name:
        return name
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise ApplianceError(f"command not found: {name!r} (is its runtime installed next to the appliance?)", status=422, code="command_not_found")
    return found


class Worker(Protocol):
    """A replica's running worker, as the runner sees it."""

    pid: int | None  # None: not an OS process of its own (nothing to find again after a restart)
    started_at: float | None
    cgroup: Path | None  # the cgroup holding its whole tree, if it has one

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float) -> int: ...


@dataclass(frozen=True)
class Slot:
    """Who a worker is for and what it may use: its replica's name and resources."""

    name: str
    cpu: float | None = None
    mem: int | None = None


class Launcher(Protocol):
    """Starts a replica's worker; ProcessLauncher is the one the appliance uses."""

    async def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, slot: Slot) -> Worker: ...


class ProcessLauncher:
    """Workers as OS processes, each in a cgroup of its own when `isolation` has cgroups."""

    def __init__(self, isolation: Isolation, identity: WorkerIdentity | None = None) -> None:
        self.isolation = isolation
        self.identity = identity

    async def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, slot: Slot) -> WorkerProcess:
        cgroups = self.isolation.cgroups
        leaf = None
        if cgroups is not None:
            try:
                leaf = await asyncio.to_thread(cgroups.leaf, slot.name, cpu=slot.cpu, mem=slot.mem)
            except OSError as exc:
                raise ApplianceError(f"could not set up the replica's cgroup: {exc.strerror or exc}", status=500, code="spawn_failed") from None
        try:
            return await WorkerProcess.spawn(argv, env=env, cwd=cwd, sink=sink, cgroup=leaf, cgroups=cgroups, identity=self.identity)
        except ApplianceError:
            if leaf is not None and cgroups is not None:
                await asyncio.to_thread(cgroups.end, leaf, 0.0)
            raise


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, started_at: float, pump: threading.Thread, cgroup: Path | None, cgroups: Cgroups | None) -> None:
        self._proc = proc
        self.pid: int | None = proc.pid
        self.started_at: float | None = started_at  # kernel start time, to tell our process from a reused pid
        self._pump = pump
        self.cgroup = cgroup
        self._cgroups = cgroups

    @classmethod
    async def spawn(
        cls, argv: Iterable[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, cgroup: Path | None = None, cgroups: Cgroups | None = None,
        identity: WorkerIdentity | None = None,
    ) -> WorkerProcess:
        args = list(argv)
        args[0] = resolve_executable(args[0])
        if identity is not None and (blocked := await asyncio.to_thread(identity.unreachable, args[0])) is not None:
            # Said here, in words, rather than as the worker's bare "Permission denied".
            raise ApplianceError(
                f"workers run as uid {identity.uid}, which cannot reach {blocked} (to start {args[0]}): install the runtime where other users "
                f'can read it, create the appliance-worker account with access to it, or set workers.user = "root"',
                status=422, code="spawn_failed",
            )
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), str(cgroup or ""),
                f"{identity.uid}:{identity.gid}:{identity.user if identity.account else ''}" if identity else "", *args,
                cwd=str(cwd),
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            raise ApplianceError(f"could not start {args[0]}: {exc.strerror or exc}", status=422, code="spawn_failed") from None
        finally:
            os.close(write_fd)
        pump = threading.Thread(target=_pump, args=(read_fd, sink), name=f"log-{proc.pid}", daemon=True)
        pump.start()
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = time.time()
        return cls(proc, started, pump, cgroup, cgroups)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """The leader's exit code, as soon as it has exited. Its helpers may live on and hold the log's
        pipe open: stop() ends them and then waits for the log's last lines."""
        return await self._proc.wait()

    async def stop(self, grace: float) -> int:
        """End the worker's whole process tree, also when its leader already exited: its cgroup
        (Cgroups.end) or else its process group (end_group). Returns the leader's exit code once no
        process of the tree is left, so what it held can be handed out again."""
        if self.cgroup is not None and self._cgroups is not None:
            await asyncio.to_thread(self._cgroups.end, self.cgroup, grace)
        if self.cgroup is None or self._proc.returncode is None:
            # No cgroup, or a leader stopped before it joined its cgroup (a stop right after the start):
            # its process group (its own session) holds it then, also once the leader has died: the kernel
            # gives no new process the group's id while a member of the group lives.
            await asyncio.to_thread(end_group, self._proc.pid, grace)
        code = await self._proc.wait()
        await asyncio.to_thread(self._pump.join, 5.0)  # the tree is gone: its last lines are in the log before anyone reads it
        return code


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (blocking; zombies are already dead and hold nothing)."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                found.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def wait_group_gone(pgid: int, timeout: float, interval: float = 0.05) -> bool:
    """True once the group has no live process; False if `timeout` seconds pass first (blocking)."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_orphan(pid: int, started_at: float | None, grace: float) -> bool:
    """End the process group of a worker left by an earlier run of the appliance (blocking): TERM,
    then KILL after `grace` seconds. True if something was stopped.

    The group's id is the old leader's pid. The kernel gives a new process a pid only when no
    process group has it as its id, so a live process with that pid but another start time means
    our group ended long ago, and whatever is in a group of that id now is someone else's.
    """
    try:
        leader = psutil.Process(pid)
        if started_at is None or abs(leader.create_time() - started_at) > 1.0:
            return False
    except psutil.Error:
        pass  # the leader is gone; its helpers may still run in its group
    if not group_members(pid):
        return False
    end_group(pid, grace)
    return True


def end_group(pgid: int, grace: float) -> None:
    """SIGTERM to a process group, SIGKILL to whatever is left of it after `grace` seconds; returns
    once no live process of the group is left (blocking)."""
    _signal_group(pgid, signal.SIGTERM)
    if wait_group_gone(pgid, grace):
        return
    _signal_group(pgid, signal.SIGKILL)
    if not wait_group_gone(pgid, KILL_WAIT):
        log.warning("process group %d still has members %s after SIGKILL", pgid, group_members(pgid))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers that will listen on it do: a port whose old connections linger in TIME_WAIT
        # is free; only a listener makes it taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(first: int, last: int, taken: set[int], *, start: int | None = None, is_free: Callable[[int], bool] = port_is_free) -> int | None:
    """The next port of [first, last] after `start` that no replica holds and nothing listens on."""
    span = last - first + 1
    offset = 0 if start is None else (start - first + 1) % span
    for i in range(span):
        port = first + (offset + i) % span
        if port not in taken and is_free(port):
            return port
    return None


def looks_like_port_conflict(lines: Iterable[str]) -> bool:
    text = "\n".join(lines).lower()
    return "address already in use" in text or "errno 98" in text or "eaddrinuse" in text
