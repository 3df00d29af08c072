"""Side-by-side attention benchmark: flex_inductor vs torch flex_attention vs SDPA.

Runs every peer in the same process on the same inputs, times with
``triton.testing.do_bench`` (median), and reports sparsity-aware TFLOP/s
(forward = 4·B·H·L·S·D·density; forward+backward = 3.5× that) and peak memory.
Prints a GitHub table with ratios and writes a CSV with the GPU, versions and
date.

    python benchmarks/bench_attention.py --shapes all --variants all --mode fwd,fwdbwd
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import flex_inductor
from flex_inductor import masks, mods

SHAPES = {
    "B4-H16-S8192-D128": (4, 16, 16, 8192, 128),
    "B8-H16-S2048-D64": (8, 16, 16, 2048, 64),
    "B4-Hq32-Hkv8-S4096-D128": (4, 32, 8, 4096, 128),
}


@dataclass
class Variant:
    """One attention variant: its mods (for both libraries) and SDPA support."""

    name: str
    score_mod: Callable | None
    mask_mod: Callable | None
    sdpa_causal: bool | None  # None: SDPA cannot express it


def variants(heads: int, seq_len: int, device: str) -> list[Variant]:
    """The ENVIRONMENT.md variants for one shape."""
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < seq_len:
        n = min(
            int(torch.randint(seq_len // 16, seq_len // 2, (1,), generator=gen)), seq_len - total
        )
        lengths.append(n)
        total += n
    return [
        Variant("noop", None, None, False),
        Variant("causal", None, masks.causal(), True),
        Variant("alibi", mods.alibi(heads, device=device), None, None),
        Variant("softcap+causal", mods.softcap(20.0), masks.causal(), None),
        Variant("sliding_window_1024", None, masks.sliding_window(1024), None),
        Variant("document", None, masks.document(lengths=lengths, device=device), None),
        Variant("prefix_lm", None, masks.prefix_lm(seq_len // 4), None),
    ]


@dataclass
class Row:
    """One measured cell."""

    shape: str
    variant: str
    mode: str
    impl: str
    ms: float
    tflops: float
    peak_mib: float


def _flex_call(fn, q, k, v, score_mod, block_mask, gqa) -> Callable[[], torch.Tensor]:
    return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)


def _sdpa_call(backend, q, k, v, causal: bool, gqa: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=gqa
            )

    return call


def _training_step(fn, inputs, B, Hq, S, D) -> Callable[[], None]:
    grad_out = torch.randn(B, Hq, S, D, device=inputs[0].device, dtype=inputs[0].dtype)

    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    return step


def _bench(fn: Callable[[], object]) -> tuple[float, float]:
    """Median ms and peak extra MiB of ``fn``."""
    import triton.testing

    fn()  # compile and warm up outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def _density(mask_mod, seq_len: int, device: str) -> float:
    if mask_mod is None:
        return 1.0
    dense = flex_inductor.create_mask(mask_mod, 1, 1, seq_len, seq_len, device=device)
    return dense.float().mean().item()


def run(shape_names, variant_names, modes, block_size: int, csv_path: str | None) -> list[Row]:
    """Measure every (shape, variant, mode, implementation) cell."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    device = "cuda"
    dtype = torch.bfloat16
    # Every cell gets fresh compiled wrappers after a Dynamo reset: one shared
    # wrapper would hit Dynamo's recompile limit after 8 cells and silently
    # fall back to eager, for us and for the peer alike.
    torch._dynamo.config.recompile_limit = 64
    rows: list[Row] = []
    for shape_name in shape_names:
        B, Hq, Hkv, S, D = SHAPES[shape_name]
        for variant in variants(Hq, S, device):
            if variant_names != ["all"] and variant.name not in variant_names:
                continue
            density = _density(variant.mask_mod, S, device)
            our_mask = (
                flex_inductor.create_block_mask(
                    variant.mask_mod, None, None, S, S, device, block_size
                )
                if variant.mask_mod
                else None
            )
            torch_mask = (
                torch_create_block_mask(variant.mask_mod, None, None, S, S, device, block_size)
                if variant.mask_mod
                else None
            )
            for mode in modes:
                torch._dynamo.reset()
                torch_flex = torch.compile(torch_flex_attention)
                ours = torch.compile(flex_inductor.flex_attention)
                grad = mode == "fwdbwd"
                q = torch.randn(B, Hq, S, D, device=device, dtype=dtype, requires_grad=grad)
                k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=grad)
                v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=grad)
                gqa = Hq != Hkv
                impls: dict[str, Callable] = {
                    "flex_inductor": _flex_call(ours, q, k, v, variant.score_mod, our_mask, gqa),
                    "torch_flex": _flex_call(
                        torch_flex, q, k, v, variant.score_mod, torch_mask, gqa
                    ),
                }
                if variant.sdpa_causal is not None:
                    impls["sdpa_cudnn"] = _sdpa_call(
                        SDPBackend.CUDNN_ATTENTION, q, k, v, variant.sdpa_causal, gqa
                    )
                    impls["sdpa_flash"] = _sdpa_call(
                        SDPBackend.FLASH_ATTENTION, q, k, v, variant.sdpa_causal, gqa
                    )
                flops = 4 * B * Hq * S * S * D * density * (3.5 if grad else 1.0)
                for impl_name, fn in impls.items():
                    call = _training_step(fn, (q, k, v), B, Hq, S, D) if grad else fn
                    try:
                        ms, peak = _bench(call)
                    except Exception as error:  # report and go on: one failing peer
                        print(f"# {shape_name} {variant.name} {mode} {impl_name}: {error!r}"[:400])
                        continue
                    row = Row(shape_name, variant.name, mode, impl_name, ms, flops / ms / 1e9, peak)
                    rows.append(row)
                    print(
                        f"{shape_name:>24} {variant.name:>20} {mode:>7} {impl_name:>14} "
                        f"{ms:8.3f} ms {row.tflops:7.1f} TF/s {peak:9.1f} MiB",
                        flush=True,
                    )
    if csv_path:
        _write_csv(rows, csv_path)
    return rows


