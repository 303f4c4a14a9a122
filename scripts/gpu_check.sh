#!/usr/bin/env bash
# The paper's scale on one GPU, nothing downloaded, unattended in one call: every stage has a timeout
# taken from one budget (BUDGET seconds, default 450, under the device tool's 8 minutes), a stage that
# fails or runs out of time is reported and the next one runs, and the script ends with the list of
# failed stages (status 1 if any).
#   1. scripts/gpu_check.py: the clip-vit-b32 tower, forward/backward at batch 128, 224 px;
#   2. scripts/gpu_check.py --mehl: the step's block products on the tower's 154 tensors, K = 18: the
#      fixed-launch fast path against the per-block loop (float32, bfloat16, float16 rows), their times,
#      the CUDA kernels of one step with 14 and with 154 blocks, no host sync in a step;
#   3. scripts/bench_mehl.py --baseline released on a synthetic zoo of 18 published-layout ViT-B/32
#      ingredients and a synthetic ImageNet tree of 224 px images: peak memory and step time of this
#      project's step and of the released algorithm's, side by side, for K = 1 and 18 with float32
#      directions, and a torch.profiler table of one step of each (top 15 CUDA ops, $OUT/profiles);
#      then this project's step with bfloat16 directions at K = 18 (the peak for K rows does not depend
#      on how many ingredients the run has: 72 ingredients at K = 18 hold the same 18 rows);
#   4. MEHL_soup_layer.py, one group of K = 18 for one epoch, under torchrun --nproc_per_node 1 (nccl),
#      its state file in the scratch folder (removed at the end), so the script can run again.
# Prepare here, where PyPI is reachable: `bash scripts/gpu_wheels.sh` puts open_clip's wheels in .whl/,
# which this script installs into /tmp/site when open_clip is missing. Outputs go to $OUT (the device
# tool's folder) or runs/gpu_check.
#   bash scripts/gpu_check.sh
# A smoke test of this script on a CPU (tests/test_gpu_check.py does this):
#   ARCH=tiny-clip DEVICE=cpu BATCH=4 KS=2 K=2 NZOO=2 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
ARCH=${ARCH:-clip-vit-b32}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-128}
NZOO=${NZOO:-18}
KS=${KS:-1,18}
K=${K:-18}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
failed=()

# stage NAME MAX_SECONDS LOG COMMAND...: run COMMAND with a timeout of MAX_SECONDS or what is left of the
# budget, its output shown and kept in $OUT/LOG; a failure or a timeout is noted and the script goes on
stage() {
  local name=$1 max=$2 log=$3 left status
  shift 3
  left=$(( BUDGET - SECONDS - 5 ))
  if (( left < max )); then max=$left; fi
  if (( max < 20 )); then
    echo "== $name: skipped, the time budget ($BUDGET s) is spent"
    failed+=("$name (skipped)")
    return
  fi
  echo "== $name (at most $max s)"
  { timeout "$max" "$@" 2>&1; echo $? > "$OUT/.status"; } | tr '\r' '\n' |
    grep --line-buffered -v 'Warning\|it/s\]\|s/it\]\|^ *$' | tee "$OUT/$log"
  status=$(cat "$OUT/.status")
  if [ "$status" != 0 ]; then
    echo "== $name: FAILED (status $status$( [ "$status" = 124 ] && echo ', timed out'))"
    failed+=("$name")
  fi
}

if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "open_clip is not installed and .whl/ holds no wheels: run 'bash scripts/gpu_wheels.sh' first" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
fi
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable (the per-block loop runs)"
SIZE=$("$PY" -c "import sys; sys.path.insert(0, '.'); from utils.archs import get_arch; from utils.archs.standins import input_size; print(input_size(get_arch('$ARCH')))") || exit 1

stage "1. forward/backward of $ARCH, batch $BATCH, $SIZE px" 90 gpu_check.txt \
  "$PY" scripts/gpu_check.py --arch "$ARCH" --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE" --num-classes 10
stage "2. MEHL block products, K = $K" 150 mehl_check.txt \
  "$PY" scripts/gpu_check.py --mehl --rows "$K" --arch "$ARCH" --device "$DEVICE" --batch-size "$BATCH" \
  --image-size "$SIZE" --num-classes 10

scratch=$(mktemp -d /tmp/gpu_check.XXXX)
trap 'rm -rf "$scratch"' EXIT
stage "writing $NZOO synthetic $ARCH ingredients and a synthetic ImageNet tree to $scratch" 150 zoo.txt \
  "$PY" -c "
import sys
sys.path.insert(0, '.')
from utils.archs.standins import write_synthetic_imagenet, write_synthetic_zoo
write_synthetic_zoo('$scratch/zoo', $NZOO, '$ARCH', 10)
write_synthetic_imagenet('$scratch/data', 10, 27, $SIZE)  # 13 held-out + 14 fine-tune per class
"

common=(--arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" --data-location "$scratch/data"
        --num-classes 10 --batch-size "$BATCH" --steps 5 --device "$DEVICE" --profile "$OUT/profiles")
stage "3a. bench_mehl.py, batch $BATCH, float32 directions, K = $KS, this project's step and the released one" \
  220 bench_mehl_float32.txt \
  "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$KS" --baseline released --out "$OUT/bench_mehl_float32.json"
stage "3b. bench_mehl.py, batch $BATCH, bfloat16 directions, K = $K" 100 bench_mehl_bfloat16.txt \
  "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$K" --directions-dtype bfloat16 \
  --out "$OUT/bench_mehl_bfloat16.json"

stage "4. MEHL-Soup+, one group of $K, one epoch, torchrun --nproc_per_node 1 (nccl on CUDA)" 150 mehl_torchrun.txt \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  MEHL_soup_layer.py --arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" \
  --data-location "$scratch/data" --heldout-per-class 13 --model_batch "$K" --epochs 1 --batch-size "$BATCH" \
  --cosine-lr --no-epoch-test --no-shifts --test-size 10 --device "$DEVICE" --results-db "$OUT/results.jsonl" \
  --save-soup none --resume "$scratch/mehl.state.pt"
if [ -s "$OUT/results.jsonl" ]; then
  "$PY" -c "import json; r = [json.loads(l) for l in open('$OUT/results.jsonl')][-1]; print('MEHL under torchrun:', r['method'], 'world', r['world_size'], 'peak GiB', round(r['peak_memory_bytes'] / 2**30, 2), 'seconds', r['seconds'])"
fi
rm -f "$OUT/.status"
echo "== summary (also in $OUT)"
for f in mehl_check.txt bench_mehl_float32.txt bench_mehl_bfloat16.txt; do
  [ -s "$OUT/$f" ] && cat "$OUT/$f"
done
[ -s "$OUT/profiles/profile_project_k$K.txt" ] && head -22 "$OUT/profiles/profile_project_k$K.txt"
echo "== done in $SECONDS s: outputs in $OUT"
if (( ${#failed[@]} )); then
  printf '== failed: %s\n' "${failed[@]}"
  exit 1
fi
