"""The compiled backward kernels against float64 autograd through the dense oracle.

Every case compiles ``flex_attention`` with Inductor (``compile_and_run`` with
``grad_outputs``: ``fullgraph=True``, Dynamo reset first, the backward run
inside the code capture), so the ``flex_inductor_bwd`` templates (dK/dV, which
also scatters captured-tensor gradients, and dQ) run: on CUDA when there is a
GPU, otherwise on CPU tensors in Triton's interpreter (see ``conftest.py``).

Gradients of q, k, v and of captured tensors must satisfy the shared
tolerance rule (``oracle.assert_close_to_oracle``): within twice the error of
the same maths done plainly in the input's precision, plus a small atol. The
float64 oracle is differentiated with autograd.

Gradient correctness through eager / aot_eager / inductor lives in
``test_autograd.py``; this file is about the backward *kernels*: which ones
run, what they generate, and that they are right on every shape and mask.
Shapes stay small because the interpreter runs each program with numpy; odd
shapes (1, 17, 113; head dim 40) are labelled as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from compile_utils import compile_and_run
from conftest import HAS_CUDA
from mod_defs import MOD_CASES, MOD_CASES_BY_NAME, Dims, block_mask_for, case_ids
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import create_block_mask, flex_attention, masks, mods
from flex_inductor._subgraphs import build_joint_graph
from flex_inductor.block_mask import BlockMask

FWD = "flex_inductor_fwd"
BWD = "flex_inductor_bwd"
DECODE = "flex_inductor_decode"
DENSE_BACKWARD = "flex_inductor.dense_attention_backward"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def make_qkv(B, Hq, L, S, E, Ev=None, Hkv=None, dtype=torch.float16, device="cpu", seed=0,
             requires_grad=(True, True, True)):
    """Random leaf ``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)``."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = Hq if Hkv is None else Hkv
    Ev = E if Ev is None else Ev
    shapes = ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev))
    return tuple(
        torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(r)
        for s, r in zip(shapes, requires_grad, strict=True)
    )


