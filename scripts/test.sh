#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on the CPU (a few minutes on 2 cores).
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest "$@"
