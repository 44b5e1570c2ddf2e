"""SIGTERM with a log follower and an open stream: the appliance exits 0 within
server.shutdown_timeout_seconds plus the workers' grace, ends the stream cleanly, flushes usage and
stops its workers."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_supervisor import _alive, fake_folder, server_config

pytestmark = pytest.mark.process
TIMEOUT, GRACE = 3.0, 2.0
STOP_DEADLINE = 60.0  # seconds past TIMEOUT + GRACE: far below the open stream's 500 s


def _open(url: str, path: str, headers: dict[str, str], body: dict[str, Any] | None = None) -> socket.socket:
    """A request whose answer is read by the test, bit by bit (a raw socket: nothing buffers it)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_sigterm_with_a_follower_and_a_stream_open_exits_0_in_time(server_factory: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "slow", "--tokens-per-second", "20")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "slow"\nmodel_folder = "{folder}"\n')
    text = config.read_text().replace("[server]\n", f"[server]\nshutdown_timeout_seconds = {TIMEOUT}\n")
    text = text.replace("stop_grace_seconds = 3.0", f"stop_grace_seconds = {GRACE}")
    config.write_text(text)
    server = server_factory(config).start()
    admin = {"Authorization": f"Bearer {(tmp_path / 'state' / 'admin.key').read_text().strip()}"}

    def api(path: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(server.url + path, method=method, headers={**admin, "Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    rep = wait_for(lambda: next((r for r in api("/api/v1/endpoints/slow/replicas")["data"] if r["state"] == "HEALTHY"), None), what="a healthy replica")
    key = api("/api/v1/keys", "POST", {"name": "streamer"})
    follower = _open(server.url, f"/api/v1/endpoints/slow/replicas/{rep['id']}/logs?follow=1&tail=1", admin)
    stream = _open(server.url, "/v1/chat/completions", {"Authorization": f"Bearer {key['key']}"},
                   {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000, "stream": True})
    assert stream.recv(65536).startswith(b"HTTP/1.1 200")  # streaming: it would take 500 s to finish
    server.proc.send_signal(signal.SIGTERM)
    # A deadline, not a timing: the stream would take 500 s, so an appliance that waited for it (or hung)
    # misses it, while a busy box that takes a few seconds more than TIMEOUT + GRACE does not fail.
    code = server.proc.wait(timeout=TIMEOUT + GRACE + STOP_DEADLINE)
    assert code == 0, server.output()
    streamed = _read_all(stream)
    assert b"the appliance is shutting down" in streamed and streamed.endswith(b"0\r\n\r\n")  # an error event, then a clean end
    assert streamed.count(b"tok") < 10_000  # ended by the shutdown, not run to its end
    assert _read_all(follower).endswith(b"0\r\n\r\n")  # the follower ended cleanly too
    assert not _alive(rep["pid"])
    again = server_factory(config).start()
    usage = json.loads(urllib.request.urlopen(urllib.request.Request(again.url + f"/api/v1/usage?key={key['id']}&since=1h", headers=admin)).read())
    assert usage["data"][0]["requests"] == 1  # the stream's usage was flushed before the exit
