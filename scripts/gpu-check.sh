#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root, with the binaries of scripts/build-cuda.sh in
# .gpu/bin. JSON reports go to $OUT (default /tmp/kvmesh-gpu); docs/benchmarks.md records a run.
#   scripts/gpu-check.sh llama8b           the Llama-3.1-8B shape, random f16 weights made on the
#       GPU: copy peaks and the HBM roofline, prefill and decode throughput at 1 and 32 streams,
#       a 20,000-token prefix restored from the HOST tier against recomputing it; decode on
#       kvmesh's kernels checked against candle's ops, and measured with each; a decode step
#       taken apart (--profile)
#   scripts/gpu-check.sh smollm2 [GGUF]    SmolLM2's greedy tokens on the GPU against the CPU
#       (F32 weights on both) and cached prefill against recompute, the decode kernels against
#       candle's ops; then its GPU throughput
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kvmesh-gpu}"
mkdir -p "$OUT"
BIN=.gpu/bin/kvmesh-gpu-bench
source scripts/gpu-env.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
ldd "$BIN" | grep -E "libcuda|not found"
status=0
case "${1:-llama8b}" in
  llama8b)
    timeout 420 "$BIN" --device cuda --shape llama-3.1-8b --weights f16 --copy-peaks \
      --host-restore --streams 1,32 --reps 3 --long-tokens 2000 --num-blocks 4096 \
      --kernels both --check-kernels --profile \
      >"$OUT/llama8b.json" 2>"$OUT/llama8b.log" || status=1
    cat "$OUT/llama8b.json"; tail -n 20 "$OUT/llama8b.log"
    ;;
  smollm2)
    MODEL="${2:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
    timeout 240 "$BIN" --model "$MODEL" --device cuda --weights f32 --check-cpu --check-kernels \
      --no-throughput \
      >"$OUT/check.json" 2>"$OUT/check.log" || status=1
    cat "$OUT/check.json"; tail -n 5 "$OUT/check.log"
    for w in native f16; do
      timeout 120 "$BIN" --model "$MODEL" --device cuda --weights $w --streams 1,32 --reps 3 \
        --kernels both \
        >"$OUT/smollm2-$w.json" 2>"$OUT/smollm2-$w.log" || status=1
      cat "$OUT/smollm2-$w.json"; tail -n 5 "$OUT/smollm2-$w.log"
    done
    ;;
  *) echo "usage: $0 llama8b | smollm2 [GGUF]" >&2; exit 2 ;;
esac
exit $status
