#!/usr/bin/env bash
# Issue 15's closing table: RMSE vs N_train of the five MLFF families (deepmd, mace, mattersim,
# chgnet, sevenn) on the laptop demo run (workflows/lips_demo.yaml), tiny models sized in
# benchmarks/mlff_compare_demo.yaml. Writes benchmarks/results/mlff_compare_demo.{txt,png,json}.
# Usage: benchmarks/mlff_compare_demo.sh [RUN_DIR]   (runs the demo first if RUN_DIR has no finished run)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VENV=${CSCFLOW_VENV:-.venv}
RUN_DIR=${1:-runs/lips_demo}
OUT=benchmarks/results
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$RUN_DIR/final_state.json" ] || "$VENV/bin/cscflow" explore workflows/lips_demo.yaml --run-dir "$RUN_DIR"
explored=$(date +%s)
# Paper split: iteration 0 is the training pool (top-N by entropy gain), the rest of it and
# every later iteration the fixed test set.
# (the log goes to RUN_DIR/mlff_compare_demo.log; the table is the output from "test set:" on)
"$VENV/bin/cscflow" compare-mlff "$RUN_DIR" --backends deepmd,mace,mattersim,chgnet,sevenn \
  --n-train 25,50,100 --train-iterations-max 0 --training benchmarks/mlff_compare_demo.yaml > "$RUN_DIR/mlff_compare_demo.log"
done_=$(date +%s)
{
  echo "# benchmarks/mlff_compare_demo.sh $RUN_DIR, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) cores (load average $(cut -d' ' -f1-3 /proc/loadavg)), OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "# demo run $((explored - start)) s (0: it existed), compare-mlff $((done_ - explored)) s wall (stored trainings are reused: time a fresh RUN_DIR)"
  echo "# labels: SevenNet 7net-0 (the demo's stand-in for DFT); training settings: benchmarks/mlff_compare_demo.yaml"
  sed -n '/^test set:/,$p' "$RUN_DIR/mlff_compare_demo.log"
} > "$OUT/mlff_compare_demo.txt"
cp "$RUN_DIR/mlff_compare/fig3a_mlff_compare.png" "$OUT/mlff_compare_demo.png"
cp "$RUN_DIR/mlff_compare/metrics.json" "$OUT/mlff_compare_demo.json"
cat "$OUT/mlff_compare_demo.txt"
