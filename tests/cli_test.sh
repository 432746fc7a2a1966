#!/usr/bin/env bash
# End-to-end checks of `strata generate` on the bundled tiny model, of
# `strata bench kv-policies` on the bundled retrieval model, and of the
# other `strata bench` and `strata profile` commands that need no GPU.
# Usage: cli_test.sh STRATA_BINARY SOURCE_DIR
set -euo pipefail
strata=$1
src=$2
model=$src/models/tiny-llama
fail() { echo "FAIL: $*" >&2; exit 1; }

# Text mode streams the prompt and a completion.
out=$("$strata" generate --model "$model" --prompt "Return the number of" --max-tokens 12 2>/dev/null)
[[ $out == "Return the number of"* ]] || fail "text output does not start with the prompt: $out"
[[ ${#out} -gt 25 ]] || fail "no completion in: $out"

# JSON mode: one object per token with id, text and logprob, then a summary.
json=$("$strata" generate --model "$model" --prompt "Return the number of" --max-tokens 8 --json)
python3 - "$json" <<'PY'
import json, sys
lines = [json.loads(l) for l in sys.argv[1].splitlines()]
tokens, summary = lines[:-1], lines[-1]["summary"]
assert len(tokens) == 8, tokens
for t in tokens:
    assert set(t) == {"token_id", "text", "logprob"}, t
    assert isinstance(t["token_id"], int) and t["logprob"] <= 0.0, t
assert summary["completion_tokens"] == 8 and summary["finish_reason"] == "length", summary
assert summary["prompt_tokens"] == 5 and summary["time_to_first_token_ms"] > 0, summary
PY

# The same seed gives the same sample; prompt ids work without text.
a=$("$strata" generate --model "$model" --prompt-ids 0,5,6,7 --temperature 0.9 --top-p 0.95 --top-k 50 --seed 7 --max-tokens 16 --json)
b=$("$strata" generate --model "$model" --prompt-ids 0,5,6,7 --temperature 0.9 --top-p 0.95 --top-k 50 --seed 7 --max-tokens 16 --json)
[[ $(echo "$a" | grep -v summary) == "$(echo "$b" | grep -v summary)" ]] || fail "same seed, different tokens"

# Tensor parallelism: the model split over 2 and 4 ranks (threads of the
# CPU backend) samples the tokens one rank does, seed for seed (the
# logprobs differ in the last digits: the sums run in another order).
token_ids() { echo "$1" | grep -v summary | python3 -c 'import json, sys; print([json.loads(l)["token_id"] for l in sys.stdin])'; }
for tp in 2 4; do
  c=$("$strata" generate --model "$model" --prompt-ids 0,5,6,7 --temperature 0.9 --top-p 0.95 --top-k 50 --seed 7 --max-tokens 16 --json --tensor-parallel $tp)
  [[ $(token_ids "$a") == "$(token_ids "$c")" ]] \
    || fail "--tensor-parallel $tp sampled other tokens than one rank: $(token_ids "$c")"
done
# With a host tier and a prefix store: records hold every rank's KV.
tiers_dir=$(mktemp -d)
cat > "$tiers_dir/tiers.yaml" <<EOF
name: tiers
kv_policy:
  type: full
tiers:
  host_bytes: 64MiB
  prefix_bytes: 32MiB
EOF
c=$("$strata" generate --model "$model" --prompt-ids 0,5,6,7 --temperature 0.9 --top-p 0.95 --top-k 50 --seed 7 --max-tokens 16 --json --tensor-parallel 2 --profile "$tiers_dir/tiers.yaml")
[[ $(token_ids "$a") == "$(token_ids "$c")" ]] || fail "--tensor-parallel 2 with a host tier: $(token_ids "$c")"
# ClusterKV on every rank over its KV heads: one rank's tokens.
# clusterkv_profile NAME [YAML]: a small ClusterKV profile, YAML appended.
clusterkv_profile() {
  printf 'name: %s\nkv_policy:\n  type: clusterkv\n  budget_tokens: 32\n  sink_tokens: 4\n  window_tokens: 16\n  tokens_per_cluster: 8\n  full_layers: 0\n%s' \
    "$1" "${2:-}" > "$tiers_dir/$1.yaml"
}
clusterkv_profile ckv
prompt=$(seq -s, 3 120)
c1=$("$strata" generate --model "$model" --prompt-ids "$prompt" --max-tokens 24 --json --profile "$tiers_dir/ckv.yaml")
c2=$("$strata" generate --model "$model" --prompt-ids "$prompt" --max-tokens 24 --json --profile "$tiers_dir/ckv.yaml" --tensor-parallel 2)
[[ $(token_ids "$c1") == "$(token_ids "$c2")" ]] || fail "clusterkv over 2 ranks: $(token_ids "$c2") vs $(token_ids "$c1")"
# ... and with its clusters homed in the host tier, every rank's.
clusterkv_profile ckv_host $'tiers:\n  host_bytes: 64MiB\n'
c3=$("$strata" generate --model "$model" --prompt-ids "$prompt" --max-tokens 24 --json --profile "$tiers_dir/ckv_host.yaml" --tensor-parallel 2)
[[ $(token_ids "$c1") == "$(token_ids "$c3")" ]] || fail "host-homed clusterkv over 2 ranks: $(token_ids "$c3") vs $(token_ids "$c1")"
rm -rf "$tiers_dir"

# An fp8 e4m3 KV cache generates text too (its accuracy cost is measured
# in bench/RESULTS.md).
out=$("$strata" generate --model "$model" --prompt "Return the number of" --max-tokens 12 \
      --kv-cache-dtype fp8_e4m3 2>/dev/null) || fail "--kv-cache-dtype fp8_e4m3"
[[ ${#out} -gt 25 ]] || fail "no completion with an fp8 cache: $out"

# Dummy weights at a preset shape run without a checkpoint.
"$strata" generate --dummy-weights tiny --prompt-ids 1,2,3 --max-tokens 4 --json >/dev/null \
  || fail "--dummy-weights tiny"

# Bad input: a clear message and a non-zero exit, never a crash.
expect_error() {
  local want=$1; shift
  set +e
  msg=$("$strata" "$@" 2>&1 >/dev/null)
  code=$?
  set -e
  [[ $code -ne 0 && $code -lt 128 ]] || fail "exit $code for: $*"
  [[ $msg == *"$want"* ]] || fail "expected '$want' in: $msg"
}
expect_error "not a directory" generate --model /nonexistent --prompt hi
expect_error "temperature" generate --model "$model" --prompt hi --temperature -1
expect_error "outside the vocabulary" generate --model "$model" --prompt-ids 1,99999
expect_error "--backend" generate --model "$model" --prompt hi --backend tpu
expect_error "unknown model preset" generate --dummy-weights gpt-5 --prompt-ids 1
expect_error "is not a token id" generate --model "$model" --prompt-ids 1,x
expect_error "--kv-cache-dtype" generate --model "$model" --prompt hi --kv-cache-dtype int3
expect_error "do not split over 3 ranks" generate --model "$model" --prompt hi --tensor-parallel 3
expect_error "is not one of" bench kv-policies --model "$src/models/retrieval-llama" --policies full,h2o

# The KV-policy accuracy benchmark on the trained retrieval model: two
# 4096-token cases, dense and ClusterKV; both must find the needle.
out=$("$strata" bench kv-policies --model "$src/models/retrieval-llama" --max-cases 2 \
      --policies full,clusterkv --budgets 256 --fidelity-steps 1 2>/dev/null) \
  || fail "bench kv-policies"
echo "$out" | grep -Eq "^full +0 +1\.000" || fail "kv-policies full accuracy: $out"
echo "$out" | grep -Eq "^clusterkv +256 +1\.000" || fail "kv-policies clusterkv accuracy: $out"
# The decode-speed benchmark on the CPU with random tiny weights: every
# policy row, ClusterKV clustering its prompt, and the op-timing lines.
out=$("$strata" bench kv-speed --dummy-weights tiny --context 400 --batch 1,2 --budgets 64 \
      --policies full,clusterkv --window-tokens 64 --steps 2 --warmup 1 --op-timing 2>/dev/null) \
  || fail "bench kv-speed"
echo "$out" | grep -Eq "^full +0 +2 +400 " || fail "kv-speed full row: $out"
echo "$out" | grep -Eq "^clusterkv +64 +2 +400 " || fail "kv-speed clusterkv row: $out"
echo "$out" | grep -q "device idle" || fail "kv-speed op timing: $out"
expect_error "must be >= 1" bench kv-speed --dummy-weights tiny --steps 0
# Every fourth host-homed cluster on an SSD tier: the steps fetch some of
# them from RocksDB (hard misses), and nothing is left there at the end.
kvs=$(mktemp -d)
out=$("$strata" bench kv-speed --dummy-weights tiny --context 400 --batch 2 --budgets 64 \
      --full-layers 1 --window-tokens 64 --policies clusterkv --host-tiers host,ssd4 \
      --ssd-path "$kvs/db" --steps 6 2>/dev/null) || fail "bench kv-speed ssd4"
awk '$1 == "clusterkv" && $5 == "ssd4" && $13 > 0 { found = 1 } END { exit !found }' <<< "$out" \
  || fail "kv-speed ssd4 row without hard misses: $out"
expect_error "need --ssd-path" bench kv-speed --dummy-weights tiny --host-tiers ssd4
rm -rf "$kvs"
# A ClusterKV profile whose clusters live in the host tier (raw codec) gives
# the tokens of the same profile keeping them on the GPU, and the summary
# shows the clusters moved there and recalled, and their GPU pages freed.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
policy='kv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, window_tokens: 16, tokens_per_cluster: 8, full_layers: 1}'
printf 'name: gpu\n%s\n' "$policy" > "$tmp/gpu.yaml"
printf 'name: host\n%s\ntiers: {host_bytes: 64MiB}\n' "$policy" > "$tmp/host.yaml"
ids=$(seq -s, 10 300)
gpu=$("$strata" generate --model "$model" --prompt-ids "$ids" --max-tokens 24 --ignore-eos --json \
      --profile "$tmp/gpu.yaml" 2>/dev/null) || fail "generate --profile gpu"
host=$("$strata" generate --model "$model" --prompt-ids "$ids" --max-tokens 24 --ignore-eos --json \
       --profile "$tmp/host.yaml" 2>/dev/null) || fail "generate --profile host"
[[ "$(grep -v summary <<< "$gpu")" == "$(grep -v summary <<< "$host")" ]] \
  || fail "host-homed clusters changed the tokens"
grep summary <<< "$host" | grep -Eq '"offloads":[1-9]' || fail "no offload: $host"
grep summary <<< "$host" | grep -Eq '"recall_tokens":[1-9]' || fail "no recall: $host"
grep summary <<< "$host" | grep -Eq '"recall_steps":[1-9]' || fail "no recall time: $host"
grep summary <<< "$host" | grep -Eq '"upper_pages_released":[1-9]' \
  || fail "no GPU page of host-homed clusters freed: $host"
printf 'name: x\ntiers: {ssd_path: /tmp/x}\n' > "$tmp/ssd.yaml"
expect_error "tiers.ssd_path" generate --model "$model" --prompt hi --profile "$tmp/ssd.yaml"
# An SSD tier whose directory cannot be created is a clear startup error;
# one that can works, and is empty again afterwards.
touch "$tmp/file"
printf 'name: ssd\n%s\ntiers: {host_bytes: 64MiB, ssd_path: %s, ssd_bytes: 1GiB}\n' "$policy" \
  "$tmp/file/kv" > "$tmp/ssd_bad.yaml"
expect_error "$tmp/file/kv" generate --model "$model" --prompt hi --profile "$tmp/ssd_bad.yaml"
printf 'name: ssd\n%s\ntiers: {host_bytes: 64MiB, ssd_path: %s, ssd_bytes: 1GiB}\n' "$policy" \
  "$tmp/kv" > "$tmp/ssd_ok.yaml"
ssd=$("$strata" generate --model "$model" --prompt-ids "$ids" --max-tokens 24 --ignore-eos --json \
      --profile "$tmp/ssd_ok.yaml" 2>/dev/null) || fail "generate --profile with an SSD tier"
[[ "$(grep -v summary <<< "$gpu")" == "$(grep -v summary <<< "$ssd")" ]] \
  || fail "an SSD tier changed the tokens"
grep summary <<< "$ssd" | grep -Eq '"ssd_bytes":1073741824' || fail "no SSD tier: $ssd"
# Stored prefixes on the SSD outlive the process: a second run of the same
# prompt loads its KV from the first run's SSD pages, with the same tokens.
printf 'name: docs\ntiers: {host_bytes: 64MiB, prefix_bytes: 32MiB, ssd_path: %s, ssd_bytes: 1GiB, ssd_prefix_bytes: 512MiB, ssd_write_admission: always}\n' \
  "$tmp/kv_prefix" > "$tmp/ssd_prefix.yaml"
first=$("$strata" generate --model "$model" --prompt-ids "$ids" --max-tokens 24 --ignore-eos --json \
      --profile "$tmp/ssd_prefix.yaml" 2>/dev/null) || fail "generate with SSD prefixes"
grep summary <<< "$first" | grep -Eq '"ssd_prefix_pages_written":[1-9]' \
  || fail "no prefix page written to the SSD: $first"
second=$("$strata" generate --model "$model" --prompt-ids "$ids" --max-tokens 24 --ignore-eos --json \
      --profile "$tmp/ssd_prefix.yaml" 2>/dev/null) || fail "generate with SSD prefixes, again"
[[ "$(grep -v summary <<< "$first")" == "$(grep -v summary <<< "$second")" ]] \
  || fail "a prefix loaded from the SSD changed the tokens"
grep summary <<< "$second" | grep -Eq '"cached_prompt_tokens":[1-9]' \
  || fail "the second run computed its whole prompt: $second"
grep summary <<< "$second" | grep -Eq '"ssd_prefix_pages_read":[1-9]' \
  || fail "nothing read from the SSD: $second"

# The SSD tier's bandwidth benchmark runs, and leaves nothing behind.
"$strata" bench kv-ssd --path "$tmp/bench" --gib 0.01 --value-kib 64 --io-threads 1,2 \
  > "$tmp/kv_ssd.txt" 2>&1 || fail "bench kv-ssd: $(cat "$tmp/kv_ssd.txt")"
grep -q "read with  2 I/O threads" "$tmp/kv_ssd.txt" || fail "bench kv-ssd: $(cat "$tmp/kv_ssd.txt")"
[[ -z "$(ls -A "$tmp/bench")" ]] || fail "bench kv-ssd left files"

# The KV transfer benchmark between two processes (it spawns its own
# receiver): a positive bandwidth per size, every message counted.
"$strata" bench transfer --sizes 16K,1M --count 8 --json > "$tmp/transfer.json" 2> "$tmp/transfer.err" \
  || fail "bench transfer: $(cat "$tmp/transfer.err")"
python3 - "$tmp/transfer.json" <<'PY' || fail "bench transfer JSON: $(cat "$tmp/transfer.json")"
import json, sys
j = json.load(open(sys.argv[1]))
sizes = j["sizes"]
assert [s["bytes"] for s in sizes] == [16384, 1048576], sizes
for s in sizes:
    assert s["messages"] == 8 and s["gbps"] > 0 and s["p99_us"] >= s["p50_us"] > 0, s
# Each size's 8 messages after twice the window of warm-up ones.
assert j["receiver_landed"] == 2 * (8 + 2 * j["window"]), j
PY
expect_error "multiple of 4 KiB" bench transfer --sizes 1000 --count 1

# strata profile check: the shipped profiles hold 32k sequences of
# Llama-3-8B's shape; a broken profile gets every problem on its own line
# and exit status 2; budgets a model cannot meet are explained.
"$strata" profile check "$src"/deploy/profiles/*.yaml --dummy-weights llama-3-8b \
  --max-context 32768 > "$tmp/check.txt" || fail "shipped profiles: $(cat "$tmp/check.txt")"
[[ $(grep -c ": ok" "$tmp/check.txt") == 3 ]] || fail "profile check: $(cat "$tmp/check.txt")"
printf 'name: bad\ncodec: fp4\nkv_policy: {type: clusterkv, budget_tokens: lots}\ntiers: {host_bytes: 8XB}\n' \
  > "$tmp/bad.yaml"
set +e
"$strata" profile check "$tmp/bad.yaml" > "$tmp/bad.txt"
status=$?
set -e
[[ $status == 2 ]] || fail "profile check of a bad profile exited $status"
[[ $(wc -l < "$tmp/bad.txt") == 3 ]] || fail "expected three problems: $(cat "$tmp/bad.txt")"
grep -q 'codec: "fp4"' "$tmp/bad.txt" || fail "no codec error: $(cat "$tmp/bad.txt")"
grep -q 'tiers.host_bytes: "8XB": unknown unit' "$tmp/bad.txt" || fail "no unit error"
printf 'name: small\nkv_policy: {type: clusterkv}\ncodec: int4\ntiers: {gpu_bytes: 2GiB, host_bytes: 1GiB}\n' \
  > "$tmp/small.yaml"
set +e
"$strata" profile check "$tmp/small.yaml" --dummy-weights llama-3-8b --max-context 32768 > "$tmp/small.txt"
status=$?
set -e
[[ $status == 2 ]] || fail "profile check of impossible budgets exited $status"
grep -q "tiers.gpu_bytes: .*cannot hold one sequence of 32768" "$tmp/small.txt" \
  || fail "no GPU budget problem: $(cat "$tmp/small.txt")"
grep -q "tiers.host_bytes: 1073741824 bytes cannot hold" "$tmp/small.txt" \
  || fail "no host budget problem: $(cat "$tmp/small.txt")"
echo "cli tests passed"
