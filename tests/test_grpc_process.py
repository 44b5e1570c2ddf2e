"""The gRPC port of `appliance serve` as a real process, with worker processes: its address in server.json,
GRPC_PORT in a worker's environment, and a stop that lets calls in flight finish while refusing new ones."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import ServerProcess, admin_api, async_wait_for, run_cli

from test_supervisor import FAST, FAKE, server_config

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("fresh_grpc")]

INFER = "/inference.GRPCInferenceService/ModelInfer"


def env_folder(root: Path) -> Path:
    """A definition whose command does not name the gRPC port: the worker reads GRPC_PORT."""
    folder = root / "models" / "g"
    folder.mkdir(parents=True)
    service = {"start_command": ["python", str(FAKE), "--port", "8000"], "port": 8000, "grpc_port": 9001, "health_check": FAST}
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "g", "model_path": "/models", "service": service}]}))
    return folder


async def test_a_stop_lets_calls_in_flight_finish_and_refuses_new_ones(tmp_path: Path, server_factory: Any) -> None:
    endpoints = f'[grpc]\nport = 0\n[[endpoints]]\nname = "g"\nmodel_folder = "{env_folder(tmp_path)}"\n'
    config = server_config(tmp_path, endpoints).read_text().replace("[server]\n", "[server]\nshutdown_timeout_seconds = 10\n")
    (tmp_path / "config.toml").write_text(config)
    server: ServerProcess = server_factory(tmp_path / "config.toml").start()
    info = json.loads((tmp_path / "state" / "server.json").read_text())
    key = (tmp_path / "state" / "admin.key").read_text().strip()
    metadata = (("authorization", f"Bearer {key}"), ("x-endpoint", "g"))
    async with grpc.aio.insecure_channel(info["grpc"]) as channel:
        infer = channel.unary_unary(INFER)

        async def answers() -> bool:
            try:
                return await infer(b"ping", metadata=metadata, timeout=5) == b"ping"
            except grpc.aio.AioRpcError:
                return False

        await async_wait_for(answers, timeout=30, what="the endpoint to answer over gRPC")
        listed = await asyncio.to_thread(run_cli, "endpoint", "replicas", "g", config=tmp_path / "config.toml", check=True)
        assert re.search(r"\d+/\d+ \(gRPC\)", listed.stdout), listed.stdout  # both ports in the CLI's table
        slow = asyncio.ensure_future(infer(b"sleep:1.5", metadata=metadata, timeout=20))
        replicas = f"{server.url}/api/v1/endpoints/g/replicas"
        await async_wait_for(lambda: admin_api(replicas, key)["data"][0]["inflight"] == 1, timeout=5, what="the slow call at the worker")
        assert server.proc is not None
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:  # once the stop has begun, a new call is turned away
            try:
                await infer(b"late", metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code() is grpc.StatusCode.UNAVAILABLE
            return False

        await async_wait_for(refused, timeout=5, what="a new call refused during the stop")
        assert not slow.done()
        assert await slow == b"slept" and time.monotonic() - stopped_at >= 1.0
    assert await asyncio.to_thread(server.proc.wait, 30) == 0
