#!/usr/bin/env bash
# Build the default ingredient zoo: EfficientNet-Lite0 (ImageNet weights) fine-tuned on Fashion-MNIST.
#
# What it runs: python sweep.py, which fine-tunes ingredient 0 as a linear probe, then the anchor (one
# fine-tune of the probe, <OUT>/anchor/, not an ingredient), then ingredients 1..N-1 from the anchor,
# each on its own share of the images, with seeded hyper-parameter draws, through finetune.py in-process.
# Ingredients already in the folder are skipped, so rerunning resumes an interrupted build.
#
# Hardware: the default (12 ingredients; a pool of 48000 images at 32 px, 8000 of them per ingredient,
# batch 256, 4-8 epochs; every block but the last frozen, its activations computed once; no mixup or
# RandAugment) is sized for a 2-core CPU: 5 min 28 s measured on a fresh clone with no other jobs, longer
# under load (docs/ZOO.md, which has the accuracies and every variant tried).
#
# Threads: OMP_NUM_THREADS defaults to the number of cores. When other jobs share the CPU, set
# OMP_NUM_THREADS=1: with 3 other jobs on this 2-core machine one training step took 6.0 s with 2 threads
# and 1.5 s with 1 (oversubscribed threads wait on each other).
#
# Usage:  scripts/build_zoo.sh [OUT] [extra sweep.py / finetune.py flags]
#   scripts/build_zoo.sh                                    # zoo/fashion_mnist, CPU default
#   scripts/build_zoo.sh zoo/fmnist72 --n 72 --start probe --finetune-size 0 --subset 0 --test-size 0 \
#       --lr-min 1e-5 --lr-max 2e-4 --epochs-min 4 --epochs-max 10 --mixup-frac 0.5 --randaug-frac 0.5 \
#       --frozen-blocks 10 --device cuda                    # the published shape and size, one GPU
#   scripts/build_zoo.sh zoo/mine --n 8 --arch timm:resnet18 --datasets ImageFolder \
#       --data-location ROOT --finetune-size 0 --test-size 0     # your own zoo (README, "Your own zoo")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-zoo/fashion_mnist}
shift || true
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
echo "building zoo in $OUT with $PYTHON ($(nproc) CPU cores; OMP_NUM_THREADS=$OMP_NUM_THREADS)"
time "$PYTHON" sweep.py --n 12 --out "$OUT" "$@"
