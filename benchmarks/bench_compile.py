"""First-call compile time: flex_inductor vs torch flex_attention, each from cold.

Every (variant, mode, implementation) runs in a fresh Python process whose
Inductor and Triton caches point at a new empty folder, with Inductor's FX-graph,
AOTAutograd and autotuning caches off, so nothing compiled earlier helps. Inside
it, a trivial function is compiled first, so that loading Inductor and Triton
counts for neither library; then the clock runs from the first attention call
(forward, or forward and backward) to its synchronised result. The steady-state
time of the same call is reported beside it.

    python benchmarks/bench_compile.py                       # on a GPU
    python benchmarks/bench_compile.py --csv r.csv --append  # add rows to a results CSV
    python benchmarks/bench_compile.py --dry-run             # CPU, kernels interpreted

With ``BENCH_COMPILE_PROFILE=<dir>`` each first call runs under cProfile and
its largest cumulative times go to ``<dir>/<impl>-<variant>-<mode>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SHAPE = "B2-H8-S2048-D64"
VARIANTS = "noop,causal,softcap+causal,document"
IMPLS = ("flex_inductor", "torch_flex")
DRY_RUN_SHAPE = "B1-H1-S256-D16"
_RESULT_TAG = "BENCH_COMPILE_RESULT "


@dataclass
class Measurement:
    """One cold first call and the steady-state time of the same call."""

    variant: str
    mode: str
    impl: str
    first_call_s: float | None
    steady_ms: float | None
    note: str = ""


def _disable_caches() -> None:
    """Turns off every cache that would let a compiled artifact be reused."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in (
        "fx_graph_cache",
        "fx_graph_remote_cache",
        "autotune_local_cache",
        "autotune_remote_cache",
        "bundled_autotune_remote_cache",
    ):
        if hasattr(inductor_config, name):
            setattr(inductor_config, name, False)
    for name in ("enable_autograd_cache", "enable_remote_autograd_cache"):
        if hasattr(functorch_config, name):
            setattr(functorch_config, name, False)


def child(shape: str, variant_name: str, mode: str, impl: str, device: str) -> Measurement:
    """Measures one cold first call; runs in the fresh process."""
    # bench_attention imports flex_inductor, which must come before anything
    # imports triton.language (FLEX_INDUCTOR_INTERPRET picks the interpreter).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_attention
    import torch

    import flex_inductor

    _disable_caches()
    B, Hq, Hkv, S, D = bench_attention.parse_shape(shape)
    variant = next(v for v in bench_attention.variants(Hq, S, device) if v.name == variant_name)
    score_mod = variant.score_mod
    if impl == "flex_inductor":
        attention, create_block_mask = flex_inductor.flex_attention, flex_inductor.create_block_mask
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        attention = flex_attention
        score_mod = variant.torch_score_mod or score_mod
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grad = mode == "fwdbwd"
    q = torch.randn(B, Hq, S, D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=grad)
    for p in variant.params:
        p.requires_grad_(grad)
    grad_out = torch.randn_like(q) if grad else None
    block_mask = (
        create_block_mask(variant.mask_mod, None, None, S, S, device) if variant.mask_mod else None
    )
    # Load Inductor, Triton's compiler and the device context for both alike.
    warm = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    warm(torch.randn(64, device=device))
    compiled = torch.compile(attention)

    def call():
        out = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
        if grad:
            out.backward(grad_out)

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    profile_dir = os.environ.get("BENCH_COMPILE_PROFILE")
    if profile_dir:
        first = _profiled(timed, os.path.join(profile_dir, f"{impl}-{variant_name}-{mode}.txt"))
    else:
        first = timed()
    steady = statistics.median(timed() for _ in range(3 if device == "cuda" else 1))
    return Measurement(variant_name, mode, impl, first, 1e3 * steady)


def _profiled(fn, path: str):
    """Run ``fn`` under cProfile; write the 80 largest cumulative times to ``path``.

    Where a first call's compile time goes (Dynamo, AOTAutograd, our lowering,
    waiting on Triton's compile workers), for ``BENCH_COMPILE_PROFILE=dir``.
    """
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    result = profile.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(80)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"first call {result:.2f} s\n{text.getvalue()}")
    return result


