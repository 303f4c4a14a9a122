#!/usr/bin/env bash
# The paper's scale on one GPU, nothing downloaded, unattended in one call. The one command, after
# `bash scripts/gpu_wheels.sh` where PyPI is reachable (carry .whl/ to the GPU machine):
#   bash scripts/gpu_check.sh --all
# Before any stage: the Python that has torch ($PYTHON, else the first python3 / python / .venv/bin/python
# that imports it), the bundle's missing distributions installed from .whl/ offline into /tmp
# (scripts/gpu_env.sh), and every import the stages need checked (scripts/gpu_stages.py imports); a
# failure there ends the script (status 2) before anything runs.
# Stages (each has a fixed budget in seconds, printed at the start, that add up to at most 9 minutes
# with --all; a stage that fails or runs out of its budget is reported and the next one runs):
#   1a/1b. scripts/gpu_check.py: the $ARCH tower, forward/backward at batch $BATCH, exact fp32, then TF32;
#   2. scripts/gpu_check.py --mehl: the step's block products on the tower's tensors, K = $K (fast path
#      against the per-block loop, kernels per step, no host sync in a step);
#   3. $NZOO synthetic $ARCH ingredients and a synthetic ImageNet tree (free disk checked first), then
#      3a. scripts/bench_mehl.py --baseline released: this project's step and the released one side by
#          side, K = $KS, float32 directions, profiler tables in $OUT/profiles;
#      3b. the same, this project's step, bfloat16 directions, K = $K;
#      3c. the same as 3a at K = $K with TF32 matmuls (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1): the step
#          both ways;
#   4. a real process group under torchrun --nproc_per_node 1 (nccl on CUDA, gloo on a CPU): init,
#      all_reduce, teardown (scripts/gpu_stages.py group);
#   5. MEHL_soup_layer.py under torchrun, one group of K = $K for one epoch on the zoo of 3; the zoo and
#      the state are removed afterwards;
#   5b. scripts/gpu_check.py --real-run on that zoo: MEHL in this process with --model_batch auto (the
#      limit set so that auto picks half the zoo), then a group at that K through the run's own
#      DataLoader under set_sync_debug_mode("error") (no host sync in a step or in reading its batch;
#      batches pinned), the plan's predicted peak against the measured one (within 5 %), and which
#      path the block products took;
# and with --all also:
#   6. scripts/gpu_paper_scale.sh (outputs in $OUT/paper_scale): the paper's ImageNet job as a stand-in (72 ViT-B/32 ingredients, 1 %
#      of the images), MEHL-Soup+, the individual evaluations and greedy soup, each timed and
#      extrapolated to the paper's image counts, stopped at the stage's budget (free disk checked first);
#   7. ViT-L/14 (scripts/gpu_stages.py vit-l14): clip-vit-l14 in the published layout, 2 stand-ins
#      written, checked and loaded, and the planner's K for a 24 GB card with float32 and bfloat16
#      directions from the plain step measured at batch $BATCH and 32.
# It ends with one summary table (every stage's budget, time and status, and the headline numbers) and
# $OUT/gpu_check.json; status 1 if a stage failed. Outputs go to $OUT (default runs/gpu_check); what
# the stages write in $SCRATCH (default /tmp) is removed at the end.
# A smoke test on a CPU (tests/test_gpu_check.py runs it; the names are as before --all existed):
#   ARCH=tiny-clip DEVICE=cpu BATCH=4 KS=2 K=2 NZOO=2 bash scripts/gpu_check.sh --all
# On a CPU (DEVICE=cpu) the budgets are multiplied by BUDGET_SCALE (default 8 there, 1 on CUDA), the
# stand-in job runs with a few tiny ones, and ViT-L/14 is measured at batch 1 with one stand-in.
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=0
for arg in "$@"; do
  case $arg in
    --all) ALL=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$arg' (the only one is --all)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/gpu_check}
ARCH=${ARCH:-clip-vit-b32}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-128}
NZOO=${NZOO:-18}
KS=${KS:-1,18}
K=${K:-18}
SCRATCH=${SCRATCH:-/tmp}
if [ "$DEVICE" = cpu ]; then BUDGET_SCALE=${BUDGET_SCALE:-8}; else BUDGET_SCALE=${BUDGET_SCALE:-1}; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/stages.tsv" "$OUT/gpu_check.json"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
source scripts/gpu_env.sh
scratch=
trap 'rm -rf ${scratch:+"$scratch"} ${GPU_CLEANUP[@]+"${GPU_CLEANUP[@]}"}' EXIT

