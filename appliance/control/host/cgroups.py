"""One cgroup v2 per replica, where the appliance has a cgroup it may manage (systemd's
`Delegate=yes`, or a writable cgroup2 mount). A replica's cgroup holds every process its worker
starts, whatever they do with sessions or process groups; `cgroup.kill` ends them all at once and
`cgroup.events` says when none is left. Where the controllers are delegated too, a replica's
`resources.cpu` and `resources.mem` become `cpu.max` and `memory.max`.

Layout, under the appliance's own cgroup O:
    O/supervisor/                   the appliance itself, moved here only when O must enable
                                    controllers for its children (cgroup v2 lets only leaves hold processes)
    O/appliance-<hash of state_dir>/<replica id>/   one leaf per running replica

Everything here blocks (file I/O, waits): the event loop calls it through asyncio.to_thread.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

Mode = Literal["auto", "cgroup", "process-group"]
_WANTED = ("cpu", "memory")
_CPU_PERIOD = 100_000  # microseconds: cpu.max is "<quota> <period>"
KILL_WAIT = 10.0  # seconds for the kernel to tear down killed processes (a GPU context takes a while)


@dataclass(frozen=True)
class Isolation:
    """Which mechanism ends a replica's processes, and what it enforces (shown in the log and API)."""

    mechanism: Literal["cgroup", "process-group"]
    detail: str
    enforced: tuple[str, ...] = ()
    cgroups: Cgroups | None = field(default=None, compare=False)

    def describe(self) -> dict[str, object]:
        return {"mechanism": self.mechanism, "detail": self.detail, "enforced": list(self.enforced)}


def _cgroup2_mount(mountinfo: str) -> Path | None:
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def own_cgroup(proc: Path = Path("/proc/self")) -> Path | None:
    """The directory of this process's cgroup v2, or None without a cgroup2 mount."""
    try:
        mount = _cgroup2_mount((proc / "mountinfo").read_text())
        rel = next((line[3:] for line in (proc / "cgroup").read_text().splitlines() if line.startswith("0::")), None)
    except OSError:
        return None
    if mount is None or rel is None:
        return None
    path = mount / rel.lstrip("/")
    return path if path.is_dir() else None


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:  # one write() per value: the kernel parses each write on its own
        f.write(value)


