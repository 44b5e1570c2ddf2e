"""A replica is its own process tree: only its tree may answer its probes, a tree whose leader died
ends within seconds, a prober that dies is a crash, and the ledger frees what a replica holds by
holder, never by number."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import Admin, async_wait_for
from test_supervisor import FAST, PORTS, WORKERS, create, events, fake_folder, replicas, wait_status

from appliance.control.host.process import port_is_free
from appliance.control.supervision import backend as backend_module
from appliance.control.supervision.ledger import Ledger
from appliance.domain.placement import Unplaceable

# A stand-in for another program on the box: answers every GET with 200, as a worker's /health would.
SQUATTER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_pair() -> tuple[int, int]:
    """Two consecutive free loopback ports, in this test process's block below the kernel's ephemeral range
    (32768 and up): no connection made meanwhile (the test's client, the appliance's listener or probes) can
    be handed one of them, as a port the kernel picked could be, and then the replica waited for ever."""
    for first in range(PORTS[0], PORTS[1]):
        if port_is_free(first) and port_is_free(first + 1):
            return first, first + 1
    raise AssertionError("no two consecutive free ports")


@pytest.mark.process
async def test_a_squatter_on_the_replicas_port_never_makes_it_healthy(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    first, second = _free_pair()
    admin: Admin = await start_app(make_config({"workers": {**WORKERS, "port_range": [first, second]}}))
    # The worker takes its time before it binds (a slow import): the window another program can win.
    await create(admin, "sq", fake_folder(tmp_path, "sq", "--startup-delay", "4", health={"initial_delay": 20.0}))

    async def starting_port() -> int | None:
        reps = await replicas(admin, "sq")
        return reps[0]["port"] if reps and reps[0]["state"] == "STARTING" and reps[0]["port"] else None

    port = await async_wait_for(starting_port, timeout=20, what="the replica to start on a port")
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, str(port)])
    try:
        await wait_status(admin, "sq", "HEALTHY", timeout=40)
        (rep,) = await replicas(admin, "sq")
        assert rep["port"] != port, "the replica became healthy on the port the squatter answers"
        evs = await events(admin, "sq")
        healthy_on_squatted = [e for e in evs if e["kind"] == "replica.healthy" and f"port {port}" in str(e)]
        assert not healthy_on_squatted
        (foreign,) = [e for e in evs if e["kind"] == "replica.foreign_listener"]
        assert foreign["details"]["intruder_pid"] == squatter.pid
        assert "python" in foreign["details"]["intruder_program"]
        assert f"pid {squatter.pid}" in foreign["message"]
    finally:
        squatter.kill()
        squatter.wait()


# A worker whose helper ignores SIGTERM, as an engine core busy in a kernel may: only SIGKILL ends it.
STUBBORN = """
import http.server, os, signal, subprocess, sys
helper = subprocess.Popen([sys.executable, "-c", "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(1)"])
open(os.environ["HELPER_FILE"], "a").write(f"{helper.pid}\\n")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.process
async def test_a_tree_whose_leader_died_ends_within_seconds(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    # A long graceful stop: the orphaned tree must not wait for it, nobody will stop it gracefully.
    admin: Admin = await start_app(make_config({"workers": {**WORKERS, "stop_grace_seconds": 30.0}}))
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    helpers = tmp_path / "helpers"
    folder = tmp_path / "models" / "orphan"
    folder.mkdir(parents=True)
    service = {"start_command": ["python", str(script), "--port", "8000"], "port": 8000, "health_check": FAST}
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "orphan", "model_path": "/models", "service": service}]}))
    await create(admin, "orphan", folder, environ={"HELPER_FILE": str(helpers)})
    await wait_status(admin, "orphan", "HEALTHY")
    (rep,) = await replicas(admin, "orphan")
    helper = int(helpers.read_text().split()[0])
    assert _alive(helper)
    os.kill(rep["pid"], signal.SIGKILL)
    died = time.monotonic()
    await async_wait_for(lambda: not _alive(helper), timeout=20, what="the orphaned helper to end")
    took = time.monotonic() - died
    print(f"orphaned tree gone {took:.2f} s after its leader's death")
    assert took < 10, f"the orphaned helper outlived its leader by {took:.1f}s"  # it waited for the 30 s grace before
    await _healthy_again(admin, "orphan", lambda r: r["pid"] != rep["pid"])


