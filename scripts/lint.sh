#!/usr/bin/env bash
# The checks CI enforces besides the tests: rustfmt, and clippy with warnings
# as errors over the whole workspace natively and over the plugin crates for
# wasm32-wasip1. Run after scripts/setup.sh (scripts/test.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets (native)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy (wasm32-wasip1, plugin crates)"
wasm_packages pkgs
cargo clippy --target wasm32-wasip1 --locked "${pkgs[@]}" -- -D warnings
