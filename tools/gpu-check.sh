#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, its driver, and Python with torch and
# transformers (the CUDA libraries come from torch's pip packages). No Rust toolchain, no
# network: DIR is what tools/gpu-prepare.sh made (a stripped protloc built with
# --features cuda,nccl, ESM-2 8M, AntiBERTy's config, the DeepLoc 1.0 test set).
#
#   tools/gpu-check.sh DIR OUT      # ~5 minutes on an H200; writes OUT/gpu-check.json
#
# 1. Parity, fp32: `protloc check-device` on ESM-2 8M (its weights) and on AntiBERTy's shape
#    (random weights): hidden states, logits, every gradient and 20 AdamW steps on the GPU
#    against the CPU, within 1e-4 relative.
#    bf16 (`--precision bf16`, mlp head: mean pooling keeps gradients comparable) against the
#    fp32 CPU run: hidden states, logits and all gradients within 5e-2 (relative L2), 20 steps
#    of losses tracking.
# 2. Training throughput: a ProtBERT-shaped BERT (30 x 1024, random weights), batch 8 x 512,
#    protloc in fp32 and bf16 against PyTorch transformers (fp32 and bf16 autocast).
# 3. Embedding throughput: ESM-2 8M on the DeepLoc 1.0 test set, protloc against
#    transformers, with the largest difference between their embeddings.
set -uo pipefail
dir=$(cd "${1:?usage: gpu-check.sh DIR OUT}" && pwd)
out=${2:?usage: gpu-check.sh DIR OUT}
mkdir -p "$out"
out=$(cd "$out" && pwd)
P=$dir/protloc
log=$out/gpu-check.log
: >"$log"
if [ ! -x "$P" ]; then # unpacked with Python's lzma: xz itself may not be installed
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$P.xz" "$P" &&
    chmod +x "$P" || exit 1
fi

# CUDA libraries (cuBLAS, cuRAND, NVRTC, NCCL) from the pip packages PyTorch brought.
site=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)
if [ -n "$site" ]; then
  for d in "$site"/*/lib; do LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; done
  export LD_LIBRARY_PATH
fi
if ldd "$P" | grep -q 'libfontconfig.so.1 => not found'; then
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$dir/lib
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$P" --version
  ldd "$P" | grep -E 'cuda|cublas|curand|nvrtc|nccl'
} >>"$log" 2>&1
if ldd "$P" | grep -q 'not found'; then
  echo "missing libraries:" >&2
  ldd "$P" | grep 'not found' >&2
  exit 1
fi

status=0
run() { # NAME SECONDS COMMAND...: runs it with a time limit, logs it, records the wall time
  local name=$1 limit=$2 t0 t1 rc
  shift 2
  echo "== $name: $*" >>"$log"
  t0=$(date +%s.%N)
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "$name rc=$rc $(awk "BEGIN { print $t1 - $t0 }")s" | tee -a "$log"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(awk "BEGIN { print $t1 - $t0 }")}" >>"$out/steps.jsonl"
  [ "$rc" = 0 ] || status=1
}
rm -f "$out/steps.jsonl"
export RUST_LOG=${RUST_LOG:-info}

run parity-esm2-8m 100 "$P" check-device --model "$dir/esm2-t6-8m" --device cuda \
  --head light-attention --batch-size 4 --residues 256 --steps 20 --output "$out/parity-esm2-8m.json"
run parity-antiberty 100 "$P" check-device --model "scratch:$dir/antiberty" --device cuda \
  --head reference --batch-size 4 --residues 128 --steps 20 --output "$out/parity-antiberty.json"
run parity-esm2-8m-bf16 100 "$P" check-device --model "$dir/esm2-t6-8m" --device cuda \
  --precision bf16 --head mlp --batch-size 4 --residues 256 --steps 20 --output "$out/parity-esm2-8m-bf16.json"
run train-protbert-protloc 120 "$P" check-device --model scratch:protbert --device cuda --skip-cpu \
  --head linear --batch-size 8 --residues 510 --steps 8 --output "$out/train-protbert-protloc.json"
run train-protbert-protloc-bf16 120 "$P" check-device --model scratch:protbert --device cuda --skip-cpu \
  --precision bf16 --head linear --batch-size 8 --residues 510 --steps 8 --output "$out/train-protbert-protloc-bf16.json"
run train-protbert-torch 100 python3 "$dir/gpu_check_torch.py" train --batch 8 --len 512 --steps 8 \
  --out "$out/train-protbert-torch.json"
# Twice: the first run also compiles candle's PTX for this GPU (cached by the driver).
run embed-protloc-first 90 "$P" embed --device cuda --model "$dir/esm2-t6-8m" \
  --input "$dir/deeploc_test.fasta" --max-batch-tokens 16384 --output "$out/embed.jsonl"
run embed-protloc 60 "$P" embed --device cuda --model "$dir/esm2-t6-8m" \
  --input "$dir/deeploc_test.fasta" --max-batch-tokens 16384 --output "$out/embed.jsonl"
run embed-torch 90 python3 "$dir/gpu_check_torch.py" embed --model "$dir/esm2-t6-8m" \
  --fasta "$dir/deeploc_test.fasta" --max-batch-tokens 16384 --protloc "$out/embed.jsonl" \
  --out "$out/embed-torch.json"

# One JSON of everything (the embeddings themselves are not kept).
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
result = {"steps": [json.loads(l) for l in open(os.path.join(out, "steps.jsonl"))]}
for name in ["parity-esm2-8m", "parity-antiberty", "parity-esm2-8m-bf16", "train-protbert-protloc",
             "train-protbert-protloc-bf16", "train-protbert-torch", "embed-torch"]:
    p = os.path.join(out, name + ".json")
    result[name] = json.load(open(p)) if os.path.exists(p) else None
    if os.path.exists(p):
        os.remove(p)
embed = {s["step"]: s for s in result["steps"]}.get("embed-protloc")
if embed and result["embed-torch"]:
    n = result["embed-torch"]["proteins"]
    result["embed-protloc"] = {"proteins": n, "seconds_with_load": embed["seconds"],
                               "proteins_per_s_with_load": n / embed["seconds"]}
# Steps/s of protloc over PyTorch's, each precision against the same one (>= 0.8 wanted).
torch = result["train-protbert-torch"]
ours = {"fp32": result["train-protbert-protloc"], "bf16": result["train-protbert-protloc-bf16"]}
if torch:
    result["protbert_train_ratio_vs_torch"] = {
        p: torch[p]["step_ms"] / ours[p]["device_step_ms"] for p in ours if ours[p]}
json.dump(result, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
PY
rm -f "$out/embed.jsonl" "$out/steps.jsonl"
exit $status
