#!/usr/bin/env bash
# Builds strata with AddressSanitizer (with LeakSanitizer) and
# UndefinedBehaviorSanitizer, using Debian's clang and no CUDA, into
# build-asan/ (or $STRATA_ASAN_BUILD_DIR), and runs the CPU tests there. Any
# sanitizer report fails the test that triggered it.
#
#   tools/sanitize.sh              # unit tests + the server integration tests
#   tools/sanitize.sh unit         # unit tests only
#   tools/sanitize.sh full         # also cli.generate (its model benchmark
#                                  # runs for minutes under the sanitizers)
#   tools/sanitize.sh build [T]    # configure and build only (target T, default all)
#
# The same build holds the libFuzzer targets (STRATA_FUZZ=ON), so
# tools/fuzz.sh afterwards only links those. -O1 with line tables keeps the
# build and the tests quick, with assertions on (no NDEBUG).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case "$what" in
  all | unit | full | build) ;;
  *)
    echo "usage: $0 [all|unit|full|build [target]]" >&2
    exit 2
    ;;
esac

bash tools/setup.sh
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/strata-ccache}
build=${STRATA_ASAN_BUILD_DIR:-build-asan}
CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
  -DSTRATA_CUDA=OFF -DSTRATA_SANITIZE=ON -DSTRATA_FUZZ=ON >/dev/null
if [ "$what" = build ]; then
  cmake --build "$build" -j "$(nproc)" --target "${2:-all}"
  exit 0
fi
cmake --build "$build" -j "$(nproc)"

# Reports go to files, so those of the `strata serve` processes the
# integration tests start (whose stderr the tests do not show) are seen too;
# any report fails the run, after ctest has listed what failed.
logs=$(cd "$build" && pwd)/sanitizer-logs
rm -rf "$logs"
mkdir -p "$logs"
export ASAN_OPTIONS=detect_leaks=1:log_path=$logs/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan
cd "$build"
status=0
ctest --output-on-failure -j "$(nproc)" --timeout 900 -L unit || status=1
case "$what" in
  all) ctest --output-on-failure -j "$(nproc)" --timeout 900 -L integration -E '^cli\.generate$' ||
    status=1 ;;
  full) ctest --output-on-failure -j "$(nproc)" --timeout 900 -L integration || status=1 ;;
esac
if compgen -G "$logs/*" >/dev/null; then
  for f in "$logs"/*; do
    echo "=== sanitizer report $f" >&2
    cat "$f" >&2
  done
  status=1
fi
exit $status
