#!/usr/bin/env bash
# Builds the model server and its benchmark with the `cuda` feature on a machine without a GPU
# or a CUDA install (the toolkit comes from PyPI: scripts/cuda-toolkit.sh), for Hopper by
# default (CUDA_COMPUTE_CAP=90), and puts the stripped binaries in .gpu/bin to carry to the GPU
# machine. There they need the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime, cuBLAS,
# cuRAND and NVRTC libraries on the library path (scripts/gpu-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolkit.sh
set -euo pipefail
cargo build --release --locked --features cuda -p kvmesh-gpu-server-server \
  --bin kvmesh-gpu-bench --bin kvmesh-gpu-server
mkdir -p .gpu/bin
for b in kvmesh-gpu-bench kvmesh-gpu-server; do
  strip -o ".gpu/bin/$b" "target/release/$b"
done
ls -la .gpu/bin
