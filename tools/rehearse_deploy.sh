#!/usr/bin/env bash
# Rehearses the disaggregated Kubernetes deployment on this machine: renders
# deploy/k8s/overlays/disaggregated with `kubectl kustomize` and starts the
# processes its containers run, with the same arguments and environment
# (tools/deploy-check/rehearse.js lists the substitutions that make them run
# on loopback without a GPU: the bundled tiny model, the CPU backend, free
# ports, 127.0.0.1 for pod IPs and the headless Services, the profiles at
# 1/256 of their budgets), one process per Deployment: a decode worker, a
# prefill worker and the router. Then, through the router:
#  - a short prompt (decoded without a prefill worker) and a prompt of 300
#    tokens (at least --prefill-threshold-tokens: computed by the prefill
#    worker, its KV sent to the decode worker over UCX) must both stream
#    tokens back, `strata generate` exiting 0, and the prefill worker's
#    strata_kv_exports_total must have grown;
#  - SIGTERM to every process: each must drain and exit 0.
#
# Usage: tools/rehearse_deploy.sh [STRATA_BINARY]   (default build/cli/strata)
# Exit status 77 (ctest's skip) when kubectl is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
strata=$(realpath "${1:-build/cli/strata}")
[ -x "$strata" ] || { echo "rehearse_deploy: $strata not found: build strata first" >&2; exit 1; }
if ! command -v kubectl >/dev/null; then
  echo "rehearse_deploy: SKIPPED: kubectl is not installed" >&2
  exit 77
fi
bash tools/deploy-check/install.sh

work=$(mktemp -d)
pids=()
names=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

kubectl kustomize deploy/k8s/overlays/disaggregated >"$work/rendered.yaml"

# Free loopback ports (bound and released; the processes bind them next).
ports=$(python3 - <<'EOF'
import socket
socks = []
for _ in range(12):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
# shellcheck disable=SC2086
node tools/deploy-check/rehearse.js "$work/rendered.yaml" "$repo" "$work/run" $ports >"$work/plan.txt"

if ! "$strata" router --help >/dev/null 2>&1; then
  echo "rehearse_deploy: $strata has no router subcommand" >&2
  exit 1
fi

# start NAME ROLE PORT METRICS_PORT: runs one planned process in the
# background (logs in $work) and waits until it listens.
router_port=""
prefill_metrics=""
start() {
  local name=$1 role=$2 port=$3 metrics_port=$4 env_args argv i
  mapfile -d '' -t env_args <"$work/run/$name.env"
  mapfile -d '' -t argv <"$work/run/$name.argv"
  echo "rehearse_deploy: $name: strata ${argv[*]}" >&2
  env ${env_args[@]+"${env_args[@]}"} "$strata" "${argv[@]}" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  names+=("$name")
  for i in $(seq 600); do
    grep -qs "listening on" "$work/$name.out" && break
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "rehearse_deploy: $name exited before listening:" >&2
      tail -n 20 "$work/$name.err" >&2
      exit 1
    fi
    sleep 0.1
  done
  if ! grep -qs "listening on" "$work/$name.out"; then
    echo "rehearse_deploy: $name did not start" >&2
    tail -n 20 "$work/$name.err" >&2
    exit 1
  fi
  [ "$role" = router ] && router_port=$port
  [ "$role" = prefill ] && prefill_metrics=$metrics_port
  return 0
}

while read -r name role port metrics_port; do
  start "$name" "$role" "$port" "$metrics_port"
done <"$work/plan.txt"

status=0
metric() {  # metric PORT NAME: the sum of a metric's samples on /metrics
  python3 - "$1" "$2" <<'EOF'
import sys, urllib.request
port, name = sys.argv[1:]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(int(sum(float(l.split()[-1]) for l in text.splitlines()
              if l.startswith(name) and (l[len(name)] in " {"))))
EOF
}

# generate NAME ARGS...: through the router, retried while the router
# finds its workers; tokens must come back and the call exit 0.
generate() {
  local what=$1 i rc
  shift
  for i in $(seq 40); do
    rc=0
    "$strata" generate --server "127.0.0.1:$router_port" --max-tokens 16 --temperature 0 \
      --json --timeout 60 "$@" >"$work/$what.json" 2>"$work/$what.gen.err" || rc=$?
    if [ $rc -eq 0 ] && grep -q '"token_id"' "$work/$what.json"; then
      echo "rehearse_deploy: $what: $(grep -c '"token_id"' "$work/$what.json") tokens through the router" >&2
      return 0
    fi
    sleep 0.5
  done
  echo "rehearse_deploy: $what: strata generate failed (exit $rc):" >&2
  cat "$work/$what.gen.err" "$work/$what.json" >&2
  return 1
}
exports_before=$(metric "$prefill_metrics" strata_kv_exports_total)
generate short --prompt "Return the number of" || status=1
seq -s, 2 301 >"$work/long.ids"
generate long --prompt-ids "@$work/long.ids" || status=1
exports_after=$(metric "$prefill_metrics" strata_kv_exports_total)
if [ "$exports_after" -le "$exports_before" ]; then
  echo "rehearse_deploy: the 300-token prompt did not go through the prefill worker" \
    "(strata_kv_exports_total $exports_before -> $exports_after)" >&2
  status=1
fi

# The drain: SIGTERM to all, each exits 0.
for p in "${pids[@]}"; do kill -TERM "$p"; done
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [ $rc -ne 0 ]; then
    echo "rehearse_deploy: ${names[$i]} exited $rc after SIGTERM:" >&2
    tail -n 20 "$work/${names[$i]}.err" >&2
    status=1
  else
    echo "rehearse_deploy: ${names[$i]} drained and exited 0" >&2
  fi
done
pids=()
if [ $status -ne 0 ]; then
  exit $status
fi
echo "rehearse_deploy: ok"
