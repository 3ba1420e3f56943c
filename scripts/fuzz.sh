#!/usr/bin/env bash
# Builds the libFuzzer targets with clang into build-fuzz and runs each for a bounded time.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-30}
BUILD=build-fuzz
if [ ! -f "$BUILD/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSR_FUZZ=ON > /dev/null
fi
ninja -C "$BUILD" step_file_fuzzer expression_fuzzer
for target in step_file_fuzzer expression_fuzzer; do
  case "$target" in
    step_file_fuzzer) seeds=tests/fuzz/corpus/steps ;;
    expression_fuzzer) seeds=tests/fuzz/corpus/expressions ;;
  esac
  work=$(mktemp -d)
  cp "$seeds"/* "$work"/
  echo "fuzz: $target for ${SECONDS_PER_TARGET}s"
  status=0
  # Crash, timeout and out-of-memory reproducers go to build-fuzz/artifacts/.
  mkdir -p "$BUILD/artifacts"
  "$BUILD/tests/fuzz/$target" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/" "$work" > "$work.log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^SUMMARY|ERROR: libFuzzer|Test unit written" "$work.log" || true
  rm -rf "$work" "$work.log"
  if [ "$status" -ne 0 ]; then echo "fuzz: $target found a failure (exit $status)" >&2; exit 1; fi
done
echo "fuzz: no failures"
