#!/usr/bin/env bash
# Runs the KV-policy benchmarks on a GPU machine from a tools/gpu-bundle.sh
# bundle, results (tables, JSON, the accuracy plot) into the folder given as
# the first argument (default ./gpu-out):
#   - retrieval accuracy and attention fidelity of models/retrieval-llama per
#     policy and budget, with the first 2 layers dense (the ClusterKV paper's
#     setting) and with every layer sparse;
#   - decode step time at a 32k context, Llama-3-8B shape with random
#     weights, batch 1, 8 and 12 (12 sequences' full 32k KV caches, 52 GB,
#     and the 16 GB of weights are about what an 80 GB GPU holds), full vs
#     Quest vs ClusterKV in the same run, and the clustering time (the
#     first step's ClusterKeys device time) as a fraction of the prefill.
# STRATA_PYTHON (default python3) draws the plot when it has matplotlib.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
strata=.gpu/bin/strata
for layers in 2 0; do
  $strata bench kv-policies --backend cuda --model models/retrieval-llama --full-layers $layers \
    --json "$out/kv_policies_fl$layers.json" > "$out/kv_policies_fl$layers.txt" 2> "$out/kv_policies_fl$layers.err"
  echo "--- retrieval, full_layers $layers (rc $?)"
  cat "$out/kv_policies_fl$layers.txt"
done
${STRATA_PYTHON:-python3} bench/plot_kv_accuracy.py "$out/kv_policies_fl2.json" "$out/kv_policies_fl0.json" \
  "$out/kv_accuracy.png" || echo "(no plot)"
echo "--- decode at 32k, llama-3-8b shape"
$strata bench kv-speed --backend cuda --dummy-weights llama-3-8b --context 32768 --batch 1,8,12 \
  --budgets 1024,2048 --policies full,quest,clusterkv --json "$out/kv_speed.json" 2> "$out/kv_speed.err" \
  | tee "$out/kv_speed.txt"
