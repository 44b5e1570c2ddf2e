"""`appliance model add|list|show|warm|rm` against a real `appliance serve`, and a model declared in the
config file with an endpoint on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, wait_for
from test_models import MiB, same_tree, write_model
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_model_commands(tmp_path: Path, server_factory: Any) -> None:
    source = fake_folder(tmp_path, "cli-model")
    write_model(source, {"weights.bin": 3 * MiB})
    config = server_config(tmp_path, f'[[models.declared]]\nname = "declared"\nsource = "{source}"\n'
                                      '[[endpoints]]\nname = "on-declared"\nmodel = "declared"\n')
    server_factory(config).start()
    added = run_cli("model", "add", "copy", str(source), "--revision", "v1", "--no-warm", config=config)
    assert added.returncode == 0 and "registered model copy" in added.stdout and "REGISTERED" in added.stdout, added.stderr
    warm = run_cli("model", "warm", "copy", config=config)
    assert warm.returncode == 0 and "model copy is READY" in warm.stdout, warm.stderr
    shown = _json(run_cli("model", "show", "copy", "--json", config=config))
    assert shown["state"] == "READY" and same_tree(source, Path(shown["local_path"])) and len(shown["manifest"]) == 2
    human = run_cli("model", "show", "copy", config=config)
    assert "revision" in human.stdout and "v1" in human.stdout
    listing = run_cli("model", "list", config=config)
    assert listing.returncode == 0 and "copy" in listing.stdout and "declared" in listing.stdout

    def served() -> bool:
        ep = _json(run_cli("endpoint", "show", "on-declared", "--json", config=config))
        return ep["status"] == "HEALTHY"

    wait_for(served, timeout=60, what="the endpoint on the declared model")
    refused = run_cli("model", "rm", "declared", config=config)
    assert refused.returncode == 1 and "used by endpoint(s) on-declared" in refused.stderr
    assert run_cli("model", "rm", "copy", config=config).returncode == 0
    assert not Path(shown["local_path"]).exists()
    missing = run_cli("model", "warm", "copy", config=config)
    assert missing.returncode == 1 and "not found" in missing.stderr
