#!/usr/bin/env bash
# The KV transfer between two processes, `strata bench transfer`, against
# UCX's own benchmark, ucx_perftest (Debian's ucx-utils), with the same
# sizes, message counts, messages in flight and UCX transport, in the same
# run. Both sides run on this host, over loopback.
#
# Which transport: strata's endpoints ask for peer-failure handling
# (UCP_ERR_HANDLING_MODE_PEER), and UCX 1.13 then leaves out the transports
# that cannot detect a failed peer (shared memory, CMA), so two strata
# processes on one host talk over TCP loopback. The comparison therefore
# runs with UCX_TLS=tcp for both and ucx_perftest with -e (error handling
# endpoints, as strata's). ucx_perftest runs twice per size: polling (its
# default: the worker is progressed in a busy loop) and sleeping on the
# worker's event fd (-I -E sleep: what strata's progress thread does). The
# ratio is against the faster of the two. For reference only, ucx_perftest
# also runs with the default UCX_TLS and no error handling (shared memory
# and CMA on one host: what strata cannot use today).
#
# strata runs twice per round: as KV moves (the sender cycles through
# WINDOW slots, the receiver lands in 2 x WINDOW: distinct memory, as KV
# pages are) and with --one-buffer (one buffer on each side, which is what
# ucx_perftest does: cache-warm). Each has its ratio to ucx_perftest.
#
# ucx_perftest's ucp_am_bw: -s SIZE -n COUNT -w WARMUP -O WINDOW -H 64 (a
# 64-byte header, the KV block header's size) -z (registered memory, as
# strata registers its rings). Its bandwidth column is MiB/s; it is
# converted to GB/s (1e9 bytes/s) here, as strata reports.
#
# Usage: bench/run_transfer.sh [STRATA_BINARY]   (default build/cli/strata)
# Environment: SIZES (16K,64K,256K,1M,2M,4M), GIB per size (1), WINDOW (16),
# ROUNDS (3: each cell is the median of the rounds), PORT (the first of the
# TCP ports ucx_perftest uses, 13340), UCX_PERFTEST (ucx_perftest), JSON (a
# file to write the results to as JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
strata=${1:-build/cli/strata}
sizes=${SIZES:-16K,64K,256K,1M,2M,4M}
gib=${GIB:-1}
window=${WINDOW:-16}
rounds=${ROUNDS:-3}
port=${PORT:-13340}
perftest=${UCX_PERFTEST:-ucx_perftest}
command -v stdbuf >/dev/null || { echo "no stdbuf (coreutils)" >&2; exit 1; }
command -v "$perftest" >/dev/null || { echo "no $perftest (Debian: apt-get install ucx-utils)" >&2; exit 1; }
[[ -x $strata ]] || { echo "no strata binary at $strata" >&2; exit 1; }
tmp=$(mktemp -d)
server=""
trap '[[ -n "$server" ]] && kill "$server" 2>/dev/null; rm -rf "$tmp"' EXIT

bytes_of() {  # 16K -> 16384
  local v=${1^^}
  case $v in
    *K) echo $(( ${v%K} << 10 )) ;;
    *M) echo $(( ${v%M} << 20 )) ;;
    *G) echo $(( ${v%G} << 30 )) ;;
    *) echo "$v" ;;
  esac
}
count_of() { python3 -c "print(max(1, int($gib * 2**30) // $1))"; }

# One ucx_perftest server and client; sets bw to the client's overall MiB/s
# (the sixth column of its final CSV line). Not in a subshell: it moves on
# to a fresh port each time, and the trap must see the server.
perftest_bw() {
  local size=$1 count=$2; shift 2
  local args=(-t ucp_am_bw -s "$size" -n "$count" -w $((2 * window)) -O "$window" -H 64 -z -f -v "$@")
  port=$((port + 1))
  # Line-buffered, so that its "Waiting for connection" shows at once (and
  # not the last server's: the file goes first).
  rm -f "$tmp/server.txt"
  stdbuf -oL "$perftest" -p "$port" "${args[@]}" > "$tmp/server.txt" 2>&1 &
  server=$!
  for _ in $(seq 200); do grep -qs "Waiting for connection" "$tmp/server.txt" && break; sleep 0.05; done
  if ! timeout 300 "$perftest" 127.0.0.1 -p "$port" "${args[@]}" > "$tmp/client.txt" 2>&1; then
    echo "ucx_perftest failed ($*):" >&2
    cat "$tmp/client.txt" "$tmp/server.txt" >&2
    exit 1
  fi
  wait "$server" || true
  server=""
  bw=$(tail -1 "$tmp/client.txt" | awk -F, '{print $6}')
}

