#!/usr/bin/env python3
"""The GPU kit's steps (run by scripts/gpu_check.sh, which sets up the import path), each under its own
deadline so the whole stays under 8 minutes:

  gpu      NVML's inventory: the GPUs, their memory, the driver (no GPU: every GPU step is skipped, said why)
  pytest   `pytest -m gpu` on the GPU tests (pinning by UUID, shares, memory back after a kill -9,
           GPU-driven autoscaling); without a GPU they report skipped, and the summary line is kept
  gateway  scripts/bench_gpu.py: a random-weight model on `transformers serve` on the GPU, streams direct
           and through the appliance at 1, 16 and 64 clients

Writes $OUT/gpu_check.json (every figure, each step's status and seconds, the pytest summary) and
$OUT/gpu_check.md (a short table). Exits non-zero when a step that ran failed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEADLINES = {"gpu": 30, "pytest": 270, "gateway": 180}  # seconds; 480 in all
GPU_TESTS = ["tests/test_engines_and_gpus.py", "tests/test_gpu.py"]


def gpus() -> dict[str, Any]:
    """The GPUs NVML sees, or why none."""
    try:
        from appliance.control.host.gpus import Nvml

        found = Nvml().inventory()
    except Exception as exc:  # noqa: BLE001 -- no driver, no library, a fake that refuses: all say "no GPU"
        return {"status": "skipped", "detail": f"no GPU: {getattr(exc, 'message', exc)}"}
    if not found:
        return {"status": "skipped", "detail": "no GPU: NVML answers and lists none"}
    return {"status": "passed", "detail": f"{len(found)} GPU(s)", "figures": {"gpus": [
        {"index": g.index, "name": g.name, "uuid": g.uuid, "memory_total": g.memory_total, "memory_used": g.memory_used} for g in found]}}


def run(argv: list[str], deadline: float, log: Path) -> tuple[int | None, str, float]:
    """`argv` under its deadline, its output into `log`: (exit code or None on the deadline, output's tail, seconds)."""
    t = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")[-4000:], time.monotonic() - t


def main() -> int:
    out = Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0], "steps": {}}
    steps = report["steps"]
    t = time.monotonic()
    steps["gpu"] = {**gpus(), "seconds": round(time.monotonic() - t, 2)}
    have_gpu = steps["gpu"]["status"] == "passed"

    code, tail, took = run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", *GPU_TESTS], DEADLINES["pytest"],
                           out / "pytest_gpu.log")
    summary = next((line.strip("= ") for line in reversed(tail.splitlines()) if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", line)), "")
    status = "timeout" if code is None else "passed" if code == 0 and have_gpu else "skipped" if code == 0 else "failed"
    steps["pytest"] = {"status": status, "seconds": round(took, 1), "detail": summary, "exit_code": code}
    report["pytest_summary"] = summary

    if have_gpu:
        figures = out / "bench_gpu.json"
        code, tail, took = run([sys.executable, "scripts/bench_gpu.py", "--json", str(figures)], DEADLINES["gateway"], out / "bench_gpu.log")
        done = code == 0 and figures.exists()
        steps["gateway"] = {"status": "timeout" if code is None else "passed" if done else "failed", "seconds": round(took, 1),
                            "detail": "" if done else tail[-1500:], **({"figures": json.loads(figures.read_text())} if done else {})}
    else:
        steps["gateway"] = {"status": "skipped", "seconds": 0.0, "detail": steps["gpu"]["detail"]}

    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(table(report))
    sys.stdout.write(table(report))
    return 1 if any(s["status"] in ("failed", "timeout") for s in steps.values()) else 0


def table(report: dict[str, Any]) -> str:
    lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        detail = str(step.get("detail", "")).replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | {detail} |")
    gateway = report["steps"].get("gateway", {}).get("figures")
    if gateway:
        lines += ["", "| streams | tokens/s direct | through the appliance | ratio | TTFT added p50 ms | appliance CPU ms / 1k tokens |",
                  "|---|---|---|---|---|---|"]
        for row in gateway["rows"]:
            lines.append(f"| {row['streams']} | {row['direct_tps']:.0f} | {row['appliance_tps']:.0f} | {row['ratio']:.3f} | "
                         f"{row['ttft_added_ms']:+.1f} | {row['cpu_ms_per_1k_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