# The budgets (seconds on an H100 / H200, times BUDGET_SCALE): with --all they add up to 540, 9 minutes,
# the preparation included.
declare -A BUDGET=([prepare]=15 [1a]=15 [1b]=15 [2]=55 [3]=30 [3a]=95 [3b]=30 [3c]=30 [4]=15 [5]=30
                   [5b]=40 [6]=135 [7]=35)
STAGES=(prepare 1a 1b 2 3 3a 3b 3c 4 5 5b)
(( ALL )) && STAGES+=(6 7)
total=0
line="stage budgets (s):"
for s in "${STAGES[@]}"; do
  BUDGET[$s]=$(( BUDGET[$s] * BUDGET_SCALE ))
  total=$(( total + BUDGET[$s] ))
  line+=" $s ${BUDGET[$s]},"
done
echo "${line%,}; total $total s ($(( total / 60 )) min $(( total % 60 )) s)"
failed=()

# record NAME BUDGET SECONDS STATUS: one row of the summary
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/stages.tsv"
}

# stage ID NAME LOG COMMAND...: run COMMAND with a timeout of the stage's budget, its output shown and
# kept in $OUT/LOG; a failure or a timeout is noted and the script goes on
stage() {
  local id=$1 name=$2 log=$3 max=${BUDGET[$1]} status start=$SECONDS verdict
  shift 3
  echo "== $id. $name (at most $max s)"
  { timeout --kill-after 10 "$max" "$@" 2>&1; echo $? > "$OUT/.status"; } | stdbuf -oL tr '\r' '\n' |
    grep --line-buffered -v 'Warning\|it/s\]\|s/it\]\|^ *$' | tee "$OUT/$log"
  status=$(cat "$OUT/.status")
  case $status in
    0) verdict=ok ;;
    124|137) verdict="timed out" ;;
    *) verdict="FAILED (status $status)" ;;
  esac
  record "$id. $name" "$max" "$(( SECONDS - start ))" "$verdict"
  if [ "$status" != 0 ]; then
    echo "== $id: $verdict"
    failed+=("$id. $name")
  fi
}

# ---------------------------------------------------------------------------------------- preparation
echo "== prepare: the Python with torch, the bundle, the imports (at most ${BUDGET[prepare]} s)"
gpu_python || exit 2
gpu_install || exit 2
gpu_imports || exit 2
if [[ $DEVICE == cuda* ]]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
fi
SIZE=$("$PY" -c "import sys; sys.path.insert(0, '.'); from utils.archs import get_arch; from scripts.standins import input_size; print(input_size(get_arch('$ARCH')))") || exit 2
record "prepare: python, bundle, imports" "${BUDGET[prepare]}" "$SECONDS" ok

# ------------------------------------------------------------------------------------------ the stages
check=(--arch "$ARCH" --device "$DEVICE" --batch-size "$BATCH" --image-size "$SIZE" --num-classes 10)
stage 1a "forward/backward of $ARCH, batch $BATCH, $SIZE px, exact fp32" gpu_check.txt \
  "$PY" scripts/gpu_check.py "${check[@]}"
stage 1b "forward/backward of $ARCH, batch $BATCH, $SIZE px, TF32" gpu_check_tf32.txt \
  "$PY" scripts/gpu_check.py "${check[@]}" --tf32
stage 2 "MEHL block products, K = $K" mehl_check.txt "$PY" scripts/gpu_check.py --mehl --rows "$K" "${check[@]}"

scratch=$(mktemp -d "$SCRATCH/gpu_check.XXXX")
zoo_bytes=$("$PY" scripts/gpu_stages.py standin-bytes "$ARCH" "$NZOO") || zoo_bytes=0
echo "(the zoo and the images of stages 3 to 5 go to $scratch)"
stage 3 "$NZOO synthetic $ARCH ingredients and a synthetic ImageNet tree" zoo.txt \
  bash -c "'$PY' scripts/gpu_stages.py disk '$scratch' $zoo_bytes '$NZOO $ARCH stand-ins' && '$PY' -c \"
import sys
sys.path.insert(0, '.')
from scripts.standins import write_synthetic_imagenet, write_synthetic_zoo
write_synthetic_zoo('$scratch/zoo', $NZOO, '$ARCH', 10, device='cuda' if '$DEVICE'.startswith('cuda') else 'cpu')
write_synthetic_imagenet('$scratch/data', 10, 27, $SIZE)  # 13 held-out + 14 fine-tune per class
\""

