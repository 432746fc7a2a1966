#!/usr/bin/env bash
# Sets up and builds strata, then runs it as users deploy it, on loopback
# with the bundled tiny model: a router in front of one prefill and one
# decode worker, with a tiered KV profile (ClusterKV clusters in the host
# tier, an SSD tier below). One completion is streamed through the router
# with the gRPC client; the prefill worker computed its prompt and sent the
# KV to the decode worker over UCX. Then all three are stopped (SIGTERM:
# they drain and exit 0). `strata serve` runs the same in one process.
# Usage: tools/quickstart.sh [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
strata=./build/cli/strata
model=models/tiny-llama

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The workload's profile; each worker has its own SSD database.
profile() {  # profile NAME: writes $work/NAME.yaml
  cat >"$work/$1.yaml" <<YAML
name: long-doc
kv_policy: {type: clusterkv, budget_tokens: 64, sink_tokens: 4, window_tokens: 16,
            tokens_per_cluster: 8, full_layers: 1}
codec: int8
tiers: {host_bytes: 64MiB, ssd_path: $work/$1-kv, ssd_bytes: 256MiB}
YAML
}
profile prefill
profile decode

start() {  # start NAME ARGS...: runs `strata ARGS...`, waits until it listens
  local name=$1
  shift
  "$strata" "$@" --host 127.0.0.1 --port 0 >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 300); do
    grep -q "listening on" "$work/$name.out" && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/$name.err" >&2; exit 1; }
    sleep 0.1
  done
  sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$work/$name.out"
}
common=(--model "$model" --max-context 2048)
prefill=$(start prefill prefill "${common[@]}" --profile "$work/prefill.yaml" \
  --kv-export-bytes 16777216)
decode=$(start decode decode "${common[@]}" --profile "$work/decode.yaml" \
  --kv-landing-bytes 16777216)
router=$(start router router "${common[@]}" --profile "$work/decode.yaml" \
  --workers "$prefill" --workers "$decode" --prefill-threshold-tokens 0)
echo "strata router on $router, prefill worker on $prefill, decode worker on $decode" >&2

# The router learns its workers within a heartbeat: retry until it has.
for _ in $(seq 50); do
  "$strata" generate --server "$router" --prompt "${1:-Return the number of}" \
    --max-tokens 48 --server-profile long-doc && break
  sleep 0.2
done

for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid"; done
pids=()
echo "all stopped" >&2
