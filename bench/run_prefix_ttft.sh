#!/usr/bin/env bash
# Time to first token of a long prompt whose KV a server keeps in its host
# tier, or on its SSD tier, against the same server prefilling it. Runs on a
# GPU machine from a bundle made by tools/gpu-bundle.sh: `strata serve`
# (Llama-3-8B shape, dummy weights, a profile with a host tier, a prefix
# store and an SSD tier that keeps prefixes, written through), then over
# gRPC: a warm-up with other tokens, the prompt computed, and the prompt
# again with a new question (its document loaded from host memory). The
# server is then stopped and started again (host memory empty; the page
# cache dropped when we may), and the prompt asked once more: its document
# comes up from the SSD. Last, the SSD tier's own bandwidth (`strata bench
# kv-ssd`: records written to RocksDB and read back by 1-8 I/O threads)
# and fio's sequential read of a file on the same disk. Prints one JSON
# summary per request and the bandwidths; logs go to $1. FIO names the fio
# binary.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
context=${CONTEXT:-32768}
fio=${FIO:-fio}
# STRATA names the binary (another build, to compare); HOST_ONLY=1 stops
# after the requests served from host memory; NO_SSD=1 (with HOST_ONLY)
# leaves the SSD tier out of the profile, so no write-through runs beside
# the host requests. CLUSTERKV=1 (with HOST_ONLY) adds a ClusterKV policy
# that clusters the prompt in chunks of 2000 tokens (whole pages and clusters) and asks for 16
# tokens: the first decode step clusters the prompt (the first host
# request keeps the chunks' clusterings, the settled one asks the same
# question and reuses them; their tokens are compared).
strata=${STRATA:-.gpu/bin/strata}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
tmp=$(mktemp -d "$PWD/.prefix-ttft.XXXXXX")
server=""
trap '[[ -n "$server" ]] && kill "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
# A 32k prompt's KV is 4 GiB at this shape: the host store keeps two, the
# SSD tier four.
cat > "$tmp/docs.yaml" <<EOF
name: docs
tiers:
  gpu_bytes: 24GiB
  host_bytes: 10GiB
  prefix_bytes: 9GiB
  ssd_path: $tmp/kv
  ssd_bytes: 20GiB
  ssd_prefix_bytes: 17GiB
  ssd_write_admission: always
EOF
if [[ "${NO_SSD:-0}" == 1 ]]; then
  sed -i '/ssd_/d' "$tmp/docs.yaml"
fi
max_tokens=4
named=()
if [[ "${CLUSTERKV:-0}" == 1 ]]; then
  cat >> "$tmp/docs.yaml" <<EOF
kv_policy:
  type: clusterkv
  budget_tokens: 1024
  sink_tokens: 16
  window_tokens: 320
  tokens_per_cluster: 80
  kmeans_iterations: 20
  full_layers: 2
  cluster_chunk_tokens: 2000
EOF
  max_tokens=16
  named=(--server-profile docs)