common=(--arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" --data-location "$scratch/data"
        --num-classes 10 --batch-size "$BATCH" --steps 5 --device "${DEVICE%%:*}" --profile "$OUT/profiles")
stage 3a "bench_mehl.py, float32 directions, K = $KS, this project's step and the released one" \
  bench_mehl_float32.txt \
  "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$KS" --baseline released --out "$OUT/bench_mehl_float32.json"
stage 3b "bench_mehl.py, bfloat16 directions, K = $K" bench_mehl_bfloat16.txt \
  "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$K" --directions-dtype bfloat16 \
  --out "$OUT/bench_mehl_bfloat16.json"
stage 3c "bench_mehl.py, float32 directions, K = $K, TF32 matmuls, both steps" bench_mehl_tf32.txt \
  env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$PY" scripts/bench_mehl.py "${common[@]}" --ks "$K" \
  --baseline released --profile "$OUT/profiles_tf32" --out "$OUT/bench_mehl_tf32.json"

stage 4 "a process group under torchrun --nproc_per_node 1: init, all_reduce, teardown" group.txt \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/gpu_stages.py group --device "$DEVICE"
stage 5 "MEHL-Soup+ under torchrun --nproc_per_node 1, one group of $K, one epoch" mehl_torchrun.txt \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  MEHL_soup_layer.py --arch "$ARCH" --datasets ImageNet --model-location "$scratch/zoo" \
  --data-location "$scratch/data" --heldout-per-class 13 --model_batch "$K" --epochs 1 --batch-size "$BATCH" \
  --cosine-lr --no-epoch-test --no-shifts --test-size 10 --device "$DEVICE" --results-db "$OUT/results.jsonl" \
  --save-soup none --resume "$scratch/mehl.state.pt"
if [ -s "$OUT/results.jsonl" ]; then
  "$PY" -c "import json; r = [json.loads(l) for l in open('$OUT/results.jsonl')][-1]; print('MEHL under torchrun:', r['method'], 'world', r['world_size'], 'peak GiB', round(r['peak_memory_bytes'] / 2**30, 2), 'seconds', r['seconds'])"
fi
stage 5b "a real MEHL run: --model_batch auto, then a group at that K through the run's DataLoader, no host sync" \
  real_run.txt "$PY" scripts/gpu_check.py --real-run --arch "$ARCH" --device "$DEVICE" --batch-size "$BATCH" \
  --zoo "$scratch/zoo" --data "$scratch/data"
rm -rf "$scratch"  # before the stand-in job writes its own

if (( ALL )); then
  if [ "$ARCH" = clip-vit-b32 ]; then
    sizes=(STEPS=mehl,individual,greedy)
  else  # the CPU smoke test: a few tiny stand-ins and images
    sizes=(STEPS=mehl,individual,greedy ARCH="$ARCH" N=$(( NZOO + 1 )) CLASSES=2 HELDOUT=3 FRACTION=0.0002 WORKERS=0)
  fi
  stage 6 "the paper's ImageNet job as a stand-in (scripts/gpu_paper_scale.sh)" paper_scale_run.txt \
    env "${sizes[@]}" OUT="$OUT/paper_scale" SCRATCH="$SCRATCH" PYTHON="$PY" DEADLINE=$(( BUDGET[6] - 20 )) \
    bash scripts/gpu_paper_scale.sh
  if [[ $DEVICE == cuda* ]]; then l14=(--batch "$BATCH,32" --n 2); else l14=(--batch 1 --n 1); fi
  stage 7 "ViT-L/14: published layout, stand-ins, the plan for a 24 GB card" vit_l14.txt \
    "$PY" scripts/gpu_stages.py vit-l14 --device "$DEVICE" "${l14[@]}" --scratch "$SCRATCH" --out "$OUT"
fi
rm -f "$OUT/.status"

echo "== summary (also in $OUT)"
for f in mehl_check.txt bench_mehl_float32.txt bench_mehl_bfloat16.txt bench_mehl_tf32.txt; do
  [ -s "$OUT/$f" ] && cat "$OUT/$f"
done
[ -s "$OUT/profiles/profile_project_k$K.txt" ] && head -22 "$OUT/profiles/profile_project_k$K.txt"
"$PY" scripts/gpu_stages.py summary "$OUT"
echo "== done in $SECONDS s: outputs in $OUT"
if (( ${#failed[@]} )); then
  printf '== failed: %s\n' "${failed[@]}"
  exit 1
fi
