#!/usr/bin/env bash
# gpu-server against llama.cpp on the same GGUF, same machine, same run, 2 threads.
# Needs llama-cpp-python 0.3.36 in a venv of its own (it builds from source; not part of
# setup.sh): LLAMACPP_PY=/tmp/llamacpp-venv/bin/python (see
# gpu-server/model/tests/fixtures/llamacpp_reference.py for how it was installed).
# Prints the JSON reports (llama.cpp; kvmesh; kvmesh with Q4_1 left to candle's matmul);
# docs/benchmarks.md records a run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
MODEL="${1:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PY="${LLAMACPP_PY:-/tmp/llamacpp-venv/bin/python}"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
# PROFILE=dev reuses the test build (dependencies at opt-level 2, the model crate at 3).
PROFILE="${PROFILE:-release}"
step "build kvmesh-gpu-bench ($PROFILE)"
cargo build --profile "$PROFILE" -q -p kvmesh-gpu-server-server --bin kvmesh-gpu-bench
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/kvmesh-gpu-bench
step "llama.cpp"
"$PY" gpu-server/server/benches/llamacpp_bench.py "$MODEL"
step "kvmesh-gpu-server engine"
"$BIN" --model "$MODEL"
step "kvmesh-gpu-server engine, Q4_1 on candle's matmul (the path before kvmesh's kernel)"
"$BIN" --model "$MODEL" --candle-q4-1
