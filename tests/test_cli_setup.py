"""The CLI as a newcomer meets it: --config before or after the command, $APPLIANCE_CONFIG, an error
that says what to do without a config, and a second server on a busy state dir or port refused
clearly, without harming the first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from test_supervisor import server_config

pytestmark = pytest.mark.process


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})


def test_config_before_or_after_the_command_and_from_the_environment(server_factory: Any, tmp_path: Path) -> None:
    config = server_config(tmp_path, "")
    server_factory(config).start()
    for result in (
        _cli("--config", str(config), "endpoint", "list", "--json"),
        _cli("endpoint", "list", "--json", "--config", str(config)),
        _cli("endpoint", "list", "--json", env={"APPLIANCE_CONFIG": str(config)}),
        _cli("endpoint", "--config", str(config), "list", "--json"),  # between the group and its action
    ):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["data"] == []


def test_a_missing_config_says_what_to_do(tmp_path: Path) -> None:
    result = _cli("endpoint", "list", env={"APPLIANCE_CONFIG": str(tmp_path / "nowhere.toml")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nowhere.toml does not exist ($APPLIANCE_CONFIG names it)" in result.stderr and "--config FILE" in result.stderr


def test_a_second_server_on_the_same_state_dir_is_refused_and_the_first_goes_on(server_factory: Any, tmp_path: Path) -> None:
    config = server_config(tmp_path, "")
    first = server_factory(config).start()
    record = (tmp_path / "state" / "server.json").read_text()
    second = run_cli("serve", config=config)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert "another appliance is already running with state_dir" in second.stderr and f"pid {first.proc.pid}" in second.stderr
    assert (tmp_path / "state" / "server.json").read_text() == record  # the first one's record is untouched
    assert run_cli("endpoint", "list", config=config).returncode == 0


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = server_config(tmp_path, "")
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        result = run_cli("serve", config=config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "choose another server.port" in result.stderr


def _gpu_config(tmp_path: Path, resources: str) -> Path:
    folder = tmp_path / "models" / "plain"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "big"\nmodel_folder = "{folder}"\nruntime = "transformers"\nresources = {resources}\n')
    return config


def test_check_config_warns_about_gpus_the_box_cannot_give(tmp_path: Path) -> None:
    result = run_cli("check-config", str(_gpu_config(tmp_path, '{ gpus = 2, gpu_name = "H100*" }')))
    assert result.returncode == 0, result.stderr
    assert "warning: endpoints[0] (big): asks for 2 GPU(s) per replica" in result.stderr and "1 warning(s)" in result.stdout


def test_doctor_reports_the_box_with_fixes(tmp_path: Path) -> None:
    result = run_cli("doctor", "--json", config=_gpu_config(tmp_path, "{ gpus = 1 }"))
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) >= {"GPUs (NVML)", "engines", "replica cgroups", "worker user", "worker ports", "state dir", "disk", "clock"}
    assert "vllm" in checks["engines"]["detail"] and "transformers" in checks["engines"]["detail"]
    assert all(c["fix"] for c in report["checks"] if c["status"] != "ok")  # every problem says how to fix it
    assert result.returncode == (1 if any(c["status"] == "problem" for c in report["checks"]) else 0)
    human = run_cli("doctor", config=_gpu_config(tmp_path, "{ gpus = 1 }"))
    assert "engines:" in human.stdout and "worker ports:" in human.stdout
    # what the config asks for: process groups on purpose; an engine a declared endpoint needs and the box lacks
    config = _gpu_config(tmp_path, "{ cpu = 1 }")
    config.write_text(config.read_text().replace("[workers]\n", '[workers]\nisolation = "process-group"\n').replace('runtime = "transformers"', 'runtime = "sglang"'))
    checks = {c["name"]: c for c in json.loads(run_cli("doctor", "--json", config=config).stdout)["checks"]}
    assert checks["replica cgroups"]["status"] == "ok" and "process-group" in checks["replica cgroups"]["detail"]
    assert checks["engines"]["status"] == "problem" and "runtime 'sglang' needs" in checks["engines"]["detail"], checks["engines"]


def test_create_with_wait_follows_the_endpoint_to_its_verdict(server_factory: Any, tmp_path: Path) -> None:
    from test_supervisor import fake_folder

    config = server_config(tmp_path, "")
    server_factory(config).start()
    good = run_cli("endpoint", "create", "ok", "--model-folder", str(fake_folder(tmp_path, "ok")), "--wait", config=config)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1].startswith("HEALTHY: ")
    bad = run_cli("endpoint", "create", "bad", "--model-folder", str(fake_folder(tmp_path, "bad", "--refuse-to-start")), "--wait", config=config)
    assert bad.returncode == 1 and "\nERROR: replica bad-" in bad.stdout, bad.stdout


def test_check_config_follows_endpoints_to_declared_models_and_refuses_missing_engines(tmp_path: Path) -> None:
    source = tmp_path / "share" / "m1"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"")
    declared = (
        f'[[models.declared]]\nname = "m1"\nsource = "{source}"\n\n'
        '[[models.declared]]\nname = "far"\nsource = "s3://bucket/far"\n\n'
        '[[endpoints]]\nname = "on-m1"\nmodel = "m1"\nruntime = "transformers"\n\n'
        '[[endpoints]]\nname = "on-far"\nmodel = "far"\n\n'
        '[[endpoints]]\nname = "on-nothing"\nmodel = "ghost"\n'
    )
    ok = run_cli("check-config", str(server_config(tmp_path, declared)))
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    assert "3 endpoint(s), 2 model(s) declared" in ok.stdout and "1 warning(s)" in ok.stdout
    assert "endpoints[2] (on-nothing): model 'ghost' is not declared" in ok.stderr

    (source / "config.json").unlink()
    (source / "model-definition.yaml").write_text("models: [")
    broken = run_cli("check-config", str(server_config(tmp_path, declared)))
    assert broken.returncode == 1 and "endpoints[0] (on-m1)" in broken.stderr and "Traceback" not in broken.stderr, broken.stderr

    missing = run_cli("check-config", str(server_config(tmp_path, declared.replace(str(source), str(tmp_path / "gone")))))
    assert missing.returncode == 1 and f"source {tmp_path / 'gone'} is not a directory" in missing.stderr, missing.stderr

    folder = tmp_path / "models" / "plain"
    folder.mkdir(parents=True, exist_ok=True)
    engine = run_cli("check-config", str(server_config(tmp_path, f'[[endpoints]]\nname = "sg"\nmodel_folder = "{folder}"\nruntime = "sglang"\n')))
    assert engine.returncode == 1 and "runtime 'sglang' needs the" in engine.stderr and "not installed" in engine.stderr, engine.stderr


def test_a_missing_or_unreadable_key_file_says_what_to_do(tmp_path: Path) -> None:
    config = server_config(tmp_path, "")
    missing = _cli("endpoint", "list", "--config", str(config), "--url", "http://127.0.0.1:9", "--key-file", str(tmp_path / "none.key"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "none.key not found: pass --key-file FILE, or `appliance admin-key reset`" in missing.stderr, missing.stderr
