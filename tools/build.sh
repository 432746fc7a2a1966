#!/usr/bin/env bash
# Sets up the dependencies and builds strata (Release) into build/ (or
# $STRATA_BUILD_DIR).
# The CUDA backend is built when nvcc is found (/usr/local/cuda or PATH).
# Extra arguments go to CMake, e.g. -DSTRATA_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/strata-ccache}
build=${STRATA_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
