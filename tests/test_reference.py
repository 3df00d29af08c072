"""The eager reference against the float64 dense oracle (and torch as a peer)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from mod_defs import MOD_CASES, MOD_CASES_BY_NAME, Dims, block_mask_for, case_ids, cases_tagged
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import reference
from flex_inductor.block_mask import BlockMask, create_block_mask
from flex_inductor.masks import causal
from flex_inductor.mods import softcap
from flex_inductor.reference import flex_attention_reference, reference_forward

F64_ATOL = 1e-10


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev))
    return tuple(
        torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad)
        for shape in shapes
    )


def _run_case(
    case, dims, Hkv, E=16, Ev=24, dtype=torch.float64, scale=0.3, broadcast=False, block=16
):
    """(ours, oracle, lowp) as (out, lse) pairs for one case."""
    built = case.build(dims)
    q, k, v = _inputs(dims.B, dims.H, Hkv, dims.L, dims.S, E, Ev, dtype)
    block_mask = block_mask_for(built.mask_mod, dims, block, broadcast)
    gqa = dims.H != Hkv
    ours = flex_attention_reference(
        q, k, v, built.score_mod, block_mask, scale, enable_gqa=gqa, return_lse=True
    )
    oracle = dense_oracle(q, k, v, built.score_mod, block_mask, scale, gqa)
    lowp = lowp_attention(q, k, v, built.score_mod, block_mask, scale, gqa)
    return ours, oracle, lowp


def _assert_pairs_close(ours, oracle, lowp, atol):
    for name, a, b, c in zip(("out", "lse"), ours, oracle, lowp, strict=True):
        assert_close_to_oracle(a, b, c, name, atol=atol)


# ---------------------------------------------------------------------------
# Every case of the library, float64, GQA, Ev != E, odd lengths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", MOD_CASES, ids=case_ids(MOD_CASES))
def test_every_case_matches_oracle(case):
    # Non-square blocks, so that q and kv block indices cannot be confused.
    ours, oracle, lowp = _run_case(case, Dims(B=2, H=4, L=37, S=53), Hkv=2, block=(8, 16))
    _assert_pairs_close(ours, oracle, lowp, F64_ATOL)


BROADCASTABLE = [
    c for c in MOD_CASES if c.mask_mod_factory and not c.tags & {"per_head", "per_batch"}
]


@pytest.mark.parametrize("case", BROADCASTABLE, ids=case_ids(BROADCASTABLE))
def test_broadcast_block_mask_matches_oracle(case):
    # The block mask has B = H = 1; the mods still see the inputs' b and h.
    ours, oracle, lowp = _run_case(
        case, Dims(B=2, H=3, L=29, S=29), Hkv=3, broadcast=True, block=(16, 8)
    )
    _assert_pairs_close(ours, oracle, lowp, F64_ATOL)


def test_mask_mod_sees_input_b_and_h_under_broadcast():
    # A B = H = 1 block mask with one partial block and a b/h-dependent
    # mask_mod: the partial block applies mask_mod with the real b and h.
    q, k, v = _inputs(2, 2, 2, 16, 16, 8, 8)

    def per_batch_and_head(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + h + 2 * b

    block_mask = BlockMask.from_kv_blocks(
        torch.ones(1, 1, 1), torch.zeros(1, 1, 1, 1), BLOCK_SIZE=16,
        mask_mod=per_batch_and_head, seq_lengths=(16, 16),
    )
    ours = reference_forward(q, k, v, None, block_mask, 0.5)
    oracle = dense_oracle(q, k, v, None, per_batch_and_head, 0.5)
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=F64_ATOL)


# Odd shapes beside round ones: (B, Hq, Hkv, L, S, E, Ev).
ODD_SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (1, 2, 2, 1, 17, 40, 40),
    (2, 2, 1, 17, 1, 64, 16),
    (1, 3, 3, 113, 17, 96, 96),
    (2, 4, 2, 17, 113, 40, 64),
    (1, 1, 1, 1023, 1023, 16, 16),
]
ODD_CASES = ["softcap_causal", "document_causal", "relative_bias_causal"]


@pytest.mark.parametrize("case_name", ODD_CASES)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes_float32(shape, case_name):
    B, Hq, Hkv, L, S, E, Ev = shape
    ours, oracle, lowp = _run_case(
        MOD_CASES_BY_NAME[case_name], Dims(B, Hq, L, S), Hkv, E, Ev, torch.float32, scale=None
    )
    assert ours[0].dtype == torch.float32 and ours[0].shape == (B, Hq, L, Ev)
    _assert_pairs_close(ours, oracle, lowp, atol=1e-5)


# ---------------------------------------------------------------------------
# Low precision against the float64 oracle, with the tolerance rule
# ---------------------------------------------------------------------------

DTYPE_CASES = ["noop", "causal", "alibi_sliding_window", "softcap_causal", "document", "full_bias"]


@pytest.mark.parametrize("case_name", DTYPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_within_twice_lowp_error(dtype, case_name):
    dims = Dims(B=2, H=4, L=45, S=70)
    ours, oracle, lowp = _run_case(MOD_CASES_BY_NAME[case_name], dims, Hkv=2, E=32, dtype=dtype)
    out, lse = ours
    assert out.dtype == dtype and lse.dtype == torch.float32
    _assert_pairs_close(ours, oracle, lowp, atol=1e-5)


def test_tolerance_rule_catches_an_error():
    # The oracle helper must fail on a result off by more than the rule allows.
    oracle = torch.zeros(4, dtype=torch.float64)
    lowp = torch.full((4,), 1e-3, dtype=torch.float64)
    ours = torch.tensor([0.0, 0.0, 3e-3, 0.0])
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_oracle(ours, oracle, lowp, "out", atol=1e-6)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_oracle(torch.tensor([math.nan, 0, 0, 0]), oracle, lowp, "out")


# ---------------------------------------------------------------------------
# Scale, lse, GQA, return_lse, index dtype
# ---------------------------------------------------------------------------


def test_scale_is_applied_before_score_mod_and_defaults_to_rsqrt_e():
    q, k, v = _inputs(1, 2, 2, 9, 11, 25, 7)
    cap, scale = 1.5, 0.7
    scores = cap * torch.tanh(scale * (q @ k.transpose(-1, -2)) / cap)
    expected = torch.softmax(scores, -1) @ v
    got = flex_attention_reference(q, k, v, softcap(cap), scale=scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=F64_ATOL)
    default = flex_attention_reference(q, k, v)
    torch.testing.assert_close(
        default, torch.softmax(q @ k.transpose(-1, -2) / 5.0, -1) @ v, rtol=0, atol=F64_ATOL
    )


def test_lse_is_natural_log_sum_exp():
    q, k, v = _inputs(2, 2, 2, 13, 21, 8, 8)
    _, lse = flex_attention_reference(q, k, v, scale=0.5, return_lse=True)
    torch.testing.assert_close(
        lse, torch.logsumexp(0.5 * q @ k.transpose(-1, -2), -1), rtol=0, atol=F64_ATOL
    )


def test_return_lse_flag_and_dtypes():
    q, k, v = _inputs(1, 2, 2, 5, 6, 8, 4, dtype=torch.bfloat16)
    out = flex_attention_reference(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    out, lse = flex_attention_reference(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 5, 4) and lse.shape == (1, 2, 5) and lse.dtype == torch.float32
    q, k, v = _inputs(1, 2, 2, 5, 6, 8, 4)
    assert flex_attention_reference(q, k, v, return_lse=True)[1].dtype == torch.float64


def test_gqa_equals_repeated_kv_heads():
    q, k, v = _inputs(2, 6, 2, 19, 23, 16, 8)
    mask = create_block_mask(causal(), 1, 6, 19, 23, "cpu", 8)
    got = flex_attention_reference(q, k, v, block_mask=mask, enable_gqa=True)
    repeated = flex_attention_reference(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), block_mask=mask
    )
    torch.testing.assert_close(got, repeated, rtol=0, atol=F64_ATOL)


def test_gqa_requires_enable_gqa():
    q, k, v = _inputs(1, 4, 2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention_reference(q, k, v)


def test_mods_see_int32_zero_d_indices():
    seen = []

    def record(score, b, h, q_idx, kv_idx):
        seen.append([(t.dtype, t.dim()) for t in (b, h, q_idx, kv_idx)])
        return score

    q, k, v = _inputs(1, 1, 1, 4, 4, 8, 8)
    flex_attention_reference(q, k, v, record)
    assert seen == [[(torch.int32, 0)] * 4]


def test_full_blocks_skip_mask_mod():
    # A causal block layout whose mask_mod rejects everything: full blocks are
    # still attended (mask_mod is not applied there), partial ones are empty.
    L = 32
    q, k, v = _inputs(1, 1, 1, L, L, 8, 8)
    block_mask = create_block_mask(causal(), 1, 1, L, L, "cpu", 8)
    block_mask.mask_mod = lambda b, h, q_idx, kv_idx: q_idx < 0
    out, lse = reference_forward(q, k, v, None, block_mask, 1.0)
    # Full blocks are those strictly below the diagonal: kv block < q block.
    qb, kvb = torch.arange(L) // 8, torch.arange(L) // 8
    keep = kvb[None, :] < qb[:, None]
    scores = (q @ k.transpose(-1, -2)).masked_fill(~keep, -math.inf)
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    torch.testing.assert_close(out, expected, rtol=0, atol=F64_ATOL)
    assert bool(torch.isinf(lse[..., :8]).all()) and bool(torch.isfinite(lse[..., 8:]).all())


# ---------------------------------------------------------------------------
# Fully masked rows
# ---------------------------------------------------------------------------


def _skip_first_block(b, h, q_idx, kv_idx):
    # The whole first query block is empty: skipped blocks, not a partial one.
    return (q_idx >= 16) & (kv_idx <= q_idx)


@pytest.mark.parametrize("mask_name", ["dead_rows", "skip_first_block"])
def test_fully_masked_rows_give_zero_and_minus_inf_without_nan(mask_name):
    dims = Dims(B=2, H=2, L=40, S=40)
    if mask_name == "dead_rows":
        mask_mod = MOD_CASES_BY_NAME["dead_rows"].build(dims).mask_mod
        dead = torch.arange(40) % 3 == 1
    else:
        mask_mod = _skip_first_block
        dead = torch.arange(40) < 16
    block_mask = block_mask_for(mask_mod, dims)
    q, k, v = _inputs(2, 2, 2, 40, 40, 16, 16, dtype=torch.float32, requires_grad=True)
    out, lse = flex_attention_reference(q, k, v, block_mask=block_mask, return_lse=True)
    assert bool((out[:, :, dead] == 0).all())
    assert bool((lse[:, :, dead] == -math.inf).all()) and bool(lse[:, :, ~dead].isfinite().all())
    # Gradients through out and through the finite part of lse.
    loss = out.square().sum() + lse[:, :, ~dead].sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert bool((dq[:, :, dead] == 0).all())


# ---------------------------------------------------------------------------
# Gradients: q, k, v and captured learnable tensors
# ---------------------------------------------------------------------------

GRAD_CASES = cases_tagged("learnable") + [
    MOD_CASES_BY_NAME[n] for n in ("softcap_causal", "alibi_sliding_window", "dead_rows")
]


def _grads(fn, q, k, v, params, seed=1):
    out, lse = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse.dtype)
    # -inf lse rows have no gradient to give; keep them out of the loss.
    loss = (out * grad_out).sum() + (lse.masked_fill(lse.isinf(), 0) * grad_lse).sum()
    return torch.autograd.grad(loss, (q, k, v, *params), allow_unused=True)


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_ids(GRAD_CASES))
def test_gradients_match_oracle(case):
    dims = Dims(B=2, H=4, L=33, S=41)
    built = case.build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = _inputs(2, 4, 2, 33, 41, 16, 24, requires_grad=True)

    def ours(q, k, v):
        return reference_forward(q, k, v, built.score_mod, block_mask, 0.3, _chunk_size=10)

    def oracle(q, k, v):
        return dense_oracle(q, k, v, built.score_mod, block_mask, 0.3, enable_gqa=True)

    got = _grads(ours, q, k, v, built.params)
    want = _grads(oracle, q, k, v, built.params)
    names = ["dq", "dk", "dv"] + [f"d_param{i}" for i in range(len(built.params))]
    for name, g, w in zip(names, got, want, strict=True):
        assert g is not None and w is not None, name
        # Captured tensors are float32, so their gradients accumulate in
        # float32 (in a different order in each implementation).
        atol = 1e-9 if g.dtype == torch.float64 else 1e-5 * float(w.abs().max())
        assert_close_to_oracle(g, w, w, name, atol=atol)
    if built.params:
        assert any(bool(g.abs().sum() > 0) for g in got[3:]), "captured tensor got no gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_low_precision_gradients_within_twice_lowp_error(dtype):
    case = MOD_CASES_BY_NAME["relative_bias_causal"]
    dims = Dims(B=1, H=2, L=40, S=40)
    built = case.build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, 32, dtype=dtype, requires_grad=True)

    def run(attention):
        return lambda q, k, v: attention(q, k, v, built.score_mod, block_mask, 0.2)

    def reference_attention(*args):
        return reference_forward(*args)

    got = _grads(run(reference_attention), q, k, v, built.params)
    want = _grads(run(dense_oracle), q, k, v, built.params)
    lowp = _grads(run(lowp_attention), q, k, v, built.params)
    for name, g, w, lp in zip(("dq", "dk", "dv", "dbias"), got, want, lowp, strict=True):
        assert_close_to_oracle(g, w, lp, name, atol=1e-5)


# ---------------------------------------------------------------------------
# Chunking: same result, bounded memory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_chunked_equals_unchunked(chunk):
    case = MOD_CASES_BY_NAME["relative_bias_causal"]
    dims = Dims(B=2, H=2, L=50, S=31)
    built = case.build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = _inputs(2, 2, 2, 50, 31, 8, 8)
    whole = reference_forward(q, k, v, built.score_mod, block_mask, 0.5, _chunk_size=10_000)
    chunked = reference_forward(q, k, v, built.score_mod, block_mask, 0.5, _chunk_size=chunk)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_default_chunk_bounds_the_score_matrix(monkeypatch):
    # Each chunk evaluates the mods once (one vmap call), so counting calls
    # counts chunks: with room for 8 rows of B x H x S scores, L = 50 takes 7.
    B, H, L, S = 2, 3, 50, 20
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", B * H * S * 8)
    calls = {"score": 0, "mask": 0}

    def counting_score(score, b, h, q_idx, kv_idx):
        calls["score"] += 1
        return score

    def counting_mask(b, h, q_idx, kv_idx):
        calls["mask"] += 1
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal(), B, H, L, S, "cpu", 8)
    block_mask.mask_mod = counting_mask
    q, k, v = _inputs(B, H, H, L, S, 8, 8)
    reference_forward(q, k, v, counting_score, block_mask, 1.0)
    assert calls == {"score": math.ceil(L / 8), "mask": math.ceil(L / 8)}


# ---------------------------------------------------------------------------
# torch's own flex_attention as a peer (tests only)
# ---------------------------------------------------------------------------

PEER_CASES = ["noop", "causal", "alibi", "softcap_causal", "document_causal", "full_bias"]


@pytest.mark.parametrize("case_name", PEER_CASES)
def test_matches_torch_flex_attention(case_name):
    from torch.nn.attention import flex_attention as torch_flex

    dims = Dims(B=2, H=4, L=37, S=53)
    built = MOD_CASES_BY_NAME[case_name].build(dims)
    q, k, v = _inputs(2, 4, 2, 37, 53, 16, 16)
    ours = flex_attention_reference(
        q, k, v, built.score_mod, block_mask_for(built.mask_mod, dims), 0.3, True, True
    )
    peer_mask = None
    if built.mask_mod is not None:
        peer_mask = torch_flex.create_block_mask(
            built.mask_mod, 2, 4, 37, 53, device="cpu", BLOCK_SIZE=16
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer_out, peer_lse = torch_flex.flex_attention(
            q, k, v, built.score_mod, peer_mask, 0.3, enable_gqa=True, return_lse=True
        )
    torch.testing.assert_close(ours[0], peer_out, rtol=0, atol=F64_ATOL)
    torch.testing.assert_close(ours[1], peer_lse, rtol=0, atol=F64_ATOL)


def _backward_of_prescaled(dtype, grad_scale=1.0):
    """reference_backward of a prescaled call: q * s given as query, scale 1."""
    from flex_inductor.reference_backward import reference_backward

    # Head dim 40: the scale is not a power of two, so multiplying by it rounds.
    q, k, v = _inputs(1, 2, 2, 40, 40, 40, 40, torch.float32, seed=3)
    s = 1 / math.sqrt(40)
    q_pre = (q * s).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    bm = create_block_mask(causal(), None, None, 40, 40, "cpu", 16)
    grad_out = grad_scale * torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(4))
    grad_lse = torch.zeros(1, 2, 40)

    def run(query, **kwargs):
        return reference_backward(
            query, k, v, None, None, grad_out, grad_lse, lambda x, *_: x, bm, 1.0, [], **kwargs
        )[0]

    return q_pre, s, run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_backward_scales_dq_before_its_one_rounding(dtype):
    q_pre, s, run = _backward_of_prescaled(dtype)
    # The same maths with a float32 query: the unrounded d(q * s).
    exact = run(q_pre.float())
    assert torch.equal(run(q_pre, dq_scale=s), (exact * s).to(dtype))
    # Rounding d(q * s) first and then the product (the dense fallback's old
    # way) differs: this case tells the two apart.
    assert not torch.equal(run(q_pre, dq_scale=s), (run(q_pre) * s).to(dtype))


def test_reference_backward_dq_scale_keeps_float16_finite():
    # d(q * s) is dq / s, 6.3x dq at head dim 40: past float16's 65504 here,
    # while dq itself fits.
    q_pre, s, run = _backward_of_prescaled(torch.float16)
    peak = run(q_pre.float()).abs().max().item()
    q_pre, s, run = _backward_of_prescaled(torch.float16, grad_scale=2e5 / peak)
    assert torch.isinf(run(q_pre)).any()
    dq = run(q_pre, dq_scale=s)
    assert torch.isfinite(dq).all()
    assert torch.equal(dq, (run(q_pre.float()) * s).to(torch.float16))
