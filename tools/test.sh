#!/usr/bin/env bash
# Sets up, builds, and runs every test. GPU tests (ctest label "gpu") skip
# themselves on machines without a GPU. Then the checks that catch what
# review misses: the formatting of every source, the CPU suite again under
# AddressSanitizer + UndefinedBehaviorSanitizer (tools/sanitize.sh), and
# each libFuzzer target for a bounded time from its committed corpus
# (tools/fuzz.sh; STRATA_FUZZ_SECONDS per target, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
bash tools/check_format.sh
bash tools/check_deploy.sh
(cd build && ctest --output-on-failure -j "$(nproc)" --timeout 900)
bash tools/sanitize.sh
bash tools/fuzz.sh "${STRATA_FUZZ_SECONDS:-60}"
