#!/usr/bin/env bash
# Time to first token of a long prompt whose KV a server keeps in its host
# tier (prefix reuse), against the same server prefilling it. Runs on a GPU
# machine from a bundle made by tools/gpu-bundle.sh: one `strata serve`
# (Llama-3-8B shape, dummy weights, a profile with a host tier and a prefix
# store), then three requests over gRPC: a warm-up with other tokens, the
# prompt computed, and the prompt again with a new question (its document
# loaded). Prints one JSON summary per request; logs go to $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
context=${CONTEXT:-32768}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
tmp=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$tmp"' EXIT
# A 32k prompt's KV is 4 GiB at this shape: the store keeps two.
printf 'name: docs\ntiers: {gpu_bytes: 24GiB, host_bytes: 10GiB, prefix_bytes: 9GiB}\n' > "$tmp/docs.yaml"
.gpu/bin/strata serve --backend cuda --dummy-weights llama-3-8b --max-context $((context + 64)) --max-seqs 4 \
  --profile "$tmp/docs.yaml" --host 127.0.0.1 --port 0 > "$out/prefix_serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do grep -q "listening on" "$out/prefix_serve.log" && break; sleep 0.2; done
address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/prefix_serve.log")
[[ -n "$address" ]] || { cat "$out/prefix_serve.log"; exit 1; }
ask() {
  .gpu/bin/strata generate --server "$address" --prompt-ids "$1" --max-tokens 4 --ignore-eos \
    --json | tail -1
}
document=$(seq -s, 1000 $((context + 999)))
echo "warm-up  $(ask "$(seq -s, 60000 $((context + 59999)))")"
echo "computed $(ask "$document,11,12,13")"
echo "loaded   $(ask "$document,21,22,23,24")"
