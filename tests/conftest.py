from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from inprocess import InProcessLauncher

from appliance.api.app import make_app
from appliance.config import Config, parse_config
from appliance.control.host.process import Launcher


def _dump_tasks(signum: int, frame: Any) -> None:
    """`kill -USR2 <pytest pid>`: every asyncio task's stack into /tmp/appliance-tasks-<pid>.txt (pytest
    holds stderr), to see what a hung test awaits."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    with open(f"/tmp/appliance-tasks-{os.getpid()}.txt", "w") as out:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task.get_name()}", file=out)
            awaited: Any = task.get_coro()
            while awaited is not None:  # the whole await chain, not only the task's own frame
                frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
                if frame is None:
                    print(f"  awaiting {awaited!r}", file=out)
                    break
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}", file=out)
                awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


signal.signal(signal.SIGUSR2, _dump_tasks)

REPO = Path(__file__).resolve().parent.parent

SEED_DEFINITION = """\
models:
  - name: "simple-http-server"
    model_path: "/models"
    service:
      start_command:
        - python
        - -m
        - http.server
        - --directory
        - /home/work
        - "8000"
      port: 8000
      health_check:
        path: /
        interval: 10.0
        max_retries: 10
        max_wait_time: 15.0
        expected_status_code: 200
        initial_delay: 60.0
"""

SEED_SERVICE_DEFINITION = """\
[vllm.environment]
image        = "example.com/model-server:latest"
architecture = "x86_64"

[vllm.resource_slots]
cpu = 1
mem = "8gb"
"cuda.shares" = "0.5"

[vllm.environ]
MODEL_NAME = "example-model-name"
"""


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture
def fresh_grpc() -> None:
    """For tests that make grpc.aio objects. grpc.aio binds its completion queue to the event loop that made
    the first of its live objects, and lets it go only once every one is collected: one left over from an
    earlier test (in a cycle the collector has not reached yet) would send this test's completions to that
    closed loop, and the test would hang. Each test has a loop of its own; the appliance has one for life."""
    gc.collect()


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "plain"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")  # an engine runtime's folder must hold weights
    return folder


@pytest.fixture
def seed_folder(tmp_path: Path) -> Path:
    """A model folder exactly as the Backend.AI documentation shows it."""
    folder = tmp_path / "models" / "seed"
    folder.mkdir(parents=True)
    (folder / "model-definition.yaml").write_text(SEED_DEFINITION)
    (folder / "service-definition.toml").write_text(SEED_SERVICE_DEFINITION)
    return folder


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(raw: dict[str, Any] | None = None) -> Config:
        raw = json.loads(json.dumps(raw or {}))
        raw.setdefault("server", {}).setdefault("state_dir", str(tmp_path / "state"))
        raw["server"].setdefault("port", 0)
        if ROOT_WORKERS:
            raw.setdefault("workers", {}).setdefault("user", "root")
        return parse_config(raw, base=tmp_path)

    return make


@pytest.fixture
async def slow_callback_guard(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Fail a test whose code blocked the event loop for more than 100 ms."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert not slow, f"event loop blocked: {slow}"


class Admin:
    """An aiohttp test client on a real loopback socket, with the admin key."""

    def __init__(self, client: TestClient, config: Config) -> None:
        self.client = client
        self.config = config

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.admin_key_path.read_text().strip()}"}

    async def call(self, method: str, path: str, *, json_body: Any = None, data: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        resp = await self.client.request(method, path, json=json_body, data=data, headers={**self.headers, **(headers or {})})
        body = await resp.json(content_type=None)
        return resp.status, body


@pytest.fixture
async def start_app(aiohttp_client: Any) -> Callable[..., Any]:
    """Start make_app(config) on 127.0.0.1:0 and wait until /readyz says ready. Workers are processes
    unless a `launcher` is given (see start_inprocess_app)."""

    async def start(config: Config, *, launcher: Launcher | None = None) -> Admin:
        app = make_app(config) if launcher is None else make_app(config, launcher=launcher)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

        async def ready() -> bool:
            resp = await client.get("/readyz")
            return resp.status == 200

        await async_wait_for(ready, timeout=10, what="/readyz")
        return Admin(client, config)

    return start


@pytest.fixture
async def launcher() -> AsyncIterator[InProcessLauncher]:
    """The in-process worker launcher of one test. Set up before the app and torn down after it, so the
    app's own shutdown stops its workers first; what it left running is stopped here and fails the test."""
    launcher = InProcessLauncher()
    yield launcher
    left = await launcher.close()
    assert not launcher.refused, f"the in-process launcher was asked to run something else: {launcher.refused}"
    assert not left, f"the appliance left in-process workers running after shutdown: {left}"


