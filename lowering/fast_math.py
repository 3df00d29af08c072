"""The Inductor lowering of ``flex_inductor::tanh_approx`` (``flex_inductor/fast_math.py``).

On an NVIDIA GPU it emits the PTX instruction ``tanh.approx.f32`` through
Inductor's inline-asm elementwise op: one special-function-unit instruction
instead of libdevice's ``tanh``. Everywhere else (CPU, Triton's interpreter,
which cannot run inline assembly, ROCm, float64) it is Inductor's exact
``tanh``. The same lowering serves the mods inlined into our templates and
any other compiled graph that calls the op.
"""

from __future__ import annotations

import torch

from flex_inductor import _compat
from flex_inductor.fast_math import TANH_APPROX_PTX

_ind = _compat.inductor_api()
_TANH_APPROX = torch.ops.flex_inductor.tanh_approx.default
# tanh.approx.f32 first appeared with Turing (PTX ISA 7.0, sm_75).
_MIN_CAPABILITY = (7, 5)
# Dtypes that the approximation serves: it computes in float32, so float64
# would lose precision, not only gain speed.
_APPROX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_nvidia_gpu(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    if _compat.inductor_config().cuda_backend != "triton":
        return False
    return torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY


def _computation_dtype(x) -> torch.dtype:
    """The dtype that decides ``low_precision_only``.

    Inside a mod, the node being lowered is the attention op, whose first
    argument is the query: the scores are float32 whatever the inputs, so
    the query's dtype tells a 16-bit attention from a float32 one. For a
    plain call of the op, its first argument is ``x`` itself.
    """
    node = _compat.current_fx_node()
    if node is not None and node.args:
        first = node.args[0]
        value = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
        if isinstance(value, torch.Tensor):
            return value.dtype
    return x.get_dtype()


def use_approximation(x, low_precision_only: bool) -> bool:
    """Whether the lowering of ``tanh_approx(x)`` emits ``tanh.approx.f32``."""
    if x.get_dtype() not in _APPROX_DTYPES or not _is_nvidia_gpu(x.get_device()):
        return False
    return not low_precision_only or _computation_dtype(x) in _LOW_PRECISION


def lower_tanh_approx(x, low_precision_only: bool = False):
    """The lowering registered for ``flex_inductor::tanh_approx``."""
    api = _compat.fast_math_api()
    if not use_approximation(x, low_precision_only):
        return api.exact_tanh(x)
    ops = _ind.ops
    dtype = x.get_dtype()

    def tanh_f32(value):
        # The instruction reads and writes 32-bit float registers ("f").
        if dtype != torch.float32:
            value = ops.to_dtype(value, torch.float32)
        result = ops.inline_asm_elementwise(
            value, asm=TANH_APPROX_PTX, constraints="=f,f", dtype=torch.float32,
            is_pure=True, pack=1,
        )
        return result if dtype == torch.float32 else ops.to_dtype(result, dtype)

    return api.make_pointwise(tanh_f32)(x)


_ind.register_lowering(_TANH_APPROX, type_promotion_kind=None)(lower_tanh_approx)
