#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on the CPU (times: README, "Two commands for a fresh machine").
#   bash scripts/test.sh [pytest arguments]      # the whole suite
#   bash scripts/test.sh -m "not slow"            # the fast tier: no process started, nothing long
# Tests run in TEST_WORKERS processes (default 2, pytest-xdist; 1 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${TEST_WORKERS:-2}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest ${parallel[@]+"${parallel[@]}"} "$@"
