#!/usr/bin/env bash
# The CUDA 13.0 toolkit from PyPI into .cuda/, for building the gpu-server's `cuda` feature on
# a machine with no CUDA installed (and no GPU): nvcc, the headers, and the runtime, cuBLAS,
# cuRAND and NVRTC libraries candle links. Pinned to the 13.0 series, which a 580 driver runs.
#
# The driver library (libcuda.so.1) comes with the GPU's driver, never from PyPI: the build links
# against a stub generated here from the symbols cudarc binds, and the real one is loaded at run
# time. Source this file to get the build environment:
#     source scripts/cuda-toolkit.sh && cargo build --release --features cuda -p kvmesh-gpu-server-server
set -euo pipefail
KVMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$KVMESH_ROOT/.cuda"
CU="$CUDA_DIR/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$CUDA_DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
# Unversioned names for the linker, and the driver stub, where cudarc looks ($CUDA_ROOT/lib/stubs).
STUBS="$CU/lib/stubs"
if [ ! -e "$STUBS/libcuda.so" ]; then
  mkdir -p "$STUBS"
  for l in cudart cublas cublasLt curand nvrtc; do
    ln -sf "$(ls "$CU"/lib/lib$l.so.* | grep -v builtins | head -n1)" "$STUBS/lib$l.so"
  done
  cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -n1)"
  if [ -z "$cudarc_src" ]; then
    (cd "$KVMESH_ROOT" && cargo fetch -q)
    cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -n1)"
  fi
  grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" \
    | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$STUBS/cuda_stub.c"
  gcc -shared -fPIC -o "$STUBS/libcuda.so" -Wl,-soname,libcuda.so.1 "$STUBS/cuda_stub.c"
fi
export CUDA_ROOT="$CU" CUDA_HOME="$CU" PATH="$CU/bin:$PATH"
# No GPU to ask on the build machine: Hopper (H100, H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
set +euo pipefail