: > "$tmp/results.txt"
echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq "$rounds"); do
  echo "round $round of $rounds: strata bench transfer (UCX_TLS=tcp)" >&2
  UCX_TLS=tcp "$strata" bench transfer --sizes "$sizes" --gib "$gib" --window "$window" --json \
    > "$tmp/strata_$round.json"
  UCX_TLS=tcp "$strata" bench transfer --sizes "$sizes" --gib "$gib" --window "$window" --json \
    --one-buffer > "$tmp/strata_one_$round.json"
  for s in ${sizes//,/ }; do
    b=$(bytes_of "$s")
    n=$(count_of "$b")
    echo "round $round: ucx_perftest $s x $n" >&2
    UCX_TLS=tcp perftest_bw "$b" "$n" -e
    poll=$bw
    UCX_TLS=tcp perftest_bw "$b" "$n" -e -I -E sleep
    sleep_bw=$bw
    perftest_bw "$b" "$n"
    echo "$round $b $n $poll $sleep_bw $bw" >> "$tmp/results.txt"
  done
done

python3 - "$tmp" "$rounds" "$window" "${JSON:-}" <<'PY'
import json, statistics, sys
tmp, rounds, window, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mib = 1048576 / 1e9  # ucx_perftest's MB/s is MiB/s
perf = {}
for line in open(f"{tmp}/results.txt"):
    _, b, n, poll, slp, shm = line.split()
    perf.setdefault(int(b), []).append((int(n), float(poll) * mib, float(slp) * mib, float(shm) * mib))
strata, one = {}, {}
for r in range(1, rounds + 1):
    for s in json.load(open(f"{tmp}/strata_{r}.json"))["sizes"]:
        strata.setdefault(s["bytes"], []).append(s["gbps"])
    for s in json.load(open(f"{tmp}/strata_one_{r}.json"))["sizes"]:
        one.setdefault(s["bytes"], []).append(s["gbps"])
med = statistics.median
def name(b):
    return f"{b >> 20} MiB" if b >= 1 << 20 and b % (1 << 20) == 0 else f"{b >> 10} KiB"
print(f"GB/s (1e9 bytes/s), median of {rounds} round(s), {window} messages in flight, loopback")
print("ratio: strata / the faster ucx_perftest over tcp; goal >= 0.85")
print(f"{'size':>8} {'messages':>9} {'strata':>8} {'strata':>8} {'perftest':>9} {'perftest':>9}"
      f" {'ratio':>6} {'ratio':>6} {'perftest':>10}")
print(f"{'':>8} {'':>9} {'rings':>8} {'1 buf':>8} {'tcp poll':>9} {'tcp sleep':>9}"
      f" {'rings':>6} {'1 buf':>6} {'shm (ref)':>10}")
rows = []
for b in sorted(perf):
    n = perf[b][0][0]
    st, st1 = med(strata[b]), med(one[b])
    poll = med(p[1] for p in perf[b])
    slp = med(p[2] for p in perf[b])
    shm = med(p[3] for p in perf[b])
    ratio, ratio1 = st / max(poll, slp), st1 / max(poll, slp)
    rows.append({"bytes": b, "messages": n, "strata_gbps": st, "strata_one_buffer_gbps": st1,
                 "perftest_tcp_poll_gbps": poll, "perftest_tcp_sleep_gbps": slp, "ratio": ratio,
                 "ratio_one_buffer": ratio1, "perftest_default_tls_gbps": shm,
                 "strata_rounds": strata[b], "strata_one_buffer_rounds": one[b],
                 "perftest_rounds": perf[b]})
    print(f"{name(b):>8} {n:>9} {st:>8.3f} {st1:>8.3f} {poll:>9.3f} {slp:>9.3f} {ratio:>6.2f}"
          f" {ratio1:>6.2f} {shm:>10.3f}")
if out:
    json.dump({"window": window, "rounds": rounds, "sizes": rows}, open(out, "w"), indent=2)
PY
