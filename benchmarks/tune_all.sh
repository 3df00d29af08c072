#!/usr/bin/env bash
# Autotune several (variant, shape, mode) cells in one device call.
#
#   bash benchmarks/tune_all.sh "VARIANT SHAPE MODE [extra tune_configs args]" ...
#
# e.g. bash benchmarks/tune_all.sh "alibi 4,16,16,8192,128 fwd" "noop 4,16,16,8192,128 bwd"
# Each job runs benchmarks/tune_configs.py in a fresh process with its own
# Inductor cache (so nothing tuned earlier is reused) and a time limit
# (JOB_TIMEOUT, default 150 s). Full logs go to $OUT/tune_<n>.log; the
# condensed AUTOTUNE reports (benchmarks/autotune_summary.py) are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
n=0
for job in "$@"; do
  n=$((n + 1))
  read -r variant shape mode extra <<<"$job"
  log="$OUT/tune_$n.log"
  echo "### job $n: $variant $shape $mode ${extra:-}"
  # shellcheck disable=SC2086
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "${JOB_TIMEOUT:-150}" \
    python3 benchmarks/tune_configs.py --variant "$variant" --shape "$shape" --mode "$mode" \
    ${extra:-} >"$log" 2>&1
  echo "exit $?"
  # The five fastest candidates of each kernel.
  python3 benchmarks/autotune_summary.py "$log" | awk '/^AUTOTUNE/{k=0; print; next} /^  /{if (k++ < 5) print; next} {print}' | head -30
done
