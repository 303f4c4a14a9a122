#!/usr/bin/env bash
# The paper's ImageNet runs on several GPUs of ONE node with torchrun (nccl). MEHL-Soup+ splits each
# group of K=18 ingredients over the GPUs (memory per GPU ~ 18 / NGPU ingredients + one model) and each
# data batch over the GPUs; the result equals the one-GPU run for the same seed (up to float rounding).
#
#   NGPU=4 DATA=/data MODELS=/data/model_soups bash scripts/paper_imagenet_multigpu.sh [uniform|greedy|learned|mehl|all]
#
# Expected: as scripts/paper_imagenet.sh (MEHL-Soup+ 81.62), in less time.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
PY=${PYTHON:-.venv/bin/python}
LAUNCH="$PY -m torch.distributed.run --standalone --nproc_per_node $NGPU" exec bash scripts/paper_imagenet.sh "$@"
