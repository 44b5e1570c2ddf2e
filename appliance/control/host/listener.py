"""Who listens on a replica's port. A health probe that passes proves only that something on
127.0.0.1:port answered; another program that bound the port first (a second appliance, any local
user) would pass it and then receive the prompts meant for the model. So a replica is routed to
only while every socket listening where its probe connects belongs to a process of its own tree.

The kernel names each listening socket's inode and owner uid: through netlink's sock_diag, which
walks only the listening sockets (a probe's cost then stays flat when the box holds thousands of
connections), else from /proc/net/tcp and tcp6, which list every socket. /proc/PID/fd links name the
inodes a process holds. Blocking: run it off the event loop.
"""

from __future__ import annotations

import os
import socket
import struct
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


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCPF_LISTEN = 1 << 10
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")  # inet_diag_msg: family … sport, dport, src, dst … uid, inode
_LOOPBACK_REACH = {
    socket.AF_INET: {socket.inet_pton(socket.AF_INET, a) for a in ("127.0.0.1", "0.0.0.0")},
    socket.AF_INET6: {socket.inet_pton(socket.AF_INET6, a) for a in ("::", "::ffff:127.0.0.1")},
}


def _diag_listeners(family: int, port: int) -> dict[int, int]:
    """inode → uid of the TCP sockets of `family` listening on `port` where 127.0.0.1 lands, from
    netlink sock_diag. Raises OSError where the kernel or a sandbox refuses it."""
    found: dict[int, int] = {}
    request = struct.pack("=BBBxI48x", family, socket.IPPROTO_TCP, 0, _TCPF_LISTEN)  # inet_diag_req_v2, any socket id
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(_NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP_REQUEST, 1, 0) + request)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    raise OSError(-errno, os.strerror(-errno))
                if length < _NLMSG.size:
                    raise OSError("malformed sock_diag answer")
                fields = _DIAG_MSG.unpack_from(data, offset + _NLMSG.size)
                sport, src, uid, inode = int.from_bytes(fields[4], "big"), fields[6], fields[13], fields[14]
                address = src[:4] if family == socket.AF_INET else src
                if sport == port and address in _LOOPBACK_REACH[family]:
                    found[inode] = uid
                offset += (length + 3) & ~3


def listening_sockets(port: int, tables: Iterable[Path] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))) -> dict[int, int]:
    """inode → owner uid of each socket listening on `port` where a connection to 127.0.0.1 lands."""
    try:
        return _diag_listeners(socket.AF_INET, port) | _diag_listeners(socket.AF_INET6, port)
    except (OSError, struct.error):
        return proc_listening_sockets(port, tables)


def proc_listening_sockets(port: int, tables: Iterable[Path] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))) -> dict[int, int]:
    """listening_sockets from the text tables: every socket of the box is read."""
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


def foreign_listener(
    port: int, leader: int, cgroup: Path | None, known: dict[int, Intruder] | None = None, ours: set[int] | None = None,
) -> Intruder | None:
    """The first process outside the replica's tree that listens on its port, or None when every
    listener there is the replica's own. Nothing listening at all is None too: the probe says so.
    `known` (socket inode → holder) spares a walk of every process for a squatter already named;
    `ours` (inodes already found in the tree, updated here) spares the walk of the tree's fds while
    the same sockets listen: a socket's inode number is not given to another socket while it lives."""
    sockets = listening_sockets(port)
    if not sockets:
        return None
    if ours is not None and ours.issuperset(sockets):
        return None
    tree: set[int] = set()
    for pid in tree_pids(leader, cgroup):
        tree |= _socket_inodes(pid)
    if ours is not None:
        ours.clear()
        ours.update(tree & sockets.keys())
    for inode, uid in sockets.items():
        if inode not in tree:
            if known is None:
                return _holder(inode, uid)
            if inode not in known:
                known[inode] = _holder(inode, uid)
            return known[inode]
    return None
