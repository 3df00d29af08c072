"""The compiled forward kernel against the float64 oracle.

Every case compiles ``flex_attention`` with Inductor (``compile_and_run``:
``fullgraph=True``, Dynamo reset first), so the generated
``flex_inductor_fwd`` Triton template runs: on CUDA when there is a GPU,
otherwise on CPU tensors in Triton's interpreter (see ``conftest.py``).
Results must satisfy the shared tolerance rule
(``oracle.assert_close_to_oracle``): within twice the error of the same
maths done plainly in the input's precision, plus a small atol.

Shapes stay small because the interpreter runs each program with numpy.
Odd shapes (1, 17, 113, 1023; head dims 40, 80, 96) are labelled as such.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from compile_utils import compile_and_run
from conftest import HAS_CUDA
from mod_defs import MOD_CASES, MOD_CASES_BY_NAME, Dims, block_mask_for, case_ids
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from torch._inductor.utils import run_and_get_code

import flex_inductor
from flex_inductor import create_block_mask, flex_attention, masks, mods
from flex_inductor.block_mask import BlockMask

KERNEL = "flex_inductor_fwd"
TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def make_qkv(B, Hq, L, S, E, Ev=None, Hkv=None, dtype=torch.float32, device="cpu", seed=0):
    """Random ``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)``."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = Hq if Hkv is None else Hkv
    Ev = E if Ev is None else Ev
    shapes = ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev))
    return tuple(torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes)


