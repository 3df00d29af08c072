"""Time the forward (or forward+backward) template over a grid of kernel configs.

Used to tune the shipped config tables on the GPU (see benchmarks/NOTES.md):

    python benchmarks/sweep_configs.py --shape 8,16,2048,64 --mask causal
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton.testing

import flex_inductor as fi
from flex_inductor import masks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,2048,64", help="B,H,S,D")
    parser.add_argument("--mask", default="none", choices=["none", "causal"])
    parser.add_argument("--mode", default="fwd", choices=["fwd", "bwd"])
    parser.add_argument("--block-m", default="64,128")
    parser.add_argument("--block-n", default="64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split(","))
    dev, dtype = "cuda", torch.bfloat16
    grad = args.mode == "bwd"
    q, k, v = (
        torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=grad) for _ in range(3)
    )
    bm = (
        fi.create_block_mask(masks.causal(), None, None, S, S, device=dev)
        if args.mask == "causal"
        else None
    )
    density = 0.5 if args.mask == "causal" else 1.0
    flops = 4 * B * H * S * S * D * density * (3.5 if grad else 1.0)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    prefix = "bwd_" if grad else "fwd_"
    grid = itertools.product(
        ints(args.block_m), ints(args.block_n), ints(args.warps), ints(args.stages)
    )
    for bm_, bn, warps, stages in grid:
        if grad:
            options = {
                "bwd_BLOCK_M1": bm_ // 2,
                "bwd_BLOCK_N1": bn,
                "bwd_BLOCK_M2": bm_,
                "bwd_BLOCK_N2": bn // 2,
                "bwd_num_warps": warps,
                "bwd_num_stages": stages,
            }
        else:
            options = {
                f"{prefix}BLOCK_M": bm_,
                f"{prefix}BLOCK_N": bn,
                f"{prefix}num_warps": warps,
                f"{prefix}num_stages": stages,
            }

        def call(options=options):
            out = fi.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
            if grad:
                out.backward(torch.ones_like(out))
            return out

        try:
            call()
            ms = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
        except Exception as error:  # a config that does not fit (shared memory)
            print(f"{options}: failed {type(error).__name__}: {str(error)[:120]}", flush=True)
            continue
        print(f"{options}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
