#!/usr/bin/env bash
# Sets up a fresh machine for the project: a virtual environment in .venv with requirements.txt, and
# Fashion-MNIST (the embedded default data set). Safe to run again: it only does what is missing.
#   bash scripts/setup.sh
# Environment: PYTHON (default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== creating $VENV and installing requirements.txt (torch is large: this takes a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  # the stamp says the environment imports: checked once here, not on every later run
  "$VENV/bin/python" -c 'import torch, torchvision, open_clip, efficientnet_lite_pytorch' || {
    echo "the packages of requirements.txt installed but do not import (above); see the README's Setup" >&2
    exit 1; }
  echo "$want" > "$stamp"
fi

# Fashion-MNIST: the Debian package where apt works, torchvision's download where online, else a message.
fmnist=/usr/share/datasets/fashion-mnist
if [ -n "${FASHION_MNIST_DIR:-}" ]; then
  fmnist=$FASHION_MNIST_DIR
elif [ ! -f "$fmnist/t10k-labels-idx1-ubyte.gz" ] && [ ! -f data/FashionMNIST/raw/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || true
  fi
  if [ ! -f "$fmnist/t10k-labels-idx1-ubyte.gz" ]; then
    echo "== trying torchvision's download of Fashion-MNIST into data/"
    "$VENV/bin/python" -c "from torchvision.datasets import FashionMNIST as F; F('data', download=True); F('data', train=False, download=True)" >/dev/null 2>&1 || {
      echo "Fashion-MNIST is not available: install the Debian package dataset-fashion-mnist, or put" >&2
      echo "train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz" >&2
      echo "in $fmnist (or any folder, then pass --data-location FOLDER)." >&2
      exit 1; }
  fi
fi
echo "== setup done: $("$VENV/bin/python" -c 'from importlib.metadata import version as v
print("torch", v("torch"), "torchvision", v("torchvision"))')"
