#!/usr/bin/env bash
# The benchmark suite of issue 7, in one command, on the GPU machine:
#
#   bash benchmarks/run_suite.sh [part ...]   # parts: grid sweep decode compile blockmask plot
#
# With no part it runs them all. Everything goes to ${OUT:-out}/ (six files, under
# the device tool's limit of eight):
#   results.csv    attention cells (grid, sweep) and cold compile times, one row per
#                  implementation, flushed after every cell
#   blockmask.csv  create_block_mask time and memory
#   summary.md     the markdown tables (decode, block mask, then grid, sweep, compile)
#   suite.log      everything printed
#   perf_seq_sweep_fwd.png, perf_seq_sweep_fwdbwd.png
#
# Time: no new cell starts after SUITE_BUDGET seconds (default 400) from the start
# of this script, so that a call fits in 9 minutes; each cell is written as soon as
# it is measured. To go on where a call stopped, put the results.csv files of
# earlier calls (any names) in PREV_DIR (default bench_prev/ in the repository, so
# that it travels with the working tree) and run the same command again: the cells
# found there are skipped, and the plot and the tables use them too.
#
# Knobs (environment): SUITE_BUDGET, PREV_DIR, VARIANTS (grid, default all),
# SHAPES (grid, default all), SWEEP_VARIANTS (default all), SEQ_LENS (default 1024,...,32768), MODES (default
# fwd,fwdbwd), COMPILE_VARIANTS, DECODE_KV, BLOCKMASK_LENGTHS (space separated).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUITE_BUDGET=${SUITE_BUDGET:-400}
# The longest single cell (4 implementations, two compiled forward+backward
# graphs): a part is killed at its budget plus this.
CELL_MAX=${CELL_MAX:-150}
PREV_DIR=${PREV_DIR:-bench_prev}
RESULTS="$OUT/results.csv"
SUMMARY="$OUT/summary.md"
LOG="$OUT/suite.log"
PART_LOG=/tmp/run_suite_part.log
ALL_PARTS=(grid sweep decode compile blockmask plot)
status=0

remaining() { echo $((SUITE_BUDGET - SECONDS)); }

# run_timed NAME CMD...: runs CMD (output also in PART_LOG), killed at the remaining
# budget plus one cell; not started once the budget is spent.
run_timed() {
  local name=$1 left rc
  shift
  left=$(remaining)
  : >"$PART_LOG"
  if [ "$left" -le 10 ]; then
    echo "### $name: not started, the budget of ${SUITE_BUDGET}s is spent"
    return
  fi
  echo "### $name (${left}s of budget left)"
  timeout --signal=TERM --kill-after=20 $((left + CELL_MAX)) "$@" 2>&1 | tee "$PART_LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "### $name: exit code $rc"
    status=1
  fi
}

# attention NAME ARGS...: bench_attention with the options every attention part shares.
attention() {
  local name=$1
  shift
  run_timed "$name" python3 benchmarks/bench_attention.py "$@" --mode "${MODES:-fwd,fwdbwd}" \
    --csv "$RESULTS" --append --skip-done "$DONE_CSVS" --time-budget "$(remaining)"
}

# summarise TITLE: appends the markdown table lines of the last part to the summary.
summarise() {
  { printf '## %s\n\n' "$1"; grep '^|' "$PART_LOG"; echo; } >>"$SUMMARY"
}

main() {
  local parts=("$@") prev=() csvs=() f
  [ ${#parts[@]} -eq 0 ] && parts=("${ALL_PARTS[@]}")

  python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/run_suite_install.log 2>&1 \
    || { cat /tmp/run_suite_install.log; return 1; }
  python3 -c 'import torch, triton
print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| triton", triton.__version__)'

  # Earlier results: cells to skip, and rows for the plot and the tables.
  if [ -d "$PREV_DIR" ]; then
    while IFS= read -r f; do
      head -1 "$f" | grep -q '^gpu,torch,triton,flex_inductor' && prev+=("$f")
    done < <(find "$PREV_DIR" -maxdepth 1 -name '*.csv' | sort)
  fi
  DONE_CSVS=$(IFS=,; echo "${prev[*]}${prev[*]:+,}$RESULTS")
  echo "parts: ${parts[*]} | budget ${SUITE_BUDGET}s | earlier results: ${prev[*]:-none}"

  for part in "${parts[@]}"; do
    case "$part" in
      grid)
        attention grid --shapes "${SHAPES:-all}" --variants "${VARIANTS:-all}"
        ;;
      sweep)
        attention sweep --sweep --seq-lens "${SEQ_LENS:-1024,2048,4096,8192,16384,32768}" \
          --variants "${SWEEP_VARIANTS:-all}"
        ;;
      decode)
        run_timed decode python3 benchmarks/bench_decode.py --kv "${DECODE_KV:-4096,32768,131072}"
        summarise "Decode (B8, Hq32, Hkv8, D128, bf16, one query token)"
        ;;
      compile)
        run_timed compile python3 benchmarks/bench_compile.py \
          --variants "${COMPILE_VARIANTS:-noop,causal,softcap+causal,document}" \
          --csv "$RESULTS" --append --skip-done "$DONE_CSVS" --time-budget "$(remaining)"
        ;;
      blockmask)
        # shellcheck disable=SC2086  # BLOCKMASK_LENGTHS is a space-separated list
        run_timed blockmask python3 benchmarks/block_mask_bench.py --device cuda \
          ${BLOCKMASK_LENGTHS:+--lengths $BLOCKMASK_LENGTHS} --csv "$OUT/blockmask.csv"
        summarise "create_block_mask (document mask, random lengths, block 128)"
        ;;
      plot)
        csvs=("${prev[@]}")
        [ -f "$RESULTS" ] && csvs+=("$RESULTS")
        if [ ${#csvs[@]} -eq 0 ]; then
          echo "### plot: no results yet"
          continue
        fi
        echo "### plot"
        python3 benchmarks/plot_results.py "${csvs[@]}" --out "$OUT/perf_seq_sweep_{mode}.png" \
          >>"$SUMMARY" || status=1
        ;;
      *)
        echo "unknown part: $part (parts: ${ALL_PARTS[*]})"
        status=1
        ;;
    esac
  done

  echo
  echo "=================== summary (${SECONDS}s) ==================="
  [ -f "$SUMMARY" ] && grep -v '^wrote ' "$SUMMARY"
  return $status
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
