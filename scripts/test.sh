#!/usr/bin/env bash
# Set up (scripts/setup.sh with vLLM and the test tools), install the system tools the tests drive (Chromium for the console's
# browser tests, systemd-analyze for the unit's), and run the whole test suite. Extra arguments go to
# pytest, e.g. scripts/test.sh -m "not slow" for the fast set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-vllm --with-tests  # vLLM too: tests/test_vllm.py runs it
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing ${missing[*]} (apt)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test: ${missing[*]} missing and not installable here (needs root and apt): the tests that drive them are skipped"
  fi
fi
exec .venv/bin/python -m pytest "$@"
