#!/usr/bin/env bash
# Builds the libFuzzer targets with clang into build-fuzz and runs each one.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# By default the run is repeatable: a fixed seed (FUZZ_SEED, default 1) and a fixed number of
# inputs (FUZZ_RUNS, default 300000), with SECONDS_PER_TARGET only as a cap for slow machines. The
# same commit then gets the same verdict in CI, and a failure is a finding anyone can replay, not
# luck. To explore new inputs, as a developer should before changing a parser:
#   FUZZ_SEED=0 FUZZ_RUNS=-1 bash scripts/fuzz.sh 900     (seed 0: a random one; -1: no count)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
FUZZ_SEED=${FUZZ_SEED:-1}
FUZZ_RUNS=${FUZZ_RUNS:-300000}
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
  echo "fuzz: $target, seed $FUZZ_SEED, $FUZZ_RUNS inputs, at most ${SECONDS_PER_TARGET}s"
  status=0
  # Crash, timeout and out-of-memory reproducers go to build-fuzz/artifacts/.
  mkdir -p "$BUILD/artifacts"
  "$BUILD/tests/fuzz/$target" -seed="$FUZZ_SEED" -runs="$FUZZ_RUNS" -max_total_time="$SECONDS_PER_TARGET" \
    -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/" \
    "$work" > "$work.log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^SUMMARY|ERROR: libFuzzer|Test unit written" "$work.log" || true
  if [ "$status" -ne 0 ]; then
    # The reproducer itself, so that a failure on a CI machine can be replayed from its log:
    #   echo '<base64>' | base64 -d > input && build-fuzz/tests/fuzz/<target> input
    sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$work.log" | while read -r unit; do
      echo "fuzz: the input, base64 ($(stat -c %s "$unit") bytes):"
      head -c 65536 "$unit" | base64 -w 0
      echo
    done
  fi
  rm -rf "$work" "$work.log"
  if [ "$status" -ne 0 ]; then echo "fuzz: $target found a failure (exit $status)" >&2; exit 1; fi
done
echo "fuzz: no failures"
