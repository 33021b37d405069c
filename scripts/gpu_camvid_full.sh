#!/usr/bin/env bash
# The full-resolution CamVid grid (docs/benchmarks.md, section 4) on one GPU machine, every run
# at once: one process per run, one CPU thread each, all sharing the GPU. The protocol is
# scripts/camvid_benchmark.py's (--protocol full), unchanged; only the device differs, and GPU
# runs of a seed are not bit-identical to CPU runs of it (nor to each other).
#
#   bash scripts/gpu_camvid_full.sh DATA_ROOT WEIGHTS OUT [DEADLINE_S]
#
# Two result folders under OUT: grid/ (seeds 0-2, the report) and tuning/ (seed 100, where the
# combinations are compared). Runs left unfinished at DEADLINE_S seconds are stopped; every
# 20 s and at the end OUT/results.tgz is rewritten with the result files and run logs so far.
# The commit is read from BENCH_COMMIT where the checkout has no git history.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=$1 WEIGHTS=$2 OUT=$3 DEADLINE=${4:-480}
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/camvid-full-runs}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT/grid" "$OUT/tuning" "$RUNS"
[[ -d $DATA/train && -d $DATA/val && -f $WEIGHTS ]] || { echo "missing data under $DATA or weights $WEIGHTS"; exit 2; }
echo "train images: $(ls "$DATA/train" | wc -l), val images: $(ls "$DATA/val" | wc -l)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

pack() {
    tar -czf "$OUT/results.tgz.part" -C "$OUT" grid tuning -C "$RUNS" --exclude='*.pt' --exclude='*.sqlite' . \
        2>/dev/null && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}
(while sleep 20; do pack; done) &
PACKER=$!

bench() {
    timeout --signal=INT --kill-after=20 "$DEADLINE" "$PYTHON" scripts/camvid_benchmark.py --protocol full \
        --data-root "$DATA" --weights "$WEIGHTS" --runs "$RUNS" "$@"
}
started=$(date +%s)
# seed-major, so the runs that finish first are whole seeds of every method
bench --methods plain topk dictcrop quota combo-a combo-b combo-c combo-d --seeds 0 1 2 --jobs 12 \
    --results "$OUT/grid" >"$OUT/grid.log" 2>&1 &
GRID=$!
bench --methods topk combo-a combo-b combo-c combo-d --seeds 100 --jobs 4 --results "$OUT/tuning" \
    >"$OUT/tuning.log" 2>&1 &
TUNING=$!
while kill -0 $GRID 2>/dev/null || kill -0 $TUNING 2>/dev/null; do
    sleep 30
    echo "$(( $(date +%s) - started ))s: $(ls "$OUT/grid" | wc -l) grid and $(ls "$OUT/tuning" | wc -l) tuning runs done"
done
kill $PACKER 2>/dev/null
pack
echo "finished in $(( $(date +%s) - started ))s"
tail -n 3 "$OUT/grid.log" "$OUT/tuning.log"
"$PYTHON" scripts/camvid_benchmark.py --protocol full --summary --results "$OUT/grid"
echo "tuning seed 100:"
"$PYTHON" scripts/camvid_benchmark.py --protocol full --summary --results "$OUT/tuning"
