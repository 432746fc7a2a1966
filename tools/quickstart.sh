#!/usr/bin/env bash
# Sets up, builds, and generates text with the bundled tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
./build/cli/strata generate --model models/tiny-llama \
  --prompt "${1:-Return the number of}" --max-tokens 48
