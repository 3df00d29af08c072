"""A gpt-fast-style decode loop: 64 steps with a growing cache, paged and contiguous.

Each step writes one new token's K/V into the cache and attends the new query
to everything cached so far (a causal mask against the cache position). The
contiguous cache is a plain ``(B, Hkv, S_max, D)`` tensor; the paged one is a
``PagedKVCache`` whose pages are handed out in a shuffled order, so that no
sequence is stored contiguously. BlockMasks are built before the timed loop
(one per step), as a server would build them while the GPU works. Both loops
run the same compiled ``flex_attention`` and must give the same outputs.

    python benchmarks/bench_decode_loop.py --start 4096 --steps 64
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import flex_inductor as fi
from flex_inductor.paged import PagedKVCache


def _causal_at(pos: torch.Tensor):
    """Queries at cache position ``pos[b]`` see the cache up to and including it."""

    def cached_causal(b, h, q_idx, kv_idx):
        return kv_idx <= pos[b]

    return cached_causal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=128)
    args = parser.parse_args(argv)
    B, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    page, steps = args.page_size, args.steps
    dev, dtype = "cuda", torch.bfloat16
    s_max = -(-(args.start + steps) // page) * page
    gen = torch.Generator(device=dev).manual_seed(0)

    # Contiguous cache, prefilled with the first `start` tokens.
    k_cont = torch.zeros(B, Hkv, s_max, D, device=dev, dtype=dtype)
    v_cont = torch.zeros_like(k_cont)
    prefill_k = torch.randn(B, Hkv, args.start, D, device=dev, dtype=dtype, generator=gen)
    prefill_v = torch.randn(B, Hkv, args.start, D, device=dev, dtype=dtype, generator=gen)
    k_cont[:, :, : args.start] = prefill_k
    v_cont[:, :, : args.start] = prefill_v

    # Paged cache with a shuffled page order, holding the same tokens.
    pages_per_seq = s_max // page
    cache = PagedKVCache(B * pages_per_seq, page, B, Hkv, D, dtype=dtype, device=dev)
    order = torch.randperm(B * pages_per_seq, generator=torch.Generator().manual_seed(0))
    cache._free = [int(p) for p in order]  # hand out pages in a shuffled order
    for b in range(B):
        cache.reserve(b, s_max)
    positions = torch.arange(args.start, device=dev).expand(B, -1)
    cache.write(torch.arange(B), positions, prefill_k, prefill_v)
    k_paged, v_paged = cache.physical_kv(B)

    new_q = torch.randn(steps, B, Hq, 1, D, device=dev, dtype=dtype, generator=gen)
    new_k = torch.randn(steps, B, Hkv, 1, D, device=dev, dtype=dtype, generator=gen)
    new_v = torch.randn(steps, B, Hkv, 1, D, device=dev, dtype=dtype, generator=gen)
    pos = torch.zeros(B, dtype=torch.int64, device=dev)
    logical_masks, paged_masks = [], []
    for t in range(steps):
        step_pos = torch.full((B,), args.start + t, device=dev)
        bm = fi.create_block_mask(
            _causal_at(step_pos), B, None, 1, s_max, device=dev, BLOCK_SIZE=page
        )
        logical_masks.append(bm)
        paged_masks.append(cache.convert_logical_block_mask(bm))

    attend = torch.compile(fi.flex_attention)
    rows = torch.arange(B, device=dev)

    def contiguous_loop():
        outs = []
        for t in range(steps):
            pos.fill_(args.start + t)
            k_cont[:, :, args.start + t] = new_k[t, :, :, 0]
            v_cont[:, :, args.start + t] = new_v[t, :, :, 0]
            outs.append(
                attend(new_q[t], k_cont, v_cont, block_mask=logical_masks[t], enable_gqa=True)
            )
        return outs

    def paged_loop():
        outs = []
        for t in range(steps):
            at = torch.full((B, 1), args.start + t, device=dev)
            cache.write(rows, at, new_k[t], new_v[t], check=False)
            outs.append(
                attend(new_q[t], k_paged, v_paged, block_mask=paged_masks[t], enable_gqa=True)
            )
        return outs

    results = {}
    for name, loop in (("contiguous", contiguous_loop), ("paged", paged_loop)):
        outs = loop()  # compile and warm up
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            outs = loop()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        times.sort()
        results[name] = (times[len(times) // 2], outs)
    diff = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(results["contiguous"][1], results["paged"][1], strict=True)
    )
    cont_ms = results["contiguous"][0] * 1e3
    paged_ms = results["paged"][0] * 1e3
    print(
        f"| cache {args.start}..{args.start + steps} | contiguous {cont_ms:.2f} ms "
        f"({cont_ms / steps * 1e3:.0f} us/step) | paged {paged_ms:.2f} ms "
        f"({paged_ms / steps * 1e3:.0f} us/step) | paged / contiguous {paged_ms / cont_ms:.3f} "
        f"| max |diff| {diff:.1e} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
