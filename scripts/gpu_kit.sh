#!/usr/bin/env bash
# Gather, here, the wheels a bare GPU machine lacks to run the appliance, its GPU tests and `transformers serve`
# on its GPU (Python 3.12, manylinux x86-64, no network there), into .whl/ (ignored by git). The versions are
# those of this checkout's .venv, so the GPU run tests what CI tests. Fails when they pass 60 MiB.
# Then, on the GPU machine: scripts/gpu_check.sh (docs/gpu.md).
#
#   scripts/gpu_kit.sh            # after scripts/setup.sh --with-tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_kit: run scripts/setup.sh --with-tests first (the versions are read from .venv)" >&2; exit 2; }

# What the appliance imports that the GPU image lacks (its list: the device's KINDS.md), what the tests need,
# and what `transformers serve` needs beyond transformers and torch (already there).
WANTED=(
  httptools apscheduler tzlocal sqlite-utils sqlite-fts4 click-default-group cryptography cffi pycparser PyJWT
  pydantic pydantic-core annotated-types typing-inspection
  pytest-aiohttp pytest-asyncio
  fastapi starlette uvicorn openai distro jiter sniffio
)
LIMIT_MIB=60
DEST=.whl
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -f "$DEST"/*.whl

pins=()
for name in "${WANTED[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  pins+=("$name${version:+==$version}")
done
echo "gpu_kit: ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  -d "$DEST" "${pins[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
size=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (size + 1048575) / 1048576 ))
echo "gpu_kit: $count wheels, $mib MiB in $DEST/"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "gpu_kit: over $LIMIT_MIB MiB: the GPU machine takes 64 MiB with the working tree" >&2
  exit 1
fi
