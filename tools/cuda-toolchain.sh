# shellcheck shell=bash
# The CUDA 13.0 toolchain from PyPI, for `--features cuda,nccl` builds on a machine with no
# CUDA installed (CI, a laptop). Source it:
#
#   . tools/cuda-toolchain.sh          # compiler + headers: enough for cargo check / clippy
#   . tools/cuda-toolchain.sh --link   # + link libraries: cargo build
#
# Installs once into $PROTLOC_CUDA_HOME (default ~/.cache/protloc/cuda-13.0, a virtual
# environment), then sets CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH (nvcc) and CUDA_COMPUTE_CAP
# (default 90: H100/H200; candle's kernels are compiled for it). CUDA 13.0 matches the
# driver 580 GPUs this project is tested on: PTX from a newer nvcc does not load on an older
# driver.
#
# --link also makes the unversioned names the linker wants (libcublas.so -> .so.13, ...) and,
# when no NVIDIA driver is installed, a stub libcuda.so generated from cudarc's bindings: the
# binary records libcuda.so.1, which the driver provides where it runs.

PROTLOC_CUDA_HOME=${PROTLOC_CUDA_HOME:-$HOME/.cache/protloc/cuda-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# candle's kernels build (cudaforge) runs nvcc on half the cores unless told otherwise.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}

protloc_cuda_setup() {
  local home=$PROTLOC_CUDA_HOME
  if [ ! -x "$home/bin/python" ] || ! ls "$home"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    echo "cuda-toolchain: installing the CUDA 13.0 compiler from PyPI into $home" >&2
    python3 -m venv "$home" || return 1
    "$home/bin/pip" install -q \
      "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
      "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" || return 1
  fi
  if [ "${1:-}" = "--link" ] && ! ls "$home"/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 >/dev/null 2>&1; then
    echo "cuda-toolchain: installing the CUDA 13.0 link libraries from PyPI into $home" >&2
    "$home/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
      "nvidia-curand==10.4.0.*" "nvidia-nccl-cu13==2.32.*" || return 1
  fi
  local site
  site=$(ls -d "$home"/lib/python3*/site-packages/nvidia | head -n 1)
  local cu=$site/cu13
  export CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
  export PATH=$cu/bin:$PATH
  if [ "${1:-}" = "--link" ]; then
    local lib
    for lib in cublas cublasLt curand nvrtc cudart; do
      ln -sf "$(basename "$(ls "$cu/lib/lib$lib.so."[0-9]* | head -n 1)")" "$cu/lib/lib$lib.so"
    done
    ln -sf "$site/nccl/lib/libnccl.so.2" "$cu/lib/libnccl.so"
    if [ ! -e "$cu/lib/libcuda.so" ] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so '; then
      protloc_cuda_stub "$cu/lib" || return 1
    fi
    export LD_LIBRARY_PATH=$cu/lib:$site/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
}

# A libcuda.so (soname libcuda.so.1) defining every driver function cudarc may call, each
# an empty stub: only for linking; the real driver library replaces it at run time.
protloc_cuda_stub() {
  local dir=$1 bindings
  cargo fetch -q >/dev/null 2>&1
  bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
  if [ -z "$bindings" ]; then
    echo "cuda-toolchain: cudarc's sources are not in the cargo registry (run cargo fetch)" >&2
    return 1
  fi
  grep -oP '^\s+fn \Kcu\w+(?=\()' "$bindings" | sort -u |
    sed 's/.*/void &(void) {}/' >"$dir/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/libcuda_stub.c"
}

protloc_cuda_setup "$@"
