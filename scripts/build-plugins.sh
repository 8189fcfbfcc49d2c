#!/usr/bin/env bash
# Builds every proxy-wasm plugin crate for wasm32-wasip1 with the wasm profile
# and copies the modules to target/plugins/<name>.wasm, where the Envoy
# configs, the host and the tests look for them. The host's test fixture
# (host/fixture) is built too, as target/plugins/host-fixture.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
wasm_packages pkgs
cargo build --locked --target wasm32-wasip1 --profile wasm "${pkgs[@]}"
mkdir -p target/plugins
for f in target/wasm32-wasip1/wasm/*.wasm; do
  n="$(basename "$f" .wasm)"
  n="${n#kvmesh_plugins_}"
  n="${n#kvmesh_}"
  cp "$f" "target/plugins/${n//_/-}.wasm"
done
ls -l target/plugins
