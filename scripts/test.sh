#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on the CPU (times: README, "Two commands for a fresh machine").
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest "$@"
