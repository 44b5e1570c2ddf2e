#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the appliance on the embedded tiny demo model, on CPU.
# Extra arguments go to `appliance demo` (e.g. --port 9000 --state-dir /tmp/demo); with --engine vllm the
# setup also installs vLLM, which the default demo (`transformers serve`) does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=()
prev=
for arg in "$@"; do
  if [ "$arg" = --engine=vllm ] || { [ "$prev" = --engine ] && [ "$arg" = vllm ]; }; then
    setup=(--with-vllm)
  fi
  prev=$arg
done
scripts/setup.sh "${setup[@]}"
exec .venv/bin/appliance demo "$@"
