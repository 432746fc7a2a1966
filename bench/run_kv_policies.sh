#!/usr/bin/env bash
# Runs the KV-policy benchmarks on a GPU machine from a tools/gpu-bundle.sh
# bundle, results (tables, JSON, the accuracy plot) into the folder given as
# the first argument (default ./gpu-out); a second argument `accuracy` skips
# the speed part:
#   - task accuracy and attention fidelity of models/retrieval-llama (and
#     models/frequent-llama once trained) per policy and budget, with the
#     first 2 layers dense (the ClusterKV paper's setting) and with every
#     layer sparse;
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
# Every bundled task model: retrieval-llama (one passkey) and frequent-llama
# (the most frequent of many scattered values), each with the question
# prefilled with the context (q0) and with the question fed through decode
# steps after the context was summarised (q1, --query-in-decode 1).
for model in models/retrieval-llama models/frequent-llama; do
  [ -f "$model/eval.jsonl" ] || continue
  name=$(basename "$model")
  for q in 0 1; do
    for layers in 2 0; do
      tag="${name%-llama}_q${q}_fl$layers"
      $strata bench kv-policies --backend cuda --model "$model" --full-layers $layers --query-in-decode $q \
        --json "$out/kv_policies_$tag.json" > "$out/kv_policies_$tag.txt" 2> "$out/kv_policies_$tag.err"
      echo "--- $name, query in decode $q, full_layers $layers (rc $?)"
      cat "$out/kv_policies_$tag.txt"
    done
    ${STRATA_PYTHON:-python3} bench/plot_kv_accuracy.py "$out/kv_policies_${name%-llama}_q${q}_fl2.json" \
      "$out/kv_policies_${name%-llama}_q${q}_fl0.json" "$out/kv_accuracy_${name%-llama}_q$q.png" || echo "(no plot)"
  done
done
[ "${2:-}" = accuracy ] && exit 0
echo "--- decode at 32k, llama-3-8b shape"
$strata bench kv-speed --backend cuda --dummy-weights llama-3-8b --context 32768 --batch 1,8,12 \
  --budgets 1024,2048 --policies full,quest,clusterkv --json "$out/kv_speed.json" 2> "$out/kv_speed.err" \
  | tee "$out/kv_speed.txt"