fi
start() {
  STRATA_LOG_LEVEL=${STRATA_LOG_LEVEL:-debug} "$strata" serve --backend cuda --dummy-weights llama-3-8b \
    --max-context $((context + 64)) --max-seqs 4 --profile "$tmp/docs.yaml" --host 127.0.0.1 \
    --port 0 --metrics-port 0 > "$out/$1" 2>&1 &
  server=$!
  for _ in $(seq 600); do grep -q "listening on" "$out/$1" && break; sleep 0.2; done
  address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/$1")
  metrics=$(sed -n 's/.*metrics on \([^ ]*\).*/\1/p' "$out/$1")
  [[ -n "$address" ]] || { cat "$out/$1"; exit 1; }
}
# The SSD prefix counters of the running server.
ssd_metrics() {
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://$metrics/metrics').read().decode())" \
    | grep -E "^strata_kv_(ssd_prefix|prefix)_" || true
}
ask() {  # ask PROMPT: its summary; its token ids in $tmp/last.ids
  echo "$1" > "$tmp/prompt.txt"
  "$strata" generate --server "$address" --prompt-ids "@$tmp/prompt.txt" --max-tokens "$max_tokens" \
    "${named[@]}" --ignore-eos --json > "$tmp/last.json"
  grep -o '"token_id":[0-9]*' "$tmp/last.json" > "$tmp/last.ids" || true
  tail -1 "$tmp/last.json"
}
document=$(seq -s, 1000 $((context + 999)))
start prefix_serve.log
echo "warm-up  $(ask "$(seq -s, 60000 $((context + 59999)))")"
echo "computed $(ask "$document,11,12,13")"
echo "host     $(ask "$document,21,22,23,24")"
cp "$tmp/last.ids" "$tmp/host.ids"
# Written through to the SSD on the I/O threads: give them time to land.
sleep 10
# Again from host memory, with nothing of the earlier requests still
# being stored or written down. With CLUSTERKV the same question as the
# host request's: its clusterings are reused, and its tokens must be those
# the k-means gave.
settled_question=25,26,27,28
[[ "${CLUSTERKV:-0}" == 1 ]] && settled_question=21,22,23,24
echo "host-settled $(ask "$document,$settled_question")"
if [[ "${CLUSTERKV:-0}" == 1 ]]; then
  if cmp -s "$tmp/host.ids" "$tmp/last.ids"; then
    echo "clusterings reused: the same $(wc -l < "$tmp/last.ids") tokens as the k-means"
  else
    echo "clusterings reused: TOKENS DIFFER from the k-means"
    paste "$tmp/host.ids" "$tmp/last.ids" | head -20
  fi
fi
if [[ "${HOST_ONLY:-0}" == 1 ]]; then
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://$metrics/metrics').read().decode())" \
    | grep -E "^strata_kv_policy_clusterings" || true
  kill -TERM "$server"
  wait "$server" || true
  exit 0
fi
kill -TERM "$server"
wait "$server" || true
sync
if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  echo "page cache dropped"
else
  echo "page cache NOT dropped (not root): the SSD figure may be read from memory"
fi
start prefix_serve_restarted.log
grep -o "stored prefix pages kept.*" "$out/prefix_serve_restarted.log" || true
echo "ssd      $(ask "$document,31,32,33,34")"
ssd_metrics
echo "ssd-warm $(ask "$document,41,42,43,44")"
kill -TERM "$server"
wait "$server" || true
server=""
du -sh "$tmp/kv"
# The disk's sequential read: an 8 GiB file, 2 MiB reads, page cache bypassed.
if command -v "$fio" > /dev/null; then
  "$fio" --name=seqread --filename="$tmp/fio.dat" --rw=read --bs=2M --size=8G --direct=1 \
    --ioengine=psync --numjobs=1 --output-format=terse --terse-version=3 > "$out/fio_read.txt"
  # Field 7 of the terse format: read bandwidth in KiB/s.
  echo "fio sequential read: $(cut -d';' -f7 "$out/fio_read.txt") KiB/s"
  "$fio" --name=seqread4 --filename="$tmp/fio.dat" --rw=read --bs=2M --size=2G --direct=1 \
    --ioengine=psync --numjobs=4 --offset_increment=2G --group_reporting \
    --output-format=terse --terse-version=3 > "$out/fio_read4.txt"
  echo "fio sequential read, 4 streams: $(cut -d';' -f7 "$out/fio_read4.txt") KiB/s"
else
  echo "no fio"
fi
rm -f "$tmp/fio.dat"
"$strata" bench kv-ssd --path "$tmp" --gib 4 --io-threads 2,4,8 --json "$out/kv_ssd.json"
"$strata" bench kv-ssd --path "$tmp" --gib 4 --io-threads 8 --buffered --json "$out/kv_ssd_buffered.json"
