"""Tune the shipped config tables: autotune a large grid of configs on the GPU.

Replaces the max-autotune candidate lists of the forward and backward
lowerings with a full grid, compiles one call under max-autotune (Inductor
compiles the candidates in parallel and benchmarks each; its ``AUTOTUNE``
report on stderr lists the fastest ones) and prints the config each kernel
chose with the resulting TF/s. The winners go into ``lowering/configs.py``
and ``lowering/backward_configs.py`` (see benchmarks/NOTES.md).

    python benchmarks/tune_configs.py --shape 8,16,16,2048,64 --mode fwd,bwd
    python benchmarks/tune_configs.py --shape 4,16,16,8192,128 --variant alibi --mode fwd
    python benchmarks/tune_configs.py --shape 8,16,16,2048,64 --kernel-options '{"USE_TMA": true}'

``--variant`` takes any name of ``bench_attention.VARIANT_NAMES``, or
``alibi_float_idx``: ALiBi written with the indices converted to float before
the subtraction (an experiment: the conversion then runs on a row and a column
instead of on every score).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys

import bench_attention
import torch
import triton.testing
from flex_inductor.lowering import backward_configs, configs

import flex_inductor as fi
from flex_inductor import mods


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def forward_grid(args) -> list:
    return [
        configs.Config(m, n, w, s)
        for m, n, w, s in itertools.product(
            _ints(args.block_m), _ints(args.block_n), _ints(args.warps), _ints(args.stages)
        )
    ]


def backward_grid(args) -> list:
    grid = []
    for m1, n1, w, s in itertools.product(
        _ints(args.bwd_m1), _ints(args.bwd_n1), _ints(args.warps), _ints(args.stages)
    ):
        # dQ tiles mirror dK/dV's: (M2, N2) = (N1, M1) keeps both kernels'
        # register footprints alike; dkdv and dq each pick their own winner.
        grid.append(backward_configs.BackwardConfig(m1, n1, n1, m1, w, s))
    return grid


def _variant(name: str, heads: int, seq_len: int, device: str):
    """(score_mod, mask_mod) of a benchmark variant, or of the float-index ALiBi."""
    if name == "alibi_float_idx":
        slopes = torch.tensor(mods.alibi_slopes(heads), dtype=torch.float32, device=device)

        def alibi_float_idx(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx.to(torch.float32) - q_idx.to(torch.float32))

        return alibi_float_idx, None
    found = {v.name: v for v in bench_attention.variants(heads, seq_len, device)}
    if name not in found:
        raise ValueError(f"--variant: expected one of {sorted(found)}, got {name!r}")
    return found[name].score_mod, found[name].mask_mod


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,16,2048,64", help="B,Hq,Hkv,S,D")
    parser.add_argument(
        "--variant", default="noop", help="a bench_attention variant, or alibi_float_idx"
    )
    parser.add_argument("--mode", default="fwd,bwd")
    parser.add_argument("--block-m", default="64,128")
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--bwd-m1", default="32,64")
    parser.add_argument("--bwd-n1", default="64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument(
        "--kernel-options", default="{}", help='JSON kernel_options, e.g. {"USE_TMA": false}'
    )
    args = parser.parse_args(argv)
    B, Hq, Hkv, S, D = _ints(args.shape)
    kernel_options = json.loads(args.kernel_options)
    dev, dtype = "cuda", torch.bfloat16
    logging.getLogger("flex_inductor").setLevel(logging.INFO)
    logging.basicConfig(format="%(message)s")
    configs.FORWARD_AUTOTUNE[:] = forward_grid(args)
    backward_configs.BACKWARD_AUTOTUNE[:] = backward_grid(args)
    score_mod, mask_mod = _variant(args.variant, Hq, S, dev)
    bm = mask_mod and fi.create_block_mask(mask_mod, None, None, S, S, device=dev)
    density = bench_attention._density(mask_mod, S, dev) if mask_mod else 1.0
    for mode in args.mode.split(","):
        grad = mode == "bwd"
        q = torch.randn(B, Hq, S, D, device=dev, dtype=dtype, requires_grad=grad)
        k, v = (
            torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=grad) for _ in range(2)
        )
        torch.compiler.reset()
        attend = torch.compile(fi.flex_attention, mode="max-autotune-no-cudagraphs")

        def call(attend=attend, q=q, k=k, v=v, grad=grad):
            out = attend(
                q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                kernel_options=kernel_options,
            )
            if grad:
                out.backward(torch.ones_like(out))
            return out

        print(f"## {mode} B{B} Hq{Hq} Hkv{Hkv} S{S} D{D} variant={args.variant}", flush=True)
        call()
        ms = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
        flops = 4 * B * Hq * S * S * D * density * (3.5 if grad else 1.0)
        print(f"## {mode}: tuned {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
