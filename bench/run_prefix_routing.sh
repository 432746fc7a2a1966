#!/usr/bin/env bash
# Prefix-aware routing: a document asked about twice through `strata
# router` in front of a prefill and a decode worker whose profile keeps
# prompts in a prefix store, with --prefix-routing on and off. Prints the
# second question's time to first token, its cached prompt tokens and the
# router's routes. Usage: bench/run_prefix_routing.sh BUILD_DIR [OUT]
# (BUILD_DIR/cli/strata is the binary; on a GPU machine set ARGS, e.g.
# ARGS="--backend cuda --dummy-weights llama-3-8b", and DOC, the document's
# tokens). Defaults: the tiny test model on the CPU, a 2000-token document.
set -euo pipefail
cd "$(dirname "$0")/.."
strata=$1/cli/strata
out=${2:-prefix-routing-out}
doc=${DOC:-2000}
args=(${ARGS:---model models/tiny-llama})
mkdir -p "$out"
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
context=$((doc + 256))
printf 'name: docs\ntiers: {host_bytes: 2GiB, prefix_bytes: 1GiB}\n' >"$tmp/docs.yaml"
common=("${args[@]}" --max-context "$context" --host 127.0.0.1 --port 0 --profile "$tmp/docs.yaml")

start() {  # start LOG ARGS...: sets $address
  local log=$1
  shift
  STRATA_LOG_LEVEL=info "$strata" "$@" >"$out/$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do grep -q "listening on" "$out/$log" && break; sleep 0.1; done
  address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/$log" | head -1)
  [[ -n "$address" ]] || { tail -20 "$out/$log"; exit 1; }
}
ask() {  # ask ROUTER QUESTION: the JSON summary of the document + a question
  python3 -c "
import random
r = random.Random(7)
doc = [r.randrange(10, 500) for _ in range($doc)]
print(','.join(map(str, doc + [600 + $2, 601 + $2, 602 + $2])))" >"$tmp/prompt.txt"
  "$strata" generate --server "$1" --prompt-ids "@$tmp/prompt.txt" --max-tokens 8 \
    --ignore-eos --temperature 0 --json --timeout 120 | tail -1
}

for routing in true false; do
  start "prefill-$routing.log" prefill "${common[@]}"
  prefill=$address
  start "decode-$routing.log" decode "${common[@]}"
  decode=$address
  start "router-$routing.log" router "${args[@]}" --max-context "$context" --host 127.0.0.1 \
    --port 0 --metrics-port 0 --profile "$tmp/docs.yaml" --workers "$prefill" \
    --workers "$decode" --prefill-threshold-tokens 256 --heartbeat-seconds 0.2 \
    --prefix-routing "$routing"
  router=$address
  metrics=$(sed -n 's/.*metrics on \([^ ]*\).*/\1/p' "$out/router-$routing.log" | head -1)
  for _ in $(seq 100); do ask "$router" 0 >/dev/null 2>&1 && break; sleep 0.1; done
  second=$(ask "$router" 1)
  routes=$(python3 -c "
import urllib.request
text = urllib.request.urlopen('http://$metrics/metrics', timeout=10).read().decode()
print(' '.join(l.split('{')[1].split('}')[0] + '=' + l.split()[-1]
               for l in text.splitlines() if l.startswith('strata_router_routes_total{')))")
  python3 - "$routing" "$second" "$routes" <<'PY'
import json, sys
routing, summary, routes = sys.argv[1], json.loads(sys.argv[2])["summary"], sys.argv[3]
cached = summary.get("cached_prompt_tokens", summary.get("kv", {}).get("cached_prompt_tokens", 0))
print(f"prefix_routing={routing} second_question_ttft_ms={summary['time_to_first_token_ms']:.1f} "
      f"cached_prompt_tokens={cached} routes: {routes}")
PY
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
done
