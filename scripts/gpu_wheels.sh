#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels that scripts/gpu_check.sh needs on a GPU machine
# that has PyTorch, timm and the rest but not open_clip: open_clip_torch, ftfy, wcwidth, for
# Python 3.12 on x86-64 Linux, into .whl/ (ignored by git). gpu_check.sh installs them from there.
#   bash scripts/gpu_wheels.sh
# Environment: PYTHON (default .venv/bin/python), PY_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13"
ls -l .whl
