# Sourced by scripts/gpu_check.sh and scripts/gpu_paper_scale.sh (bash): the Python and packages of a GPU
# machine that reaches no network.
#   gpu_python   sets PY: $PYTHON when set, else the first of python3, python, .venv/bin/python that
#                imports torch (the GPU machine's own PyTorch is used, never one from the bundle);
#   gpu_install  installs, offline, from .whl/ (scripts/gpu_wheels.sh prepares it where PyPI is reachable)
#                the bundle's distributions that $PY lacks, and only those (nothing of $PY's own is
#                shadowed), into a fresh folder in $SCRATCH (default /tmp) put first on PYTHONPATH; appends the folder to
#                GPU_CLEANUP for the caller to remove at exit;
#   gpu_imports  checks every import the stages need (scripts/gpu_stages.py imports), before any stage.
# Each returns non-zero with a message on stderr when it cannot do its part.
GPU_CLEANUP=()

gpu_python() {
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    return 0
  fi
  local candidate
  for candidate in python3 python .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY=$candidate
      return 0
    fi
  done
  echo "error: no python3 here imports torch (set PYTHON to the one that has PyTorch)" >&2
  return 2
}

gpu_install() {
  local missing site
  if [ ! -s .whl/MANIFEST ]; then
    return 0  # no bundle: the imports check says what is missing, if anything
  fi
  missing=$("$PY" - <<'EOF'
import importlib.metadata as metadata
import re
from pathlib import Path

names = {re.sub(r"[-_.]+", "-", line.split("-")[0]).lower() for line in Path(".whl/MANIFEST").read_text().split()}
for name in sorted(names):
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(name)
EOF
  ) || return 2
  if [ -z "$missing" ]; then
    echo "the bundle's distributions are all installed already"
    return 0
  fi
  site=$(mktemp -d "${SCRATCH:-/tmp}/gpu_site.XXXX")
  GPU_CLEANUP+=("$site")
  # shellcheck disable=SC2086  # one distribution name per word
  if ! PIP_NO_INDEX=1 "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-compile \
      --no-cache-dir --disable-pip-version-check --target "$site" $missing; then
    echo "error: installing from .whl/ failed (is it the bundle for this Python? rerun scripts/gpu_wheels.sh)" >&2
    return 2
  fi
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  echo "installed offline from .whl/ into $site: $(echo $missing | tr '\n' ' ')"
}

gpu_imports() {
  if ! "$PY" scripts/gpu_stages.py imports; then
    echo "error: a module the stages need does not import (above); nothing was run (prepare the bundle with" \
      "'bash scripts/gpu_wheels.sh' where PyPI is reachable and carry .whl/ here)" >&2
    return 2
  fi
}
