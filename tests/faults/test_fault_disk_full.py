"""The disk holding the state fills up under a running `appliance serve`: inference goes on, writes
are refused with a clear 507 and nothing half-made, usage and events wait in memory, nothing crashes,
and everything is written once space returns.

The state directory is a small tmpfs of its own, so the test fills a disk without touching the
machine's; mounting one needs root (CAP_SYS_ADMIN), as on the CI machines."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "state"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a tmpfs for the state directory cannot be mounted here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; returns it (delete it to give the space back)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _call(url: str, path: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_disk_refuses_writes_clearly_and_loses_nothing(server_factory: Any, tmp_path: Path, small_disk: Path) -> None:
    folder = fake_folder(tmp_path, "echo", "--log-request-bytes", "1000")  # more than a page of log while the disk is full
    config = server_config(tmp_path, f'[[endpoints]]\nname = "echo"\nmodel_folder = "{folder}"\n[auth]\nusage_flush_seconds = 0.5\n')
    # replica logs on the same small disk: the worker's output must keep flowing while they cannot be written
    config.write_text(config.read_text().replace("[workers]\n", f'[workers]\nlog_dir = "{small_disk / "logs"}"\n', 1))
    server = server_factory(config).start()
    admin = (small_disk / "admin.key").read_text().strip()
    created, key = _call(server.url, "/api/v1/keys", admin, {"name": "before"})
    assert created == 201, key
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    wait_for(lambda: _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200, timeout=30, what="the endpoint to answer")
    answered = 1

    filler = _fill(small_disk)
    refused: tuple[int, Any] | None = None
    for i in range(500):  # SQLite reuses its write-ahead log's pages until it has to grow it
        status, body = _call(server.url, "/api/v1/keys", admin, {"name": f"during-{i}"})
        if status != 201:
            refused = (status, body)
            break
        answered += _call(server.url, "/v1/chat/completions", key["key"], chat)[0] == 200
    assert refused is not None, "500 keys were written to a full disk"
    status, body = refused
    assert status == 507, body
    assert body["error"]["code"] == "disk_full" and "full" in body["error"]["message"] and "nothing was changed" in body["error"]["message"]
    refused_name = f"during-{i}"

    for _ in range(30):  # inference goes on: it needs no disk
        status, _ = _call(server.url, "/v1/chat/completions", key["key"], chat)
        assert status == 200
        answered += 1
    health = json.loads(urllib.request.urlopen(server.url + "/healthz", timeout=5).read())
    assert "disk full" in health["detail"], health
    assert _call(server.url, "/api/v1/endpoints/echo", admin)[0] == 200  # reads still work
    assert server.proc.poll() is None

    os.unlink(filler)
    wait_for(lambda: "disk full" not in json.loads(urllib.request.urlopen(server.url + "/healthz", timeout=5).read())["detail"],
             timeout=15, what="the held writes to be written once space returned")
    kinds = [e["kind"] for e in _call(server.url, "/api/v1/events?limit=500", admin)[1]["data"]]
    assert "store.disk_full" in kinds and "store.disk_recovered" in kinds, kinds[:20]
    names = [k["name"] for k in _call(server.url, "/api/v1/keys?limit=1000", admin)[1]["data"]]
    assert refused_name not in names  # the refused write left nothing behind
    assert _call(server.url, "/api/v1/keys", admin, {"name": "after"})[0] == 201  # writes work again

    def usage_recorded() -> bool:
        rows = _call(server.url, f"/api/v1/usage?key={key['id']}&since=1h", admin)[1]["data"]
        return bool(rows) and rows[0]["requests"] == answered

    wait_for(usage_recorded, timeout=15, what=f"all {answered} requests in the usage table")
    log_text = "".join(p.read_text(errors="replace") for p in (small_disk / "logs").rglob("*.log*"))
    assert "lines were not written here" in log_text  # the worker's lines went on, and the gap is marked
    assert server.stop() == 0
