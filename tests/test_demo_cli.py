"""The demo's command line, in-process: when it says ready, what it refuses, and the CLI's --expires."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import server_side
from appliance.cli.main import main


class StubAppliance:
    """Says the demo endpoint is HEALTHY, but fails its first `failures` chat requests (a replica that passed
    its health check and cannot answer), then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.chats: list[dict[str, Any]] = []
        self.keys: set[str] = set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub.keys.add(self.headers.get("Authorization", ""))
                self._send(200, {"name": "demo", "status": "HEALTHY"})

            def do_POST(self) -> None:
                stub.keys.add(self.headers.get("Authorization", ""))
                stub.chats.append({"path": self.path, "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
                if len(stub.chats) <= stub.failures:
                    self._send(502, {"error": {"message": "worker unreachable", "type": "worker_error", "code": "worker_unreachable"}})
                else:
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": " hot box today"}, "finish_reason": "length"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def stub() -> Iterator[StubAppliance]:
    s = StubAppliance(failures=2)
    thread = threading.Thread(target=s.server.serve_forever, daemon=True)
    thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_ready_is_said_only_after_the_endpoint_answered_a_chat_request(stub: StubAppliance, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server_file, key_file = tmp_path / "server.json", tmp_path / "admin.key"
    server_file.write_text(json.dumps({"url": stub.url}))
    key_file.write_text("ak-demo\n")
    assert server_side.say_when_ready(server_file, key_file, try_lines=True, timeout=30, interval=0.01)
    out = capsys.readouterr().out
    assert len(stub.chats) == 3  # HEALTHY twice without an answer: not ready yet
    assert stub.chats[-1]["path"] == "/v1/chat/completions" and stub.chats[-1]["body"]["model"] == "demo"
    assert stub.keys == {"Bearer ak-demo"}
    ready = [line for line in out.splitlines() if line.startswith("demo: ready:")]
    assert ready == [f"demo: ready: the demo endpoint answers at {stub.url}/v1 (it said 'hot box today')"]
    # the console and how to log in, with the try lines
    assert f"demo: web console at {stub.url}/ui (log in with the admin key: paste the contents of {key_file})" in out
    assert out.index("web console") < out.index("demo: ready:")


def test_ready_is_not_said_when_the_endpoint_never_answers(stub: StubAppliance, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.failures = 10**6
    server_file, key_file = tmp_path / "server.json", tmp_path / "admin.key"
    server_file.write_text(json.dumps({"url": stub.url}))
    key_file.write_text("ak-demo\n")
    assert not server_side.say_when_ready(server_file, key_file, try_lines=False, timeout=1.0, interval=0.01)
    out = capsys.readouterr().out
    assert "demo: ready" not in out and "did not answer within 1 s" in out and len(stub.chats) >= 2


def test_the_vllm_demo_without_vllm_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    import appliance.demo_model
    import appliance.server

    served: list[Any] = []
    monkeypatch.setattr(appliance.server, "serve", lambda config: served.append(config) or 0)  # never serve for real here
    monkeypatch.setattr(appliance.demo_model, "is_current_demo_model", lambda folder: True)
    monkeypatch.setattr(server_side, "say_when_ready", lambda *args: None)
    assert main(["demo", "--engine", "vllm", "--state-dir", str(tmp_path / "state"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "--engine vllm needs vLLM, which is not installed" in err and "scripts/setup.sh --with-vllm" in err
    assert not served and not (tmp_path / "state").exists()  # refused before anything was written


@pytest.mark.parametrize("given", ["30x", "soon", "12hours"])
def test_expires_that_is_neither_a_duration_nor_a_date_names_the_forms_that_work(given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # refused before any server is asked: no config or server is needed
    assert main(["key", "create", "--expires", given, "--config", str(tmp_path / "absent.toml")]) == 2
    err = capsys.readouterr().err
    assert f"--expires: {given!r} is neither a duration nor a date" in err
    assert "30d" in err and "12h" in err and "2027-01-01" in err and "never" in err


def test_demo_workers_run_as_root_only_where_a_uid_of_their_own_cannot_reach_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                    request: pytest.FixtureRequest) -> None:
    import os
    import pwd

    from appliance.config import load_config
    from appliance.demo_model import write_demo_config

    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def no_account(name: str) -> Any:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", no_account)
    opened = Path(tempfile.mkdtemp(prefix="appliance-demo-"))  # pytest's tmp_path sits in a 0700 folder
    request.addfinalizer(lambda: shutil.rmtree(opened))
    opened.chmod(0o755)
    state = opened / "state"
    state.mkdir()
    shared = opened / "python"
    shared.write_text("")
    shared.chmod(0o755)
    assert server_side.demo_workers_user(state, python=str(shared)) == (None, None)  # secure by default where it works

    home = opened / "home"  # as pyenv's Python under /root: 0700
    home.mkdir(mode=0o700)
    (home / "python").write_text("")
    user, why = server_side.demo_workers_user(state, python=str(home / "python"))
    assert user == "root" and why is not None and f"cannot reach {home}," in why and "appliance-worker" in why

    config = load_config(write_demo_config(state, tmp_path / "model", port=0, workers_user=user))
    assert config.workers.user == "root"
    assert load_config(write_demo_config(state, tmp_path / "model", port=0)).workers.user != "root"