def grad_outputs_for(q, v, return_lse, seed=1):
    """Random ``dO`` (and ``dlse`` with ``return_lse``) for a call on ``q``, ``v``."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq, L, _ = q.shape
    grad_out = torch.randn((B, Hq, L, v.shape[-1]), generator=gen).to(q.device, q.dtype)
    if not return_lse:
        return grad_out
    return grad_out, torch.randn((B, Hq, L), generator=gen).to(q.device)


class Case:
    """One training call: inputs, mods and learnable captured tensors.

    ``params`` are the learnable tensors the score_mod captures, by name.
    ``rebuild(*params)`` makes the same score_mod over other tensors, so that
    the oracle sees float64 copies; without it the oracle differentiates
    with respect to ``params`` themselves, through the score_mod as given.
    """

    def __init__(self, q, k, v, score_mod=None, block_mask=None, params=None,
                 rebuild: Callable | None = None, enable_gqa=False, return_lse=False,
                 kernel_options=None):
        self.q, self.k, self.v = q, k, v
        self.score_mod = score_mod
        self.block_mask = block_mask
        self.params = dict(params or {})
        self.rebuild = rebuild
        self.enable_gqa = enable_gqa
        self.return_lse = return_lse
        self.kernel_options = kernel_options

    def leaves(self) -> dict:
        """Every tensor that gets a gradient, by gradient name."""
        named = {"dq": self.q, "dk": self.k, "dv": self.v}
        named.update({f"d{name}": p for name, p in self.params.items()})
        return {n: t for n, t in named.items() if t.requires_grad}

    def compiled(self, **compile_kwargs):
        """Compile and run forward and backward: ``(grads, CompileResult)``."""
        for t in self.leaves().values():
            t.grad = None

        def attention(q, k, v):
            return flex_attention(
                q, k, v, score_mod=self.score_mod, block_mask=self.block_mask,
                enable_gqa=self.enable_gqa, return_lse=self.return_lse,
                kernel_options=self.kernel_options,
            )

        grad_outputs = grad_outputs_for(self.q, self.v, self.return_lse)
        result = compile_and_run(
            attention, self.q, self.k, self.v, grad_outputs=grad_outputs, **compile_kwargs
        )
        grads = {n: t.grad for n, t in self.leaves().items()}
        for name, grad in grads.items():
            assert grad is not None, f"{name}: no gradient"
        return grads, result

    def oracle(self, attention, with_floor=False):
        """Gradients of ``attention`` (dense_oracle or lowp_attention) at this case.

        With ``with_floor`` (float64 only), also the part of a FlashAttention
        backward's error that comes from storing ``out`` in the inputs' dtype
        (see :meth:`check`): ``(grads, floor)``.
        """
        float64 = attention is dense_oracle
        leaves = self.leaves()

        def copy(t):
            return (t.detach().double() if float64 else t.detach().clone()).requires_grad_(
                t.requires_grad
            )

        q, k, v = (copy(t) for t in (self.q, self.k, self.v))
        if self.rebuild is not None:
            params = {n: copy(p) for n, p in self.params.items()}
            score_mod = self.rebuild(*params.values())
        else:
            params, score_mod = self.params, self.score_mod
        out, lse = attention(q, k, v, score_mod, self.block_mask, None, self.enable_gqa)
        grad_out = grad_outputs_for(self.q, self.v, return_lse=False).to(out.dtype)
        grad_lse = (
            grad_outputs_for(self.q, self.v, return_lse=True)[1].to(lse.dtype)
            if self.return_lse else torch.zeros_like(lse)
        )
        wrt = {"dq": q, "dk": k, "dv": v, **{f"d{n}": p for n, p in params.items()}}
        wrt = [wrt[n] for n in leaves]
        grads = _grad((out, lse), wrt, (grad_out, grad_lse), retain_graph=with_floor)
        grads = dict(zip(leaves, grads, strict=True))
        if not with_floor:
            return grads
        # The kernels compute delta = rowsum(dO * out) from the stored out,
        # rounded to the inputs' dtype. An error e in delta_i is exactly a
        # gradient -e_i on lse_i (d lse_i / d s_ij = p_ij), so its effect on
        # every gradient is the oracle's gradient of lse with that weight.
        stored = out.detach().to(self.q.dtype).double()
        delta_error = (grad_out * (stored - out.detach())).sum(-1)
        floor = _grad((lse,), wrt, (-delta_error,))
        return grads, dict(zip(leaves, floor, strict=True))

    def check(self, grads) -> None:
        """The tolerance rule for every gradient, against the float64 oracle.

        ``atol`` is the shared small slack plus the error that storing the
        forward's ``out`` in the inputs' dtype causes in a FlashAttention-style
        backward (delta is read off it). The plain low-precision baseline is
        differentiated by autograd and never reads ``out``, so without this
        term a gradient summed over many positions (a bias's) can sit just
        past twice the baseline's error in float16 and bfloat16, while being
        exactly as good as the algorithm allows. It is computed, not guessed:
        zero for float32 up to float32 rounding.
        """
        (oracle, floor), lowp = self.oracle(dense_oracle, True), self.oracle(lowp_attention)
        assert set(grads) == set(oracle)
        for name, grad in grads.items():
            assert grad.dtype == self.leaves()[name].dtype, name
            atol = 1e-5 + floor[name].abs().max().item()
            assert_close_to_oracle(grad, oracle[name], lowp[name], name, atol=atol)


def _grad(outputs, inputs, grad_outputs, retain_graph=False):
    """``torch.autograd.grad`` with zeros for inputs the outputs do not depend on."""
    # lse does not depend on v: with only v learnable it has no graph.
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [g for _, g in pairs],
        retain_graph=retain_graph, allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]


def template_kernels(result, tag) -> list[str]:
    """Our template kernels in the generated code (``triton_tem_`` only).

    Pointwise kernels that feed the op may carry its name too (the zero fill
    of a captured tensor's gradient, the delta reduction).
    """
    return [name for name in result.kernels(tag) if name.startswith("triton_tem_")]


def kernel_source(result, marker: str) -> str:
    """The code (launch decorator included) of the one template kernel containing ``marker``."""
    chunks = re.split(r"^(?=\w+ = async_compile\.triton\()", result.source, flags=re.MULTILINE)
    # Each kernel's code is a string argument that ends at its closing quotes.
    codes = [chunk.split("''', device_str=")[0] for chunk in chunks]
    found = [code for code in codes if code.startswith("triton_tem_") and marker in code]
    assert len(found) == 1, f"{len(found)} template kernels contain {marker!r}"
    return found[0]


def assert_template_backward(result) -> None:
    """One forward template, the two backward templates, no dense fallback.

    A single query row (L = 1) runs the decode kernel as its forward.
    """
    forward = template_kernels(result, FWD) or template_kernels(result, DECODE)
    assert len(forward) == 1, result.kernels("")
    assert len(template_kernels(result, BWD)) == 2, result.kernels("")
    kernel_source(result, "def _dkdv_inner(")
    kernel_source(result, "def _dq_inner(")
    assert DENSE_BACKWARD not in result.source


def constexpr(source: str, name: str) -> str:
    """The value a template kernel binds to constexpr ``name``."""
    match = re.search(rf"^\s+{name} : tl\.constexpr = (.+)$", source, re.MULTILINE)
    assert match is not None, name
    return match.group(1)


def block_mask_from_states(states, block_size, seq_lengths, mask_mod=None, with_full=True):
    """A BlockMask from an int ``(B, H, nq, nkv)`` map: 0 skipped, 1 partial, 2 full.

    Built with ``BlockMask.from_kv_blocks``: each row lists its partial (or
    full) blocks first, then pads with the other block indices, so padding
    entries are valid indices as the format requires. With
    ``with_full=False`` full blocks are listed as partial ones.
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


# Learnable captured tensors of the issue, each as (factory, parameter).


def relative_bias(H, L, S, device, seed=0):
    """``score + bias[h, q_idx - kv_idx + S]``: a learnable relative position bias."""
    gen = torch.Generator().manual_seed(seed)
    bias = (torch.randn(H, L + S + 1, generator=gen) * 0.5).to(device).requires_grad_()

    def build(bias):
        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx - kv_idx + S]

        return relative_bias

    return build, bias


def per_head_scale(H, L, S, device, seed=0):
    """``score * scales[h]``."""
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.rand(H, generator=gen) + 0.5).to(device).requires_grad_()
    return mods.per_head_scale, scales


