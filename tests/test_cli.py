"""The CLI and `appliance serve` as real processes on loopback."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, run_cli, write_config

pytestmark = pytest.mark.process


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.toml", f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n')


@pytest.fixture
def server(server_factory: Any, config_path: Path) -> ServerProcess:
    return server_factory(config_path).start()


def cli(config: Path, *args: str) -> Any:
    result = run_cli(*args, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_endpoint_lifecycle_through_the_cli(server: ServerProcess, config_path: Path, model_folder: Path, tmp_path: Path) -> None:
    created = cli(config_path, "endpoint", "create", "chat", "--model-folder", str(model_folder), "--runtime", "vllm",
                  "--replicas", "2", "--max-replicas", "4", "--gpu-share", "0.5", "--env", "A=1", "--extra-arg=--max-model-len=4096",
                  "--alias", "chat-latest", "--public")
    assert created["name"] == "chat" and created["replicas"] == 2 and created["resources"]["gpu_share"] == 0.5
    assert created["environ"] == {"A": "1"} and created["extra_args"] == ["--max-model-len=4096"] and created["public"] is True

    spec = write_config(tmp_path / "spec.toml", 'name = "filed"\nmodel_folder = "models/plain"\nruntime = "transformers"\n[resources]\ncpu = 2\n')
    filed = cli(config_path, "endpoint", "create", "-f", str(spec), "--description", "from a file")
    assert filed["model_folder"] == str(model_folder) and filed["resources"]["cpu"] == 2.0 and filed["description"] == "from a file"

    listing = cli(config_path, "endpoint", "list")
    assert [e["name"] for e in listing["data"]] == ["chat", "filed"]

    table = run_cli("endpoint", "list", config=config_path)
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "RUNTIME", "STATUS", "REPLICAS", "RANGE", "GPU", "ACCESS", "SOURCE", "MODEL", "FOLDER"]
    cells = rows[0].split()
    assert cells[:2] == ["chat", "vllm"] and cells[3:8] == ["2", "2-4", "0.5", "GPU", "public"]

    updated = cli(config_path, "endpoint", "update", "chat", "--replicas", "3", "--no-public")
    assert updated["replicas"] == 3 and updated["public"] is False and updated["generation"] == 1  # scaling needs no new workers

    shown = run_cli("endpoint", "show", "chat", config=config_path)
    assert shown.returncode == 0 and "private (key required)" in shown.stdout and "3 (min 3, max 4)" in shown.stdout

    events = cli(config_path, "endpoint", "events", "chat", "--limit", "1000")
    assert [e["kind"] for e in events["data"] if e["kind"] in ("endpoint.created", "endpoint.updated")] == ["endpoint.updated", "endpoint.created"]

    deleted = run_cli("endpoint", "delete", "filed", config=config_path)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted endpoint filed"


def test_cli_errors_carry_the_server_message(server: ServerProcess, config_path: Path, model_folder: Path) -> None:
    result = run_cli("endpoint", "show", "nope", config=config_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: endpoint 'nope' not found"
    result = run_cli("endpoint", "create", "bad name", "--model-folder", str(model_folder), config=config_path)
    assert result.returncode == 1 and "name: must be 1–50 characters" in result.stderr
    result = run_cli("endpoint", "create", "x", "--model-folder", str(model_folder), "--replicas", "3", "--max-replicas", "1", "--min-replicas", "4", config=config_path)
    assert result.returncode == 1 and "problems:" in result.stderr and "min_replicas: must be ≤ replicas (3)" in result.stderr
    result = run_cli("endpoint", "create", "x", "--model-folder", str(model_folder), "--env", "NOEQUALS", config=config_path)
    assert result.returncode == 2 and "--env takes KEY=VALUE" in result.stderr
    result = run_cli("endpoint", "update", "x", config=config_path)
    assert result.returncode == 2 and "nothing to change" in result.stderr


def test_cli_with_a_wrong_or_missing_key(server: ServerProcess, config_path: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("ak-not-the-key\n")
    result = run_cli("endpoint", "list", "--key-file", str(wrong), config=config_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: invalid API key"
    result = run_cli("endpoint", "list", "--key-file", str(tmp_path / "absent.key"), config=config_path)
    assert result.returncode == 1 and "not found" in result.stderr


def test_cli_without_a_server(config_path: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin.key").write_text("ak-x\n")
    (tmp_path / "state" / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9"}))
    result = run_cli("endpoint", "list", config=config_path)
    assert result.returncode == 1 and "cannot reach the appliance at http://127.0.0.1:9" in result.stderr


def test_admin_key_reset_works_offline_and_online(server: ServerProcess, config_path: Path, tmp_path: Path) -> None:
    old = (tmp_path / "state" / "admin.key").read_text().strip()
    result = run_cli("admin-key", "reset", config=config_path)
    assert result.returncode == 0, result.stderr
    new = (tmp_path / "state" / "admin.key").read_text().strip()
    assert new != old and (tmp_path / "state" / "admin.key").stat().st_mode & 0o777 == 0o600
    assert cli(config_path, "endpoint", "list")["data"] == []  # the running server accepts the new key
    req = urllib.request.Request(server.url + "/api/v1/endpoints", headers={"Authorization": f"Bearer {old}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 401  # and rejects the old one


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_cleanly_on_signals(server_factory: Any, config_path: Path, tmp_path: Path, sig: int) -> None:
    server = server_factory(config_path).start()
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    assert server.stop(sig) == 0
    assert not (tmp_path / "state" / "server.json").exists()
    assert "shutting down" in server.output() and "Traceback" not in server.output()


def test_serve_refuses_a_bad_config_or_database(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", "[server]\nport = -1\n")
    result = run_cli("serve", config=bad)
    assert result.returncode == 1 and "server.port: must be ≥ 0" in result.stderr
    state = tmp_path / "state"
    state.mkdir()
    (state / "appliance.db").write_bytes(b"garbage" * 1000)
    cfg = write_config(tmp_path / "c.toml", f'[server]\nport = 0\nstate_dir = "{state}"\n')
    result = run_cli("serve", config=cfg)
    assert result.returncode == 1 and "state database" in result.stderr and "Traceback" not in result.stderr


def test_serve_reads_the_config_path_from_the_environment(tmp_path: Path, config_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "APPLIANCE_CONFIG": str(tmp_path / "missing.toml")}
    result = subprocess.run([sys.executable, "-m", "appliance", "check-config"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "missing.toml does not exist" in result.stderr


def test_serve_tells_systemd_when_ready_and_stopping(server_factory: Any, config_path: Path, tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        server = server_factory(config_path, env={"NOTIFY_SOCKET": address}).start()
        assert sock.recv(256).startswith(b"READY=1\nSTATUS=")  # the status line says how many replicas are healthy
        server.stop(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"


def test_an_answer_that_is_not_json_is_a_clear_error_not_a_traceback() -> None:
    import http.server
    import threading

    from appliance.cli.client import AdminClient
    from appliance.errors import ApplianceError

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>a proxy page</html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ApplianceError) as info:
            AdminClient(f"http://127.0.0.1:{server.server_port}", "ak-x").request("GET", "/api/v1/endpoints")
    finally:
        server.shutdown()
    assert info.value.code == "bad_answer" and "not JSON" in info.value.message and "a proxy page" in info.value.message
