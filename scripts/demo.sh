#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the appliance on the embedded tiny demo model, on CPU.
# Extra arguments go to `appliance demo` (e.g. --port 9000 --state-dir /tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/appliance demo "$@"