async def test_a_prober_that_dies_is_a_crash_of_its_replica(
    start_inprocess_app: Any, make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    admin: Admin = await start_inprocess_app(make_config({"workers": WORKERS}))
    await create(admin, "pr", fake_folder(tmp_path, "pr"))
    await wait_status(admin, "pr", "HEALTHY")
    (before,) = await replicas(admin, "pr")

    async def broken(*args: Any, **kwargs: Any) -> tuple[bool, str]:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(backend_module, "probe", broken)

    async def failed() -> bool:
        return any(e["kind"] == "replica.failed" and "health checks failed" in e["message"] for e in await events(admin, "pr"))

    await async_wait_for(failed, timeout=20, what="the replica to fail with its prober")
    assert any("health checks stopped" in r.getMessage() and "database is locked" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    await _healthy_again(admin, "pr", lambda r: r["restarts"] == before["restarts"] + 1)


async def _healthy_again(admin: Admin, name: str, new: Any) -> None:
    """Wait for a replacement: a HEALTHY replica for which `new(replica)` holds."""

    async def check() -> bool:
        return any(r["state"] == "HEALTHY" and new(r) for r in await replicas(admin, name))

    await async_wait_for(check, timeout=40, what=f"a replacement replica of {name} to be HEALTHY")


def _one_port_ledger() -> Ledger:
    """A ledger whose range is one free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Ledger((port, port))


def test_a_stale_release_leaves_a_port_with_its_new_holder() -> None:
    ledger = _one_port_ledger()
    port = ledger.take_port("a", 0.0)
    ledger.release("a")
    assert ledger.take_port("a", 0.0) == port
    ledger.release("a")
    assert ledger.take_port("b", 0.0) == port
    ledger.release("a")  # a's runner releasing again (a wait for GPUs after a failed start)
    with pytest.raises(Unplaceable):
        ledger.take_port("c", 0.0)
    ledger.release("b")
    assert ledger.take_port("c", 0.0) == port


def test_a_replica_that_takes_a_port_again_gives_back_its_old_one() -> None:
    ledger = _one_port_ledger()
    port = ledger.take_port("a", 0.0)
    ledger.release("a")
    assert ledger.take_port("a", 0.0) == port
    assert ledger.take_port("a", 0.0) == port  # a retry of the same replica: not "no free port"

def test_a_listener_is_told_from_the_trees_own_without_a_cgroup(tmp_path: Path) -> None:
    from appliance.control.host.listener import foreign_listener

    ready = tmp_path / "port"
    code = "import socket, sys\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\nopen(sys.argv[1], 'w').write(str(s.getsockname()[1]))\ninput()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready)], stdin=subprocess.PIPE, start_new_session=True)
    try:
        from conftest import wait_for

        port = int(wait_for(lambda: ready.exists() and ready.read_text(), timeout=20, what="the listener"))
        assert foreign_listener(port, proc.pid, None) is None  # the leader's own socket
        other = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE, start_new_session=True)
        try:
            intruder = foreign_listener(port, other.pid, None)
            assert intruder is not None and intruder.pid == proc.pid and "python" in intruder.program
        finally:
            other.kill()
            other.wait()
    finally:
        proc.kill()
        proc.wait()


def _listen(family: int, address: str, port: int = 0) -> socket.socket:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((address, port))
    s.listen()
    return s


def test_netlink_and_the_proc_tables_name_the_same_listeners() -> None:
    from appliance.control.host import listener

    reach = [_listen(socket.AF_INET, "127.0.0.1"), _listen(socket.AF_INET, "0.0.0.0")]
    elsewhere = _listen(socket.AF_INET, "127.0.0.2")  # a connection to 127.0.0.1 never lands here
    wide = _listen(socket.AF_INET6, "::")  # dual-stack: 127.0.0.1 lands here too
    sockets = [*reach, elsewhere, wide]
    try:
        for s in sockets:
            port = s.getsockname()[1]
            want = {os.fstat(s.fileno()).st_ino: os.geteuid()} if s is not elsewhere else {}
            assert listener.proc_listening_sockets(port) == want
            try:
                got = listener._diag_listeners(socket.AF_INET, port) | listener._diag_listeners(socket.AF_INET6, port)
            except OSError as exc:
                pytest.skip(f"netlink sock_diag refused here: {exc}")
            assert got == want
    finally:
        for s in sockets:
            s.close()


def test_without_netlink_the_proc_tables_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.control.host import listener

    def refused(family: int, port: int) -> dict[int, int]:
        raise PermissionError(13, "refused")

    monkeypatch.setattr(listener, "_diag_listeners", refused)
    s = _listen(socket.AF_INET, "127.0.0.1")
    try:
        assert listener.listening_sockets(s.getsockname()[1]) == {os.fstat(s.fileno()).st_ino: os.geteuid()}
    finally:
        s.close()


def test_a_squatter_that_takes_a_known_port_after_the_worker_left_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree's fds are walked only when a socket not yet found in the tree listens: the sockets
    proven the replica's own pass at the cost of one netlink dump, and a new one is looked at."""
    from appliance.control.host import listener
    from conftest import wait_for

    ready = tmp_path / "port"
    code = "import socket, sys\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 0)); s.listen()\nopen(sys.argv[1], 'w').write(str(s.getsockname()[1]))\ninput()"
    worker = subprocess.Popen([sys.executable, "-c", code, str(ready)], stdin=subprocess.PIPE, start_new_session=True)
    squatter = None
    try:
        port = int(wait_for(lambda: ready.exists() and ready.read_text(), timeout=20, what="the listener"))
        ours: set[int] = set()
        assert listener.foreign_listener(port, worker.pid, None, {}, ours) is None
        assert len(ours) == 1
        walks = 0
        tree_pids = listener.tree_pids

        def counted(leader: int, cgroup: Path | None) -> set[int]:
            nonlocal walks
            walks += 1
            return tree_pids(leader, cgroup)

        monkeypatch.setattr(listener, "tree_pids", counted)
        assert listener.foreign_listener(port, worker.pid, None, {}, ours) is None
        assert walks == 0  # the same socket listens: nothing to walk
        worker.kill()
        worker.wait()
        squatter = _listen(socket.AF_INET, "0.0.0.0", port)
        intruder = listener.foreign_listener(port, worker.pid, None, {}, ours)
        assert walks == 1
        assert intruder is not None and intruder.pid == os.getpid()
    finally:
        worker.kill()
        worker.wait()
        if squatter is not None:
            squatter.close()
