"""Worker plumbing as plain code: log tails across rotation, port picking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import wait_for

from appliance.control.host.process import group_members, pick_port, port_is_free, stop_orphan, wait_group_gone
from appliance.control.host.replica_log import ReplicaLog, _last_lines


def test_log_tail_reads_from_the_end_across_rotated_files(tmp_path: Path) -> None:
    log = ReplicaLog(tmp_path / "r.log", max_bytes=200_000, backups=2)
    for i in range(30_000):
        log.write(f"line {i}")
    assert (tmp_path / "r.log.1").exists()
    assert log.read_tail(5) == [f"line {i}" for i in range(29_995, 30_000)]
    many = log.read_tail(20_000)  # more than the newest file holds
    assert len(many) == 20_000 and many == [f"line {i}" for i in range(10_000, 30_000)]
    assert log.read_tail(0) == []
    log.close()


def test_last_lines_edge_cases(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"a\nb\nc")
    assert _last_lines(tmp_path / "x", 2) == ["b", "c"] and _last_lines(tmp_path / "x", 10) == ["a", "b", "c"]
    (tmp_path / "e").write_bytes(b"")
    assert _last_lines(tmp_path / "e", 3) == []
    (tmp_path / "big").write_bytes(b"".join(b"%d\n" % i for i in range(100_000)))
    assert _last_lines(tmp_path / "big", 3, block=16) == ["99997", "99998", "99999"]


def test_pick_port_skips_taken_and_busy_ports_and_rotates() -> None:
    busy = {20_001}
    assert pick_port(20_000, 20_003, {20_000}, is_free=lambda p: p not in busy) == 20_002
    assert pick_port(20_000, 20_003, set(), start=20_002, is_free=lambda p: True) == 20_003
    assert pick_port(20_000, 20_003, set(), start=20_003, is_free=lambda p: True) == 20_000  # wraps around
    assert pick_port(20_000, 20_001, {20_000, 20_001}, is_free=lambda p: True) is None


def test_a_port_is_taken_only_while_something_listens_on_it() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not port_is_free(port)
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its end of the connection lingers in TIME_WAIT
    client.close()
    listener.close()
    assert port_is_free(port)  # a new worker can listen there at once


def _session_with_child() -> subprocess.Popen[bytes]:
    """A process leading its own session and process group, with a child in that group."""
    code = "import subprocess,sys,time\nsubprocess.Popen([sys.executable,'-c','import time\\nwhile True: time.sleep(1)'])\nwhile True: time.sleep(1)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_an_orphan_group_is_stopped_but_never_a_process_that_only_reused_the_pid() -> None:
    leader = _session_with_child()
    try:
        wait_for(lambda: len(group_members(leader.pid)) == 2, timeout=10, what="the leader and its child")
        started = psutil.Process(leader.pid).create_time()
        # Recorded with another start time: this pid now belongs to someone else; nothing is touched.
        assert stop_orphan(leader.pid, started - 100, grace=1.0) is False
        assert len(group_members(leader.pid)) == 2
        # The leader died (kill -9) and left its child: the group is still ours and is ended.
        child = next(p for p in group_members(leader.pid) if p != leader.pid)
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        assert stop_orphan(leader.pid, started, grace=1.0) is True
        assert group_members(leader.pid) == []
        assert child not in group_members(leader.pid) and (not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
    finally:
        leader.kill()
        leader.wait()


def test_wait_group_gone() -> None:
    leader = _session_with_child()
    wait_for(lambda: len(group_members(leader.pid)) == 2, timeout=10, what="the leader and its child")
    assert wait_group_gone(leader.pid, 0.2) is False
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    assert wait_group_gone(leader.pid, 10.0) is True
