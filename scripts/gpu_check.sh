#!/usr/bin/env bash
# The GPU kit's run, on a machine with an NVIDIA GPU (docs/gpu.md): the wheels scripts/gpu_kit.sh gathered
# (.whl/) installed into a target folder without network when there are any, then every step of
# scripts/gpu_check.py under its own deadline. Figures go to $OUT (default: a new temporary folder):
# gpu_check.json, gpu_check.md and the pytest log. Without a GPU the GPU steps say so and are skipped.
#
#   OUT=/tmp/out scripts/gpu_check.sh          # GPU_CHECK_PYTHON: the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$(mktemp -d)}
PY=${GPU_CHECK_PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
  site=${GPU_CHECK_SITE:-/tmp/appliance-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
