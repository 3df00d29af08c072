"""Mods that capture 0-d tensors (a learnable temperature, a window size).

Inductor passes a 0-d CPU tensor to a Triton kernel by value (``.item()`` at
the call), while our templates load every captured tensor through a
pointer; the lowerings copy such scalars into one-element buffers on the
kernel's device. Without a GPU every tensor is a CPU tensor, so each case
here goes through that copy; on a GPU ``scalar_device`` picks a CPU scalar
next to CUDA inputs, or a scalar on the kernels' own device.

Every case compiles with Inductor, checks which kernels ran (our templates;
the dense backward only for a learnable scalar, whose gradient is not a
scatter) and that the results follow the shared tolerance rule against the
float64 oracle.
"""

from __future__ import annotations

import pytest
import torch
from compile_utils import compile_and_run
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from test_backward_kernel import Case, assert_template_backward, make_qkv, template_kernels

from flex_inductor import create_block_mask, flex_attention

FWD = "flex_inductor_fwd"
DECODE = "flex_inductor_decode"
DENSE = "flex_inductor.dense_attention"
DENSE_BACKWARD = "flex_inductor.dense_attention_backward"
SCALAR_DEVICES = ["cpu", "kernel"]


def scalar(value, scalar_device, device, dtype=torch.float32, requires_grad=False):
    """A 0-d tensor on the CPU, or on the kernels' device (``"kernel"``)."""
    where = "cpu" if scalar_device == "cpu" else device
    return torch.tensor(value, dtype=dtype, device=where, requires_grad=requires_grad)


def slope_mod(w):
    """``score + w * (q_idx - kv_idx)``: a relative-position slope."""

    def slope(score, b, h, q_idx, kv_idx):
        return score + w * (q_idx - kv_idx)

    return slope


def window_mask(width):
    """Causal within ``width`` positions; ``width`` is a 0-d integer tensor."""

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= width)

    return window


def run_forward(q, k, v, score_mod=None, block_mask=None, kernel_options=None):
    """Compiled forward with ``return_lse``, checked against the oracle."""

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True,
            kernel_options=kernel_options,
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    out, lse = result.output
    oracle = dense_oracle(q.double(), k.double(), v.double(), score_mod, block_mask)
    lowp = lowp_attention(q, k, v, score_mod, block_mask)
    assert out.dtype == q.dtype
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")
    assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")
    assert DENSE not in result.source
    return result


# ---------------------------------------------------------------------------
# Forward template
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_score_mod_scalar(scalar_device, dtype, device):
    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=dtype, device=device, requires_grad=(False,) * 3)
    w = scalar(0.25, scalar_device, device)
    result = run_forward(q, k, v, slope_mod(w), kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    assert len(template_kernels(result, FWD)) == 1, result.kernels("")


@pytest.mark.parametrize("value_dtype", [torch.float64, torch.float16])
def test_score_mod_scalar_of_other_dtypes(value_dtype, device):
    # Inductor passes a 0-d float16 tensor by value as float32; float64
    # promotes the mod's result.
    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=torch.float32, device=device,
                       requires_grad=(False,) * 3)
    w = scalar(-0.5, "cpu", device, dtype=value_dtype)
    result = run_forward(q, k, v, slope_mod(w), kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    assert len(template_kernels(result, FWD)) == 1, result.kernels("")


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
def test_mask_mod_scalar(scalar_device, device):
    # The window reaches the kernel only through the mask_mod of partial blocks.
    q, k, v = make_qkv(1, 2, 64, 64, 16, dtype=torch.float32, device=device,
                       requires_grad=(False,) * 3)
    width = scalar(20, scalar_device, device, dtype=torch.int64)
    block_mask = create_block_mask(window_mask(width), 1, 1, 64, 64, device=device, BLOCK_SIZE=16)
    w = scalar(0.125, scalar_device, device)
    result = run_forward(q, k, v, slope_mod(w), block_mask)
    assert len(template_kernels(result, FWD)) == 1, result.kernels("")


def test_scalar_view_made_in_the_compiled_function(device):
    # ``slopes[1]`` taken inside the compiled region reaches the lowering as a
    # 0-d view of a larger CPU buffer, not as a graph input of its own. The
    # interpreter reads it through a pointer either way; a CUDA kernel cannot.
    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=torch.float32, device=device,
                       requires_grad=(False,) * 3)
    slopes = torch.tensor([0.5, -0.25, 2.0])

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=slope_mod(slopes[1]), return_lse=True,
            kernel_options={"FORCE_USE_FLEX_ATTENTION": True},
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    assert len(template_kernels(result, FWD)) == 1, result.kernels("")
    mod = slope_mod(slopes[1])
    oracle = dense_oracle(q.double(), k.double(), v.double(), mod)
    lowp = lowp_attention(q, k, v, mod)
    assert_close_to_oracle(result.output[0], oracle[0], lowp[0], "out")
    assert_close_to_oracle(result.output[1], oracle[1], lowp[1], "lse")


