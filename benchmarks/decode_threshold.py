"""Where the decode template stops beating the forward template.

Times both templates (forced with kernel_options) for growing query lengths;
the crossover sets ``DECODE_MAX_QUERY_LEN`` in lowering/decode.py. Each call is
compiled and replayed as a CUDA graph, so the times are the GPU's, not
Python's (an eager call costs more host time than a short decode kernel).

    python benchmarks/decode_threshold.py --kv 8192
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

import flex_inductor as fi


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="1,2,4,8,16,32,64,128")
    args = parser.parse_args(argv)
    B, Hq, Hkv, D, S = args.batch, 32, 8, 128, args.kv
    dev, dtype = "cuda", torch.bfloat16
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    print(f"B{B} Hq{Hq} Hkv{Hkv} D{D} KV {S}")
    print("| query len | decode ms | forward ms | decode / forward |")
    print("|---|---|---|---|")
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(B, Hq, L, D, device=dev, dtype=dtype)
        offset = S - L

        def cached_causal(b, h, q_idx, kv_idx, offset=offset):
            return q_idx + offset >= kv_idx

        bm = fi.create_block_mask(cached_causal, None, None, L, S, device=dev)
        times = {}
        for name, options in (
            ("decode", {"FORCE_DECODE": True}),
            ("forward", {"FORCE_USE_FLEX_ATTENTION": True}),
        ):

            # A fresh compile per cell: 16 cells would pass Dynamo's recompile limit.
            torch.compiler.reset()
            attend = torch.compile(fi.flex_attention)

            def call(options=options, q=q, bm=bm, attend=attend):
                return attend(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options)

            try:
                call()
                times[name] = triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median")
            except Exception as error:
                print(f"# L={L} {name}: {type(error).__name__}: {str(error)[:160]}")
        if len(times) == 2:
            print(
                f"| {L} | {times['decode']:.3f} | {times['forward']:.3f} "
                f"| {times['decode'] / times['forward']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
