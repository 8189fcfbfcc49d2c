#!/usr/bin/env bash
# The whole-stack benchmark: kvmesh's strategies (swapped through the control
# plane) and the SGLang router (cache_aware) in front of the same replicas,
# same trace, cold caches before each run. Installs the SGLang router from
# PyPI into its own venv (.cache/bench-venv), builds release binaries, runs
# kvmesh-bench and writes the table into docs/benchmarks.md (## whole stack)
# and the plot into docs/whole-stack.svg.
#
#   scripts/bench.sh [kvmesh-bench flags]     (see: target/release/kvmesh-bench --help)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SGLANG_ROUTER_VERSION=0.3.2

bash scripts/setup.sh
step "sglang-router $SGLANG_ROUTER_VERSION (PyPI) into .cache/bench-venv"
if [ ! -x .cache/bench-venv/bin/python ]; then
  python3 -m venv .cache/bench-venv
fi
.cache/bench-venv/bin/python -m pip install -q --disable-pip-version-check \
  "sglang-router==$SGLANG_ROUTER_VERSION"

step "build the plugins"
bash scripts/build-plugins.sh >/dev/null
step "build release binaries"
cargo build --release --locked \
  -p kvmesh-control-plane-server --bin kvmesh-control-plane \
  -p kvmesh-gpu-server-server --bin kvmesh-gpu-server \
  -p kvmesh-tests-harness --bin kvmesh-bench

export KVMESH_ENVOY="$(envoy_bin)"
step "kvmesh-bench"
./target/release/kvmesh-bench \
  --sglang-python .cache/bench-venv/bin/python \
  --md docs/benchmarks.md --svg docs/whole-stack.svg --json logs/bench/result.json \
  "$@"
