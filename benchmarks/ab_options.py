"""A/B of kernel options on the GPU: one process, the same inputs, one table.

Each (shape, variant, mode) cell is measured once per ``--options`` entry (a
``kernel_options`` dict), with torch flex beside them, and each option set's
output (and, forward+backward, dq) is compared with the first's (a wrong
kernel shows as a large max difference, not only as a speed-up). Used for
the template experiments of benchmarks/NOTES.md (TMA, warp specialisation,
query-block order, atomic dq).

    python benchmarks/ab_options.py --shapes B4-H16-S8192-D128 --variants noop,causal \\
        --options '{"base": {}, "tma": {"USE_TMA": true}}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import bench_attention as ba
import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flex_inductor as fi


def _cell(shape, variant, mode, option_sets, with_peer):
    B, Hq, Hkv, S, D = ba.parse_shape(shape)
    grad = mode == "fwdbwd"
    dev, dtype = "cuda", torch.bfloat16
    q, k, v = (
        torch.randn(B, h, S, D, device=dev, dtype=dtype, requires_grad=grad)
        for h in (Hq, Hkv, Hkv)
    )
    for p in variant.params:
        p.requires_grad_(grad)
    tensors = (q, k, v, *variant.params)
    grad_out = torch.randn(B, Hq, S, D, device=dev, dtype=dtype) if grad else None
    mask = variant.mask_mod and fi.create_block_mask(variant.mask_mod, None, None, S, S, device=dev)
    masks = {}
    for name, options in option_sets.items():
        # "_block_size": [q, kv] runs that option set with a BlockMask of those
        # block sizes (a noop mask when the variant has none), e.g. 256-row
        # query blocks for BLOCK_M=256 tiles.
        block_size = options.get("_block_size")
        masks[name] = mask if block_size is None else fi.create_block_mask(
            variant.mask_mod or fi.noop_mask, None, None, S, S, device=dev,
            BLOCK_SIZE=tuple(block_size),
        )
    density = ba._density(variant.mask_mod, S, dev)
    flops = 4 * B * Hq * S * S * D * density * (ba.FWDBWD_FLOP_FACTOR if grad else 1.0)
    calls = {}
    for name, options in option_sets.items():
        fn = torch.compile(fi.flex_attention)
        options = {key: value for key, value in options.items() if key != "_block_size"}
        calls[name] = lambda fn=fn, options=options, mask=masks[name]: fn(
            q, k, v, score_mod=variant.score_mod, block_mask=mask,
            enable_gqa=Hq != Hkv, kernel_options=options,
        )
    if with_peer:
        peer_mask = variant.mask_mod and torch_create_block_mask(
            variant.mask_mod, None, None, S, S, device=dev
        )
        peer = torch.compile(torch_flex_attention)
        calls["torch_flex"] = lambda: peer(
            q, k, v, score_mod=variant.torch_score_mod or variant.score_mod,
            block_mask=peer_mask, enable_gqa=Hq != Hkv,
        )
    results, first = {}, None
    for name, call in calls.items():
        step = ba._training_step(call, tensors, grad_out) if grad else call
        try:
            out = _outputs(call, q, grad_out)
            ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        except Exception as error:  # one failing option set must not stop the others
            message = " ".join(str(error).split())[:200]
            results[name] = f"failed: {type(error).__name__}: {message}"
            continue
        if first is None:
            first = out
        diff = max((o - f).abs().max().item() for o, f in zip(out, first, strict=True))
        results[name] = f"{flops / ms / 1e9:.0f} TF/s (max diff {diff:.1e})"
    torch._dynamo.reset()
    return results


def _experiment_variants(heads, seq_len, device):
    """Variants for experiments only, beside bench_attention's.

    ``alibi_int_tile``: ALiBi with the position difference converted to float
    explicitly, which keeps the lowering's float-position rewrite off: the
    kernel converts the integer (BLOCK_M, BLOCK_N) tile as before that change
    (benchmarks/NOTES.md entry 12).

    ``prefix_lm_tile``: the prefix-LM mask with its prefix test written over
    the whole (BLOCK_M, BLOCK_N) tile (``kv_idx - q_idx < P - q_idx``) instead
    of a (1, BLOCK_N) row that is broadcast into the ``|``; the same mask.
    ``prefix_lm_swapped``: the two terms of the ``|`` in the other order
    (benchmarks/NOTES.md entry 13).
    """
    slopes = torch.tensor(fi.mods.alibi_slopes(heads), dtype=torch.float32, device=device)
    prefix = seq_len // 4

    def alibi_int_tile(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(torch.float32)

    def prefix_lm_tile(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx < prefix - q_idx) | (q_idx >= kv_idx)

    def prefix_lm_swapped(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (kv_idx < prefix)

    return [
        ba.Variant("alibi_int_tile", alibi_int_tile, None, None),
        ba.Variant("prefix_lm_tile", None, prefix_lm_tile, None),
        ba.Variant("prefix_lm_swapped", None, prefix_lm_swapped, None),
    ]


def _outputs(call, q, grad_out):
    """The output, and with ``grad_out`` also dq, as float32 (compared across option sets)."""
    out = call()
    if grad_out is None:
        return [out.detach().float()]
    (dq,) = torch.autograd.grad(out, q, grad_out)
    return [out.detach().float(), dq.float()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="B4-H16-S8192-D128")
    parser.add_argument("--variants", default="noop,causal")
    parser.add_argument("--modes", default="fwd")
    parser.add_argument("--options", default='{"base": {}}', help="JSON: name -> kernel_options")
    parser.add_argument("--no-peer", action="store_true", help="skip torch flex")
    parser.add_argument("--tag", default="ab", help="the table goes to $OUT/<tag>.md")
    args = parser.parse_args(argv)
    option_sets = json.loads(args.options)
    out_path = os.path.join(os.environ.get("OUT", "."), f"{args.tag}.md")
    lines = ["| shape | variant | mode | " + " | ".join([*option_sets, "torch_flex"]) + " |"]
    lines.append("|" + "---|" * (len(option_sets) + 4))
    for shape in args.shapes.split(","):
        _, Hq, _, S, _ = ba.parse_shape(shape)
        found = [*ba.variants(Hq, S, "cuda"), *_experiment_variants(Hq, S, "cuda")]
        by_name = {v.name: v for v in found}
        for variant_name in args.variants.split(","):
            for mode in args.modes.split(","):
                results = _cell(
                    shape, by_name[variant_name], mode, option_sets, not args.no_peer
                )
                cells = [results.get(n, "") for n in [*option_sets, "torch_flex"]]
                lines.append(f"| {shape} | {variant_name} | {mode} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
                with open(out_path, "w") as f:
                    f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
