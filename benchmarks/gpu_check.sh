#!/usr/bin/env bash
# Everything we check on the GPU machine, in one call (device time is scarce).
#
#   bash benchmarks/gpu_check.sh [tests] [demo] [bench ARGS...]
#
# With no arguments it runs all three stages with default arguments. Logs and
# the benchmark CSV go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests demo bench)
status=0
i=0
while [ $i -lt ${#stages[@]} ]; do
  stage=${stages[$i]}
  case "$stage" in
    tests)
      timeout ${TEST_TIMEOUT:-420} python3 -m pytest tests -q -n ${WORKERS:-8} -p no:cacheprovider \
        2>&1 | tee "$OUT/tests.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    demo)
      timeout 300 python3 -m flex_inductor.demo 2>&1 | tee "$OUT/demo.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    bench)
      # Everything after "bench" is the benchmark's own arguments.
      args=("${stages[@]:$((i + 1))}")
      timeout ${BENCH_TIMEOUT:-480} python3 benchmarks/bench_attention.py "${args[@]}" 2>&1 \
        | tee "$OUT/bench.log" | grep -v "^W1\|warn" | tail -80
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      break
      ;;
  esac
  i=$((i + 1))
done
exit $status
