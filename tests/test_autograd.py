"""Gradients of flex_attention against float64 autograd through the dense oracle.

Each case computes ``dq, dk, dv`` and the gradients of the tensors the
score_mod closes over (a relative-position bias, per-head scales, a full
``(H, L, S)`` bias) three ways: ours, the float64 dense oracle, and the same
dense maths in the inputs' precision. Ours must be within twice the
low-precision error of the oracle (plus a small atol).

Paths: ``eager`` is ``flex_attention`` called directly in float64 (the
blockwise reference, differentiated by autograd); ``aot_eager`` compiles
with Dynamo + AOTAutograd and runs the backward op's dense rule, whose
joint graph comes from ``build_joint_graph``; ``inductor`` lowers both ops
(run in Triton's interpreter on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from compile_utils import compile_and_run
from mod_defs import MOD_CASES_BY_NAME, Dims, block_mask_for
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import flex_attention, masks, mods

E = 8
DIMS = Dims(B=2, H=2, L=21, S=29)
# The dtype each path is tested in: eager float64 is the reference itself;
# the compiled paths run the float32 kernels.
DTYPES = {"eager": torch.float64, "aot_eager": torch.float32, "inductor": torch.float32}
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5}


@dataclass(frozen=True)
class GradCase:
    """A score_mod over learnable tensors, rebuilt per dtype, and a mask."""

    name: str
    make_params: Callable[[Dims, torch.Generator], list[torch.Tensor]]
    make_score_mod: Callable[[list[torch.Tensor]], Callable] | None
    mask_case: str | None = None  # a mask of mod_defs.MOD_CASES


def _relative_bias_params(dims, gen):
    return [torch.randn(dims.H, 2 * dims.max_len - 1, generator=gen) * 0.5]


GRAD_CASES = {
    c.name: c
    for c in [
        GradCase(
            "relative_bias_causal",
            _relative_bias_params,
            lambda p: mods.relative_position_bias(p[0]),
            "causal",
        ),
        GradCase(
            "per_head_scale",
            lambda d, g: [torch.rand(d.H, generator=g) + 0.5],
            lambda p: mods.per_head_scale(p[0]),
        ),
        GradCase(
            "full_bias_sliding_window",
            lambda d, g: [torch.randn(d.H, d.L, d.S, generator=g)],
            lambda p: mods.full_bias(p[0]),
            "sliding_window",
        ),
        GradCase("softcap_document", lambda d, g: [], lambda p: mods.softcap(2.0), "document"),
        GradCase(
            "relative_bias_dead_rows",
            _relative_bias_params,
            lambda p: mods.relative_position_bias(p[0]),
            "dead_rows",
        ),
        GradCase("noop_causal", lambda d, g: [], None, "causal"),
    ]
}


def _run(mode: str, fn, *args):
    if mode == "eager":
        return fn(*args)
    result = compile_and_run(fn, *args, backend=mode)
    assert result.frame_count == 1 and result.op_calls() == 1
    return result.output


def _loss(out, lse, g_out, g_lse, use_lse: bool):
    loss = (out.to(torch.float64) * g_out).sum()
    if use_lse:
        # A row that attends to nothing has lse = -inf; it adds nothing.
        finite = torch.where(torch.isfinite(lse), lse, 0.0)
        loss = loss + (finite.to(torch.float64) * g_lse).sum()
    return loss


def check_grads(
    mode: str,
    case: GradCase,
    dims: Dims = DIMS,
    Hkv: int | None = None,
    Ev: int = E,
    needs: tuple[str, ...] = ("q", "k", "v", "params"),
    use_lse: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Assert our gradients follow the tolerance rule; return them by name."""
    dtype = DTYPES[mode]
    dims = dataclasses.replace(dims, device=device)
    gen = torch.Generator().manual_seed(seed)
    Hkv = dims.H if Hkv is None else Hkv
    gqa = Hkv != dims.H
    base = {
        "q": torch.randn(dims.B, dims.H, dims.L, E, generator=gen),
        "k": torch.randn(dims.B, Hkv, dims.S, E, generator=gen),
        "v": torch.randn(dims.B, Hkv, dims.S, Ev, generator=gen),
    }
    base = {name: t.to(device) for name, t in base.items()}
    params = [p.to(device) for p in case.make_params(dims, gen)]
    g_out = torch.randn(dims.B, dims.H, dims.L, Ev, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(dims.B, dims.H, dims.L, generator=gen, dtype=torch.float64)
    g_out, g_lse = g_out.to(device), g_lse.to(device)
    mask_mod = None if case.mask_case is None else MOD_CASES_BY_NAME[case.mask_case].build(
        dims
    ).mask_mod
    block_mask = block_mask_for(mask_mod, dims)

    def leaves(dt):
        q, k, v = (base[n].to(dt).requires_grad_(n in needs) for n in "qkv")
        ps = [p.to(dt).requires_grad_("params" in needs) for p in params]
        score_mod = None if case.make_score_mod is None else case.make_score_mod(ps)
        names = [n for n in "qkv" if n in needs] + [f"param{i}" for i in range(len(ps))] * (
            "params" in needs
        )
        wrt = [t for t in (q, k, v, *ps) if t.requires_grad]
        return (q, k, v), score_mod, dict(zip(names, wrt, strict=True))

    (q, k, v), score_mod, ours_wrt = leaves(dtype)

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, return_lse=True
        )

    out, lse = _run(mode, attention, q, k, v)
    ours = torch.autograd.grad(_loss(out, lse, g_out, g_lse, use_lse), list(ours_wrt.values()))

    (q64, k64, v64), mod64, oracle_wrt = leaves(torch.float64)
    o_out, o_lse = dense_oracle(q64, k64, v64, mod64, block_mask, None, gqa)
    oracle = torch.autograd.grad(
        _loss(o_out, o_lse, g_out, g_lse, use_lse), list(oracle_wrt.values())
    )

    (ql, kl, vl), mod_lowp, lowp_wrt = leaves(dtype)
    l_out, l_lse = lowp_attention(ql, kl, vl, mod_lowp, block_mask, None, gqa)
    lowp = torch.autograd.grad(_loss(l_out, l_lse, g_out, g_lse, use_lse), list(lowp_wrt.values()))

    assert_close_to_oracle(out, o_out, l_out, "out", atol=ATOL[dtype])
    for name, a, b, c in zip(ours_wrt, ours, oracle, lowp, strict=True):
        assert a.dtype == ours_wrt[name].dtype, f"d{name} has dtype {a.dtype}"
        assert_close_to_oracle(a, b, c, f"d{name}", atol=ATOL[dtype])
    return dict(zip(ours_wrt, ours, strict=True))