def measure(shape, variant, mode, impl, device, timeout) -> Measurement:
    """Runs ``child`` in a fresh process with empty, private compile caches."""
    cache = tempfile.mkdtemp(prefix="bench_compile_")
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
        "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
    }
    command = [sys.executable, os.path.abspath(__file__), "--child", shape, variant, mode, impl]
    command += ["--device", device]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Measurement(variant, mode, impl, None, None, f"timed out after {timeout} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return Measurement(**json.loads(line[len(_RESULT_TAG) :]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Measurement(variant, mode, impl, None, None, f"exit {proc.returncode}: {tail}"[:300])


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(results: list[Measurement]) -> str:
    """GitHub table: cold first-call seconds per library, and ours / torch flex."""
    cells: dict[tuple[str, str], dict[str, Measurement]] = {}
    for m in results:
        cells.setdefault((m.variant, m.mode), {})[m.impl] = m
    lines = [
        "| variant | mode | flex_inductor first call (s) | torch flex first call (s) "
        "| ours / torch flex | flex_inductor steady (ms) | torch flex steady (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (variant, mode), impls in cells.items():
        ours, theirs = impls.get("flex_inductor"), impls.get("torch_flex")
        first = [m.first_call_s if m else None for m in (ours, theirs)]
        steady = [m.steady_ms if m else None for m in (ours, theirs)]
        ratio = first[0] / first[1] if None not in first else None
        lines.append(
            f"| {variant} | {mode} | {_fmt(first[0], '.1f')} | {_fmt(first[1], '.1f')} "
            f"| {_fmt(ratio, '.2f')}{'x' if ratio else ''} | {_fmt(steady[0], '.2f')} "
            f"| {_fmt(steady[1], '.2f')} |"
        )
    return "\n".join(lines)


def from_rows(rows) -> list[Measurement]:
    """The measurements among results-CSV rows (``bench_attention.read_csv``)."""
    return [
        Measurement(r.variant, r.mode.removeprefix("compile_"), r.impl, r.first_call_s, r.ms)
        for r in rows
        if r.mode.startswith("compile_")
    ]


def _rows(shape: str, results: list[Measurement]):
    """The measurements as results-CSV rows, mode ``compile_<mode>``."""
    import bench_attention

    B, Hq, Hkv, S, D = bench_attention.parse_shape(shape)
    return [
        bench_attention.Row(
            shape,
            B,
            Hq,
            Hkv,
            S,
            D,
            m.variant,
            f"compile_{m.mode}",
            m.impl,
            ms=m.steady_ms,
            tflops=None,
            peak_mib=None,
            first_call_s=m.first_call_s,
            note=m.note or "cold first call; ms is the steady-state call",
        )
        for m in results
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=SHAPE)
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--mode", default="fwd,fwdbwd")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per measurement")
    parser.add_argument("--time-budget", type=float, help="no new measurement after this many s")
    parser.add_argument("--csv", help="append the rows to this results CSV (bench_attention's)")
    parser.add_argument("--append", action="store_true", help="add to --csv instead of replacing")
    parser.add_argument("--skip-done", default="", help="comma list of CSVs with cells done")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, kernels interpreted, flex_inductor only"
    )
    parser.add_argument("--child", nargs=4, metavar=("SHAPE", "VARIANT", "MODE", "IMPL"))
    args = parser.parse_args(argv)
    if args.child:
        m = child(*args.child, device=args.device)
        print(_RESULT_TAG + json.dumps(m.__dict__), flush=True)
        return 0
    shape = args.shape
    impls = args.impls.split(",")
    if args.dry_run:
        # Children inherit the environment: our kernels run in the interpreter.
        os.environ["FLEX_INDUCTOR_INTERPRET"] = "1"
        args.device, impls = "cpu", ["flex_inductor"]
        shape = DRY_RUN_SHAPE if args.shape == SHAPE else args.shape
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_attention

    done_paths = [p for p in args.skip_done.split(",") if p and os.path.exists(p)]
    done = {(r.shape, r.variant, r.mode, r.impl) for r in bench_attention.read_csv(done_paths)}
    sink = None
    if args.csv:
        meta = bench_attention.metadata(args.device)
        sink = bench_attention.CsvSink(args.csv, args.append, meta)
    start = time.monotonic()
    results, skipped = [], []
    for variant in args.variants.split(","):
        for mode in args.mode.split(","):
            for impl in impls:
                if (shape, variant, f"compile_{mode}", impl) in done:
                    continue
                if args.time_budget and time.monotonic() - start > args.time_budget:
                    skipped.append((variant, mode, impl))
                    continue
                m = measure(shape, variant, mode, impl, args.device, args.timeout)
                print(
                    f"{variant:>16} {mode:>7} {impl:>14} first call "
                    f"{_fmt(m.first_call_s, '.1f')} s, steady {_fmt(m.steady_ms, '.2f')} ms "
                    f"{m.note}",
                    flush=True,
                )
                results.append(m)
                if sink:
                    sink.write(_rows(shape, [m]))
    if sink:
        sink.close()
    print(f"\nCold first call, {shape}, {args.device}:\n")
    print(markdown(results))
    if skipped:
        print(f"\nSkipped for the time budget ({len(skipped)}; rerun with --skip-done):")
        for cell in skipped:
            print("  skipped", *cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
