"""Quick correctness smoke test on a GPU: forward and backward vs the reference.

Covers the template paths the interpreter cannot check for compile errors
(real tl.dot shapes, bf16/fp16, pipelining). Prints one line per case and
exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import flex_inductor as fi
from flex_inductor import masks, mods


def _case(name, B, Hq, Hkv, L, S, E, Ev, score_mod, mask_mod, dtype, backward=True):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(B, Hq, L, E, device=dev, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, Hkv, S, E, device=dev, dtype=dtype, requires_grad=backward)
    v = torch.randn(B, Hkv, S, Ev, device=dev, dtype=dtype, requires_grad=backward)
    bm = fi.create_block_mask(mask_mod, None, None, L, S, device=dev) if mask_mod else None
    grad_out = torch.randn(B, Hq, L, Ev, device=dev, dtype=dtype)
    results = []
    for impl, cast in ((fi.flex_attention, dtype), (fi.flex_attention_reference, torch.float64)):
        qq, kk, vv = (t.detach().to(cast).requires_grad_(backward) for t in (q, k, v))
        out = impl(qq, kk, vv, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv)
        grads = []
        if backward:
            out.backward(grad_out.to(cast))
            grads = [qq.grad, kk.grad, vv.grad]
        results.append([out, *grads])
    errors = [(a.double() - b).abs().max().item() for a, b in zip(*results, strict=False)]
    scale = [b.abs().max().item() for b in results[1]]
    tol = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    ok = all(e <= tol * max(1.0, s) for e, s in zip(errors, scale, strict=False)) and not any(
        torch.isnan(t).any().item() for t in results[0]
    )
    print(f"{'ok ' if ok else 'BAD'} {name:<40} {dtype} errs={[f'{e:.2e}' for e in errors]}")
    return ok


def main() -> int:
    H = 4
    cases = [
        ("noop bf16", 2, H, H, 256, 256, 64, 64, None, None, torch.bfloat16),
        ("causal bf16", 2, H, H, 384, 384, 128, 128, None, masks.causal(), torch.bfloat16),
        (
            "alibi causal fp16",
            1,
            H,
            H,
            300,
            300,
            64,
            64,
            mods.alibi(H, device="cuda"),
            masks.causal(),
            torch.float16,
        ),
        (
            "softcap sliding fp32",
            1,
            H,
            H,
            257,
            257,
            40,
            40,
            mods.softcap(20.0),
            masks.sliding_window(64),
            torch.float32,
        ),
        (
            "gqa document Ev!=E bf16",
            1,
            8,
            2,
            500,
            500,
            96,
            64,
            None,
            masks.document(lengths=[100, 250, 150], device="cuda"),
            torch.bfloat16,
        ),
        ("odd lengths L=17 S=1023", 1, H, H, 17, 1023, 64, 64, None, None, torch.bfloat16),
        ("L=1 decode-shaped", 2, H, H, 1, 700, 128, 128, None, None, torch.bfloat16),
        ("head dim 256", 1, 2, 2, 256, 256, 256, 256, None, masks.causal(), torch.bfloat16),
    ]
    ok = True
    for case in cases:
        try:
            ok &= _case(*case)
        except Exception as error:
            ok = False
            print(f"ERR {case[0]}: {error!r}"[:2000])
    bias = torch.randn(H, 2 * 512 - 1, device="cuda", requires_grad=True)
    try:
        ok &= _learnable_bias(bias)
    except Exception as error:
        ok = False
        print(f"ERR learnable bias: {error!r}"[:2000])
    return 0 if ok else 1


def _learnable_bias(bias):
    torch.manual_seed(0)
    L = 512
    q, k, v = (
        torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    score_mod = mods.relative_position_bias(bias)
    bm = fi.create_block_mask(masks.causal(), None, None, L, L, device="cuda")
    out = fi.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
    out.float().square().sum().backward()
    ours = bias.grad.clone()
    bias.grad = None
    ref = fi.flex_attention_reference(
        *(t.detach().double().requires_grad_() for t in (q, k, v)),
        score_mod=mods.relative_position_bias(bias.double() if False else bias),
        block_mask=bm,
    )
    ref.float().square().sum().backward()
    err = (ours - bias.grad).abs().max().item()
    ok = err <= 5e-2 * max(1.0, bias.grad.abs().max().item())
    print(f"{'ok ' if ok else 'BAD'} learnable bias grad err={err:.2e}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