# ---------------------------------------------------------------------------
# Every gradient case, eager and aot_eager; a few under Inductor
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
@pytest.mark.parametrize("case_name", list(GRAD_CASES))
def test_grads_match_oracle(case_name, mode):
    check_grads(mode, GRAD_CASES[case_name])


@pytest.mark.parametrize(
    "case_name", ["relative_bias_causal", "per_head_scale", "full_bias_sliding_window"]
)
def test_grads_match_oracle_inductor(case_name, device):
    check_grads("inductor", GRAD_CASES[case_name], device=device)


# Odd shapes: lengths 1, 17 and 113, and Ev != E.
ODD_DIMS = [
    Dims(B=1, H=2, L=1, S=17),
    Dims(B=1, H=2, L=17, S=1),
    Dims(B=1, H=2, L=113, S=17),
    Dims(B=1, H=1, L=17, S=113),
]


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
@pytest.mark.parametrize("dims", ODD_DIMS, ids=lambda d: f"L{d.L}_S{d.S}")
def test_grads_odd_shapes(dims, mode):
    check_grads(mode, GRAD_CASES["relative_bias_causal"], dims, Ev=12)
    check_grads(mode, GRAD_CASES["full_bias_sliding_window"], dims, Ev=12)


def _device_for(mode: str, device: str) -> str:
    # Inductor runs on the kernels' device (CUDA, or CPU under the interpreter).
    return device if mode == "inductor" else "cpu"


@pytest.mark.parametrize("mode", ["eager", "aot_eager", "inductor"])
def test_grads_gqa(mode, device):
    # Two query heads share each kv head: dk and dv sum over the group.
    dims = Dims(B=1, H=4, L=17, S=33)
    check_grads(
        mode, GRAD_CASES["relative_bias_causal"], dims, Hkv=2, device=_device_for(mode, device)
    )


@pytest.mark.parametrize("mode", ["eager", "aot_eager", "inductor"])
def test_grads_fully_masked_rows_are_zero(mode, device):
    grads = check_grads(
        mode, GRAD_CASES["relative_bias_dead_rows"], use_lse=True,
        device=_device_for(mode, device),
    )
    dead = torch.arange(DIMS.L) % 3 == 1
    for name, grad in grads.items():
        assert not grad.isnan().any(), f"d{name} has NaN"
    assert grads["q"][:, :, dead].abs().max() == 0, "a row that attends to nothing got a dq"


NEEDS = [("q",), ("v",), ("params",), ("k", "params"), ("q", "k", "v")]


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "+".join(n))
def test_grads_when_only_some_inputs_require_grad(needs, mode):
    grads = check_grads(mode, GRAD_CASES["relative_bias_causal"], needs=needs)
    assert set(grads) == {"param0" if n == "params" else n for n in needs}


@pytest.mark.parametrize("mode", ["eager", "aot_eager", "inductor"])
def test_grads_through_lse(mode, device):
    check_grads(
        mode, GRAD_CASES["relative_bias_causal"], use_lse=True, device=_device_for(mode, device)
    )


