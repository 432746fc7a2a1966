#!/usr/bin/env bash
# Sets up and builds strata, starts `strata serve` on the bundled tiny model,
# streams a completion through the gRPC client, and stops the server.
# Usage: tools/quickstart.sh [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
strata=./build/cli/strata

log=$(mktemp)
"$strata" serve --model models/tiny-llama --host 127.0.0.1 --port 0 --metrics-port 0 >"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
address=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$log")
[ -n "$address" ] || { echo "strata serve did not start" >&2; exit 1; }
echo "strata serve is listening on $address ($(sed -n 's/.*\(metrics on [^ ]*\).*/\1/p' "$log"))" >&2

"$strata" generate --server "$address" --prompt "${1:-Return the number of}" --max-tokens 48

kill -TERM "$server"
wait "$server"