@pytest.fixture
async def start_inprocess_app(launcher: InProcessLauncher, start_app: Callable[..., Any]) -> Callable[[Config], Awaitable[Admin]]:
    """start_app with fake workers run in the test's event loop (tests/inprocess.py): no worker process."""

    async def start(config: Config) -> Admin:
        admin: Admin = await start_app(config, launcher=launcher)
        return admin

    return start


class ServerProcess:
    """`appliance serve` as a real subprocess on a port it picks itself."""

    def __init__(self, config_path: Path, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.config_path = config_path
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"server-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0, *, ready: bool = True) -> "ServerProcess":
        """Start it and wait until /readyz says ready (ready=False: until it answers at all)."""
        server_json = self.state_dir / "server.json"
        server_json.unlink(missing_ok=True)
        root_workers(self.config_path)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if not server_json.exists():
                return False
            try:
                info = json.loads(server_json.read_text())
                # readiness only; tests that check certificates do so themselves
                insecure = ssl._create_unverified_context() if info["url"].startswith("https:") else None
                with urllib.request.urlopen(info["url"] + ("/readyz" if ready else "/healthz"), timeout=2, context=insecure) as resp:
                    self.url = info["url"]
                    return resp.status == 200
            except (OSError, ValueError):
                return False

        wait_for(up, timeout=timeout, what="appliance serve to become ready")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[[Path], ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(config_path: Path, state_dir: Path | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(config_path, state_dir or tmp_path / "state", env)
        servers.append(server)
        return server

    yield make
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.terminate()  # a clean stop takes its workers' process groups with it
            try:
                s.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()


def run_cli(*args: str, config: Path | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "appliance", *args]
    if config is not None:
        argv += ["--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# Run as root, the appliance gives workers a uid of their own, which cannot start this test run's
# interpreter where it lives under /root (0700). Tests about that identity set workers.user themselves
# (tests/test_worker_user.py); every other test says "root" outright, as an operator would.
ROOT_WORKERS = os.geteuid() == 0


def root_workers(config_path: Path) -> None:
    """Add workers.user = "root" to a config file that does not set workers.user, when run as root."""
    if not ROOT_WORKERS or not config_path.exists():
        return
    text = config_path.read_text()
    workers = re.search(r"^\[workers\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if workers and re.search(r"^\s*user\s*=", workers.group(1), re.M):
        return
    if "[workers]\n" in text:
        text = text.replace("[workers]\n", '[workers]\nuser = "root"\n', 1)
    else:
        text = text.rstrip("\n") + '\n\n[workers]\nuser = "root"\n'
    config_path.write_text(text)


def admin_api(url: str, key: str, method: str = "GET", body: Any = None) -> Any:
    """One admin API call to a served appliance (`url` includes the path), its JSON answer."""
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path



def _nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a process test is slow
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "process" in item.keywords or "ray" in item.keywords:
            item.add_marker(pytest.mark.slow)
    if any("gpu" in item.keywords for item in items) and _nvml_gpu_count() == 0:
        skip = pytest.mark.skip(reason="needs NVML and at least one GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