def run_compiled(q, k, v, score_mod=None, block_mask=None, enable_gqa=False, **kwargs):
    """Compiled ``flex_attention(..., return_lse=True)``: ``(out, lse, CompileResult)``.

    Runs under ``no_grad`` so that only the forward is compiled: captured
    tensors that require grad must not pull the backward into these tests.
    ``FORCE_USE_FLEX_ATTENTION`` keeps short queries on the forward template
    (they would otherwise go to the decode template, tested elsewhere).
    """
    options = kwargs.get("kernel_options", {})
    kwargs["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True, **options}

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa,
            return_lse=True, **kwargs,
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    out, lse = result.output
    return out, lse, result


def assert_matches_oracle(out, lse, q, k, v, score_mod=None, mask=None, enable_gqa=False):
    """Tolerance rule for ``out`` and (unless None) ``lse``; dtypes and shapes too."""
    oracle_out, oracle_lse = dense_oracle(
        q.double(), k.double(), v.double(), score_mod, mask, None, enable_gqa
    )
    lowp_out, lowp_lse = lowp_attention(q, k, v, score_mod, mask, None, enable_gqa)
    assert out.dtype == q.dtype and out.device == q.device
    assert_close_to_oracle(out, oracle_out, lowp_out, "out")
    if lse is not None:
        assert lse.dtype == torch.float32
        assert_close_to_oracle(lse, oracle_lse, lowp_lse, "lse")


def template_kernels(result) -> list[str]:
    """Our template kernels in the generated code.

    Pointwise kernels that build a BlockMask inside the graph may carry the
    op's name too (``triton_poi_fused_arange_..._flex_inductor_fwd_...``):
    they realise the op's inputs. Only ``triton_tem_`` kernels are templates.
    """
    return [name for name in result.kernels(KERNEL) if name.startswith("triton_tem_")]


def check_compiled(q, k, v, score_mod=None, block_mask=None, enable_gqa=False, **kwargs):
    """Compile, run, check one template kernel ran, and check against the oracle."""
    out, lse, result = run_compiled(q, k, v, score_mod, block_mask, enable_gqa, **kwargs)
    assert len(template_kernels(result)) == 1, result.kernels("")
    assert_matches_oracle(out, lse, q, k, v, score_mod, block_mask, enable_gqa)
    return out, lse, result


def block_mask_from_states(states, block_size, seq_lengths, mask_mod=None, with_full=True):
    """A BlockMask from an int ``(B, H, nq, nkv)`` map: 0 skipped, 1 partial, 2 full.

    Built with ``BlockMask.from_kv_blocks``: each row lists its partial (or
    full) blocks first in ascending order, then pads with the other block
    indices, so padding entries are valid indices as the format requires.
    With ``with_full=False`` full blocks are listed as partial ones.
    """
    if not with_full:
        states = torch.where(states == 2, 1, states)

    def listed(state):
        # A stable argsort of "not in this list" puts the listed blocks first.
        chosen = states == state
        indices = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
        return chosen.sum(-1).to(torch.int32), indices.to(torch.int32)

    partial_num, partial_idx = listed(1)
    full_num, full_idx = listed(2) if with_full else (None, None)
    return BlockMask.from_kv_blocks(
        partial_num, partial_idx, full_num, full_idx,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=seq_lengths,
    )


def random_states(B, H, nq, nkv, seed, p_partial=0.4, p_full=0.3):
    """A random block map with skipped, partial and full blocks."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand((B, H, nq, nkv), generator=gen)
    states = torch.zeros((B, H, nq, nkv), dtype=torch.int64)
    states[draw < p_partial + p_full] = 1
    states[draw < p_full] = 2
    return states


# ---------------------------------------------------------------------------
# Every mod of the library
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", MOD_CASES, ids=case_ids(MOD_CASES))
def test_every_mod(case, device):
    dims = Dims(B=2, H=2, L=37, S=53, device=device)
    built = case.build(dims)
    q, k, v = make_qkv(dims.B, dims.H, dims.L, dims.S, 16, dtype=torch.float16, device=device)
    block_mask = block_mask_for(built.mask_mod, dims)
    out, lse, result = run_compiled(q, k, v, built.score_mod, block_mask)
    # row_table_sum reduces a row of its table: torch 2.11 unrolls that small
    # reduction into pointwise code and inlines it; torch 2.13 refuses to,
    # and the call runs through the blockwise dense op instead.
    fused = len(template_kernels(result)) == 1
    if case.name == "row_table_sum":
        assert fused or "flex_inductor.dense_attention" in result.source
    else:
        assert fused
    assert_matches_oracle(out, lse, q, k, v, built.score_mod, block_mask)


def test_constant_score_mod_on_whole_tiles(device):
    # A score_mod that ignores its inputs gives Inductor a [1]-shaped value;
    # with whole tiles and only full blocks nothing else broadcasts it.
    def constant(score, b, h, q_idx, kv_idx):
        return torch.zeros_like(score)

    q, k, v = make_qkv(1, 1, 128, 128, 16, device=device)
    check_compiled(q, k, v, constant)


def test_score_mod_computing_in_float64(device):
    # A captured float64 table promotes the mod's result to float64; the
    # softmax must still run in float32 (acc's dtype is fixed by the loop).
    bias = torch.randn(53, dtype=torch.float64, device=device)

    def float64_bias(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=torch.float16, device=device)
    check_compiled(q, k, v, float64_bias)


def test_non_contiguous_inputs(device):
    # (B, L, H, E) activations viewed as (B, H, L, E): the kernel reads strides.
    gen = torch.Generator().manual_seed(0)

    def bhle(S, H, E):
        return torch.randn(2, S, H, E, generator=gen).to(device).transpose(1, 2)

    q, k, v = bhle(37, 4, 16), bhle(45, 2, 16), bhle(45, 2, 24)
    block_mask = create_block_mask(masks.causal(), 1, 1, 37, 45, device=device, BLOCK_SIZE=16)
    out, _, _ = check_compiled(q, k, v, mods.alibi(4, device=device), block_mask,
                               enable_gqa=True)
    assert out.is_contiguous()


# ---------------------------------------------------------------------------
# Random BlockMasks built from kv blocks
# ---------------------------------------------------------------------------


def _checkerboard(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx) % 3 != 0


@pytest.mark.parametrize(
    "name, mask_mod, with_full, block_size, broadcast",
    [
        ("noop_partials", None, True, 16, False),
        ("checkerboard_partials", _checkerboard, True, 16, False),
        ("causal_partials_no_full_lists", masks.causal(), False, 16, False),
        ("checkerboard_32_blocks", _checkerboard, True, 32, False),
        ("checkerboard_rect_blocks", _checkerboard, True, (16, 32), False),
        ("broadcast_over_batch_heads", _checkerboard, True, 16, True),
    ],
)
def test_random_block_mask(name, mask_mod, with_full, block_size, broadcast, device):
    B, H, L, S = 2, 2, 45, 70  # neither a multiple of 16 nor of 32
    qb, kvb = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nkv = -(-L // qb), -(-S // kvb)
    states = random_states(1 if broadcast else B, 1 if broadcast else H, nq, nkv, seed=len(name))
    block_mask = block_mask_from_states(states, (qb, kvb), (L, S), mask_mod, with_full).to(device)
    q, k, v = make_qkv(B, H, L, S, 16, dtype=torch.float16, device=device)
    check_compiled(q, k, v, block_mask=block_mask)


def test_random_block_mask_with_score_mod_and_gqa(device):
    B, Hq, Hkv, L, S = 1, 4, 2, 33, 47
    states = random_states(B, Hq, 3, 3, seed=7)
    block_mask = block_mask_from_states(states, 16, (L, S), masks.causal()).to(device)
    q, k, v = make_qkv(B, Hq, L, S, 16, Hkv=Hkv, dtype=torch.bfloat16, device=device)
    check_compiled(q, k, v, mods.alibi(Hq, device=device), block_mask, enable_gqa=True)


@pytest.mark.parametrize("block_size", [8, 24, (16, 8)], ids=str)
def test_block_sizes_no_tile_fits_use_dense_op(block_size, device):
    # Tiles are multiples of 16 (tl.dot's minimum) and step whole sparse
    # blocks; smaller or odd BlockMask blocks go to the blockwise dense op.
    L, S = 40, 45
    block_mask = create_block_mask(_checkerboard, 1, 1, L, S, device=device,
                                   BLOCK_SIZE=block_size)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float16, device=device)
    out, lse, result = run_compiled(q, k, v, block_mask=block_mask)
    assert "flex_inductor.dense_attention" in result.source
    assert not template_kernels(result)
    assert_matches_oracle(out, lse, q, k, v, None, block_mask)


def test_full_blocks_skip_mask_mod(device):
    # Every block is listed as full while the mask_mod keeps nothing: the
    # kernel must not evaluate mask_mod on full blocks, so all is attended.
    L = S = 40

    def keep_nothing(b, h, q_idx, kv_idx):
        return q_idx < 0

    states = torch.full((1, 1, 3, 3), 2)
    block_mask = block_mask_from_states(states, 16, (L, S), keep_nothing).to(device)
    q, k, v = make_qkv(1, 2, L, S, 16, device=device)
    out, lse, _ = check_compiled(q, k, v, block_mask=block_mask)
    assert torch.isfinite(lse).all()


# ---------------------------------------------------------------------------
# Odd shapes: lengths, head dims, Ev != E
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L, S",
    [(1, 1), (1, 17), (17, 1), (17, 113), (113, 17), (48, 80), (40, 72)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "causal"])
def test_odd_lengths(L, S, masked, device):
    block_mask = (
        create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
        if masked else None
    )
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float16, device=device, seed=L + S)
    check_compiled(q, k, v, block_mask=block_mask)


def test_short_queries_without_forcing(device):
    # Left to itself a short query may take the decode template; either way
    # exactly one template kernel runs and the result is right.
    q, k, v = make_qkv(2, 4, 1, 70, 16, Hkv=2, dtype=torch.float16, device=device)
    block_mask = create_block_mask(masks.causal(), 1, 1, 1, 70, device=device, BLOCK_SIZE=16)

    def attention(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    templates = [n for n in result.kernels("flex_inductor_") if n.startswith("triton_tem_")]
    assert len(templates) == 1, templates
    assert_matches_oracle(*result.output, q, k, v, None, block_mask, enable_gqa=True)


@pytest.mark.parametrize("E, Ev", [(16, 16), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128)])
def test_head_dims(E, Ev, device):
    q, k, v = make_qkv(1, 1, 24, 40, E, Ev, dtype=torch.float16, device=device, seed=E)
    check_compiled(q, k, v, mods.softcap(5.0))


@pytest.mark.parametrize("E, Ev", [(16, 40), (64, 16), (40, 80), (96, 32)])
def test_value_head_dim_differs(E, Ev, device):
    L, S = 29, 45
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(2, 2, L, S, E, Ev, dtype=torch.bfloat16, device=device, seed=Ev)
    out, _, _ = check_compiled(q, k, v, block_mask=block_mask)
    assert out.shape == (2, 2, L, Ev)


@pytest.mark.parametrize(
    "dims",
    [
        # Long enough for many kv blocks per row and many programs, still
        # cheap in the interpreter with B = H = 1.
        pytest.param((1023, 1023, 16), id="odd_1023"),
        pytest.param((256, 1023, 64), id="odd_256x1023_E64", marks=pytest.mark.slow),
    ],
)
def test_long_odd_length(dims, device):
    L, S, E = dims
    block_mask = create_block_mask(
        masks.sliding_window(40), 1, 1, L, S, device=device, BLOCK_SIZE=32
    )
    q, k, v = make_qkv(1, 1, L, S, E, dtype=torch.float16, device=device)
    check_compiled(q, k, v, block_mask=block_mask)


# ---------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("case_name", ["alibi", "head_window", "softcap_causal"])
def test_gqa(groups, case_name, device):
    Hkv = 2
    dims = Dims(B=2, H=Hkv * groups, L=31, S=50, device=device)
    built = MOD_CASES_BY_NAME[case_name].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = make_qkv(dims.B, dims.H, dims.L, dims.S, 16, Hkv=Hkv, dtype=torch.float16,
                       device=device)
    check_compiled(q, k, v, built.score_mod, block_mask, enable_gqa=True)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case_name", ["noop", "alibi_sliding_window", "softcap_document"])
def test_dtypes(dtype, case_name, device):
    dims = Dims(B=1, H=2, L=50, S=50, device=device)
    built = MOD_CASES_BY_NAME[case_name].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = make_qkv(dims.B, dims.H, dims.L, dims.S, 32, dtype=dtype, device=device)
    check_compiled(q, k, v, built.score_mod, block_mask)


# ---------------------------------------------------------------------------
# Fully masked rows, return_lse
# ---------------------------------------------------------------------------


def _assert_dead_rows(out, lse, dead):
    """Rows in ``dead`` (bool over (B, H, L)) give exactly 0 and -inf; others finite."""
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[dead] == 0).all()
    assert (lse[dead] == float("-inf")).all()
    assert torch.isfinite(lse[~dead]).all()


def test_dead_rows_inside_partial_blocks(device):
    dims = Dims(B=1, H=2, L=41, S=41, device=device)
    built = MOD_CASES_BY_NAME["dead_rows"].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = make_qkv(1, 2, 41, 41, 16, dtype=torch.float16, device=device)
    out, lse, _ = check_compiled(q, k, v, block_mask=block_mask)
    dead = (torch.arange(41, device=device) % 3 == 1).expand(1, 2, 41)
    _assert_dead_rows(out, lse, dead)


def test_query_blocks_without_any_kv_block(device):
    # Query blocks 1 and 3 list no block at all: the kernel's loops do not
    # run for them, and their rows must come out as 0 / -inf.
    L, S = 60, 50
    states = random_states(1, 1, 4, 4, seed=3, p_partial=0.5, p_full=0.5)
    states[:, :, 1] = 0
    states[:, :, 3] = 0
    block_mask = block_mask_from_states(states, 16, (L, S), _checkerboard).to(device)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.bfloat16, device=device)
    out, lse, _ = check_compiled(q, k, v, block_mask=block_mask)
    rows = torch.arange(L, device=device) // 16
    dead = ((rows == 1) | (rows == 3)).expand(1, 2, L)
    _assert_dead_rows(out, lse, dead)


def test_empty_block_mask(device):
    states = torch.zeros((1, 1, 2, 2), dtype=torch.int64)
    block_mask = block_mask_from_states(states, 16, (20, 30), None).to(device)
    q, k, v = make_qkv(1, 1, 20, 30, 16, device=device)
    out, lse, _ = check_compiled(q, k, v, block_mask=block_mask)
    _assert_dead_rows(out, lse, torch.ones((1, 1, 20), dtype=torch.bool, device=device))


def test_return_lse_flag(device):
    q, k, v = make_qkv(1, 2, 20, 20, 16, device=device)

    def both(q, k, v):
        return flex_attention(q, k, v, return_lse=True)

    def out_only(q, k, v):
        return flex_attention(q, k, v)

    with torch.no_grad():
        out, lse = compile_and_run(both, q, k, v).output
        plain = compile_and_run(out_only, q, k, v).output
    assert isinstance(plain, torch.Tensor)
    assert lse.shape == (1, 2, 20) and lse.dtype == torch.float32
    assert_matches_oracle(out, lse, q, k, v)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# kernel_options
# ---------------------------------------------------------------------------


def _constexpr(source: str, name: str) -> str:
    """The value a template kernel binds to constexpr ``name``."""
    marker = f"    {name} : tl.constexpr = "
    line = next(line for line in source.splitlines() if line.startswith(marker))
    return line[len(marker):]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"BLOCK_M": 32, "BLOCK_N": 16}, {"BLOCK_M": "32", "BLOCK_N": "16"}),
        ({"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 32, "BLOCK_M": 32}, {"BLOCK_M": "16", "BLOCK_N": "32"}),
        ({"bwd_BLOCK_M": 32}, {"BLOCK_M": None}),  # backward keys leave the forward alone
        ({"PRESCALE_QK": True}, {"PRESCALE_QK": "True"}),
        ({"ROWS_GUARANTEED_SAFE": True}, {"ROWS_GUARANTEED_SAFE": "True"}),
        ({"BLOCKS_ARE_CONTIGUOUS": True}, {}),
    ],
    ids=["block_sizes", "fwd_prefix_wins", "bwd_prefix_ignored", "prescale_qk",
         "rows_guaranteed_safe", "blocks_are_contiguous"],
)
def test_kernel_options(options, expected, device):
    L, S = 64, 96
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float16, device=device)
    _, _, result = check_compiled(q, k, v, block_mask=block_mask, kernel_options=options)
    default = run_compiled(q, k, v, block_mask=block_mask)[2].source
    for name, value in expected.items():
        want = _constexpr(default, name) if value is None else value
        assert _constexpr(result.source, name) == want, name


def test_kernel_options_num_warps_and_stages(device):
    q, k, v = make_qkv(1, 1, 32, 32, 16, device=device)
    _, _, result = check_compiled(q, k, v, kernel_options={"num_warps": 2, "fwd_num_stages": 2})
    assert "num_warps=2," in result.source
    assert "num_stages=2," in result.source


@pytest.mark.parametrize("return_lse", [False, True])
def test_output_logsumexp_false(return_lse, device):
    # OUTPUT_LOGSUMEXP=False skips the lse store only where nothing reads lse.
    q, k, v = make_qkv(1, 2, 30, 30, 16, device=device)
    # L=30 would take the decode template; this checks the forward's option.
    options = {"OUTPUT_LOGSUMEXP": False, "FORCE_USE_FLEX_ATTENTION": True}

    def attention(q, k, v):
        return flex_attention(q, k, v, return_lse=return_lse, kernel_options=options)

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    out, lse = result.output if return_lse else (result.output, None)
    assert _constexpr(result.source, "OUTPUT_LOGSUMEXP") == str(return_lse)
    assert_matches_oracle(out, lse, q, k, v)


def test_unknown_kernel_option_lists_valid_keys(device):
    q, k, v = make_qkv(1, 1, 16, 16, 16, device=device)
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_Q'\].*valid keys:.*BLOCK_M"):
        flex_attention(q, k, v, kernel_options={"BLOCK_Q": 16})


@pytest.mark.parametrize(
    "options", [{"BLOCK_M": 32}, {"fwd_BLOCK_N": 48}, {"BLOCK_N": 256}],
    ids=["BLOCK_M_32_vs_16", "fwd_BLOCK_N_48_vs_16", "BLOCK_N_256_vs_default_128"],
)
def test_block_sizes_must_divide_block_mask(options, device):
    q, k, v = make_qkv(1, 1, 40, 40, 16, device=device)
    block_mask = (
        None if "BLOCK_N" in options
        else create_block_mask(masks.causal(), 1, 1, 40, 40, device=device, BLOCK_SIZE=16)
    )
    with pytest.raises(ValueError, match="must divide the BlockMask's"):
        flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)


# ---------------------------------------------------------------------------
# Auto-dispatch, torch.compile(model), the explicit reference
# ---------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, score_mod, block_mask):
        super().__init__()
        self.score_mod = score_mod
        self.block_mask = block_mask

    def forward(self, q, k, v):
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask)


def test_eager_dispatch_matches_compiled_model(device):
    L, S, H = 35, 35, 4
    block_mask = create_block_mask(masks.sliding_window(9), 1, 1, L, S, device=device,
                                   BLOCK_SIZE=16)
    model = _Attention(mods.alibi(H, device=device), block_mask)
    q, k, v = make_qkv(1, H, L, S, 16, dtype=torch.float16, device=device)
    with torch.no_grad():
        # Eager: flex_attention compiles itself; a fresh Dynamo makes it
        # compile here, so its generated code can be inspected.
        torch._dynamo.reset()
        eager, eager_code = run_and_get_code(model, q, k, v)
        compiled = compile_and_run(model, q, k, v)
    assert any(f"def triton_tem_fused_{KERNEL}" in code for code in eager_code)
    assert len(template_kernels(compiled)) == 1
    assert compiled.op_calls() == 1
    torch.testing.assert_close(eager, compiled.output, rtol=0, atol=0)
    assert_matches_oracle(eager, None, q, k, v, model.score_mod, block_mask)


def test_reference_stays_available(device):
    dims = Dims(B=1, H=2, L=27, S=27, device=device)
    built = MOD_CASES_BY_NAME["softcap_causal"].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = make_qkv(1, 2, 27, 27, 16, device=device)
    out, lse = flex_inductor.flex_attention_reference(
        q, k, v, score_mod=built.score_mod, block_mask=block_mask, return_lse=True
    )
    assert_matches_oracle(out, lse, q, k, v, built.score_mod, block_mask)
    fused, fused_lse, _ = check_compiled(q, k, v, built.score_mod, block_mask)
    assert_close_to_oracle(fused, out.double(), out, "fused vs reference")


# ---------------------------------------------------------------------------
# CPU without the interpreter: the blockwise dense op
# ---------------------------------------------------------------------------

_CPU_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from torch._inductor.utils import run_and_get_code

    import flex_inductor
    from flex_inductor import _compat, flex_attention
    from mod_defs import MOD_CASES_BY_NAME, Dims, block_mask_for
    from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

    assert not _compat.interpreter_active(), "the interpreter must be off here"
    dims = Dims(B=2, H=2, L=37, S=53)
    for name in ("noop", "causal", "alibi_sliding_window", "softcap_document",
                 "relative_bias_causal"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            built = MOD_CASES_BY_NAME[name].build(dims)
            block_mask = block_mask_for(built.mask_mod, dims)
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(2, 2, 37, 16, generator=gen).to(dtype)
            k = torch.randn(2, 2, 53, 16, generator=gen).to(dtype)
            v = torch.randn(2, 2, 53, 24, generator=gen).to(dtype)

            def attention(q, k, v):
                return flex_attention(q, k, v, score_mod=built.score_mod,
                                      block_mask=block_mask, return_lse=True)

            torch._dynamo.reset()
            compiled = torch.compile(attention, backend="inductor", fullgraph=True)
            with torch.no_grad():
                (out, lse), code = run_and_get_code(compiled, q, k, v)
                eager_out = attention(q, k, v)[0]
            code = "\\n".join(code)
            # Memory-bounded by design: the blockwise dense op, no Triton.
            assert "torch.ops.flex_inductor.dense_attention" in code, (name, dtype)
            assert "def triton_" not in code, (name, dtype)
            oracle = dense_oracle(q.double(), k.double(), v.double(), built.score_mod,
                                  block_mask)
            lowp = lowp_attention(q, k, v, built.score_mod, block_mask)
            assert_close_to_oracle(out, oracle[0], lowp[0], f"{{name}} {{dtype}} out")
            assert_close_to_oracle(lse, oracle[1], lowp[1], f"{{name}} {{dtype}} lse")
            assert_close_to_oracle(eager_out, oracle[0], lowp[0], f"{{name}} {{dtype}} eager")
    print("CPU_FALLBACK_OK")
    """
)


