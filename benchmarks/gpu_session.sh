#!/usr/bin/env bash
# One device call, several parts, everything under $OUT (the device tool
# brings back at most eight files):
#
#   PARTS="tests compile ab grid" bash benchmarks/gpu_session.sh
#
#   tests    the GPU test suite, or the pytest arguments in $TEST_ARGS -> tests.log
#   compile  first-call compile time, ours and torch flex, with cProfile
#            (COMPILE_VARIANTS, default noop,causal) -> compile.log, prof/
#   ab       benchmarks/ab_options.py once per line of the file $AB_FILE (each
#            line its shell-quoted arguments; tags ab1, ab2, ...) -> ab<N>.md
#   grid     benchmarks/run_suite.sh $SUITE_PARTS (default grid) -> results.csv,
#            summary.md
#   host     benchmarks/host_overhead.py (host vs GPU time per call) -> host.log
# Each part has its own time limit (TEST_TIMEOUT, COMPILE_TIMEOUT, AB_TIMEOUT;
# the grid has SUITE_BUDGET), so that one slow part cannot eat the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
for part in ${PARTS:-tests compile}; do
  start=$SECONDS
  case "$part" in
    tests)
      # shellcheck disable=SC2086  # TEST_ARGS is a list of pytest arguments
      timeout "${TEST_TIMEOUT:-330}" python3 -m pytest ${TEST_ARGS:-tests} -q -n "${WORKERS:-14}" \
        -p no:cacheprovider >"$OUT/tests.log" 2>&1
      echo "tests exit $?"
      grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -15
      ;;
    compile)
      mkdir -p "$OUT/prof"
      BENCH_COMPILE_PROFILE=$OUT/prof timeout "${COMPILE_TIMEOUT:-200}" python3 \
        benchmarks/bench_compile.py --variants "${COMPILE_VARIANTS:-noop,causal}" \
        --mode fwd,fwdbwd 2>&1 | tee "$OUT/compile.log" | grep -E "^\||first|error" | tail -12
      ;;
    ab)
      n=0
      while IFS= read -r run; do
        [ -z "$run" ] && continue
        n=$((n + 1))
        eval "set -- $run"
        timeout "${AB_TIMEOUT:-200}" python3 benchmarks/ab_options.py --tag "ab$n" "$@" 2>&1 \
          | grep '^|' || echo "ab$n exit ${PIPESTATUS[0]}"
      done <"${AB_FILE:?ab needs AB_FILE}"
      ;;
    grid)
      PREV_DIR=${PREV_DIR:-/nonexistent} bash benchmarks/run_suite.sh ${SUITE_PARTS:-grid} \
        >/dev/null 2>&1
      echo "suite exit $?"
      grep '^|' "$OUT/summary.md" | head -90
      ;;
    host)
      timeout "${HOST_TIMEOUT:-60}" python3 benchmarks/host_overhead.py 2>&1 | tee "$OUT/host.log" \
        | grep -E '^\||^    '
      ;;
  esac
  echo "### $part took $((SECONDS - start)) s"
done
