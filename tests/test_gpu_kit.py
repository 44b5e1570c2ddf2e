"""The GPU kit's dry run: scripts/gpu_check.sh on this box with a stand-in NVML that lists no GPU reaches its
end, writes its JSON and table, and reports every GPU step skipped for want of a GPU, not crashed. So the kit
cannot rot between the machines with a GPU it is run on (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.process
def test_the_gpu_check_runs_to_its_end_without_a_gpu_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_NO_INSTALL": "1",
           "PYTHONPATH": str(Path(__file__).parent / "fake_nvml")}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert set(steps) == {"gpu", "pytest", "gateway"}
    assert steps["gpu"]["status"] == "skipped" and "lists none" in steps["gpu"]["detail"]  # the stand-in answered: no GPU
    assert steps["pytest"]["status"] == "skipped" and steps["pytest"]["exit_code"] == 0
    assert "skipped" in report["pytest_summary"] and "passed" not in report["pytest_summary"] and "failed" not in report["pytest_summary"]
    assert steps["gateway"]["status"] == "skipped"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| gateway | skipped |" in table and (tmp_path / "pytest_gpu.log").exists()