def full_bias(H, L, S, device, seed=0):
    """``score + bias[h, q_idx, kv_idx]`` with a full ``(H, L, S)`` bias."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(H, L, S, generator=gen).to(device).requires_grad_()
    return mods.full_bias, bias


def learnable_case(factory, q, k, v, block_mask=None, **kwargs) -> Case:
    """A Case whose score_mod captures one learnable tensor made by ``factory``."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    build, param = factory(H, L, S, q.device)
    return Case(q, k, v, build(param), block_mask, params={"bias": param}, rebuild=build,
                **kwargs)


# ---------------------------------------------------------------------------
# Every mod of the library
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", MOD_CASES, ids=case_ids(MOD_CASES))
def test_every_mod(case, device):
    # B = 2 only where the mod reads b: the interpreter's time grows with B * H.
    dims = Dims(B=2 if "per_batch" in case.tags else 1, H=2, L=33, S=40, device=device)
    built = case.build(dims)
    q, k, v = make_qkv(dims.B, dims.H, dims.L, dims.S, 16, device=device)
    block_mask = block_mask_for(built.mask_mod, dims)
    params = {f"param{i}": p for i, p in enumerate(built.params)}
    problem = Case(q, k, v, built.score_mod, block_mask, params=params)
    grads, result = problem.compiled()
    # row_table_sum reduces a row of its table: torch 2.11 unrolls that small
    # reduction into pointwise code and inlines it (seen on the H100); torch
    # 2.13 refuses to, and the backward runs the blockwise dense op instead.
    if case.name == "row_table_sum":
        fused = len(template_kernels(result, BWD)) == 2
        assert fused != (DENSE_BACKWARD in result.source), result.kernels("")
    else:
        assert_template_backward(result)
        # A learnable captured tensor's gradient is scattered by one atomic
        # add in the dK/dV kernel; dQ never scatters.
        dkdv = kernel_source(result, "def _dkdv_inner(")
        assert constexpr(dkdv, "HAS_SCATTER") == str(bool(built.params))
        assert dkdv.count("tl.atomic_add(") == len(built.params)
        assert "tl.atomic_add(" not in kernel_source(result, "def _dq_inner(")
    problem.check(grads)


