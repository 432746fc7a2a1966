#!/usr/bin/env bash
# Decode steps at 32k with part of ClusterKV's host-homed clusters on the
# SSD tier, against the same steps with all of them in host memory, in one
# run (`strata bench kv-speed`, Llama-3-8B shape, dummy weights, budget
# 1024): every tenth cluster of each (layer, KV head) is written to RocksDB
# before the timed steps and its host copy is no longer read, so a step
# whose recall misses it in the GPU ring fetches it from the SSD (a hard
# miss) while the step waits. Each ssd10 run is made with and without reads
# ahead (ssd10+ra: each layer starts the SSD reads of the next layer's
# guessed selection; ssd10-ra: the step reads them when it selects them;
# READ_AHEAD narrows it to one). Also runs the CUDA tiering tests (the recall's
# fetch path against the CPU reference). Runs on a GPU machine from a
# bundle made by tools/gpu-bundle.sh; logs go to $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
context=${CONTEXT:-32768}
batches=${BATCHES:-1,8}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export STRATA_FIXTURES_DIR=$PWD/tests/fixtures
tmp=$(mktemp -d "$PWD/.cluster-ssd.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
status=0
.gpu/bin/strata_cuda_tests --gtest_filter='*Tier*' >"$out/cuda_tiering_tests.log" 2>&1 || status=1
tail -3 "$out/cuda_tiering_tests.log"
.gpu/bin/strata bench kv-speed --backend cuda --dummy-weights llama-3-8b --context "$context" \
  --batch "$batches" --budgets 1024 --policies clusterkv --host-tiers host,ssd10 \
  --ssd-path "$tmp/kv" --ssd-io-threads "${IO_THREADS:-16}" --steps 20 --warmup 3 \
  --ssd-read-ahead "${READ_AHEAD:-true,false}" \
  --json "$out/cluster_ssd.json" 2>"$out/cluster_ssd.err" | tee "$out/cluster_ssd.txt" || status=1
tail -5 "$out/cluster_ssd.err"
df -h "$tmp" | tail -1
exit $status
