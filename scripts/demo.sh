#!/usr/bin/env bash
# The whole study on the embedded default, on a CPU, with no downloads: set up, build the default zoo
# (if absent), evaluate every ingredient, run uniform, greedy, Learned-Soup(+) and MEHL-Soup(+), the
# extra runs the figures need (souping the first n ingredients; removing the top-k), then the report.
#
# Hardware: a 2-core CPU, no GPU. Sets: held-out 5000 (500 per class), test all 10,000, each of the six
# synthetic corruptions all 10,000; every results line names its per-example predictions, and the report
# gives exact McNemar p-values and bootstrap intervals (README, "Results on the embedded default").
# Time, measured on a fresh clone of the final code (OMP_NUM_THREADS=2, the default; an empty cache
# folder, MODEL_SOUPS_CACHE): 7.9 minutes (472 s): setup 63 s, the zoo 140 s, greedy soup 100 s (its
# time includes the frozen prefix's one pass over the 75,000 held-out, test and shift images and the 12
# ingredients' evaluations), the 17 other soup runs and the report 169 s; no other job ran. The 18 soup processes share the frozen
# prefix's outputs through files in ~/.cache/model_soups/prefix (--prefix-cache; checked before use,
# safe to delete). Reruns skip every soup already written (DEMO_FORCE=1 redoes them). The table is
# printed last and written with the figures and the per-block distances to $DEMO_OUT/report/.
#
#   bash scripts/demo.sh
#
# Environment (all optional): DEMO_OUT (runs/demo), DEMO_ZOO (zoo/fashion_mnist), DEMO_N (12),
# DEMO_ARCH (efficientnet-lite0; any --arch: tests.models:tiny_cnn, the tests' model, for a quick run),
# DEMO_DATA (data root; default the dataset's standard place),
# DEMO_TEST_SIZE (all 10,000; a number: that many test images, and images per shift set, for a quick
# run), DEMO_MEHL_EPOCHS (1: MEHL's epochs over the 5000 held-out images, the 40 steps per group that
# the paper's 5 epochs take over 1000; docs/ZOO.md), DEMO_K (4: MEHL's model batch),
# DEMO_SEEDS ("1 2 3": MEHL-Soup+'s seeds), DEMO_FIRST_N ("4 8": the figure's extra runs),
# DEMO_EXCLUDE ("2 4 7": the elimination table's top-k; DEMO_FIRST_N, DEMO_EXCLUDE or DEMO_SEEDS set
# empty skips those runs), DEMO_ZOO_FLAGS (extra flags of the zoo build),
# DEMO_SOUP_FLAGS (extra flags of every soup script), DEMO_SKIP_SETUP=1 (use the current .venv as is).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
ZOO=${DEMO_ZOO:-zoo/fashion_mnist}
N=${DEMO_N:-12}
ARCH=${DEMO_ARCH:-efficientnet-lite0}
TEST_SIZE=${DEMO_TEST_SIZE:-}
MEHL_EPOCHS=${DEMO_MEHL_EPOCHS:-1}
K=${DEMO_K:-4}
FIRST_N=${DEMO_FIRST_N-4 8}
EXCLUDE=${DEMO_EXCLUDE-2 4 7}
SEEDS=${DEMO_SEEDS-1 2 3}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
start=$(date +%s)

[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
data_flag=()
[ -n "${DEMO_DATA:-}" ] && data_flag=(--data-location "$DEMO_DATA")

echo "== 1/4 the zoo: $N ingredients in $ZOO"
# shellcheck disable=SC2086
PYTHON=$PY bash scripts/build_zoo.sh "$ZOO" --n "$N" --arch "$ARCH" "${data_flag[@]}" ${DEMO_ZOO_FLAGS:-}

mkdir -p "$OUT"
DB=$OUT/results.jsonl
test_flag=()
[ -n "$TEST_SIZE" ] && test_flag=(--test-size "$TEST_SIZE")
common=(--model-location "$ZOO" --params_start 0 --params_end "$N" --arch "$ARCH" --datasets FashionMNIST
        "${data_flag[@]}" "${test_flag[@]}" --results-db "$DB")

soup() {  # soup NAME SCRIPT FLAGS... : run one soup unless its file exists (DEMO_FORCE=1 redoes it)
  local name=$1 script=$2
  shift 2
  if [ -f "$OUT/$name.pt" ] && [ "${DEMO_FORCE:-0}" != 1 ]; then
    echo "-- $name: $OUT/$name.pt exists, skipped"
    return
  fi
  local again=()
  [ "${DEMO_FORCE:-0}" = 1 ] && again=(--overwrite)
  echo "-- $name: $script $*"
  # shellcheck disable=SC2086
  "$PY" "$script" "${common[@]}" --save-soup "$OUT/$name.pt" "${again[@]}" "$@" ${DEMO_SOUP_FLAGS:-}
}

echo "== 2/4 the soups (every ingredient is evaluated once, by the greedy soup, and cached in $DB)"
soup greedy greedy_soup.py
soup uniform uniform_soup.py
soup learned learned_soup.py
soup learned_plus learned_soup.py --layerwise
# MEHL's per-epoch test log (never used to choose anything) is left out to keep the demo short;
# --resume continues a run that was interrupted (and starts afresh when there is no state yet).
soup mehl MEHL_soup_layer.py --epochs "$MEHL_EPOCHS" --model_batch "$K" --layer-size 1000000000 --cosine-lr --no-epoch-test --resume
# MEHL-Soup+ over three seeds (the order in which ingredients are grouped, and the data order):
# the report shows their mean and spread.
for seed in $SEEDS; do
  name=mehl_plus; [ "$seed" = 1 ] || name=mehl_plus_seed$seed
  soup "$name" MEHL_soup_layer.py --epochs "$MEHL_EPOCHS" --model_batch "$K" --layer-size 0 --cosine-lr --no-epoch-test --resume \
    --randomseed "$seed"
done

echo "== 3/4 extra runs for the figure (first n ingredients) and the elimination table (top-k removed)"
# These report test accuracy only: --no-shifts skips the shift sets, --no-epoch-test MEHL's per-epoch log.
for n in $FIRST_N; do
  soup "greedy_first$n" greedy_soup.py --params_end "$n" --no-shifts
  soup "mehl_plus_first$n" MEHL_soup_layer.py --params_end "$n" --epochs "$MEHL_EPOCHS" --model_batch "$K" --layer-size 0 --cosine-lr \
    --no-epoch-test --no-shifts --resume
done
for k in $EXCLUDE; do
  soup "greedy_top$k" greedy_soup.py --exclude-top "$k" --no-shifts
  soup "mehl_plus_top$k" MEHL_soup_layer.py --exclude-top "$k" --epochs "$MEHL_EPOCHS" --model_batch "$K" --layer-size 0 --cosine-lr \
    --no-epoch-test --no-shifts --resume
done

echo "== 4/4 the report"
"$PY" report.py --results-db "$DB" --out "$OUT/report"
echo "demo done in $(( $(date +%s) - start )) s; report: $OUT/report/report.md"
