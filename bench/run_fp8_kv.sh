#!/usr/bin/env bash
# The fp8 e4m3 KV cache on a GPU machine, from a tools/gpu-bundle.sh bundle;
# results into the folder given as the first argument (default ./gpu-out):
#   - its accuracy cost: retrieval accuracy and fidelity of
#     models/retrieval-llama per policy and budget (first 2 layers dense),
#     the same harness as bench/run_kv_policies.sh, with the cache in fp8;
#   - decode step time at a 32k context, Llama-3-8B shape with random
#     weights, batch 1 and 8, full and ClusterKV, bf16 and fp8 caches in the
#     same run.
# The kernel-level figure (decode attention on an fp8 cache against PyTorch
# SDPA on bf16) is in bench/run_kernels.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
strata=.gpu/bin/strata
$strata bench kv-policies --backend cuda --model models/retrieval-llama --full-layers 2 \
  --kv-cache-dtype fp8_e4m3 --json "$out/kv_policies_fl2_fp8.json" \
  > "$out/kv_policies_fl2_fp8.txt" 2> "$out/kv_policies_fl2_fp8.err"
echo "--- retrieval, full_layers 2, fp8 e4m3 KV cache (rc $?)"
cat "$out/kv_policies_fl2_fp8.txt"
for dtype in auto fp8_e4m3; do
  echo "--- decode at 32k, llama-3-8b shape, --kv-cache-dtype $dtype"
  $strata bench kv-speed --backend cuda --dummy-weights llama-3-8b --context 32768 --batch 1,8 \
    --budgets 1024 --policies full,clusterkv --kv-cache-dtype "$dtype" \
    --json "$out/kv_speed_$dtype.json" 2> "$out/kv_speed_$dtype.err" | tee "$out/kv_speed_$dtype.txt"
done
