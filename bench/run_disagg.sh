#!/usr/bin/env bash
# Disaggregated serving against `strata serve` on one GPU machine: prefill
# and decode workers as separate processes sharing the GPU(s), behind a
# router, against one `strata serve` on the same GPU (Llama-3-8B shape,
# dummy weights). For each prompt length (PROMPTS, default "8192 32768"):
# one request through each setup after a warm-up, reporting its time to
# first token and decode speed, and from the decode worker's metrics the
# prompt's compute time on the prefill worker, its KV transfer time (first
# token sampled -> every block landed) and bytes on the wire. With MIXED=1,
# then a mixed load through each (`strata bench serve`, 6 streams of 32
# requests: 26 short, 1024-token prompts and 96 tokens out, and 6 long,
# 16384-token prompts and 16 out, shuffled), for the inter-token latency
# of the short ones while long prompts arrive, reported apart from the
# long ones' (its requests name the profile, so their KV crosses in
# CODECS' codec too).
# Each disaggregated request's greedy tokens are compared with serve's
# (which prefills in the same chunks). Runs from a bundle made by
# tools/gpu-bundle.sh; logs go to $1.
#   CHUNKS        the prefill worker's --max-batch-tokens values to try
#                 (default 2048: a prompt's KV leaves in parts as its
#                 chunks complete)
#   CODECS        the profile codecs the KV crosses in (default "bf16
#                 int8": raw pages, and int8 blocks coded and decoded on
#                 the GPUs)
#   POLICY        clusterkv: both setups get the long-document ClusterKV
#                 policy (whole-prompt clustering); the prefill worker then
#                 clusters the prompt and sends the clusterings, and the
#                 decode worker's first step (second_token_ms) redoes them
#                 instead of running the k-means; serve clusters at its
#                 first decode step
#                 clusterkv-host: the same with its clusters homed in a
#                 16 GiB host tier; the decode worker then puts an
#                 imported prompt's cold clusters straight into that tier
#                 from the landed KV (import admission), and its log
#                 (LOG_LEVEL=debug) times the encoding, against a plain
#                 copy of as many bytes on 8 threads measured first
#   ADMISSION     the decode worker's --kv-import-admission values to try
#                 (default true; "true false" measures what it saves)
#   IMPORT_BYTES  the decode worker's --kv-import-bytes-per-step
#   LAYER_PARTS   the prefill worker's --kv-export-layer-parts values to
#                 try (default 4: the last chunk's pages leave in 4 parts
#                 of 8 layers as its step computes them; 1: whole, after
#                 the step)
#   LOG_LEVEL     the processes' log level (default info)
#   PREFILL_GPU, DECODE_GPU  the workers' devices (default 0 and 0)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
prompts=${PROMPTS:-"8192 32768"}
prefill_gpu=${PREFILL_GPU:-0}
chunks=${CHUNKS:-2048}
layer_parts=${LAYER_PARTS:-4}
codecs=${CODECS:-"bf16 int8"}
decode_gpu=${DECODE_GPU:-0}
policy=${POLICY:-}
policy_yaml=""
admissions=${ADMISSION:-true}
if [ "$policy" = clusterkv ] || [ "$policy" = clusterkv-host ]; then
  policy_yaml="kv_policy: {type: clusterkv, budget_tokens: 1024, sink_tokens: 16, window_tokens: 320, tokens_per_cluster: 80, kmeans_iterations: 20, full_layers: 2}"
  [ "$policy" = clusterkv-host ] && policy_yaml="$policy_yaml"$'\n'"tiers: {host_bytes: 16GiB}"
elif [ -n "$policy" ]; then
  echo "POLICY: clusterkv, clusterkv-host or nothing" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
strata=.gpu/bin/strata
tmp=$(mktemp -d "$PWD/.disagg.XXXXXX")
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
max=0
for p in $prompts; do [ "$p" -gt "$max" ] && max=$p; done
# The mixed load's long prompts (16384 tokens) must fit too.
[ "${MIXED:-0}" = 1 ] && [ "$max" -lt 16384 ] && max=16384
context=$((max + 128))
# Two sequences of the longest context in each worker's cache (16-token
# pages); the host buffers hold one prompt's KV (128 KiB a token) and more.
pages=$(((2 * context + 15) / 16))
host=$((max * 131072 + (512 << 20)))
if [ "${MIXED:-0}" = 1 ]; then
  # The mixed load keeps 6 requests in flight, up to 6 of them long: room
  # for all of them in the cache, and for 3 long prompts' KV landing at
  # once, so that neither the router's admission nor a full landing area
  # (which leaves the prompt to the decode worker) decides what is measured.
  pages=$((pages > 6 * (16384 + 128) / 16 ? pages : 6 * (16384 + 128) / 16))
  host=$((host > 3 * 16384 * 131072 + (512 << 20) ? host : 3 * 16384 * 131072 + (512 << 20)))