# ---------------------------------------------------------------------------
# Decode template (short queries)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
def test_decode_scalars(scalar_device, device):
    L, S = 2, 75
    q, k, v = make_qkv(1, 4, L, S, 16, Hkv=2, dtype=torch.float32, device=device,
                       requires_grad=(False,) * 3)
    offset = scalar(S - L, scalar_device, device, dtype=torch.int64)

    def cached_causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    block_mask = create_block_mask(cached_causal, None, None, L, S, device=device, BLOCK_SIZE=16)
    w = scalar(0.1, scalar_device, device)

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=slope_mod(w), block_mask=block_mask, enable_gqa=True,
            return_lse=True, kernel_options={"SPLIT_KV": 2},
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    assert len(template_kernels(result, DECODE)) == 1, result.kernels("")
    assert not template_kernels(result, FWD)
    mod = slope_mod(w)
    oracle = dense_oracle(q.double(), k.double(), v.double(), mod, block_mask, enable_gqa=True)
    lowp = lowp_attention(q, k, v, mod, block_mask, enable_gqa=True)
    assert_close_to_oracle(result.output[0], oracle[0], lowp[0], "out")
    assert_close_to_oracle(result.output[1], oracle[1], lowp[1], "lse")


# ---------------------------------------------------------------------------
# Backward templates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
def test_backward_with_learnable_scalar(scalar_device, device):
    # dw sums dscore * (q_idx - kv_idx) over every position: a pointwise
    # gradient, not a scatter, which the backward templates do not take; the
    # forward template still reads w, and the dense backward gives dw.
    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=torch.float32, device=device)
    w = scalar(0.25, scalar_device, device, requires_grad=True)
    block_mask = create_block_mask(
        window_mask(scalar(30, scalar_device, device, dtype=torch.int64)),
        1, 1, 37, 53, device=device, BLOCK_SIZE=16,
    )
    case = Case(q, k, v, slope_mod(w), block_mask, params={"w": w}, rebuild=slope_mod)
    grads, result = case.compiled()
    assert len(template_kernels(result, FWD)) == 1, result.kernels("")
    assert DENSE_BACKWARD in result.source
    assert grads["dw"].shape == () and grads["dw"].device == w.device
    case.check(grads)


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
def test_backward_scalar_next_to_learnable_table(scalar_device, device):
    # A constant scalar in a mod whose table gradient the dK/dV kernel scatters.
    L, S = 37, 53
    q, k, v = make_qkv(1, 2, L, S, 16, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(3)
    bias = (torch.randn(2, L + S + 1, generator=gen) * 0.5).to(device).requires_grad_()
    w = scalar(0.5, scalar_device, device)

    def build(bias):
        def scaled_bias(score, b, h, q_idx, kv_idx):
            return score * w + bias[h, q_idx - kv_idx + S]

        return scaled_bias

    case = Case(q, k, v, build(bias), params={"bias": bias}, rebuild=build)
    grads, result = case.compiled()
    assert_template_backward(result)
    case.check(grads)


@pytest.mark.parametrize("scalar_device", SCALAR_DEVICES)
def test_backward_with_constant_scalar(scalar_device, device):
    # A scalar without a gradient still reaches both backward kernels' mods.
    q, k, v = make_qkv(1, 2, 37, 53, 16, dtype=torch.float16, device=device)
    w = scalar(-0.25, scalar_device, device)
    case = Case(q, k, v, slope_mod(w), return_lse=True)
    grads, result = case.compiled()
    assert_template_backward(result)
    case.check(grads)
