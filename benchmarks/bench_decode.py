"""Decode benchmark: one new query token against a long KV cache.

Side by side in one process: flex_inductor, torch flex_attention (compiled),
and SDPA (cuDNN and flash backends). Reports GB/s of K and V read
(2 · B · Hkv · S · D · bytes / time) and the ratio to each peer.

    python benchmarks/bench_decode.py --kv 4096,32768,131072
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import flex_inductor


def _sdpa(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _fmt(results: dict, name: str) -> str:
    return f"{results[name]:.0f}" if name in results else ""


def _time(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None) -> int:
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--q-len", type=int, default=1)
    parser.add_argument("--kv", default="4096,32768,131072")
    args = parser.parse_args(argv)
    B, Hq, Hkv, D, L = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.q_len
    dev, dtype = "cuda", torch.bfloat16
    ours = torch.compile(flex_inductor.flex_attention)
    theirs = torch.compile(torch_flex_attention)
    print(
        "| KV len | flex_inductor GB/s | torch flex GB/s | cuDNN GB/s | FA2 GB/s "
        "| vs torch flex | vs best SDPA |"
    )
    print("|---|---|---|---|---|---|---|")
    for S in (int(s) for s in args.kv.split(",")):
        q = torch.randn(B, Hq, L, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        gbytes = 2 * B * Hkv * S * D * k.element_size() / 1e9
        results = {}
        impls = {
            "ours": functools.partial(ours, q, k, v, enable_gqa=True),
            "torch_flex": functools.partial(theirs, q, k, v, enable_gqa=True),
            "cudnn": functools.partial(_sdpa, SDPBackend.CUDNN_ATTENTION, q, k, v),
            "flash": functools.partial(_sdpa, SDPBackend.FLASH_ATTENTION, q, k, v),
        }
        for name, fn in impls.items():
            try:
                results[name] = gbytes / (_time(fn) / 1e3)
            except Exception as error:  # a peer that does not support the shape
                print(f"# {name} at S={S}: {type(error).__name__}: {str(error)[:200]}")
        ref = flex_inductor.flex_attention_reference(q[:1], k[:1], v[:1], enable_gqa=True)
        err = (impls["ours"]()[:1].float() - ref.float()).abs().max().item()
        fmt = functools.partial(_fmt, results)
        best_sdpa = max((results[n] for n in ("cudnn", "flash") if n in results), default=None)
        ratio_flex = (
            f"{results['ours'] / results['torch_flex']:.2f}x" if "torch_flex" in results else ""
        )
        ratio_sdpa = f"{results['ours'] / best_sdpa:.2f}x" if best_sdpa else ""
        print(
            f"| {S} | {fmt('ours')} | {fmt('torch_flex')} | {fmt('cudnn')} | {fmt('flash')} | "
            f"{ratio_flex} | {ratio_sdpa} |  (max err vs reference {err:.1e})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
