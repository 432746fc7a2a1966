#!/usr/bin/env bash
# Runs every GPU test and the generation smoke benchmarks on a GPU machine,
# from a bundle made by tools/gpu-bundle.sh. Logs go to the folder given as
# the first argument (default ./gpu-out). Prints a short summary last, and
# exits non-zero when any GPU or engine test failed, or when the served
# tokens differ from local generation's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# strata loads NCCL at run time: NCCL_LIB names the folder that holds
# libnccl.so.2 when the library path does not (e.g. a Python environment's
# site-packages/nvidia/nccl/lib). Without NCCL the NCCL tests skip.
if [ -n "${NCCL_LIB:-}" ]; then export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$NCCL_LIB; fi
# NVLink multicast stays off unless asked for.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export STRATA_FIXTURES_DIR=$PWD/tests/fixtures
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"

.gpu/bin/strata_cuda_tests > "$out/cuda_tests.log" 2>&1
cuda_rc=$?
.gpu/bin/strata_engine_tests > "$out/engine_tests.log" 2>&1
engine_rc=$?
grep -E "relative error|FAILED|Failure" "$out/cuda_tests.log" | head -40

echo "--- tiny model on cuda"
.gpu/bin/strata generate --backend cuda --model models/tiny-llama --prompt "Return the number of" --max-tokens 40

# Decode speed at batch 1 with a 1000-token prompt, random weights at real
# shapes; the summary line has time to first token and decode tokens/s.
ids=$(seq -s, 10 1009)
for preset in llama-3-1b llama-3-8b qwen2-0.5b; do
  .gpu/bin/strata generate --backend cuda --dummy-weights "$preset" --prompt-ids "$ids" \
    --max-tokens 128 --ignore-eos --json > "$out/gen_$preset.jsonl" 2>"$out/gen_$preset.err"
  echo "$preset $(tail -1 "$out/gen_$preset.jsonl")"
done

# strata serve on the GPU: the client's tokens equal local generation's.
echo "--- serve on cuda"
.gpu/bin/strata serve --backend cuda --model models/tiny-llama --host 127.0.0.1 --port 0 > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do grep -q "listening on" "$out/serve.log" && break; sleep 0.2; done
address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/serve.log")
remote=$(.gpu/bin/strata generate --server "$address" --prompt "Return the number of" --max-tokens 32 --json | grep -v summary)
local=$(.gpu/bin/strata generate --backend cuda --model models/tiny-llama --prompt "Return the number of" --max-tokens 32 --json | grep -v summary)
kill -TERM $server; wait $server; serve_rc=$?
[ "$remote" == "$local" ] && serve_match=yes || serve_match=no

echo "=== summary"
echo "serve on cuda: client tokens equal local: $serve_match, server exit $serve_rc"
echo "cuda tests: $(grep -E '^\[  (PASSED|FAILED)  \]' "$out/cuda_tests.log" | head -2 | tr '\n' ' ') rc=$cuda_rc"
echo "engine tests: $(grep -E '^\[  (PASSED|FAILED)  \]' "$out/engine_tests.log" | head -2 | tr '\n' ' ') rc=$engine_rc"

status=0
[ "$cuda_rc" -eq 0 ] || { echo "FAILED: cuda tests (exit $cuda_rc)"; status=1; }
[ "$engine_rc" -eq 0 ] || { echo "FAILED: engine tests (exit $engine_rc)"; status=1; }
[ "$serve_match" == yes ] && [ "$serve_rc" -eq 0 ] || { echo "FAILED: serve on cuda"; status=1; }
exit $status
