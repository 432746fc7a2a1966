#!/usr/bin/env bash
# Runs the GPU runtime benchmark (strata_kernel_bench) and its PyTorch peer
# (sdpa_peer.py) on a GPU machine, from a bundle made by tools/gpu-bundle.sh.
# Usage: bench/run_kernels.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
# The Python with PyTorch and transformers for the peer: $STRATA_PYTHON, else python3.
py=${STRATA_PYTHON:-python3}
PYTHONUNBUFFERED=1 "$py" bench/sdpa_peer.py > "$out/peer.jsonl" 2> "$out/peer.err" || tail -5 "$out/peer.err"
.gpu/bin/strata_kernel_bench | tee "$out/strata.jsonl" | grep -v '^{'
echo "--- peer (PyTorch)"
cat "$out/peer.jsonl"