# ---------------------------------------------------------------------------
# Captured-tensor gradients
# ---------------------------------------------------------------------------


def _alibi_relative(score, b, h, q_idx, kv_idx, slopes, bias, S):
    """ALiBi over ``slopes`` plus a relative ``bias`` (either may learn)."""
    return score + slopes[h] * (kv_idx - q_idx) + bias[h, q_idx - kv_idx + S]


def _alibi_with(slopes, bias, S):
    """:func:`_alibi_relative` closing over its tensors, as users write mods."""

    def alibi_relative(score, b, h, q_idx, kv_idx):
        return _alibi_relative(score, b, h, q_idx, kv_idx, slopes, bias, S)

    return alibi_relative


def test_captured_tensor_without_grad_costs_nothing(device):
    L = S = 32
    q, k, v = make_qkv(1, 2, L, S, 16, device=device)
    # ALiBi captures its slopes, a tensor that requires no grad.
    problem = Case(q, k, v, mods.alibi(2, device=device))
    grads, result = problem.compiled()
    assert_template_backward(result)
    dkdv = kernel_source(result, "def _dkdv_inner(")
    assert constexpr(dkdv, "HAS_SCATTER") == "False"
    assert "tl.atomic_add(" not in result.source
    problem.check(grads)

    # In the joint graph, the slot of a tensor that needs no gradient is
    # None (nothing to lower), while a learnable one's is a scatter. The
    # graph takes the captured tensors as trailing inputs, as Dynamo lifts them.
    slopes = torch.tensor(mods.alibi_slopes(2), device=device)
    bias = torch.zeros(2, L + S + 1, device=device, requires_grad=True)

    def lifted(score, b, h, q_idx, kv_idx, slopes, bias):
        return _alibi_relative(score, b, h, q_idx, kv_idx, slopes, bias, S)

    joint = build_joint_graph(lifted, q, [slopes, bias])
    output = next(n for n in joint.graph.nodes if n.op == "output")
    grad_score, grad_slopes, grad_bias = output.args[0]
    assert grad_score is not None and grad_slopes is None and grad_bias is not None


def test_only_the_learnable_of_two_captured_tensors_is_scattered(device):
    L = S = 32
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device)
    slopes = torch.tensor(mods.alibi_slopes(2), device=device)
    bias = (torch.randn(2, L + S + 1) * 0.5).to(device).requires_grad_()
    problem = Case(q, k, v, _alibi_with(slopes, bias, S), params={"bias": bias},
                   rebuild=lambda bias: _alibi_with(slopes.double(), bias, S))
    grads, result = problem.compiled()
    assert_template_backward(result)
    assert kernel_source(result, "def _dkdv_inner(").count("tl.atomic_add(") == 1
    problem.check(grads)


# ---------------------------------------------------------------------------
# Random BlockMasks built from kv blocks
# ---------------------------------------------------------------------------


def _checkerboard(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx) % 3 != 0


