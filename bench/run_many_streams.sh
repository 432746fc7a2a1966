#!/usr/bin/env bash
# Many concurrent streams on one `strata serve`: memory, threads and router
# overhead while `strata bench serve` keeps C streams open (closed loop).
#
#   bash bench/run_many_streams.sh [CONCURRENCY] [SECONDS] [OUT_DIR]
#
# Defaults: 5000 streams for 60 s on the bundled tiny model (CPU backend),
# output under ./many-streams-out. Needs a built tree (tools/build.sh).
# Prints, every 5 s, the server's resident memory, thread count, open
# streams and requests in flight, then the router overhead percentiles
# (request arrival to hand-off to the engine, from the server's
# strata_router_overhead_seconds histogram) and the client's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
concurrency=${1:-5000}
seconds=${2:-60}
out=${3:-many-streams-out}
strata=${STRATA_BIN:-build/cli/strata}
mkdir -p "$out"

# Each stream is a socket on both sides.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"$strata" serve --model models/tiny-llama --host 127.0.0.1 --port 0 --metrics-port 0 \
  --threads 1 --max-context 512 --max-seqs 64 --max-in-flight $((concurrency * 2)) \
  --grace-seconds 5 > "$out/serve.out" 2> "$out/serve.err" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 150); do grep -qs "listening on" "$out/serve.out" && break; sleep 0.2; done
address=$(sed -n 's/.*listening on \([^ ]*\) .*/\1/p' "$out/serve.out")
metrics=$(sed -n 's/.*metrics on \([^ ]*\).*/\1/p' "$out/serve.out")
[ -n "$address" ] || { echo "server did not start"; cat "$out/serve.err"; exit 1; }

sample() {
  local rss threads m
  rss=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
  threads=$(awk '/Threads/ {print $2}' /proc/$server/status)
  m=$(curl -s "http://$metrics/metrics" || true)
  printf "%s rss_mib=%d threads=%d in_flight=%s waiting=%s\n" "$1" $((rss / 1024)) "$threads" \
    "$(echo "$m" | awk '/^strata_requests_in_flight / {print $2}')" \
    "$(echo "$m" | awk '/^strata_requests_waiting / {print $2}')"
}
sample "t=0s(idle)" | tee "$out/samples.txt"

"$strata" bench serve --server "$address" --concurrency "$concurrency" --duration "$seconds" \
  --input-len 16 --output-len 32 --request-timeout 600 --channels 8 --quiet \
  --json "$out/bench.json" > "$out/bench.txt" 2>&1 &
client=$!
for t in $(seq 5 5 "$seconds"); do
  sleep 5
  kill -0 $client 2>/dev/null || break
  sample "t=${t}s" | tee -a "$out/samples.txt"
done
wait $client || true
sample "after" | tee -a "$out/samples.txt"

curl -s "http://$metrics/metrics" > "$out/metrics.txt"
python3 - "$out/metrics.txt" <<'PY'
import re, sys
buckets = []
for line in open(sys.argv[1]):
    m = re.match(r'strata_router_overhead_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
    if m:
        buckets.append((float('inf') if m.group(1) == '+Inf' else float(m.group(1)), float(m.group(2))))
total = buckets[-1][1]
def quantile(q):
    want, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= want:
            if le == float('inf'):
                return prev_le, prev_le, le
            return prev_le + (le - prev_le) * (want - prev_n) / max(n - prev_n, 1), prev_le, le
        prev_le, prev_n = le, n
for q in (0.5, 0.9, 0.99, 0.999):
    v, lo, hi = quantile(q)
    print(f"router overhead p{q*100:g}: {v*1e6:.0f} us (bucket {lo*1e6:.0f}-{hi*1e6:.0f} us)")
print(f"requests admitted: {int(total)}")
PY
tail -n 25 "$out/bench.txt"