class Cgroups:
    """The appliance's subtree: creates, limits, ends and removes replica leaves."""

    def __init__(self, instance: Path, controllers: frozenset[str]) -> None:
        self.instance = instance
        self.controllers = controllers

    def leaf(self, name: str, *, cpu: float | None = None, mem: int | None = None) -> Path:
        """A fresh, empty leaf for one replica, with its limits written."""
        path = self.instance / name
        if path.exists():
            self.end(path, 0.0)  # left by an earlier worker of the same replica
        path.mkdir()
        if cpu and "cpu" in self.controllers:
            _write(path / "cpu.max", f"{max(1000, int(cpu * _CPU_PERIOD))} {_CPU_PERIOD}")
        if mem and "memory" in self.controllers:
            _write(path / "memory.max", str(int(mem)))
        return path

    @staticmethod
    def members(path: Path) -> list[int]:
        try:
            return [int(p) for p in _read(path / "cgroup.procs").split()]
        except OSError:
            return []

    @staticmethod
    def populated(path: Path) -> bool:
        try:
            return "populated 1" in _read(path / "cgroup.events")
        except OSError:
            return False

    def _wait_empty(self, path: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.populated(path):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def end(self, path: Path, grace: float) -> None:
        """SIGTERM to every process of the leaf, cgroup.kill after `grace` seconds; returns once the
        leaf is empty and removed. Processes in a cgroup cannot leave it, so nothing escapes; one that
        joins while this runs (a stop right after the start, before the worker's first instruction)
        is killed on the way out."""
        self._signal(path, signal.SIGTERM)
        if not self._wait_empty(path, grace):
            self._kill(path)
        for _ in range(5):
            if self._remove(path):
                return
            self._kill(path)  # someone joined after the first look
        log.warning("cgroup %s could not be removed; processes %s", path, self.members(path))

    def _kill(self, path: Path) -> None:
        try:
            _write(path / "cgroup.kill", "1")
        except OSError:  # kernels before 5.14 have no cgroup.kill
            self._signal(path, signal.SIGKILL)
        if not self._wait_empty(path, KILL_WAIT):
            log.warning("cgroup %s still has processes %s after SIGKILL", path, self.members(path))

    def _signal(self, path: Path, sig: int) -> None:
        for pid in self.members(path):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _remove(path: Path) -> bool:
        """True once the leaf is gone; False while it holds a process."""
        for _ in range(10):  # the kernel may report a just-emptied cgroup as busy for a moment
            try:
                path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        return False

    def leftovers(self) -> list[Path]:
        """Leaves still there from an earlier run of the appliance (killed before it could clean up)."""
        try:
            return sorted(p for p in self.instance.iterdir() if p.is_dir())
        except OSError:
            return []

    def close(self) -> None:
        if not self._remove(self.instance):
            log.warning("cgroup %s still has replica cgroups; left in place", self.instance)


def _enable(cgroup: Path, wanted: set[str]) -> set[str]:
    """Turn on the `wanted` controllers for `cgroup`'s children; returns those now on."""
    try:
        available = set(_read(cgroup / "cgroup.controllers").split())
        for name in wanted & available - set(_read(cgroup / "cgroup.subtree_control").split()):
            try:
                _write(cgroup / "cgroup.subtree_control", f"+{name}")
            except OSError as exc:
                log.debug("cannot enable %s in %s: %s", name, cgroup, exc)
        return set(_read(cgroup / "cgroup.subtree_control").split()) & wanted
    except OSError:
        return set()


def _make_room(own: Path) -> None:
    """cgroup v2 lets a non-root cgroup with processes enable no controllers for its children: move
    the appliance into a leaf of its own first (systemd's delegation expects exactly this)."""
    root = not (own / "cgroup.type").exists()  # the root cgroup may hold processes and still delegate
    if root or not Cgroups.members(own) or not set(_read(own / "cgroup.controllers").split()) & set(_WANTED):
        return
    leaf = own / "supervisor"
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", str(os.getpid()))


def open_isolation(mode: Mode, state_dir: Path, *, own: Path | None = None) -> Isolation:
    """Pick how replicas are isolated. `auto` takes a cgroup where one can be made, process groups
    otherwise; `cgroup` insists (an error says why it cannot); `process-group` never tries."""
    if mode == "process-group":
        return Isolation("process-group", "process groups (workers.isolation = \"process-group\")")
    own = own if own is not None else own_cgroup()
    reason = "no cgroup v2 hierarchy is mounted" if own is None else None
    if own is not None and not os.access(own, os.W_OK):
        reason = f"the appliance's cgroup {own} is not writable (run it under systemd with Delegate=yes)"
    if reason is None and own is not None:
        try:
            _make_room(own)
            own_controllers = _enable(own, set(_WANTED))  # fails (and says so in DEBUG) while others share our cgroup
            tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
            instance = own / f"appliance-{tag}"
            instance.mkdir(exist_ok=True)
            controllers = _enable(instance, own_controllers) if own_controllers else set()
            enforced = tuple(sorted({"cpu": "cpu", "memory": "mem"}[c] for c in controllers))
            limits = f"enforces {', '.join(f'resources.{e}' for e in enforced)}" if enforced else "resources.cpu and resources.mem not enforced: no cpu or memory controller delegated"
            return Isolation("cgroup", f"one cgroup v2 per replica under {instance}; {limits}", enforced, Cgroups(instance, frozenset(controllers)))
        except OSError as exc:
            reason = f"cannot create cgroups under {own}: {exc.strerror or exc}"
    if mode == "cgroup":
        raise ApplianceError(f"workers.isolation = \"cgroup\", but {reason}", code="cgroup_unavailable")
    return Isolation("process-group", f"process groups and a parent-death signal: {reason}")
