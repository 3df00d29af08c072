"""The split-KV decode kernel: correctness against the float64 oracle, and dispatch.

Short queries (L <= DECODE_MAX_QUERY_LEN, 16) use the decode template; longer ones the forward
template. Without a GPU the kernels run in Triton's interpreter, so shapes are
small; ``SPLIT_KV`` is forced above 1 in most cases so that the merge of the
splits by their lse is always exercised.
"""

from __future__ import annotations

import pytest
import torch
from compile_utils import compile_and_run
from flex_inductor.lowering.decode import DECODE_MAX_QUERY_LEN
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from torch._inductor.utils import run_and_get_code

import flex_inductor as fi
from flex_inductor import masks, mods

BLOCK = 16  # BlockMask block size: short caches still have several blocks


def _cache_causal(offset: int):
    """Causal mask for queries that sit at positions offset..offset+L-1 of the cache."""

    def cached_causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return cached_causal


def _cache_sliding(offset: int, window: int):
    def cached_sliding(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (pos >= kv_idx) & (pos - kv_idx <= window)

    return cached_sliding


def _run(
    device, B, Hq, Hkv, L, S, E, score_mod, mask_mod, dtype=torch.float32, splits=3,
    q_block=BLOCK, force_decode=False,
):
    gen = torch.Generator().manual_seed(L * 1000 + S)
    q = torch.randn(B, Hq, L, E, generator=gen, dtype=dtype).to(device)
    k = torch.randn(B, Hkv, S, E, generator=gen, dtype=dtype).to(device)
    v = torch.randn(B, Hkv, S, E, generator=gen, dtype=dtype).to(device)
    bm = (
        fi.create_block_mask(
            mask_mod, None, None, L, S, device=device, BLOCK_SIZE=(q_block, BLOCK)
        )
        if mask_mod
        else None
    )
    options = {"SPLIT_KV": splits, **({"FORCE_DECODE": True} if force_decode else {})}

    def call(q, k, v):
        return fi.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=bm,
            enable_gqa=Hq != Hkv,
            return_lse=True,
            kernel_options=options,
        )

    result = compile_and_run(call, q, k, v)
    out, lse = result.output
    gqa = Hq != Hkv
    ref = dense_oracle(q.double(), k.double(), v.double(), score_mod, bm, enable_gqa=gqa)
    low = lowp_attention(q, k, v, score_mod, bm, enable_gqa=gqa)
    assert_close_to_oracle(out, ref[0], low[0], "out", atol=1e-5)
    assert_close_to_oracle(lse, ref[1], low[1], "lse", atol=1e-5)
    return result


def test_longest_measured_decode_queries_match_oracle(device):
    # L=64, where the decode template was still faster on the H100, with a
    # GQA group of 4: 256 packed query rows.
    L, S = 64, 75
    # Every query row must sit in the BlockMask's first query block.
    result = _run(
        device, 1, 8, 2, L, S, 16, None, _cache_causal(S - L), q_block=L, force_decode=True
    )
    assert result.kernels("flex_inductor_decode")


@pytest.mark.parametrize("L", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_matches_oracle_causal_with_cache_offset(device, L, group):
    S = 75  # odd cache length: the last block is partly past the end
    result = _run(device, 1, 8, 8 // group, L, S, 16, None, _cache_causal(S - L))
    assert result.kernels("flex_inductor_decode"), (
        "the decode template should run for short queries"
    )
    assert not result.kernels("flex_inductor_fwd")


@pytest.mark.parametrize(
    "name",
    ["noop", "sliding_window", "alibi", "document"],
)
def test_decode_variants(device, name):
    L, S, H = 2, 93, 4
    score_mod, mask_mod = None, None
    if name == "sliding_window":
        mask_mod = _cache_sliding(S - L, 20)
    elif name == "alibi":
        score_mod, mask_mod = mods.alibi(H, device=device), _cache_causal(S - L)
    elif name == "document":
        doc = masks.document(lengths=[30, 41, 22], device=device)
        offset = S - L

        def doc_decode(b, h, q_idx, kv_idx):
            return doc(b, h, q_idx + offset, kv_idx)

        mask_mod = doc_decode
    result = _run(device, 2, H, H, L, S, 32, score_mod, mask_mod)
    assert result.kernels("flex_inductor_decode")


def test_decode_fully_masked_rows_give_zero_and_neg_inf(device):
    def nothing(b, h, q_idx, kv_idx):
        return kv_idx < 0

    _run(device, 1, 2, 2, 2, 40, 16, None, nothing)


def test_decode_bf16(device):
    _run(device, 1, 4, 1, 1, 64, 32, None, _cache_causal(63), dtype=torch.bfloat16, splits=2)


def test_long_queries_use_the_forward_template(device):
    L = DECODE_MAX_QUERY_LEN + 1
    q = k = v = torch.randn(1, 2, L, 16, device=device)
    result = compile_and_run(lambda q, k, v: fi.flex_attention(q, k, v), q, k, v)
    assert result.kernels("flex_inductor_fwd")
    assert not result.kernels("flex_inductor_decode")


def test_kernel_options_force_either_template(device):
    q = torch.randn(1, 2, 4, 16, device=device)
    k = v = torch.randn(1, 2, 48, 16, device=device)
    forced_fwd = compile_and_run(
        lambda q, k, v: fi.flex_attention(
            q, k, v, kernel_options={"FORCE_USE_FLEX_ATTENTION": True}
        ),
        q,
        k,
        v,
    )
    assert forced_fwd.kernels("flex_inductor_fwd") and not forced_fwd.kernels(
        "flex_inductor_decode"
    )
    q_long = torch.randn(1, 2, 24, 16, device=device)
    forced_decode = compile_and_run(
        lambda q, k, v: fi.flex_attention(q, k, v, kernel_options={"FORCE_DECODE": True}),
        q_long,
        k,
        v,
    )
    assert forced_decode.kernels("flex_inductor_decode")
    ref = fi.flex_attention_reference(q_long, k, v)
    torch.testing.assert_close(forced_decode.output, ref, atol=2e-5, rtol=1e-5)


def test_backward_through_a_decode_shaped_call_uses_the_backward_templates(device):
    q = torch.randn(1, 2, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 40, 16, device=device, requires_grad=True)
    v = torch.randn(1, 2, 40, 16, device=device, requires_grad=True)

    torch._dynamo.reset()
    compiled = torch.compile(fi.flex_attention, fullgraph=True)

    def step():
        out = compiled(q, k, v)
        out.sum().backward()  # the backward graph compiles here, outside Dynamo
        return out

    _, code = run_and_get_code(step)
    source = "\n".join(code)
    assert "flex_inductor_decode" in source
    assert "flex_inductor_bwd" in source
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fi.flex_attention_reference(q, k, v).sum().backward()
    for ours, ref in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_force_decode_rejects_queries_longer_than_the_query_block(device):
    q = torch.randn(1, 2, 40, 16, device=device)
    k = v = torch.randn(1, 2, 40, 16, device=device)
    bm = fi.create_block_mask(masks.causal(), None, None, 40, 40, device=device, BLOCK_SIZE=16)
    with pytest.raises(Exception, match="FORCE_DECODE"):
        compile_and_run(
            lambda q, k, v: fi.flex_attention(
                q, k, v, block_mask=bm, kernel_options={"FORCE_DECODE": True}
            ),
            q,
            k,
            v,
        )
