#!/usr/bin/env bash
# The paper's ImageNet runs on ONE GPU (24 GB is enough for all but Learned-Soup+): 72 CLIP ViT-B/32
# ingredients (the published model-soups checkpoints model_0.pt .. model_71.pt), held-out split of 26
# images per class from ImageNet train, evaluated on ImageNet val and the five shifts.
#
#   DATA=/data MODELS=/data/model_soups bash scripts/paper_imagenet.sh [individual|uniform|greedy|learned|mehl|report|all]
#
# Expected (the paper, ImageNet top-1): uniform 79.97, greedy 81.03 (about 1 h), Learned-Soup+ 81.39
# (needs ~253 GB: all 72 ingredients resident; the script refuses with its estimate on a smaller device),
# MEHL-Soup+ 81.62 (K=18: about 15 min and 19 GB on an A100-class GPU). Folder layouts: docs/DATA.md.
# `individual` evaluates every ingredient alone (what greedy soup does first; later steps reuse the
# lines); `all` runs every step in order and then the report; a single step also writes the report
# unless REPORT=0.
# Environment: DATA (root holding imagenet/, the shift folders), MODELS (the checkpoints), OUT
# (runs/imagenet), WORKERS (8), HELDOUT_INDEX (optional: the published 0/1 index file for the exact split),
# PYTHON (.venv/bin/python), LAUNCH (prefix such as "torchrun --nproc_per_node 4"; see the other launchers).
# The paper's values, to change only for other zoos or stand-ins (scripts/paper_scale.py): ARCH
# (clip-vit-b32), N (72 ingredients), BATCH (256: evaluations, uniform and greedy soup), LEARNED_BATCH
# (256), MEHL_BATCH (128), K (18, MEHL's --model_batch; "auto" picks the largest that fits), MEMORY_LIMIT
# (GiB that Learned-Soup+ and MEHL's plan may count on; default: what the device has).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to the folder holding imagenet/ and the shift sets}"
: "${MODELS:?set MODELS to the folder holding model_0.pt .. model_71.pt}"
OUT=${OUT:-runs/imagenet}
WORKERS=${WORKERS:-8}
PY=${PYTHON:-.venv/bin/python}
ARCH=${ARCH:-clip-vit-b32}
N=${N:-72}
BATCH=${BATCH:-256}
LEARNED_BATCH=${LEARNED_BATCH:-256}
MEHL_BATCH=${MEHL_BATCH:-128}
K=${K:-18}
read -r -a LAUNCH <<< "${LAUNCH:-$PY}"
what=${1:-all}
case "$what" in
  individual|uniform|greedy|learned|mehl|report|all) ;;
  *) echo "error: unknown step '$what': give individual, uniform, greedy, learned, mehl, report or all" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
common=(--model-location "$MODELS" --params_start 0 --params_end "$N" --arch "$ARCH" --datasets ImageNet
        --data-location "$DATA" --workers "$WORKERS" --results-db "$OUT/results.jsonl")
[ -n "${HELDOUT_INDEX:-}" ] && common+=(--heldout-index "$HELDOUT_INDEX")
limit=()
[ -n "${MEMORY_LIMIT:-}" ] && limit=(--memory-limit "$MEMORY_LIMIT")

if [ "$what" = individual ] || [ "$what" = all ]; then
  "${LAUNCH[@]}" scripts/individual.py "${common[@]}" --batch-size "$BATCH"
fi
if [ "$what" = uniform ] || [ "$what" = all ]; then
  "${LAUNCH[@]}" uniform_soup.py "${common[@]}" --batch-size "$BATCH" --save-soup "$OUT/uniform.pt"
fi
if [ "$what" = greedy ] || [ "$what" = all ]; then
  "${LAUNCH[@]}" greedy_soup.py "${common[@]}" --batch-size "$BATCH" --save-soup "$OUT/greedy.pt"
fi
if [ "$what" = learned ] || [ "$what" = all ]; then
  # Learned-Soup+ by layer, as published (81.38): AdamW lr 0.05, wd 0, 5 epochs, batch 256, constant lr.
  "${LAUNCH[@]}" learned_soup.py "${common[@]}" --layerwise --lr 0.05 --wd 0 --epochs 5 --batch-size "$LEARNED_BATCH" \
    "${limit[@]}" --save-soup "$OUT/learned_plus.pt" ||
    echo "Learned-Soup+ did not run (see its message): it needs all $N ingredients in memory"
fi
if [ "$what" = mehl ] || [ "$what" = all ]; then
  # The released launcher's settings: lr 0.01, wd 0, AdamW, cosine, batch 128, 5 epochs, K=18,
  # 1 models-epoch, seed 1, layer-size 0 (MEHL-Soup+). Resumable: rerun with --resume after a kill.
  "${LAUNCH[@]}" MEHL_soup_layer.py "${common[@]}" --lr 0.01 --wd 0 --optimizer adamw --cosine-lr \
    --batch-size "$MEHL_BATCH" --epochs 5 --model_batch "$K" --models_epochs 1 --randomseed 1 --layer-size 0 \
    "${limit[@]}" --save-soup "$OUT/mehl_plus.pt" ${RESUME:+--resume}
fi
if [ "$what" = report ] || [ "$what" = all ] || [ "${REPORT:-1}" != 0 ]; then
  "$PY" report.py --results-db "$OUT/results.jsonl" --out "$OUT/report"
fi
