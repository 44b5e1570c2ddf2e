"""Abusive clients against a real `appliance serve`: headers dribbled byte by byte, a stalled body,
10,000 idle connections and a 1 GB body. Each time the appliance goes on serving everyone else, with
bounded memory, and lets the abusive connections go within the configured timeouts."""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ServerProcess, wait_for
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _serve(server_factory: Any, tmp_path: Path, **server: Any) -> tuple[ServerProcess, psutil.Process]:
    folder = fake_folder(tmp_path, "echo")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "echo"\nmodel_folder = "{folder}"\npublic = true\n')
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in server.items())
    config.write_text(config.read_text().replace("[server]\n", "[server]\n" + extra, 1))
    proc = server_factory(config).start()
    wait_for(lambda: _chat(proc.url) == 200, timeout=30, what="the endpoint to answer")
    return proc, psutil.Process(proc.proc.pid)


def _chat(url: str, timeout: float = 10) -> int:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(CHAT).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            json.loads(resp.read())
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the appliance closed the connection (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _response_head(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class _Served:
    """Chat requests one after another in a thread, each answer's status and latency kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.results.append((_chat(self.url), time.monotonic() - started))

    def __enter__(self) -> "_Served":  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self, at_least: int) -> None:
        assert len(self.results) >= at_least, f"only {len(self.results)} requests were answered meanwhile"
        failed = [r for r in self.results if r[0] != 200]
        assert not failed, f"requests failed while the abuse went on: {failed[:5]}"
        slowest = max(t for _, t in self.results)
        assert slowest < 2.0, f"a request took {slowest:.2f}s while the abuse went on"


def test_dribbled_headers_and_a_stalled_body_are_cut_off_while_others_are_served(server_factory: Any, tmp_path: Path) -> None:
    idle = 2.0
    server, _ = _serve(server_factory, tmp_path, idle_timeout_seconds=idle, body_timeout_seconds=idle)
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"a" * 10_000
    dribblers = [_connect(server.url) for _ in range(20)]
    opened = time.monotonic()
    stalled = _connect(server.url)  # a whole head announcing a body it never finishes
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    closed_at: dict[int, float] = {}
    pace, tick = threading.Event(), time.monotonic()
    with _Served(server.url) as served:
        sent = 0
        while len(closed_at) < len(dribblers) and time.monotonic() - opened < idle + 8:
            for i, sock in enumerate(dribblers):  # one more byte each, as long as the appliance takes them
                if i in closed_at:
                    continue
                if _closed_by_peer(sock):
                    closed_at[i] = time.monotonic() - opened
                    continue
                try:
                    sock.send(request[sent % len(request) : sent % len(request) + 1])
                except OSError:
                    closed_at[i] = time.monotonic() - opened
            sent += 1
            tick += 0.1  # the dribble's pace: a byte per connection every 100 ms
            pace.wait(max(0.0, tick - time.monotonic()))
        head = _response_head(stalled, timeout=idle + 5)
    assert len(closed_at) == len(dribblers), f"{len(dribblers) - len(closed_at)} dribbling connections were still open after {idle + 8}s"
    assert max(closed_at.values()) < idle + 3, f"dribbling connections were closed after {sorted(closed_at.values())[-3:]}s"
    assert head.startswith(b"HTTP/1.1 408"), head
    served.check(at_least=5)


def _raise_own_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _accepted(proc: psutil.Process, port: int) -> int:
    """Connections the appliance has accepted on its listening port and still holds."""
    return sum(1 for c in proc.net_connections(kind="tcp") if c.laddr and c.laddr.port == port and c.raddr and c.status == psutil.CONN_ESTABLISHED)


@pytest.fixture
def idle_sockets() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def test_ten_thousand_idle_connections_cost_bounded_memory_and_are_let_go(server_factory: Any, tmp_path: Path, idle_sockets: list[socket.socket]) -> None:
    count = 10_000
    limit = _raise_own_fd_limit(count + 1_000)
    assert limit >= count + 500, f"this test opens {count} sockets; the open files limit here is {limit}"
    idle = 30.0  # long enough to open them all before the first is closed, on a slow box too
    server, proc = _serve(server_factory, tmp_path, idle_timeout_seconds=idle)
    base_fds, base_rss = proc.num_fds(), proc.memory_info().rss
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    for _ in range(count):
        s = socket.socket()
        s.connect((host, int(port)))
        idle_sockets.append(s)
    # Count the connections the appliance holds on its own port rather than its fds: a pooled
    # upstream socket or a journal file open at the baseline may be gone by now.
    left = idle - (time.monotonic() - started) - 3
    assert left > 1, f"opening {count} connections took {time.monotonic() - started:.1f}s, longer than the idle timeout allows"
    wait_for(lambda: _accepted(proc, int(port)) >= count, timeout=left, interval=0.25, what=f"the appliance to accept {count} connections")
    opened = time.monotonic() - started
    rss = proc.memory_info().rss
    with _Served(server.url) as served:
        wait_for(lambda: len(served.results) >= 20, timeout=10, what="20 requests served beside the idle connections")
    served.check(at_least=20)
    grown = (rss - base_rss) / count
    print(f"{count} idle connections opened in {opened:.1f}s: RSS {base_rss >> 20} -> {rss >> 20} MiB ({grown / 1024:.1f} KiB each)")
    assert grown < 16 << 10, f"each idle connection costs {grown / 1024:.1f} KiB"
    # the idle timeout lets them all go, and every descriptor is given back
    wait_for(lambda: _accepted(proc, int(port)) == 0, timeout=idle + 15, interval=0.25, what="the idle connections to be closed")
    wait_for(lambda: proc.num_fds() <= base_fds + 5, timeout=10, what="every descriptor to be given back")
    assert sum(_closed_by_peer(s) for s in idle_sockets[:100]) == 100


def _upload(sock: socket.socket, head: bytes, total: int, chunked: bool) -> tuple[int, bytes]:
    """Send `head`, then up to `total` body bytes until the appliance answers or closes; returns the
    body bytes it took and its answer."""
    sock.sendall(head)
    block = b"\0" * (1 << 20)
    sent = 0
    sock.settimeout(0)
    answer = b""
    while sent < total:
        try:
            answer += sock.recv(65536)
            if answer:
                break
        except BlockingIOError:
            pass
        except OSError:
            break
        piece = (f"{len(block):x}\r\n".encode() + block + b"\r\n") if chunked else block
        try:
            sock.settimeout(10)
            sock.sendall(piece)
            sock.settimeout(0)
        except OSError:
            break
        sent += len(block)
    if not answer.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in answer:
        try:
            answer += _response_head(sock, timeout=10)
        except OSError:
            pass
    return sent, answer


def test_a_one_gigabyte_body_is_refused_early_with_bounded_memory(server_factory: Any, tmp_path: Path) -> None:
    limit = 1 << 20
    server, proc = _serve(server_factory, tmp_path, max_body_bytes=limit)
    gigabyte = 1 << 30
    peak = [proc.memory_info().rss]
    base = peak[0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        paths = ("/v1/chat/completions", "/api/v1/keys", "/endpoints/echo/v1/completions")
        for path in paths:
            # declared: refused from the head alone
            declared = _connect(server.url)
            declared.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {gigabyte}\r\n\r\n".encode())
            head = _response_head(declared, timeout=10)
            assert head.split(b"\r\n")[0] in (b"HTTP/1.1 413 Request Entity Too Large", b"HTTP/1.1 401 Unauthorized"), (path, head)
            declared.close()
        # chunked, so its size is known only by reading: cut off at the limit, not read to the end
        streamed = _connect(server.url)
        sent, answer = _upload(streamed, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                               gigabyte, chunked=True)
        streamed.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert _chat(server.url) == 200  # and the next client is served as before
    finally:
        stop.set()
        sampler.join()
    print(f"1 GiB chunked body: {sent >> 20} MiB sent before the 413; RSS peak {base >> 20} -> {peak[0] >> 20} MiB")
    assert sent < gigabyte // 2, f"the appliance read {sent >> 20} MiB of a body over its {limit}-byte limit"
    assert peak[0] - base < 64 << 20, f"RSS grew by {(peak[0] - base) >> 20} MiB during a 1 GiB upload"
