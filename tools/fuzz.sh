#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (in the sanitizer build,
# build-asan/, shared with tools/sanitize.sh) and runs each for a bounded time
# from a copy of its seed corpus (tests/fuzz/corpus/<target>/), so the source
# tree is never written. Fails when any target finds a crash, leak, timeout or
# out-of-memory input; the reproducer is kept under
# $STRATA_FUZZ_ARTIFACTS (default build-asan/fuzz-artifacts/) and the
# target's log is printed.
#
#   tools/fuzz.sh [seconds-per-target [target...]]   # default: 60 s, every target
#
# Targets run side by side, as many at once as there are cores.
# Reproduce a finding with: build-asan/tests/fuzz/<target> <reproducer file>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_fuzzer model_config_fuzzer tokenizer_json_fuzzer tokenizer_encode_fuzzer
    profile_fuzzer request_conversion_fuzzer kv_block_fuzzer kv_wire_fuzzer)
fi

build=${STRATA_ASAN_BUILD_DIR:-build-asan}
bash tools/sanitize.sh build strata_fuzzers

artifacts=${STRATA_FUZZ_ARTIFACTS:-$build/fuzz-artifacts}
mkdir -p "$artifacts"
artifacts=$(cd "$artifacts" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export ASAN_OPTIONS=detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

run_target() {
  local target=$1
  local corpus=$work/corpus/$target
  mkdir -p "$corpus"
  cp -r "tests/fuzz/corpus/$target/." "$corpus/"
  local dict=()
  [ -f "tests/fuzz/$target.dict" ] && dict=("-dict=tests/fuzz/$target.dict")
  local rc=0
  "$build/tests/fuzz/$target" "${dict[@]}" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -timeout=10 -print_final_stats=1 -artifact_prefix="$artifacts/$target-" "$corpus" \
    >"$work/$target.log" 2>&1 || rc=$?
  echo "$rc" >"$work/$target.rc"
}

for target in "${targets[@]}"; do
  [ -x "$build/tests/fuzz/$target" ] || { echo "fuzz: no target $target" >&2; exit 2; }
done
failed=()
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n || true; done
  run_target "$target" &
done
wait
for target in "${targets[@]}"; do
  if [ "$(cat "$work/$target.rc")" = 0 ]; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$target.log" | grep -o '[0-9]*$' || true)
    echo "fuzz: $target ok (${runs:-?} runs in ${seconds} s)"
  else
    failed+=("$target")
    echo "fuzz: $target FAILED; its log:" >&2
    tail -n 80 "$work/$target.log" >&2
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${failed[*]} failed; reproducers in $artifacts" >&2
  exit 1
fi