@pytest.mark.parametrize(
    "name, mask_mod, with_full, block_size, broadcast",
    [
        ("checkerboard_partials", _checkerboard, True, 16, False),
        ("causal_partials_no_full_lists", masks.causal(), False, 16, False),
        ("checkerboard_rect_blocks", _checkerboard, True, (16, 32), False),
        ("broadcast_over_batch_heads", _checkerboard, True, 32, True),
    ],
)
def test_random_block_mask(name, mask_mod, with_full, block_size, broadcast, device):
    # The learnable bias checks that scatters skip exactly the masked positions.
    # A different pattern per (b, h), or one broadcast over both.
    B, H, L, S = 2, 2, 45, 58  # neither a multiple of 16 nor of 32
    qb, kvb = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nkv = -(-L // qb), -(-S // kvb)
    states = random_states(1 if broadcast else B, 1 if broadcast else H, nq, nkv, seed=len(name))
    block_mask = block_mask_from_states(states, (qb, kvb), (L, S), mask_mod, with_full).to(device)
    q, k, v = make_qkv(B, H, L, S, 16, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    grads, result = problem.compiled()
    assert_template_backward(result)
    problem.check(grads)


def test_random_block_mask_with_a_real_mask_mod_and_gqa(device):
    B, Hq, Hkv, L, S = 1, 4, 2, 47, 64
    states = random_states(B, Hq, 3, 4, seed=11)
    block_mask = block_mask_from_states(
        states, 16, (L, S), masks.sliding_window(20, causal=False)
    ).to(device)
    q, k, v = make_qkv(B, Hq, L, S, 16, Hkv=Hkv, dtype=torch.bfloat16, device=device)
    problem = Case(q, k, v, mods.softcap(3.0), block_mask, enable_gqa=True)
    grads, result = problem.compiled()
    assert_template_backward(result)
    problem.check(grads)


# ---------------------------------------------------------------------------
# Odd shapes, head dims, Ev != E, GQA, dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L, S", [(1, 1), (1, 17), (17, 113), (113, 17)], ids=lambda x: str(x)
)
def test_odd_lengths(L, S, device):
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, 2, L, S, 16, device=device, seed=L + S)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    grads, result = problem.compiled()
    assert_template_backward(result)
    problem.check(grads)


@pytest.mark.parametrize("E, Ev", [(40, 40), (64, 64), (16, 40), (64, 32)],
                         ids=["E40_odd", "E64", "E16_Ev40", "E64_Ev32"])
def test_head_dims(E, Ev, device):
    L, S = 29, 40
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, 2, L, S, E, Ev, device=device, seed=E + Ev)
    problem = Case(q, k, v, mods.softcap(5.0), block_mask)
    grads, result = problem.compiled()
    assert_template_backward(result)
    assert grads["dk"].shape == k.shape and grads["dv"].shape == v.shape
    problem.check(grads)


@pytest.mark.parametrize("groups", [2, 4])
def test_gqa(groups, device):
    # dk and dv sum over each kv head's group of query heads inside the
    # kernel; the bias gradient is scattered per query head.
    Hkv, L, S = 2, 31, 40
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, Hkv * groups, L, S, 16, Hkv=Hkv, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask, enable_gqa=True)
    grads, result = problem.compiled()
    assert_template_backward(result)
    assert constexpr(kernel_source(result, "def _dkdv_inner("), "GQA_SHARED_HEADS") == str(groups)
    problem.check(grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype, device):
    L, S = 40, 40
    block_mask = create_block_mask(
        masks.sliding_window(12), 1, 1, L, S, device=device, BLOCK_SIZE=16
    )
    q, k, v = make_qkv(1, 2, L, S, 32, dtype=dtype, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    grads, result = problem.compiled()
    assert_template_backward(result)
    problem.check(grads)


def test_bfloat16_captured_tensor(device):
    # The scatter accumulates in float32 and converts once at the end.
    L = S = 32
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.bfloat16, device=device)
    build, bias = relative_bias(2, L, S, device)
    bias = bias.detach().to(torch.bfloat16).requires_grad_()
    problem = Case(q, k, v, build(bias), params={"bias": bias}, rebuild=build)
    grads, result = problem.compiled()
    assert_template_backward(result)
    assert grads["dbias"].dtype == torch.bfloat16
    problem.check(grads)