def _write_csv(rows: list[Row], path: str) -> None:
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flex_inductor": getattr(flex_inductor, "__version__", "0.1.0"),
        "date": datetime.date.today().isoformat(),
    }
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *asdict(rows[0])] if rows else list(meta))
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **asdict(row)})


def _peak(impls: dict, name: str) -> str:
    return f"{impls[name].peak_mib:.0f}" if name in impls else ""


def markdown(rows: list[Row]) -> str:
    """A GitHub table: TF/s per implementation and our ratio to each peer."""
    cells: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        cells.setdefault((row.shape, row.variant, row.mode), {})[row.impl] = row
    peers = ["torch_flex", "sdpa_cudnn", "sdpa_flash"]
    lines = [
        "| shape | variant | mode | flex_inductor TF/s | torch flex TF/s | cuDNN TF/s | FA2 TF/s "
        "| vs torch flex | vs cuDNN | ours peak MiB | torch flex peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for (shape, variant, mode), impls in cells.items():
        ours = impls.get("flex_inductor")

        def tf(name, impls=impls):
            return f"{impls[name].tflops:.0f}" if name in impls else ""

        def ratio(name, impls=impls, ours=ours):
            if ours is None or name not in impls:
                return ""
            return f"{ours.tflops / impls[name].tflops:.2f}x"

        if ours is not None and "torch_flex" in impls:
            ratios.append(ours.tflops / impls["torch_flex"].tflops)
        peak = functools.partial(_peak, impls)
        lines.append(
            f"| {shape} | {variant} | {mode} | {tf('flex_inductor')} | {tf(peers[0])} | "
            f"{tf(peers[1])} | {tf(peers[2])} | {ratio(peers[0])} | {ratio(peers[1])} | "
            f"{peak('flex_inductor')} | {peak('torch_flex')} |"
        )
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append(f"\nGeometric mean vs torch flex over {len(ratios)} cells: {geo:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="all", help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--variants", default="all")
    parser.add_argument("--mode", default="fwd,fwdbwd")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "bench.csv"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    rows = run(shapes, args.variants.split(","), args.mode.split(","), args.block_size, args.csv)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