def test_grads_only_through_lse():
    # The loss reads lse alone: the backward op gets a zero grad_out.
    dims = Dims(B=1, H=2, L=17, S=17)
    q, k, v = _qkv_requiring_grad(dims)
    block_mask = block_mask_for(masks.causal(), dims)

    def lse_only(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, return_lse=True)[1]

    lse = compile_and_run(lse_only, q, k, v, backend="aot_eager").output
    ours = torch.autograd.grad(lse.sum(), (q, k, v))
    # lse does not depend on v: dv must be exactly zero.
    assert ours[2].abs().max() == 0
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    oracle = torch.autograd.grad(
        dense_oracle(q64, k64, v.detach().double(), None, block_mask)[1].sum(), (q64, k64)
    )
    ql, kl = (t.detach().clone().requires_grad_() for t in (q, k))
    lowp = torch.autograd.grad(
        lowp_attention(ql, kl, v.detach(), None, block_mask)[1].sum(), (ql, kl)
    )
    for name, a, b, c in zip("qk", ours[:2], oracle, lowp, strict=True):
        assert_close_to_oracle(a, b, c, f"d{name}")


def test_module_parameter_grad_matches_oracle():
    # A module owns the bias; one optimizer step's worth of gradient.
    dims = DIMS

    class RelativeBiasAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(3)
            self.bias = torch.nn.Parameter(
                torch.randn(dims.H, 2 * dims.max_len - 1, generator=gen)
            )

        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=mods.relative_position_bias(self.bias))

    model = RelativeBiasAttention()
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(dims.B, dims.H, dims.L, E, generator=gen)
    k, v = (torch.randn(dims.B, dims.H, dims.S, E, generator=gen) for _ in range(2))
    out = compile_and_run(model, q, k, v, backend="aot_eager").output
    out.square().sum().backward()

    bias64 = model.bias.detach().double().requires_grad_()
    o_out = dense_oracle(q.double(), k.double(), v.double(), mods.relative_position_bias(bias64))[0]
    (oracle,) = torch.autograd.grad(o_out.square().sum(), bias64)
    bias32 = model.bias.detach().clone().requires_grad_()
    l_out = lowp_attention(q, k, v, mods.relative_position_bias(bias32))[0]
    (lowp,) = torch.autograd.grad(l_out.square().sum(), bias32)
    assert_close_to_oracle(model.bias.grad, oracle, lowp, "dbias")


# ---------------------------------------------------------------------------
# Mask-only and noop mods pay nothing in the backward
# ---------------------------------------------------------------------------


def _backward_graphs(fn, *args):
    """Compile with aot_eager, run forward and backward; return the recorded backward graphs."""
    torch._dynamo.reset()
    backend = torch._dynamo.testing.AotEagerAndRecordGraphs()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    out.sum().backward()
    assert len(backend.bw_graphs) == 1
    return backend.bw_graphs[0]


def _backward_op(bw_graph):
    (node,) = [
        n
        for n in bw_graph.graph.nodes
        if getattr(n.target, "__name__", "") == "flex_inductor_attention_backward"
    ]
    return node


def _ops(graph_module) -> list[str]:
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]


def _qkv_requiring_grad(dims):
    gen = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(dims.B, dims.H, n, E, generator=gen).requires_grad_()
        for n in (dims.L, dims.S, dims.S)
    )


def test_noop_score_mod_has_an_empty_joint_graph():
    # No score_mod, a mask that captures a document-id tensor: the joint
    # graph passes the incoming gradient through untouched, and nothing
    # computes a gradient for the captured tensor.
    q, k, v = _qkv_requiring_grad(DIMS)
    block_mask = block_mask_for(MOD_CASES_BY_NAME["document"].build(DIMS).mask_mod, DIMS)
    bw = _backward_graphs(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), q, k, v)
    node = _backward_op(bw)
    joint = getattr(bw, node.args[8].target)
    assert _ops(joint) == [], f"the noop joint graph computes {_ops(joint)}"
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in joint.graph.nodes if n.op == "output"]
    assert output.args[0] == (placeholders[5],)  # grad_score = the incoming gradient
    assert list(node.args[14]) == [] and len(node.args[15]) >= 1
    for gm in (bw, *bw.children()):
        assert not any("zeros_and_scatter" in op for op in _ops(gm))


def test_constant_captured_tensor_gets_no_gradient_computation():
    # ALiBi's slopes do not require grad: the joint graph returns None in
    # their slot and computes nothing for them.
    q, k, v = _qkv_requiring_grad(DIMS)
    alibi = mods.alibi(DIMS.H)
    bw = _backward_graphs(lambda q, k, v: flex_attention(q, k, v, score_mod=alibi), q, k, v)
    node = _backward_op(bw)
    joint = getattr(bw, node.args[8].target)
    (output,) = [n for n in joint.graph.nodes if n.op == "output"]
    assert output.args[0][1] is None
    assert not any("scatter" in op or "index" in op for op in _ops(joint)), _ops(joint)


def test_learnable_captured_tensor_gets_its_gradient_in_the_joint_graph():
    # The positive control of the two tests above.
    q, k, v = _qkv_requiring_grad(DIMS)
    bias = torch.randn(DIMS.H, 2 * DIMS.max_len - 1, requires_grad=True)
    score_mod = mods.relative_position_bias(bias)
    bw = _backward_graphs(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod), q, k, v)
    joint = getattr(bw, _backward_op(bw).args[8].target)
    assert any("zeros_and_scatter" in op for op in _ops(joint)), _ops(joint)
    assert bias.grad is not None and bias.grad.abs().sum() > 0