def test_dynamic_shapes(device):
    # Symbolic lengths: the kernels' loop bounds and strides become arguments.
    L, S = 33, 40
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, 2, L, S, 16, device=device)
    problem = Case(q, k, v, mods.softcap(2.0), block_mask)
    grads, result = problem.compiled(dynamic=True)
    assert_template_backward(result)
    for marker in ("def _dkdv_inner(", "def _dq_inner("):
        source = kernel_source(result, marker)
        assert re.search(r"^\s+Q_LEN = [a-z]", source, re.MULTILINE), marker  # not a literal
        assert re.search(r"^\s+KV_LEN = [a-z]", source, re.MULTILINE), marker
    problem.check(grads)


# ---------------------------------------------------------------------------
# Fully masked rows, the gradient of lse, partial requires_grad
# ---------------------------------------------------------------------------


def test_dead_rows_get_zero_gradients(device):
    dims = Dims(B=1, H=2, L=41, S=41, device=device)
    block_mask = block_mask_for(MOD_CASES_BY_NAME["dead_rows"].build(dims).mask_mod, dims)
    q, k, v = make_qkv(1, 2, 41, 41, 16, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask, return_lse=True)
    grads, result = problem.compiled()
    assert_template_backward(result)
    dead = torch.arange(41, device=device) % 3 == 1
    assert (grads["dq"][:, :, dead] == 0).all()
    problem.check(grads)


def test_query_blocks_without_any_kv_block(device):
    # Query blocks 1 and 3 list no kv block: no program of dQ walks any
    # block for them, and the transposed lists of dK/dV never visit them.
    L, S = 60, 50
    states = random_states(1, 1, 4, 4, seed=3, p_partial=0.5, p_full=0.5)
    states[:, :, 1] = 0
    states[:, :, 3] = 0
    block_mask = block_mask_from_states(states, 16, (L, S), _checkerboard).to(device)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.bfloat16, device=device)
    problem = Case(q, k, v, mods.softcap(2.0), block_mask, return_lse=True)
    grads, result = problem.compiled()
    assert_template_backward(result)
    rows = torch.arange(L, device=device) // 16
    assert (grads["dq"][:, :, (rows == 1) | (rows == 3)] == 0).all()
    problem.check(grads)


def test_gradient_of_lse(device):
    L, S = 37, 45
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask, return_lse=True)
    grads, result = problem.compiled()
    assert_template_backward(result)
    problem.check(grads)


def test_loss_of_lse_alone(device):
    # Only lse reaches the loss: dO is zero and delta is -dlse alone.
    L, S = 30, 30
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device)

    def lse_only(q, k, v):
        return flex_attention(q, k, v, score_mod=mods.softcap(4.0), return_lse=True)[1]

    grad_lse = grad_outputs_for(q, v, return_lse=True)[1]
    result = compile_and_run(lse_only, q, k, v, grad_outputs=grad_lse)
    assert len(template_kernels(result, BWD)) == 2
    # v does not reach lse: its gradient is zero (autograd's None).
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = _grad(
        (dense_oracle(q64, k64, v64, mods.softcap(4.0))[1],), (q64, k64, v64),
        (grad_lse.double(),),
    )
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    lowp = _grad(
        (lowp_attention(ql, kl, vl, mods.softcap(4.0))[1],), (ql, kl, vl), (grad_lse,)
    )
    for name, ours, want, plain in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), oracle,
                                       lowp, strict=True):
        assert_close_to_oracle(ours, want, plain, name)


