"""Fast approximate math for mods: ``tanh_approx``.

``tanh_approx(x)`` is a custom op, ``flex_inductor::tanh_approx``. Run
eagerly it is exactly ``torch.tanh``, so the eager reference and the CPU paths
stay exact. Inside a kernel that Inductor generates for an NVIDIA GPU it
lowers to one PTX instruction, ``tanh.approx.f32`` (``lowering/fast_math.py``),
instead of libdevice's ``tanh``, a long instruction sequence that takes a
large share of a soft-capped attention kernel's time. Its gradient is
``1 - y**2`` from the op's own output, so the joint graph of a ``score_mod``
that uses it holds only this op and pointwise aten ops, and the backward
kernels inline it too.
"""

from __future__ import annotations

import torch

__all__ = ["tanh_approx"]

# The PTX instruction the CUDA lowering emits (sm_75 and newer).
TANH_APPROX_PTX = "tanh.approx.f32 $0, $1;"


def _check_floating(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"tanh_approx: expected a floating-point tensor, got {x.dtype}")


@torch.library.custom_op("flex_inductor::tanh_approx", mutates_args=())
def _tanh_approx_op(x: torch.Tensor, low_precision_only: bool = False) -> torch.Tensor:
    # Eager (and any non-Inductor) semantics: the exact tanh. Only the
    # Inductor lowering approximates, where it can emit the PTX instruction.
    _check_floating(x)
    return torch.tanh(x)


@_tanh_approx_op.register_fake
def _(x: torch.Tensor, low_precision_only: bool = False) -> torch.Tensor:
    _check_floating(x)
    # A graph that holds the op is being traced (torch.compile, export):
    # register its Inductor lowering before Inductor may run, also when the
    # op is used outside flex_attention (once; a no-op afterwards).
    from ._registration import ensure_lowerings

    ensure_lowerings()
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _backward(ctx, grad: torch.Tensor):
    # d tanh(x)/dx = 1 - tanh(x)**2, from the op's own output: no second
    # transcendental in the backward, and on the GPU the derivative of the
    # approximation the forward used.
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y), None


_tanh_approx_op.register_autograd(_backward, setup_context=_setup_context)


@_tanh_approx_op.register_vmap
def _(info, in_dims, x: torch.Tensor, low_precision_only: bool = False):
    # Elementwise: the batched tensor goes through as it is. Without this
    # rule vmap (the eager reference evaluates mods under vmap) would loop
    # over every element.
    return _tanh_approx_op(x, low_precision_only), in_dims[0]


def tanh_approx(x: torch.Tensor, *, low_precision_only: bool = False) -> torch.Tensor:
    """Hyperbolic tangent that compiled CUDA kernels compute with one fast instruction.

    Use it in a ``score_mod`` (or any compiled code) where ``torch.tanh`` is
    the bottleneck, as in logit soft-capping: :func:`flex_inductor.mods.softcap`
    uses it by default.

    * Inside a Triton kernel that Inductor generates for an NVIDIA GPU
      (compute capability 7.5 or newer), it is the PTX instruction
      ``tanh.approx.f32``, computed in float32 (16-bit inputs are upcast and
      the result cast back). The PTX ISA documents a maximum relative error
      of about 2^-11 (2^-10.987); the error measured on the H100 is in
      ``docs/score_mod.md``.
    * Everywhere else it is exactly ``torch.tanh``: eager calls, the eager
      reference, CPU kernels (also under Triton's interpreter, which cannot
      run inline assembly), ROCm, and float64.

    Its gradient is ``grad * (1 - y**2)`` with ``y`` the op's own output.

    Args:
        x: A floating-point tensor.
        low_precision_only: Approximate only where the computation is 16-bit:
            inside ``flex_attention``, when the query is float16 or bfloat16
            (the scores are float32 in either case); elsewhere, when ``x``
            is. float32 attention then keeps the exact tanh, whose error
            stays below that of float32 arithmetic.

    Returns:
        ``tanh(x)``, same shape and dtype as ``x``.

    Example::

        from flex_inductor.fast_math import tanh_approx

        def softcap_20(score, b, h, q_idx, kv_idx):
            return 20.0 * tanh_approx(score / 20.0)
    """
    return torch.ops.flex_inductor.tanh_approx.default(x, low_precision_only)
