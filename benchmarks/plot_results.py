"""Plots and tables from bench_attention / bench_compile results CSVs.

Writes one PNG per mode (fwd, fwdbwd): a panel per variant, TF/s against
sequence length (log2 axis) for each implementation, from the sweep rows
(heads ``--sweep-heads``, head dim ``--sweep-dim``, B·S = ``--sweep-tokens``).
Prints the markdown table of the fixed shapes (``bench_attention.SHAPES``) with
ratios to torch flex, cuDNN and FA2 and the geometric mean of ours / torch flex,
then the sweep table and, when present, the compile-time table.

    python benchmarks/plot_results.py out/results.csv [more.csv ...] \\
        --out docs/perf_seq_sweep_{mode}.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention  # noqa: E402
import bench_compile  # noqa: E402

IMPL_STYLE = {
    "flex_inductor": ("flex_inductor", "tab:blue", "o"),
    "torch_flex": ("torch flex", "tab:orange", "s"),
    "sdpa_cudnn": ("SDPA cuDNN", "tab:green", "^"),
    "sdpa_flash": ("SDPA flash (FA2)", "tab:red", "v"),
}


def sweep_rows(rows, tokens: int, heads: int, head_dim: int):
    """The rows of the sequence-length sweep family, with a time.

    A variant measured at one length only is left out: the grid's B4 H16
    S8192 D128 shape is also a sweep shape, and its other variants would
    each make a panel of one point.
    """
    family = [
        r
        for r in rows
        if r.tflops is not None
        and r.mode in bench_attention.MODES
        and r.Hq == r.Hkv == heads
        and r.D == head_dim
        and r.B == max(1, tokens // r.S)
    ]
    lengths = {}
    for r in family:
        lengths.setdefault(r.variant, set()).add(r.S)
    return [r for r in family if len(lengths[r.variant]) > 1]


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_mode(rows, mode: str, path: str, title: str) -> str | None:
    """One PNG: a panel per variant, TF/s vs sequence length per implementation."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    rows = [r for r in rows if r.mode == mode]
    if not rows:
        return None
    order = {name: i for i, name in enumerate(bench_attention.VARIANT_NAMES)}
    names = sorted({r.variant for r in rows}, key=lambda n: (order.get(n, len(order)), n))
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows + 0.8), layout="constrained")
    lengths = sorted({r.S for r in rows})
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for impl, (label, colour, marker) in IMPL_STYLE.items():
            points = sorted((r.S, r.tflops) for r in rows if r.variant == name and r.impl == impl)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=marker, color=colour, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.set_title(name)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    handles, labels = {}, {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
            labels[label] = label
    fig.legend(list(handles.values()), list(labels), loc="outside lower center", ncols=4)
    fig.suptitle(title)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="results CSVs; later rows replace earlier ones")
    parser.add_argument("--out", default="docs/perf_seq_sweep_{mode}.png")
    parser.add_argument("--sweep-tokens", type=int, default=bench_attention.SWEEP_TOKENS)
    parser.add_argument("--sweep-heads", type=int, default=bench_attention.SWEEP_HEADS)
    parser.add_argument("--sweep-dim", type=int, default=bench_attention.SWEEP_HEAD_DIM)
    args = parser.parse_args(argv)
    paths = [p for p in args.csv if os.path.exists(p)]
    if not paths:
        print(f"no results CSV among {args.csv}", file=sys.stderr)
        return 1
    rows = bench_attention.read_csv(paths)
    gpus = bench_attention.read_csv_meta(paths, "gpu")

    fixed = [r for r in rows if r.shape in bench_attention.SHAPES and r.mode in ("fwd", "fwdbwd")]
    if fixed:
        print(f"## Fixed shapes ({', '.join(gpus)})\n")
        print(bench_attention.markdown(fixed))
    sweep = sweep_rows(rows, args.sweep_tokens, args.sweep_heads, args.sweep_dim)
    if sweep:
        sweep.sort(key=lambda r: (r.variant, r.mode, r.S))
        print(
            f"\n## Sequence-length sweep (B·S = {args.sweep_tokens}, H{args.sweep_heads}, "
            f"D{args.sweep_dim})\n"
        )
        print(bench_attention.markdown(sweep))
        for mode in bench_attention.MODES:
            title = (
                f"{mode}: TFLOP/s vs sequence length, B·S = {args.sweep_tokens}, "
                f"H{args.sweep_heads}, D{args.sweep_dim} ({', '.join(gpus)})"
            )
            written = plot_mode(sweep, mode, args.out.format(mode=mode), title)
            if written:
                print(f"\nwrote {written}")
    compiles = bench_compile.from_rows(rows)
    if compiles:
        shapes = sorted({r.shape for r in rows if r.mode.startswith("compile_")})
        print(f"\n## Cold first-call compile time ({', '.join(shapes)})\n")
        print(bench_compile.markdown(compiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
