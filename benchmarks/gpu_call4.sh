#!/usr/bin/env bash
# Session 4, device call 4: the GPU tests of the kernels, then the grid
# (continued in the next call through PREV_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 180 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_forward_kernel.py \
  tests/test_backward_kernel.py tests/test_decode.py tests/test_template_options.py \
  tests/test_captured_scalars.py tests/test_codegen_facts.py >"$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -15
SUITE_BUDGET=${SUITE_BUDGET:-330} CELL_MAX=60 PREV_DIR=${PREV_DIR:-/nonexistent} \
  bash benchmarks/run_suite.sh ${PARTS:-grid} >/dev/null 2>&1
grep '^|' "$OUT/summary.md" | head -80
