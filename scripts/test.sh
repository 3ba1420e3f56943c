#!/usr/bin/env bash
# Runs every test: installs packages, builds, fuzzes the parsers for a bounded time, then CTest
# (unit, integration and the benchmark smoke run). Ends with CTest's summary; exits non-zero if
# anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
# The parser and the expression evaluator under libFuzzer: a fixed seed and input count (see
# fuzz.sh), with 60 s per target as a cap that a loaded machine may reach first.
bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
BUILD_DIR=${BUILD_DIR:-build}
cd "$BUILD_DIR"
ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 900