def test_cpu_without_interpreter_uses_dense_op():
    env = dict(os.environ)
    env["FLEX_INDUCTOR_INTERPRET"] = "0"
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = _CPU_FALLBACK_SCRIPT.format(tests_dir=str(TESTS_DIR))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "CPU_FALLBACK_OK" in proc.stdout, proc.stderr[-5000:]


@pytest.mark.skipif(not HAS_CUDA, reason="float64 on a GPU: needs CUDA")
def test_float64_on_gpu_uses_dense_op():
    q, k, v = make_qkv(1, 2, 33, 33, 16, dtype=torch.float64, device="cuda")
    block_mask = create_block_mask(masks.causal(), 1, 1, 33, 33, device="cuda", BLOCK_SIZE=16)
    out, lse, result = run_compiled(q, k, v, block_mask=block_mask)
    assert "flex_inductor.dense_attention" in result.source
    assert not template_kernels(result)
    assert_matches_oracle(out, None, q, k, v, None, block_mask)


@pytest.mark.skipif(not HAS_CUDA, reason="realistic sizes: needs CUDA")
@pytest.mark.parametrize("case_name", ["noop", "causal", "alibi_sliding_window", "document_causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_realistic_size_on_gpu(case_name, dtype):
    # The default (Hopper) configs with 128-wide BlockMask blocks, odd lengths.
    dims = Dims(B=2, H=8, L=2047, S=2049, device="cuda")
    built = MOD_CASES_BY_NAME[case_name].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims, block_size=128)
    q, k, v = make_qkv(dims.B, dims.H, dims.L, dims.S, 128, Hkv=4, dtype=dtype, device="cuda")
    check_compiled(q, k, v, built.score_mod, block_mask, enable_gqa=True)


@pytest.mark.parametrize("kind, stages", [("pointwise", 3), ("positional", 3), ("table", 2)])
def test_position_indexed_tables_cap_pipeline_stages(monkeypatch, kind, stages):
    # A 3-stage D64 tile with a float32 bias gather ran out of shared memory on
    # the H100: mods reading 2-D tables get at most 2 stages (not pinned ones).
    from flex_inductor.lowering import configs, forward

    monkeypatch.setattr(
        configs, "default_forward_config", lambda *args: configs.Config(128, 128, 4, 3)
    )
    (config,) = forward._candidate_configs(
        64, torch.bfloat16, torch.device("cpu"), {}, 128, 128, kind
    )
    assert config.num_stages == stages
    (pinned,) = forward._candidate_configs(
        64, torch.bfloat16, torch.device("cpu"), {"num_stages": 3}, 128, 128, kind
    )
    assert pinned.num_stages == 3


@pytest.mark.parametrize(
    "name, kind",
    [
        ("none", "none"),
        ("causal", "mask"),
        ("softcap", "pointwise"),
        ("alibi", "positional"),
        ("table", "table"),
        ("mask_table", "table"),
        ("document", "mask"),
        ("scalar_times_positions", "positional"),
    ],
)
def test_score_mod_kind_picks_the_default_config(monkeypatch, device, name, kind):
    # The lowering reads what the captured mods do per score and asks the
    # config table for that kind: ALiBi's integer tile; a tile-shaped gather
    # of a table indexed by both positions (not a per-token vector).
    from flex_inductor.lowering import configs

    H, L = 2, 32
    table = torch.randn(H, 2 * L - 1, device=device)
    allowed = torch.rand(L, L, device=device) > 0.3
    doc = torch.arange(L, device=device).div(10, rounding_mode="floor").expand(1, L)
    weight = torch.tensor([0.5], device=device)
    score_mods = {
        "table": lambda score, b, h, q, kv: score + table[h, q - kv + L - 1],
        "softcap": mods.softcap(5.0),
        "alibi": mods.alibi(H, device=device),
        "scalar_times_positions": lambda score, b, h, q, kv: score + weight[b] * (q - kv),
    }
    mask_mods = {
        "causal": masks.causal(),
        "mask_table": lambda b, h, q, kv: allowed[q, kv],
        "document": lambda b, h, q, kv: doc[b, q] == doc[b, kv],
    }
    seen = []
    real = configs.default_forward_config

    def spy(head_dim, dtype, device, score_mod_kind=configs.MASK_ONLY):
        seen.append(score_mod_kind)
        return real(head_dim, dtype, device, score_mod_kind)

    monkeypatch.setattr(configs, "default_forward_config", spy)
    q, k, v = make_qkv(1, H, L, L, 16, device=device)
    block_mask = (
        create_block_mask(mask_mods[name], 1, 1, L, L, device=device, BLOCK_SIZE=16)
        if name in mask_mods
        else None
    )
    torch._dynamo.reset()
    run_compiled(q, k, v, score_mods.get(name), block_mask)
    assert seen == [kind]


def test_hopper_default_configs_depend_on_score_mod_kind(monkeypatch):
    # The tuned Hopper table (benchmarks/NOTES.md entry 7), read without a GPU.
    from flex_inductor.lowering import configs

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    bf16 = torch.bfloat16

    def pick(head_dim, kind, dtype=bf16):
        return configs.default_forward_config(head_dim, dtype, cuda, kind)

    assert pick(64, configs.POINTWISE) == configs.Config(128, 128, 4, 3)
    assert pick(64, configs.POSITIONAL) == configs.Config(128, 64, 4, 3)
    assert pick(64, configs.TABLE) == configs.Config(128, 64, 4, 1)
    assert pick(128, configs.POINTWISE) == configs.Config(64, 64, 4, 3)  # entry 15
    assert pick(128, configs.POSITIONAL) == configs.Config(128, 128, 8, 3)
    assert pick(128, configs.NO_MODS) == configs.Config(128, 64, 4, 2)
    assert pick(128, configs.MASK_ONLY) == configs.Config(128, 64, 4, 2)
    # D64 without a score_mod: TMA loads with their own tiles (entry 11).
    assert pick(64, configs.MASK_ONLY) == configs.Config(64, 128, 4, 2)
    assert pick(64, configs.NO_MODS) == configs.Config(64, 128, 4, 2)
    assert pick(128, configs.TABLE) == configs.Config(64, 64, 4, 2)
    # float32 keeps its own (smaller) tiles whatever the mod.
    assert pick(128, configs.TABLE, torch.float32) == pick(128, configs.POINTWISE, torch.float32)
    assert pick(40, configs.POSITIONAL) == pick(64, configs.POSITIONAL)
