"""Inductor lowering of ``flex_inductor_attention_backward``.

Until the backward Triton templates land, every device uses the blockwise
dense backward (an extern call), which is exact and memory bounded.
"""

from __future__ import annotations

from .fallback import dense_backward_fallback


def lower_backward(*args):
    """The lowering registered for the backward op; returns ``(dq, dk, dv, grads)``."""
    return dense_backward_fallback(*args)
