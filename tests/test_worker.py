"""Worker plumbing as plain code: log tails across rotation, port picking."""

from __future__ import annotations

import socket
from pathlib import Path

from appliance.control.process import ReplicaLog, _last_lines, pick_port, port_is_free


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
