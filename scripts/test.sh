#!/usr/bin/env bash
# Runs every kvmesh test on a fresh machine: installs what it needs
# (scripts/setup.sh), builds the wasm plugins, then runs the whole workspace's
# tests. This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bash scripts/setup.sh

step "build wasm plugins (wasm32-wasip1, profile wasm)"
bash scripts/build-plugins.sh

step "cargo test --workspace"
export KVMESH_ENVOY="$(envoy_bin)"
# Everything is installed above: a test that would skip for a missing
# prerequisite fails instead.
export KVMESH_NO_SKIP=1
# One build per run: incremental state would only cost disk.
export CARGO_INCREMENTAL=0
cargo test --workspace --locked --no-fail-fast