fi
common=(--backend cuda --dummy-weights llama-3-8b --max-context "$context" --max-seqs 8
  --kv-pages "$pages" --host 127.0.0.1 --port 0 --metrics-port 0)

start() {  # start LOG ENV... -- ARGS...: sets $address and $metrics
  local log=$1
  shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" STRATA_LOG_LEVEL="${LOG_LEVEL:-info}" "$strata" "$@" >"$out/$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 900); do grep -q "listening on" "$out/$log" && break; sleep 0.2; done
  address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/$log" | head -1)
  metrics=$(sed -n 's/.*metrics on \([^ ]*\).*/\1/p' "$out/$log" | head -1)
  [[ -n "$address" ]] || { tail -20 "$out/$log"; exit 1; }
}
metric() {  # metric ADDRESS NAME
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
addr, name = sys.argv[1:]
text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines() if l.split(" ")[0] == name))
PY
}
mixed() {  # mixed SERVER NAME [PROFILE]: the mixed load through SERVER, its summary lines
  [[ "${MIXED:-0}" = 1 ]] || return 0
  python3 - "$tmp/mixed.jsonl" <<'PY'
import json, random, sys
r = random.Random(7)
reqs = [(1024, 96)] * 26 + [(16384, 16)] * 6
r.shuffle(reqs)
with open(sys.argv[1], "w") as f:
    for n, out in reqs:
        f.write(json.dumps({"prompt_ids": [r.randrange(1000, 120000) for _ in range(n)],
                            "max_tokens": out}) + "\n")
PY
  "$strata" bench serve --server "$1" --dataset "$tmp/mixed.jsonl" --ignore-eos --concurrency 6 \
    ${3:+--profile "$3"} --split-prompt-tokens 4096 \
    --num-requests 32 --temperature 0 --quiet --json "$out/mixed-$2.json" >"$out/mixed-$2.txt" 2>&1 ||
    { tail -5 "$out/mixed-$2.txt"; return 0; }
  echo "mixed $2:"; grep -E "latency|TTFT|ITL|throughput|completed|failed" "$out/mixed-$2.txt" | head -16
}
ask() {  # ask SERVER LENGTH SEED [PROFILE]: one request, its JSON summary (tokens: $tmp/last.jsonl)
  python3 -c "import random; r=random.Random($3); print(','.join(str(r.randrange(1000, 120000)) for _ in range($2)))" >"$tmp/prompt.txt"
  local named=()
  [[ -n "${4:-}" ]] && named=(--server-profile "$4")
  "$strata" generate --server "$1" --prompt-ids "@$tmp/prompt.txt" --max-tokens 64 \
    --ignore-eos --temperature 0 --json --timeout 600 "${named[@]}" >"$tmp/last.jsonl"
  tail -1 "$tmp/last.jsonl"
}
same_tokens() {  # same_tokens FILE: whether the last request's tokens are FILE's
  python3 - "$1" "$tmp/last.jsonl" <<'PY'
import json, sys
ids = [[json.loads(l)["token_id"] for l in open(f) if '"token_id"' in l] for f in sys.argv[1:]]
same = sum(a == b for a, b in zip(*ids))
print(f"tokens equal to serve's: {same} of {len(ids[0])}" + (" (all)" if ids[0] == ids[1] else ""))
PY
}
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

if [ "$policy" = clusterkv-host ]; then
  # What the admission's encoding is measured against: a plain copy of a
  # 32k prompt's sparse layers (3.75 GiB of bf16) on 8 threads.
  python3 - <<'PY'