@pytest.mark.parametrize(
    "requires_grad, bias_grad",
    [
        ((False, False, True), False),
        ((False, False, False), True),
        ((True, False, False), True),
        ((False, True, True), False),
    ],
    ids=["only_v", "only_bias", "q_and_bias", "k_and_v_bias_frozen"],
)
def test_some_inputs_require_grad(requires_grad, bias_grad, device):
    L, S = 33, 40
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device,
                       requires_grad=requires_grad)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    problem.params["bias"].requires_grad_(bias_grad)
    grads, result = problem.compiled()
    assert set(grads) == set(problem.leaves())
    for t, needed in zip((q, k, v), requires_grad, strict=True):
        assert needed or t.grad is None
    # A gradient nobody needs costs nothing: Inductor drops the kernel whose
    # outputs are all unused (dQ without q; dK/dV without k, v or the bias).
    needs_dq = requires_grad[0]
    needs_dkdv = requires_grad[1] or requires_grad[2] or bias_grad
    assert len(template_kernels(result, BWD)) == needs_dq + needs_dkdv, result.kernels("")
    assert ("def _dq_inner(" in result.source) == needs_dq
    assert ("def _dkdv_inner(" in result.source) == needs_dkdv
    assert ("tl.atomic_add(" in result.source) == bias_grad
    assert DENSE_BACKWARD not in result.source
    problem.check(grads)


# ---------------------------------------------------------------------------
# The generated code of a training call
# ---------------------------------------------------------------------------


def _allocated_shapes(source: str) -> list[tuple[int, ...]]:
    """Shapes of every buffer the generated code allocates."""
    shapes = re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", source)
    return [tuple(int(n) for n in s.split(",") if n.strip()) for s in shapes]


def test_generated_code_has_only_our_kernels(device):
    B, H, L, S, E = 1, 2, 48, 80, 16
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(B, H, L, S, E, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    grads, result = problem.compiled()
    templates = [n for n in result.kernels("") if n.startswith("triton_tem_")]
    assert len(templates) == 3, templates
    assert len(template_kernels(result, FWD)) == 1
    assert len(template_kernels(result, BWD)) == 2
    kernel_source(result, "def _dkdv_inner(")
    kernel_source(result, "def _dq_inner(")
    assert "dense_attention" not in result.source
    # Besides the templates, only the zero fill of the bias gradient and the
    # delta reduction run; no buffer is as large as one head's L x S scores.
    others = [n for n in result.kernels("") if not n.startswith("triton_tem_")]
    assert len(others) <= 2, others
    shapes = _allocated_shapes(result.source)
    assert shapes, "no allocation found: has the generated code's format changed?"
    for shape in shapes:
        assert torch.Size(shape).numel() < L * S, shape
    problem.check(grads)


# ---------------------------------------------------------------------------
# Deterministic mode
# ---------------------------------------------------------------------------


@pytest.fixture
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the test, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: cuBLAS without CUBLAS_WORKSPACE_CONFIG has no deterministic
    # mode, and the test process's environment is not ours to set.
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _run_twice(make_problem):
    """Two fresh compiled runs of the same inputs: ``(problem, grads, grads, result)``."""
    problem = make_problem()
    first, result = problem.compiled()
    first = {n: g.clone() for n, g in first.items()}
    second, _ = problem.compiled()
    return problem, first, second, result


def _assert_bitwise_equal(first, second):
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between runs"


def _deterministic_problem(device, learnable, options, L=32, S=32, H=2, dtype=torch.float16):
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    q, k, v = make_qkv(1, H, L, S, 16, dtype=dtype, device=device)
    if learnable:
        return learnable_case(relative_bias, q, k, v, block_mask, kernel_options=options)
    return Case(q, k, v, mods.alibi(H, device=device), block_mask, kernel_options=options)


@pytest.mark.parametrize("learnable", [False, True], ids=["no_captured_grad", "learnable_bias"])
def test_deterministic_option(learnable, device):
    problem, first, second, result = _run_twice(
        lambda: _deterministic_problem(device, learnable, {"DETERMINISTIC": True})
    )
    _assert_bitwise_equal(first, second)
    # The templates add nothing atomically but the captured-tensor gradients:
    # without those they stay; with them the blockwise dense backward, which
    # sums in a fixed order, takes over.
    if learnable:
        assert DENSE_BACKWARD in result.source
        assert not template_kernels(result, BWD)
    else:
        assert_template_backward(result)
    problem.check(first)


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("learnable", [False, True], ids=["no_captured_grad", "learnable_bias"])
def test_use_deterministic_algorithms(learnable, device):
    problem, first, second, result = _run_twice(
        lambda: _deterministic_problem(device, learnable, None)
    )
    _assert_bitwise_equal(first, second)
    assert (DENSE_BACKWARD in result.source) == learnable
    assert "tl.atomic_add(" not in result.source
    problem.check(first)


@pytest.mark.skipif(not HAS_CUDA, reason="atomic adds are only racy on a GPU")
@pytest.mark.parametrize("mode", ["default", "DETERMINISTIC", "use_deterministic_algorithms"])
def test_deterministic_on_gpu(mode, device, request):
    # Long enough that many programs add into the same bias entries at once.
    if mode == "use_deterministic_algorithms":
        request.getfixturevalue("deterministic_algorithms")
    options = {"DETERMINISTIC": True} if mode == "DETERMINISTIC" else None
    problem, first, second, result = _run_twice(
        lambda: _deterministic_problem(device, True, options, L=1024, S=1024, H=4,
                                       dtype=torch.bfloat16)
    )
    if mode == "default":
        # The atomic path: correct, but its sums may differ in the last bits.
        assert "tl.atomic_add(" in result.source
    else:
        _assert_bitwise_equal(first, second)
    problem.check(first)


# ---------------------------------------------------------------------------
# kernel_options of the backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 16, "bwd_BLOCK_M2": 16, "bwd_BLOCK_N2": 32},
         {"BLOCK_M1": "32", "BLOCK_N1": "16", "BLOCK_M2": "16", "BLOCK_N2": "32"}),
        ({"BLOCK_N1": 32, "bwd_BLOCK_N1": 16, "BLOCK_M2": 32},
         {"BLOCK_N1": "16", "BLOCK_M2": "32"}),
    ],
    ids=["bwd_prefixed", "bwd_prefix_wins_over_plain"],
)
def test_backward_kernel_options(options, expected, device):
    L, S = 64, 64
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, L, S, 16, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask, kernel_options=options)
    grads, result = problem.compiled()
    assert_template_backward(result)
    dkdv = kernel_source(result, "def _dkdv_inner(")
    dq = kernel_source(result, "def _dq_inner(")
    for name, value in expected.items():
        assert constexpr(dkdv if name.endswith("1") else dq, name) == value, name
    problem.check(grads)


