"""Autoscaling rules and decisions through the CLI, and a graceful stop that finishes a stream in flight,
against `appliance serve` processes."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, wait_for, write_config
from test_access_cli import cli
from test_supervisor import fake_folder

pytestmark = pytest.mark.process


def test_autoscale_rules_and_decisions_through_the_cli(server_factory: Any, tmp_path: Path) -> None:
    # No evaluation runs during this test (the first is one interval after the start).
    config = write_config(tmp_path / "config.toml", f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n[autoscaling]\ninterval_seconds = 600\n')
    server_factory(config).start()
    cli(config, "endpoint", "create", "chat", "--model-folder", str(fake_folder(tmp_path, "chat")), "--replicas", "0",
        "--min-replicas", "0", "--max-replicas", "3", "--idle-timeout", "600", "--max-surge", "0")
    shown = run_cli("endpoint", "show", "chat", config=config).stdout
    assert "0 desired; configured 0 (min 0, max 3)" in shown and "surge 0" in shown and "idle to zero after 600s" in shown
    rule = cli(config, "endpoint", "autoscale", "add", "chat", "--source", "gateway", "--metric", "latency_p95", "--comparator", ">",
               "--threshold", "2", "--step", "1", "--window", "60")
    assert rule["comparator"] == "GREATER_THAN" and rule["window_seconds"] == 60 and rule["max_replicas"] is None
    down = cli(config, "endpoint", "autoscale", "add", "chat", "--source", "inference", "--metric", "vllm:num_requests_running",
               "--comparator", "LESS_THAN", "--threshold", "1", "--step", "-1", "--min", "1")
    listed = run_cli("endpoint", "autoscale", "list", "chat", config=config).stdout.splitlines()
    assert listed[0].split()[:3] == ["RULE", "METRIC", "COMPARATOR"]
    assert any(line.startswith(rule["id"]) and "gateway/latency_p95" in line and "+1" in line for line in listed)
    assert any(line.startswith(down["id"]) and "-1" in line and "1..-" in line for line in listed)
    off = cli(config, "endpoint", "autoscale", "update", "chat", rule["id"], "--no-enabled", "--threshold", "3")
    assert off["enabled"] is False and off["threshold"] == 3
    assert cli(config, "endpoint", "autoscale", "rm", "chat", down["id"])["deleted"] is True
    assert [r["id"] for r in cli(config, "endpoint", "autoscale", "list", "chat")["data"]] == [rule["id"]]
    assert "no autoscaling decisions yet" in run_cli("endpoint", "decisions", "chat", config=config).stdout
    kinds = [e["kind"] for e in cli(config, "endpoint", "events", "chat", "--limit", "20")["data"]]
    assert kinds.count("autoscaling_rule.created") == 2 and "autoscaling_rule.updated" in kinds and "autoscaling_rule.deleted" in kinds

    bad = run_cli("endpoint", "autoscale", "add", "chat", "--source", "gpu", "--metric", "temperature", "--comparator", ">",
                  "--threshold", "80", "--step", "1", config=config)
    assert bad.returncode == 1 and "gpu metrics are gpu_util, gpu_mem" in bad.stderr
    bad = run_cli("endpoint", "autoscale", "add", "chat", "--source", "gateway", "--metric", "latency_p95", "--comparator", "bigger",
                  "--threshold", "1", "--step", "1", config=config)
    assert bad.returncode == 1 and "comparator" in bad.stderr
    missing = run_cli("endpoint", "autoscale", "list", "nope", config=config)
    assert missing.returncode == 1 and "endpoint 'nope' not found" in missing.stderr
    gone = run_cli("endpoint", "autoscale", "rm", "chat", "asr-00000000", config=config)
    assert gone.returncode == 1 and "no autoscaling rule 'asr-00000000'" in gone.stderr


def test_stopping_the_appliance_finishes_a_stream_in_flight(server_factory: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "slow", "--tokens-per-second", "10")
    config = write_config(
        tmp_path / "config.toml",
        f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[endpoints]]\nname = "slow"\nmodel_folder = "{folder}"\npublic = true\n',
    )
    server = server_factory(config).start()
    wait_for(lambda: cli(config, "endpoint", "show", "slow")["status"] == "HEALTHY", timeout=30, what="a healthy replica")
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}).encode()
    received: list[bytes] = []
    first = threading.Event()

    def read() -> None:
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            for line in resp:
                received.append(line)
                first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    assert server.stop(signal.SIGTERM, timeout=30) == 0  # the stream still had ~3 s to go
    reader.join(10)
    text = b"".join(received).decode()
    assert text.count("data: {") == 30 and text.rstrip().endswith("data: [DONE]")
