"""The public entry point, ``flex_attention``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from flex_inductor._dispatch import attention
from flex_inductor._validation import validate_inputs

__all__ = ["flex_attention"]


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with a user-defined score modification and block-sparse mask.

    Computes ``softmax(score_mod(scale * q @ k^T)) @ v`` over the positions
    kept by ``block_mask``; see ``flex_inductor.reference`` for the exact spec.

    Args:
        query: ``(B, Hq, L, E)``, float16, bfloat16, float32 or float64.
        key: ``(B, Hkv, S, E)``, same dtype and device.
        value: ``(B, Hkv, S, Ev)``, same dtype and device.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on 0-d
            tensors, or None for the identity (see ``flex_inductor.mods``).
        block_mask: A ``BlockMask`` from ``create_block_mask``, or None to
            attend everywhere (see ``flex_inductor.masks``).
        scale: Multiplies ``q·k`` before ``score_mod``; default ``1/sqrt(E)``.
        enable_gqa: Allow grouped-query attention (``Hq`` a multiple of ``Hkv``).
        return_lse: Also return the natural-log log-sum-exp of the scores.
        kernel_options: Tuning knobs for the compiled kernels (keys in
            ``flex_inductor._validation.KERNEL_OPTION_KEYS``).

    Returns:
        ``out`` ``(B, Hq, L, Ev)`` in the query dtype; with ``return_lse``,
        ``(out, lse)`` with ``lse`` ``(B, Hq, L)`` in float32 (float64 for
        float64 inputs). Rows with no kept position give 0 and ``-inf``.

    Raises:
        TypeError: An argument has the wrong type or a mod the wrong arity.
        ValueError: Shapes, dtypes, devices or values are inconsistent.

    Example:
        >>> from flex_inductor.mods import softcap
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> flex_attention(q, k, v, score_mod=softcap(20.0)).shape
        torch.Size([1, 2, 16, 8])
    """
    validate_inputs(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options
    )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    out, lse = attention(query, key, value, score_mod, block_mask, scale, kernel_options)
    return (out, lse) if return_lse else out
