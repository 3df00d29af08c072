"""``tanh_approx`` (``flex_inductor.fast_math``) and the soft-capping mod that uses it.

The op is exact ``torch.tanh`` everywhere but in compiled CUDA kernels, where
it lowers to the PTX instruction ``tanh.approx.f32``. So: eager, vmap,
gradients and the CPU (interpreter) kernels are checked against the exact
tanh; the choice of the instruction is checked on CPU by generating code
with the GPU test patched in; on a GPU, the generated kernels, the error of
the instruction and ``softcap`` attention against the float64 oracle.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
import torch._inductor.config as inductor_config
from compile_utils import compile_and_run
from conftest import HAS_CUDA
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from test_backward_kernel import Case, make_qkv
from torch._inductor.utils import get_code
from torch.fx.experimental.proxy_tensor import make_fx

from flex_inductor import create_block_mask, flex_attention, masks, mods
from flex_inductor._subgraphs import build_joint_graph
from flex_inductor.fast_math import tanh_approx

TANH_APPROX = torch.ops.flex_inductor.tanh_approx.default
PTX = "tanh.approx.f32"
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="CPU kernels under Triton's interpreter; on a GPU the CUDA tests apply"
)


def call_targets(graph_module: torch.fx.GraphModule) -> list:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


def template_sources(source: str) -> dict[str, str]:
    """The code of each template kernel (``triton_tem_*``) in generated code, by name."""
    chunks = re.split(r"^(?=\w+ = async_compile\.triton\()", source, flags=re.MULTILINE)
    codes = [chunk.split("''', device_str=")[0] for chunk in chunks]
    return {code.split(" ", 1)[0]: code for code in codes if code.startswith("triton_tem_")}


# ---------------------------------------------------------------------------
# The op: eager, autograd, vmap, tracing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("low_precision_only", [False, True])
def test_eager_is_exact_tanh(dtype, low_precision_only):
    x = torch.linspace(-12, 12, 1001).to(dtype)
    assert torch.equal(tanh_approx(x, low_precision_only=low_precision_only), torch.tanh(x))


def test_rejects_integer_tensor():
    with pytest.raises(TypeError, match="floating-point"):
        tanh_approx(torch.arange(3))


def test_gradient_is_one_minus_square():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tanh_approx, (x,))
    assert torch.autograd.gradgradcheck(tanh_approx, (x,))


def test_vmap_is_elementwise():
    # The eager reference evaluates mods under nested vmap.
    x = torch.randn(3, 5, 7)
    assert torch.equal(torch.vmap(torch.vmap(tanh_approx))(x), torch.tanh(x))
    x = x.double().requires_grad_()
    torch.vmap(lambda t: 3.0 * tanh_approx(t / 3.0))(x).sum().backward()
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach() / 3.0) ** 2)


def test_make_fx_records_the_op():
    gm = make_fx(lambda x: tanh_approx(x) * 2)(torch.randn(4))
    assert TANH_APPROX in call_targets(gm)
    assert torch.ops.aten.tanh.default not in call_targets(gm)


def test_softcap_joint_graph_has_only_the_op_and_pointwise_aten_ops():
    q = torch.randn(1, 1, 4, 8)
    gm = build_joint_graph(mods.softcap(20.0), q, [])
    targets = call_targets(gm)
    assert TANH_APPROX in targets
    for target in targets:
        if target is TANH_APPROX or target is torch.ops.aten.detach.default:
            continue
        assert target.namespace == "aten" and torch.Tag.pointwise in target.tags, target
    assert torch.ops.aten.tanh.default not in targets


def test_compile_fullgraph_forward_and_backward(device):
    x = torch.linspace(-6, 6, 517, device=device, requires_grad=True)
    # In [0, 1): the gradient's error stays that of y, as the tolerance assumes.
    grad = torch.rand(517, device=device)
    result = compile_and_run(lambda x: 2.0 * tanh_approx(x), x, grad_outputs=grad)
    assert result.frame_count == 1
    assert sum(n.target is TANH_APPROX for gm in result.graphs for n in gm.graph.nodes) == 1
    y = torch.tanh(x.detach())
    # Exact on CPU (up to float32 rounding); tanh.approx.f32 on CUDA.
    atol = 1e-3 if HAS_CUDA else 1e-6
    torch.testing.assert_close(result.output.detach(), 2.0 * y, atol=2 * atol, rtol=0)
    torch.testing.assert_close(x.grad, grad * 2.0 * (1 - y * y), atol=4 * atol, rtol=0)


def test_export_keeps_the_op():
    class Capped(torch.nn.Module):
        def forward(self, x):
            return 5.0 * tanh_approx(x / 5.0)

    x = torch.randn(8, 4)
    exported = torch.export.export(Capped(), (x,))
    assert TANH_APPROX in call_targets(exported.graph_module)
    assert torch.equal(exported.module()(x), 5.0 * torch.tanh(x / 5.0))


# ---------------------------------------------------------------------------
# softcap(cap, approx)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "approx, name, low_precision_only",
    [
        (None, "softcap_20", True),
        (True, "softcap_20_approx", False),
        (False, "softcap_20_exact", None),
    ],
)
def test_softcap_approx_flag(approx, name, low_precision_only):
    score_mod = mods.softcap(20.0, approx=approx)
    assert score_mod.__name__ == name
    args = [torch.zeros(()), *(torch.zeros((), dtype=torch.int32) for _ in range(4))]
    gm = make_fx(score_mod)(*args)
    calls = [n for n in gm.graph.nodes if n.target is TANH_APPROX]
    if low_precision_only is None:
        assert not calls and torch.ops.aten.tanh.default in call_targets(gm)
    else:
        assert len(calls) == 1
        # make_fx leaves out an argument equal to its default (False).
        assert (*calls[0].args[1:], False)[0] == low_precision_only
    score = torch.tensor(31.0, dtype=torch.float64)
    assert score_mod(score, *args[1:]) == 20.0 * torch.tanh(score / 20.0)


def test_softcap_rejects_bad_approx():
    with pytest.raises(ValueError, match="approx"):
        mods.softcap(20.0, approx="fast")


def _softcap_problem(device, dtype, score_mod):
    L, S, E = 64, 64, 16
    q, k, v = make_qkv(1, 2, L, S, E, dtype=dtype, device=device, seed=7)
    # Scores of a few units (std ~4, up to ~15): tanh(score / 20) is well
    # into its curved range, not a near-identity.
    q = (q.detach() * 4).requires_grad_()
    block_mask = create_block_mask(masks.causal(), 1, 1, L, S, device=device, BLOCK_SIZE=16)
    return Case(q, k, v, score_mod, block_mask)


def _check_forward_and_backward(case: Case):
    grads, result = case.compiled()
    args = (case.score_mod, case.block_mask)
    q, k, v = (t.detach() for t in (case.q, case.k, case.v))
    oracle_out = dense_oracle(q.double(), k.double(), v.double(), *args)[0]
    lowp_out = lowp_attention(q, k, v, *args)[0]
    assert_close_to_oracle(result.output, oracle_out, lowp_out, "out")
    case.check(grads)
    return template_sources(result.source)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_softcap_attention_matches_oracle(dtype, device):
    kernels = _check_forward_and_backward(
        _softcap_problem(device, dtype, mods.softcap(20.0))
    )
    # The forward template and the two backward ones.
    assert len(kernels) == 3, sorted(kernels)
    # On a GPU the default is the fast tanh for 16-bit attention only.
    fast = HAS_CUDA and dtype == torch.bfloat16
    for name, code in kernels.items():
        assert (PTX in code) == fast, name
        assert ("libdevice.tanh" in code) != fast, name


@interpreter_only
@pytest.mark.parametrize(
    "approx, dtype, fast",
    [
        (None, torch.bfloat16, True),
        (None, torch.float16, True),
        (None, torch.float32, False),
        (True, torch.float32, True),
        (False, torch.bfloat16, False),
    ],
    ids=["default-bf16", "default-fp16", "default-fp32", "approx-fp32", "exact-bf16"],
)
def test_which_tanh_a_gpu_kernel_gets(approx, dtype, fast):
    # The lowering's choice, with its GPU test patched to pass: the code is
    # only generated (inline assembly cannot run in the interpreter).
    from flex_inductor.lowering import fast_math as lowering

    q = torch.randn(1, 2, 64, 16, dtype=dtype)
    score_mod = mods.softcap(20.0, approx=approx)
    attention = torch.compile(
        lambda q: flex_attention(q, q, q, score_mod=score_mod), fullgraph=True
    )
    with (
        mock.patch.object(lowering, "_is_nvidia_gpu", lambda device: True),
        inductor_config.patch(fx_graph_cache=False),
    ):
        source = "\n".join(get_code(attention, q))
    kernels = template_sources(source)
    assert len(kernels) == 1, sorted(kernels)
    (code,) = kernels.values()
    assert (f"tl.inline_asm_elementwise('{PTX} $0, $1;', '=f,f'" in code) == fast
    assert ("libdevice.tanh" in code) != fast


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
def test_cuda_kernel_uses_the_instruction_and_its_error_is_small():
    x = torch.linspace(-10, 10, 1 << 20, device="cuda")
    result = compile_and_run(tanh_approx, x)
    assert PTX in result.source
    error = (result.output.double() - torch.tanh(x.double())).abs().max().item()
    # The PTX ISA documents a relative error of about 2^-11; |tanh| <= 1.
    assert error < 1e-3, error


@requires_cuda
@pytest.mark.gpu
def test_cuda_softcap_approx_in_float32_matches_bfloat16_tolerance():
    # approx=True puts the instruction into float32 attention too; its error
    # is then that of the instruction, well inside a bfloat16 tolerance.
    case = _softcap_problem("cuda", torch.float32, mods.softcap(20.0, approx=True))
    grads, result = case.compiled()
    kernels = template_sources(result.source)
    assert kernels and all(PTX in code for code in kernels.values()), sorted(kernels)
    q, k, v = (t.detach() for t in (case.q, case.k, case.v))
    oracle_out = dense_oracle(q.double(), k.double(), v.double(), case.score_mod,
                              case.block_mask)[0]
    lowp_out = lowp_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), case.score_mod,
                              case.block_mask)[0]
    assert_close_to_oracle(result.output, oracle_out, lowp_out, "out")
