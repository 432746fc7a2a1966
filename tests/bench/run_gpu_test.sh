#!/usr/bin/env bash
# bench/run_gpu.sh's exit status, without a GPU: the script runs in a copy
# of its bundle layout whose test binaries, nvidia-smi and strata are
# stand-in scripts, once with every test passing and once with each kind of
# failure. Usage: run_gpu_test.sh SOURCE_DIR
set -euo pipefail
src=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$work/bench" "$work/.gpu/bin" "$work/bin" "$work/models/tiny-llama"
cp "$src/bench/run_gpu.sh" "$work/bench/"
cat > "$work/bin/nvidia-smi" <<'SH'
#!/usr/bin/env bash
echo "stand-in GPU, 0, 0 MiB, 0 MHz"
SH
# strata: `serve` announces a port and waits for SIGTERM; `generate` prints
# the same tokens locally and from the server unless told otherwise.
cat > "$work/.gpu/bin/strata" <<'SH'
#!/usr/bin/env bash
if [ "$1" == serve ]; then
  echo "strata serve: listening on 127.0.0.1:1 metrics on 127.0.0.1:2"
  trap 'exit 0' TERM
  while true; do sleep 0.05; done
fi
if [[ " $* " == *" --server "* ]] && [ -n "${STAND_IN_SERVE_DIFFERS:-}" ]; then
  echo '{"token_id": 9}'
else
  echo '{"token_id": 1}'
fi
echo '{"summary": {}}'
SH
for t in strata_cuda_tests strata_engine_tests; do
  cat > "$work/.gpu/bin/$t" <<SH
#!/usr/bin/env bash
if [ "\${STAND_IN_FAIL:-}" == "$t" ]; then echo "[  FAILED  ] 1 test"; exit 1; fi
echo "[  PASSED  ] 3 tests."
SH
done
chmod +x "$work/bin/"* "$work/.gpu/bin/"*

run() { (cd "$work" && PATH="$work/bin:$PATH" bash bench/run_gpu.sh "$work/out" > "$work/log" 2>&1); }
run || fail "all passing, yet run_gpu.sh exited $? ($(tail -3 "$work/log"))"
STAND_IN_FAIL=strata_cuda_tests run && fail "a failing cuda test, yet run_gpu.sh exited 0"
grep -q "FAILED: cuda tests" "$work/log" || fail "the summary does not name the cuda tests"
STAND_IN_FAIL=strata_engine_tests run && fail "a failing engine test, yet run_gpu.sh exited 0"
STAND_IN_SERVE_DIFFERS=1 run && fail "served tokens differ, yet run_gpu.sh exited 0"
echo "run_gpu.sh exit status: ok"
