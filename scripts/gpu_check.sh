#!/usr/bin/env bash
# The paper's scale on one GPU, nothing downloaded (about 6 minutes on one H100 or H200):
#   1. scripts/gpu_check.py: the clip-vit-b32 tower, forward/backward at batch 128, 224 px;
#   2. scripts/bench_mehl.py on a synthetic zoo of 18 published-layout ViT-B/32 ingredients and a
#      synthetic ImageNet tree of 224 px images: peak memory and step time for K = 1, 6, 18 with
#      float32 directions, and K = 18 with bfloat16 directions (the peak for K rows does not depend on
#      how many ingredients the run has: 72 ingredients at K = 18 hold the same 18 rows);
#   3. MEHL_soup_layer.py, one group of K = 18 for one epoch, under torchrun --nproc_per_node 1 (nccl).
# Prepare here, where PyPI is reachable: `bash scripts/gpu_wheels.sh` puts open_clip's wheels in .whl/,
# which this script installs into /tmp/site when open_clip is missing. Outputs go to $OUT (the device
# tool's folder) or runs/gpu_check.
#   bash scripts/gpu_check.sh
# A smoke test of this script on a CPU (tests do this): ARCH=tiny-clip DEVICE=cpu BATCH=4 KS=1,2 K=2 NZOO=2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
ARCH=${ARCH:-clip-vit-b32}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-128}
NZOO=${NZOO:-18}
KS=${KS:-1,6,18}
K=${K:-18}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "open_clip is not installed and .whl/ holds no wheels: run 'bash scripts/gpu_wheels.sh' first" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
fi
SIZE=$("$PY" -c "import sys; sys.path.insert(0, '.'); from utils.archs import get_arch; from utils.archs.standins import input_size; print(input_size(get_arch('$ARCH')))")

echo "== 1. forward/backward of $ARCH, batch $BATCH, $SIZE px"
timeout 120 "$PY" scripts/gpu_check.py --arch "$ARCH" --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE" \
  --num-classes 10 2>&1 | tee "$OUT/gpu_check.txt"

scratch=$(mktemp -d /tmp/gpu_check.XXXX)
trap 'rm -rf "$scratch"' EXIT
echo "== writing $NZOO synthetic $ARCH ingredients and a synthetic ImageNet tree to $scratch"
"$PY" - "$scratch" "$ARCH" "$NZOO" "$SIZE" <<'PYTHON'
import sys
sys.path.insert(0, ".")
from utils.archs.standins import write_synthetic_imagenet, write_synthetic_zoo
folder, arch, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
write_synthetic_zoo(f"{folder}/zoo", n, arch, 10)
write_synthetic_imagenet(f"{folder}/data", 10, 27, size)   # 13 held-out + 14 fine-tune per class
PYTHON

echo "== 2. bench_mehl.py, batch $BATCH: float32 directions (K = $KS), bfloat16 (K = $K)"
common=(--arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" --data-location "$scratch/data"
        --num-classes 10 --batch-size "$BATCH" --steps 5 --device "$DEVICE")
timeout 240 "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$KS" --out "$OUT/bench_mehl_float32.json" 2>&1 |
  grep -v Warning | tee "$OUT/bench_mehl_float32.txt"
timeout 150 "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$K" --directions-dtype bfloat16 \
  --out "$OUT/bench_mehl_bfloat16.json" 2>&1 | grep -v Warning | tee "$OUT/bench_mehl_bfloat16.txt"

echo "== 3. MEHL-Soup+, one group of $K, one epoch, torchrun --nproc_per_node 1 (nccl on CUDA)"
timeout 180 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29517 \
  MEHL_soup_layer.py --arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" \
  --data-location "$scratch/data" --heldout-per-class 13 --model_batch "$K" --epochs 1 --batch-size "$BATCH" \
  --cosine-lr --no-epoch-test --no-shifts --test-size 10 --device "$DEVICE" \
  --results-db "$OUT/results.jsonl" --save-soup none 2>&1 | grep -v "it/s\]\|Warning" | tee "$OUT/mehl_torchrun.txt"
"$PY" -c "import json; r = [json.loads(l) for l in open('$OUT/results.jsonl')][-1]; print('MEHL under torchrun:', r['method'], 'world', r['world_size'], 'peak GiB', round(r['peak_memory_bytes'] / 2**30, 2), 'seconds', r['seconds'])"
echo "== done: outputs in $OUT"
