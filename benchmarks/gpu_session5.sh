#!/usr/bin/env bash
# Session 5, one device call: the GPU test suite, then first-call compile time
# (with cProfile, ours and torch flex) for noop and causal.
#   PARTS="tests compile" bash benchmarks/gpu_session5.sh
# Logs, tables and profiles go to $OUT. The grid is run_suite.sh's job.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for part in ${PARTS:-tests compile}; do
  case "$part" in
    tests)
      timeout ${TEST_TIMEOUT:-330} python3 -m pytest tests -q -n 14 -p no:cacheprovider \
        >"$OUT/tests.log" 2>&1
      echo "tests exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -15
      ;;
    compile)
      BENCH_COMPILE_PROFILE=$OUT/prof timeout 200 python3 benchmarks/bench_compile.py \
        --variants noop,causal --mode fwd,fwdbwd 2>&1 | tail -8
      ;;
  esac
done
