#!/usr/bin/env bash
# The paper's whole ImageNet job as a stand-in on one GPU (H100 / H200), unattended, in one call of at
# most 8 minutes, nothing downloaded (scripts/paper_scale.py --preset gpu):
#   - 72 stand-in CLIP ViT-B/32 ingredients in the published layout (433 MB each, about 31 GB; drawn on
#     the GPU, each with its own perturbation) and an ImageNet-shaped tree of real JPEG files (500 x 375,
#     quality 90) holding 1 % of the paper's images: 10 classes x 26 held-out = 260 of 26 000, val 500
#     of 50 000, 1 % of each shift (V2 100, Sketch 509, R 300, ObjectNet 186, A 75);
#   - the steps of scripts/paper_imagenet.sh, each timed with its peak resident and GPU memory, MEHL-Soup+
#     first, then the individual evaluations, greedy, uniform, Learned-Soup+ (refused with its estimate
#     under MEMORY_LIMIT=24, the launcher's 24 GB card) and the report; a step still running at the
#     deadline is stopped and the later ones skipped;
#   - each step's measured time and its time extrapolated to the paper's image counts: the time outside
#     data passes is fixed; each data pass is its start plus, per full batch at the paper's count, the
#     measured mean wait for a batch and the mean time of the loop's body (scripts/paper_scale.py says how).
# Outputs in $OUT (5 files): paper_scale.json, paper_scale.txt (this script's output: the table),
# steps.log (the steps' own logs, progress bars left out), results.jsonl, report.md.
# Prepare here, where PyPI is reachable: `bash scripts/gpu_wheels.sh` puts the wheels in .whl/ (carry it
# to the GPU machine); the distributions the Python with torch lacks are installed from there offline
# (scripts/gpu_env.sh), and every import the steps need is checked before anything is written. The free
# disk in SCRATCH is checked against the stand-ins' size (+ 1 GiB) before they are written; all of it is
# removed at the end. `bash scripts/gpu_check.sh --all` runs this as its stage 6.
#   bash scripts/gpu_paper_scale.sh
# A smoke test on a CPU (the tests run the same with a tiny arch):
#   ARCH=tiny-clip N=3 CLASSES=2 HELDOUT=3 FRACTION=0.0002 WORKERS=0 bash scripts/gpu_paper_scale.sh
# Environment: OUT (runs/gpu_paper_scale), PYTHON (default: the python3 that has torch), SCRATCH (/tmp: the
# stand-ins and images, removed at the end), DEADLINE (400 s for the steps, counted from the start of
# paper_scale.py), STEPS (default all of them; the report is left out when matplotlib does not import),
# and paper_scale.py's sizes: ARCH, N, CLASSES, HELDOUT (per class), FRACTION, WORKERS, K, MEMORY_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_paper_scale}
SCRATCH=${SCRATCH:-/tmp}
DEADLINE=${DEADLINE:-400}
STEPS=${STEPS:-mehl,individual,greedy,uniform,learned,report}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/gpu_env.sh
work=
trap 'rm -rf ${work:+"$work"} ${GPU_CLEANUP[@]+"${GPU_CLEANUP[@]}"}' EXIT
gpu_python
gpu_install
gpu_imports >/dev/null || gpu_imports
if [[ ,$STEPS, == *,report,* ]] && ! "$PY" -c "import matplotlib" 2>/dev/null; then
  STEPS=$(echo ",$STEPS," | sed 's/,report,/,/; s/^,//; s/,$//')
  echo "matplotlib does not import: the report step is left out (STEPS=$STEPS)"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device: CPU')"
nproc
df -h "$SCRATCH" | tail -1
standins=$("$PY" scripts/gpu_stages.py standin-bytes "${ARCH:-clip-vit-b32}" "${N:-72}")
"$PY" scripts/gpu_stages.py disk "$SCRATCH" "$standins" "${N:-72} ${ARCH:-clip-vit-b32} stand-ins and the images"

work=$(mktemp -d "$SCRATCH/paper_scale.XXXX")
sizes=()
for pair in arch:ARCH n:N classes:CLASSES heldout-per-class:HELDOUT fraction:FRACTION workers:WORKERS \
            k:K memory-limit:MEMORY_LIMIT; do
  var=${pair#*:}
  if [ -n "${!var:-}" ]; then
    sizes+=("--${pair%%:*}" "${!var}")
  fi
done
set +e
"$PY" scripts/paper_scale.py --preset gpu --out "$work/job" --deadline "$DEADLINE" --steps "$STEPS" \
  --python "$PY" ${sizes[@]+"${sizes[@]}"} 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/paper_scale.txt"
status=${PIPESTATUS[0]}
set -e
cp "$work/job/paper_scale.json" "$OUT/" 2>/dev/null || echo "no paper_scale.json was written" >&2
cp "$work/job/run/results.jsonl" "$OUT/" 2>/dev/null || true
cp "$work/job/run/report/report.md" "$OUT/" 2>/dev/null || true
for log in "$work"/job/logs/*.log; do
  [ -f "$log" ] || continue
  echo "===== $(basename "$log")"
  tr '\r' '\n' < "$log" | grep -v "it/s\]\|s/it\]\|^\s*$\| 0%|" || true
done > "$OUT/steps.log"
echo "== done (status $status): outputs in $OUT"
exit "$status"
