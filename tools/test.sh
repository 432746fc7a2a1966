#!/usr/bin/env bash
# Sets up, builds, and runs every test. GPU tests (ctest label "gpu") skip
# themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
cd build
ctest --output-on-failure -j "$(nproc)" --timeout 900
