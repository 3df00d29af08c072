"""A gpt-fast-style decode loop: 64 steps with a growing cache, paged and contiguous.

Each step writes one new token's K/V into the cache and attends the new query
to everything cached so far. As in gpt-fast, the step (cache write plus
attention) is one compiled function, and by default it runs as a CUDA graph
(``mode="reduce-overhead"``), so the loop measures the GPU rather than Python.

The contiguous cache is a plain ``(B, Hkv, S_max, D)`` tensor; the paged one is
a ``PagedKVCache`` whose pages are handed out in a shuffled order, so that no
sequence is stored contiguously. Both loops use one BlockMask built once for
the final length: its mask_mod reads the current position from a tensor that
the loop updates in place (``kv_idx <= cache_pos[b]``), so the last page is a
partial block and every earlier one full. Both loops must give the same
outputs.

    python benchmarks/bench_decode_loop.py --start 4096 --steps 64
    python benchmarks/bench_decode_loop.py --modes reduce-overhead,default,eager
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import flex_inductor as fi
from flex_inductor import _compat
from flex_inductor.paged import PagedKVCache


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_loop(loop, device: str, repeats: int = 5) -> tuple[float, list[torch.Tensor]]:
    """Median wall time of ``loop()`` (after one warm-up run) and its outputs."""
    outs = loop()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = loop()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--start", default="4096,32768", help="cache lengths to start from")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (interpreter)")
    parser.add_argument(
        "--modes", default="reduce-overhead,default",
        help="torch.compile modes of the step; 'eager' calls flex_attention per step",
    )
    args = parser.parse_args(argv)
    print(
        "| cache | step | contiguous ms (us/step) | paged ms (us/step) "
        "| paged / contiguous | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for start in (int(s) for s in args.start.split(",")):
        for mode in args.modes.split(","):
            try:
                _run(args, start, mode)
            except Exception as error:  # report and go on with the next cell
                print(f"# start={start} mode={mode}: {type(error).__name__}: {str(error)[:300]}")
    return 0


def _run(args, start: int, mode: str) -> None:
    B, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    page, steps = args.page_size, args.steps
    dev, dtype = args.device, torch.bfloat16
    torch.compiler.reset()
    s_max = -(-(start + steps) // page) * page
    gen = torch.Generator(device=dev).manual_seed(0)
    prefill_k = torch.randn(B, Hkv, start, D, device=dev, dtype=dtype, generator=gen)
    prefill_v = torch.randn(B, Hkv, start, D, device=dev, dtype=dtype, generator=gen)

    # Contiguous cache, prefilled with the first `start` tokens.
    k_cont = torch.zeros(B, Hkv, s_max, D, device=dev, dtype=dtype)
    v_cont = torch.zeros_like(k_cont)
    k_cont[:, :, :start] = prefill_k
    v_cont[:, :, :start] = prefill_v
    _compat.mark_static_address(k_cont)
    _compat.mark_static_address(v_cont)

    # Paged cache holding the same tokens, its pages handed out shuffled.
    pages_per_seq = s_max // page
    cache = PagedKVCache(B * pages_per_seq, page, B, Hkv, D, dtype=dtype, device=dev)
    order = torch.randperm(B * pages_per_seq, generator=torch.Generator().manual_seed(0))
    cache._free = [int(p) for p in order]  # hand out pages in a shuffled order
    for b in range(B):
        cache.reserve(b, s_max)
    prefill_pos = torch.arange(start, device=dev).expand(B, -1)
    cache.write(torch.arange(B), prefill_pos, prefill_k, prefill_v)

    new_q = torch.randn(steps, B, Hq, 1, D, device=dev, dtype=dtype, generator=gen)
    new_k = torch.randn(steps, B, Hkv, 1, D, device=dev, dtype=dtype, generator=gen)
    new_v = torch.randn(steps, B, Hkv, 1, D, device=dev, dtype=dtype, generator=gen)

    # One BlockMask for the whole loop, built at the final position.
    cache_pos = torch.full((B,), start + steps - 1, device=dev, dtype=torch.int64)

    def cached_causal(b, h, q_idx, kv_idx):
        return kv_idx <= cache_pos[b]

    logical = fi.create_block_mask(cached_causal, B, None, 1, s_max, device=dev, BLOCK_SIZE=page)
    paged = cache.convert_logical_block_mask(logical)
    rows = torch.arange(B, device=dev)

    def contiguous_step(q, k_new, v_new):
        k_cont.index_copy_(2, cache_pos[:1], k_new)
        v_cont.index_copy_(2, cache_pos[:1], v_new)
        return fi.flex_attention(q, k_cont, v_cont, block_mask=logical, enable_gqa=True)

    def paged_step(q, k_new, v_new):
        cache.write(rows, cache_pos[:, None], k_new, v_new, check=False)
        k_store, v_store = cache.physical_kv(B)
        return fi.flex_attention(q, k_store, v_store, block_mask=paged, enable_gqa=True)

    def loop_of(step):
        if mode != "eager":
            step = torch.compile(step, mode=mode, fullgraph=True)

        def loop():
            outs = []
            for t in range(steps):
                cache_pos.fill_(start + t)
                outs.append(step(new_q[t], new_k[t], new_v[t]).clone())
            return outs

        return loop

    cont_s, cont_outs = _time_loop(loop_of(contiguous_step), dev)
    paged_s, paged_outs = _time_loop(loop_of(paged_step), dev)
    diff = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(cont_outs, paged_outs, strict=True)
    )
    cont_ms, paged_ms = cont_s * 1e3, paged_s * 1e3
    print(
        f"| {start}..{start + steps} | {mode} | {cont_ms:.2f} ({cont_ms / steps * 1e3:.0f}) "
        f"| {paged_ms:.2f} ({paged_ms / steps * 1e3:.0f}) | {paged_ms / cont_ms:.3f} "
        f"| {diff:.1e} |",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
