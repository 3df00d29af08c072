"""Inductor lowerings of flex_inductor's ops (installed as flex_inductor.lowering).

Importing this package registers them with Inductor, once.
"""

from __future__ import annotations

from flex_inductor import _compat
from flex_inductor.op import flex_inductor_attention, flex_inductor_attention_backward

from . import fast_math  # noqa: F401  (registers the lowering of tanh_approx)
from .backward import lower_backward
from .forward import lower_forward

_register = _compat.inductor_api().register_lowering
_register(flex_inductor_attention, type_promotion_kind=None)(lower_forward)
_register(flex_inductor_attention_backward, type_promotion_kind=None)(lower_backward)
