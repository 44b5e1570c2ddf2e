"""Who listens on a replica's port. A health probe that passes proves only that something on
127.0.0.1:port answered; another program that bound the port first (a second appliance, any local
user) would pass it and then receive the prompts meant for the model. So a replica is routed to
only while every socket listening where its probe connects belongs to a process of its own tree.

The kernel's socket tables (/proc/net/tcp, tcp6) name each listening socket's inode and owner
uid; /proc/PID/fd links name the inodes a process holds. Blocking: run it off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from appliance.control.host.process import group_members

_LISTEN = "0A"
# Local addresses that accept a connection to 127.0.0.1 (the kernel's hex, each 32-bit word little-endian).
_REACHES_LOOPBACK = {
    "0100007F",  # 127.0.0.1
    "00000000",  # 0.0.0.0
    "00000000000000000000000000000000",  # :: (dual-stack)
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


@dataclass(frozen=True)
class Intruder:
    """A process outside the replica's tree that listens on its port."""

    pid: int | None  # None: its process could not be seen (another user's, to an unprivileged appliance)
    program: str
    uid: int

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.program})" if self.pid is not None else f"a process of uid {self.uid} this appliance cannot see"
        return f"{who}, not this replica's worker"


def listening_sockets(port: int, tables: Iterable[Path] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))) -> dict[int, int]:
    """inode → owner uid of each socket listening on `port` where a connection to 127.0.0.1 lands."""
    found: dict[int, int] = {}
    want = f"{port:04X}"
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address, _, hexport = fields[1].partition(":")
            if hexport == want and address in _REACHES_LOOPBACK:
                found[int(fields[9])] = int(fields[7])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tree_pids(leader: int, cgroup: Path | None) -> set[int]:
    """The live processes of a replica: its cgroup's (nested ones too), else its process group and the
    leader's descendants."""
    pids: set[int] = set()
    if cgroup is not None:
        for procs in cgroup.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except (OSError, ValueError):
                continue
        return pids
    pids.update(group_members(leader))
    try:
        pids.update(c.pid for c in psutil.Process(leader).children(recursive=True))
    except psutil.Error:
        pass
    return pids


def _holder(inode: int, uid: int) -> Intruder:
    for p in psutil.process_iter(["pid", "name"]):
        if inode in _socket_inodes(p.pid):
            try:
                program = " ".join(" ".join(p.cmdline()).split())[:120] or p.info["name"] or "?"
            except psutil.Error:
                program = p.info["name"] or "?"
            return Intruder(p.pid, program, uid)
    return Intruder(None, "?", uid)


def foreign_listener(port: int, leader: int, cgroup: Path | None, known: dict[int, Intruder] | None = None) -> Intruder | None:
    """The first process outside the replica's tree that listens on its port, or None when every
    listener there is the replica's own. Nothing listening at all is None too: the probe says so.
    `known` (socket inode → holder) spares a walk of every process for a squatter already named."""
    sockets = listening_sockets(port)
    if not sockets:
        return None
    ours: set[int] = set()
    for pid in tree_pids(leader, cgroup):
        ours |= _socket_inodes(pid)
    for inode, uid in sockets.items():
        if inode not in ours:
            if known is None:
                return _holder(inode, uid)
            if inode not in known:
                known[inode] = _holder(inode, uid)
            return known[inode]
    return None