import threading, time
import numpy as np
n = 30 * 32768 * 131072 // 32
src = np.ones(n, np.uint8); dst = np.empty_like(src); dst.fill(0)
def part(i):
    s = slice(i * n // 8, (i + 1) * n // 8)
    np.copyto(dst[s], src[s])
for _ in range(3):
    t = time.perf_counter()
    ts = [threading.Thread(target=part, args=(i,)) for i in range(8)]
    [x.start() for x in ts]; [x.join() for x in ts]
    dt = time.perf_counter() - t
    print(f"plain host copy, 8 threads: {n / 1e6:.1f} MB in {dt * 1e3:.1f} ms ({n / dt / 1e9:.2f} GB/s)")
PY
fi
echo "== strata serve (one process)"
printf 'name: wire\n%s\n' "$policy_yaml" >"$tmp/serve.yaml"
# Prefill chunks as the prefill worker's first setting, so that greedy
# tokens compare (same chunks, same rounding).
start serve.log CUDA_VISIBLE_DEVICES="$decode_gpu" -- serve "${common[@]}" --profile "$tmp/serve.yaml" \
  --max-batch-tokens "${chunks%% *}"
serve=$address
# Warm-ups of the longest prompt: the first long prompt through a process
# also pays for first touches (pinned records, the transport's memory
# registrations), which a serving process has long done.
ask "$serve" 1024 1 wire >/dev/null
ask "$serve" "$max" 2 wire >/dev/null
for p in $prompts; do
  echo "serve $p $(ask "$serve" "$p" "$p" wire)"
  cp "$tmp/last.jsonl" "$tmp/serve-$p.jsonl"
done
mixed "$serve" serve wire
stop_all

for codec in $codecs; do
printf 'name: wire\ncodec: %s\n%s\n' "$codec" "$policy_yaml" >"$tmp/wire-$codec.yaml"
profile=(--profile "$tmp/wire-$codec.yaml")
for chunk in $chunks; do
for parts in $layer_parts; do
for admission in $admissions; do
echo "== router + prefill worker (chunks of $chunk tokens, last chunk in $parts layer parts) + decode worker (admission $admission), KV in $codec"
start "prefill-$codec-$chunk-$parts-$admission.log" CUDA_VISIBLE_DEVICES="$prefill_gpu" -- prefill "${common[@]}" \
  "${profile[@]}" --kv-export-bytes "$host" --max-batch-tokens "$chunk" \
  --kv-export-layer-parts "$parts"
prefill=$address
prefill_metrics=$metrics
start "decode-$codec-$chunk-$parts-$admission.log" CUDA_VISIBLE_DEVICES="$decode_gpu" -- decode "${common[@]}" \
  "${profile[@]}" --kv-landing-bytes "$host" ${IMPORT_BYTES:+--kv-import-bytes-per-step "$IMPORT_BYTES"} \
  --kv-import-admission "$admission"
decode=$address
decode_metrics=$metrics
start "router-$codec-$chunk-$parts-$admission.log" -- router --dummy-weights llama-3-8b --max-context "$context" \
  "${profile[@]}" --host 127.0.0.1 --port 0 --metrics-port 0 --workers "$prefill" \
  --workers "$decode" --prefill-threshold-tokens 256 --heartbeat-seconds 0.2
router=$address
# Requests name the profile: the KV crosses in its codec (the workers'
# default profile sends bf16).
for _ in $(seq 50); do ask "$router" 1024 1 wire >/dev/null 2>&1 && break; sleep 0.2; done  # warm-up
ask "$router" "$max" 2 wire >/dev/null
for p in $prompts; do
  before=()
  for m in strata_prefill_remote_seconds_sum strata_kv_transfer_seconds_sum \
    strata_kv_wire_bytes_total strata_kv_raw_bytes_total; do
    before+=("$(metric "$decode_metrics" "$m")")
  done
  summary=$(ask "$router" "$p" "$p" wire)
  after=()
  for m in strata_prefill_remote_seconds_sum strata_kv_transfer_seconds_sum \
    strata_kv_wire_bytes_total strata_kv_raw_bytes_total; do
    after+=("$(metric "$decode_metrics" "$m")")
  done
  chunk=$chunk codec=$codec parts=$parts python3 - "$p" "$summary" "${before[@]}" "${after[@]}" <<'PY'
import json, os, sys
chunk, codec, parts = os.environ["chunk"], os.environ["codec"], os.environ["parts"]
p, summary = sys.argv[1], json.loads(sys.argv[2])["summary"]
b = [float(x) for x in sys.argv[3:7]]; a = [float(x) for x in sys.argv[7:11]]
compute, transfer, wire, raw = (a[i] - b[i] for i in range(4))
print(f"disagg codec={codec} chunk={chunk} parts={parts} {p} ttft_ms={summary['time_to_first_token_ms']:.1f} "
      f"decode_tok_s={summary['decode_tokens_per_s']:.1f} "
      f"second_token_ms={summary.get('second_token_ms', 0):.1f} prefill_s={compute:.3f} "
      f"transfer_s={transfer:.3f} transfer/prefill={transfer / compute if compute else 0:.2f} "
      f"wire_GB={wire / 1e9:.3f} raw_bf16_GB={raw / 1e9:.3f} "
      f"wire_GB_per_s={wire / transfer / 1e9 if transfer else 0:.2f}")
PY
  same_tokens "$tmp/serve-$p.jsonl"
done
echo "exports $(metric "$prefill_metrics" strata_kv_exports_total) imports $(metric "$decode_metrics" strata_kv_imports_total) fallbacks $(metric "$decode_metrics" strata_prefill_fallbacks_total)"
mixed "$router" "disagg-$codec-$chunk-$parts-$admission" wire
echo "clusterings: prefill k-means $(metric "$prefill_metrics" strata_kv_policy_clusterings_total) exported $(metric "$prefill_metrics" strata_kv_policy_clusterings_exported_total); decode k-means $(metric "$decode_metrics" strata_kv_policy_clusterings_total) imported $(metric "$decode_metrics" strata_kv_policy_clusterings_imported_total)"
echo "admitted imports $(metric "$decode_metrics" strata_kv_imports_admitted_total), upper pages never on the GPU $(metric "$decode_metrics" strata_kv_import_upper_pages_saved_total)"
grep -h "admitted .* chunks" "$out/decode-$codec-$chunk-$parts-$admission.log" 2>/dev/null | sed 's/^.*sequence/  sequence/' || true
stop_all
done
done
done
done