def test_backward_num_warps_option(device):
    q, k, v = make_qkv(1, 1, 32, 32, 16, device=device)
    # L=32 would take the decode template; this checks the forward's option.
    options = {"bwd_num_warps": 2, "fwd_num_warps": 1, "FORCE_USE_FLEX_ATTENTION": True}
    problem = Case(q, k, v, kernel_options=options)
    grads, result = problem.compiled()
    assert_template_backward(result)
    assert "num_warps=1," in kernel_source(result, "def _inner(")
    for marker in ("def _dkdv_inner(", "def _dq_inner("):
        assert "num_warps=2," in kernel_source(result, marker)
    problem.check(grads)


@pytest.mark.parametrize(
    "options, key",
    [({"bwd_BLOCK_M1": 32}, "bwd_BLOCK_M1"), ({"BLOCK_N2": 48}, "BLOCK_N2")],
    ids=["bwd_BLOCK_M1_32_vs_16", "BLOCK_N2_48_vs_16"],
)
def test_backward_tiles_must_divide_block_mask(options, key, device):
    q, k, v = make_qkv(1, 1, 32, 32, 16, device=device)
    block_mask = create_block_mask(masks.causal(), 1, 1, 32, 32, device=device, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=rf"kernel_options\['{key}'\].*must divide the BlockMask"):
        flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)


def test_block_size_below_the_smallest_tile(device):
    # 8-row blocks are finer than any tile tl.dot allows (16): the backward
    # cannot walk them and runs the blockwise dense backward instead.
    L = S = 32
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=8)
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device)
    problem = learnable_case(relative_bias, q, k, v, block_mask)
    grads, result = problem.compiled()
    assert DENSE_BACKWARD in result.source
    problem.check(grads)
