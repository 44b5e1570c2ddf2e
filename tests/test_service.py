"""`appliance serve` under a service manager: the notify protocol read from a real unix datagram
socket (READY with a STATUS line, WATCHDOG pings, RELOADING on SIGHUP, STOPPING), and SIGHUP reloading
the config file without touching what did not change."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_shutdown import _open
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


class Messages:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except BlockingIOError:
                return self.seen
            self.seen.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))

    def find(self, predicate: Any, after: int = 0) -> dict[str, str] | None:
        return next((m for m in self.poll()[after:] if predicate(m)), None)


def _api(url: str, key: str, path: str) -> Any:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_notify_protocol_and_reload(server_factory: Any, tmp_path: Path, notify_socket: socket.socket) -> None:
    one = fake_folder(tmp_path, "one", "--tokens-per-second", "20")
    two = fake_folder(tmp_path, "two")
    declared_one = f'[[endpoints]]\nname = "one"\nmodel_folder = "{one}"\npublic = true\n'
    config = server_config(tmp_path, declared_one)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    server = server_factory(config, env=env).start()
    key = (tmp_path / "state" / "admin.key").read_text().strip()
    messages = Messages(notify_socket)
    assert wait_for(lambda: messages.find(lambda m: m.get("READY") == "1"), what="READY=1")
    wait_for(lambda: messages.find(lambda m: m.get("STATUS") == "1 endpoints, 1/1 replicas healthy"), timeout=20, what="a STATUS line")
    first = len(messages.poll())
    wait_for(lambda: len([m for m in messages.poll()[first:] if m.get("WATCHDOG") == "1"]) >= 3, timeout=10, what="watchdog pings")
    pid = next(r["pid"] for r in _api(server.url, key, "/api/v1/endpoints/one/replicas")["data"])

    # a stream in flight while the config gains an endpoint and is reloaded
    stream = _open(server.url, "/v1/chat/completions", {}, {"model": "one", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True})
    assert stream.recv(65536).startswith(b"HTTP/1.1 200")
    config.write_text(config.read_text() + f'[[endpoints]]\nname = "two"\nmodel_folder = "{two}"\n')
    before = len(messages.poll())
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: messages.find(lambda m: m.get("RELOADING") == "1" and "MONOTONIC_USEC" in m, after=before), what="RELOADING=1")
    wait_for(lambda: messages.find(lambda m: m.get("READY") == "1", after=before), what="READY=1 after the reload")
    wait_for(lambda: _api(server.url, key, "/api/v1/endpoints/two")["status"] == "HEALTHY", timeout=20, what="the new endpoint")
    body = b""
    while not body.endswith(b"0\r\n\r\n"):  # to the chunked body's end (the connection stays open)
        chunk = stream.recv(65536)
        assert chunk, "the stream was cut"
        body += chunk
    assert body.count(b"data: ") >= 40 and b"[DONE]" in body  # the stream finished across the reload
    assert [r["pid"] for r in _api(server.url, key, "/api/v1/endpoints/one/replicas")["data"]] == [pid]  # unchanged: not restarted

    # an invalid file is refused, and what runs stays as it was
    config.write_text(config.read_text().replace('name = "two"', 'name = "two"\nreplicas = -3'))
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: " in server.output() and "is not valid, the running config is kept" in server.output(), what="the refusal in the log")
    assert "replicas" in server.output().split("is not valid", 1)[1].splitlines()[0]
    assert _api(server.url, key, "/api/v1/endpoints/two")["status"] == "HEALTHY"

    before = len(messages.poll())
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert messages.find(lambda m: m.get("STOPPING") == "1", after=before)


def test_a_failed_start_still_says_ready_with_why_in_status(server_factory: Any, tmp_path: Path, notify_socket: socket.socket) -> None:
    config = server_config(tmp_path, "")
    (tmp_path / "state" / "admin.key").mkdir(parents=True)  # the admin key cannot be written: startup fails
    server = server_factory(config, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).start(ready=False)
    messages = Messages(notify_socket)
    # READY=1 all the same (the process stays up for /healthz, /readyz and the log), and STATUS says why
    ready = wait_for(lambda: messages.find(lambda m: m.get("READY") == "1"), what="READY=1")
    assert ready.get("STATUS", "").startswith("startup failed: "), ready
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    try:
        urllib.request.urlopen(server.url + "/readyz", timeout=5).close()
        raise AssertionError("/readyz answered 200 after a failed start")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
