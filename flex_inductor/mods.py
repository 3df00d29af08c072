"""The score_mod library: one small named factory per score modification.

A ``score_mod(score, b, h, q_idx, kv_idx) -> score`` rewrites one scaled
attention logit ``score = scale * q·k`` before the softmax. Every factory
returns a plain function with a readable ``__name__`` (``softcap(30)`` is
``softcap_30``), so test ids, logs and benchmark rows read well.

The functions are written with torch ops on 0-d tensors, because Dynamo later
traces them into Triton kernels: no Python control flow on tensor values, no
``.item()``; captured tensors (slopes, biases) are indexed with the index
tensors and become kernel inputs. Learnable captured tensors get gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .fast_math import tanh_approx

__all__ = [
    "alibi",
    "alibi_slopes",
    "full_bias",
    "learnable_relative_bias",
    "noop",
    "per_head_scale",
    "relative_position_bias",
    "softcap",
]

ScoreMod = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


def _named(fn: ScoreMod, name: str) -> ScoreMod:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def _number_name(x: float) -> str:
    # "2.5" -> "2p5", so that a name stays a valid identifier.
    return f"{x:g}".replace(".", "p").replace("-", "m")


def noop() -> ScoreMod:
    """Identity score_mod: ``score``.

    Returns:
        A score_mod named ``noop``.
    """

    def score_mod(score, b, h, q_idx, kv_idx):
        return score

    return _named(score_mod, "noop")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes, a geometric sequence.

    For a power of two ``n``: ``2 ** (-8 * (i + 1) / n)`` for head ``i``. For
    other ``n``: the slopes of the closest smaller power of two ``p``, followed
    by every other slope of ``2 * p`` (the first ``n - p`` of them). Source:
    "Train Short, Test Long" (Press et al., 2022), ``get_slopes`` in
    ofirpress/attention_with_linear_biases.

    Args:
        num_heads: Number of attention heads, ``>= 1``.

    Returns:
        ``num_heads`` slopes as Python floats.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi: `num_heads` must be a positive int, got {num_heads!r}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
    return power_of_two_slopes(closest) + extra


def alibi(num_heads: int, device: torch.device | str | None = None) -> ScoreMod:
    """ALiBi linear position bias: ``score + slopes[h] * (kv_idx - q_idx)``.

    ``slopes`` (see :func:`alibi_slopes`) is a float32 tensor captured by the
    returned function. Source: "Train Short, Test Long" (Press et al., 2022).

    Args:
        num_heads: Number of query heads.
        device: Device of the captured slopes; must match the attention inputs.

    Returns:
        A score_mod named ``alibi_<num_heads>``.
    """
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return _named(score_mod, f"alibi_{num_heads}")


def softcap(cap: float, approx: bool | None = None) -> ScoreMod:
    """Logit soft-capping: ``cap * tanh(score / cap)``.

    Source: Gemma 2 (Gemma Team, 2024) and Grok-1 attention soft-capping.

    The tanh is :func:`flex_inductor.fast_math.tanh_approx` unless
    ``approx=False``: exact everywhere except inside compiled CUDA kernels,
    where it is the PTX instruction ``tanh.approx.f32`` (relative error about
    2^-11, so the capped score is off by at most about ``cap * 2^-11``). It
    replaces libdevice's tanh, a long instruction sequence that otherwise
    takes a large share of a soft-capped attention kernel's time.

    Args:
        cap: Largest magnitude of a capped score, ``> 0``.
        approx: ``None`` (default): the fast tanh in CUDA kernels when the
            attention's inputs are float16 or bfloat16, whose rounding error
            is larger than the approximation's; exact for float32 inputs.
            ``True``: the fast tanh in CUDA kernels for every dtype.
            ``False``: always ``torch.tanh``.

    Returns:
        A score_mod named ``softcap_<cap>`` (``softcap_2p5`` for 2.5), with a
        suffix ``_approx`` for ``approx=True`` and ``_exact`` for ``approx=False``.
    """
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap < math.inf:
        raise ValueError(f"softcap: `cap` must be a positive finite number, got {cap!r}")
    if approx is not None and not isinstance(approx, bool):
        raise ValueError(f"softcap: `approx` must be None, True or False, got {approx!r}")
    name = f"softcap_{_number_name(cap)}"

    if approx is False:

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return _named(score_mod, f"{name}_exact")

    low_precision_only = approx is None

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * tanh_approx(score / cap, low_precision_only=low_precision_only)

    return _named(score_mod, name if approx is None else f"{name}_approx")


def relative_position_bias(bias: torch.Tensor) -> ScoreMod:
    """Learned relative position bias: ``score + bias[h, q_idx - kv_idx + max_len - 1]``.

    ``bias`` has shape ``(H, 2 * max_len - 1)``: one learned scalar per head and
    signed distance in ``(-max_len, max_len)``. It is captured, so it receives a
    gradient when it requires one. Source: T5's relative attention bias
    (Raffel et al., 2020), without its log-spaced buckets.

    Args:
        bias: ``(H, 2 * max_len - 1)`` tensor; sequence lengths must be at most
            ``max_len``.

    Returns:
        A score_mod named ``relative_position_bias_<max_len>``.
    """
    if not isinstance(bias, torch.Tensor) or bias.dim() != 2 or bias.shape[1] % 2 != 1:
        raise ValueError(
            "relative_position_bias: `bias` must be a (H, 2 * max_len - 1) tensor, got "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
        )
    max_len = (bias.shape[1] + 1) // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + (max_len - 1)]

    return _named(score_mod, f"relative_position_bias_{max_len}")


def learnable_relative_bias(
    num_heads: int, max_len: int, device: torch.device | str | None = None
) -> tuple[ScoreMod, torch.nn.Parameter]:
    """A :func:`relative_position_bias` together with its fresh parameter.

    The parameter starts at zero, so the model starts without a position bias
    (T5 starts from a small random table; initialise it as you like).

    Args:
        num_heads: Number of query heads.
        max_len: Longest query/key length the bias must cover.
        device: Device of the parameter.

    Returns:
        ``(score_mod, bias)`` with ``bias`` an ``nn.Parameter`` of shape
        ``(num_heads, 2 * max_len - 1)``, float32; register it in your module.
    """
    bias = torch.nn.Parameter(torch.zeros(num_heads, 2 * max_len - 1, device=device))
    return relative_position_bias(bias), bias


def per_head_scale(scales: torch.Tensor) -> ScoreMod:
    """Per-head temperature: ``score * scales[h]``.

    Source: a per-head softmax temperature, the head-wise form of the learned
    scale of "Query-Key Normalization for Transformers" (Henry et al., 2020).

    Args:
        scales: ``(H,)`` tensor, one factor per query head (may be learnable).

    Returns:
        A score_mod named ``per_head_scale``.
    """
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1:
        raise ValueError("per_head_scale: `scales` must be a 1-D (H,) tensor")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scales[h]

    return _named(score_mod, "per_head_scale")


def full_bias(bias: torch.Tensor) -> ScoreMod:
    """Dense additive bias: ``score + bias[h, q_idx, kv_idx]``.

    Source: the additive ``attn_mask`` of ``scaled_dot_product_attention`` and
    AlphaFold / Evoformer pair bias; the most general (and most memory-hungry)
    position bias.

    Args:
        bias: ``(H, L, S)`` tensor (may be learnable).

    Returns:
        A score_mod named ``full_bias``.
    """
    if not isinstance(bias, torch.Tensor) or bias.dim() != 3:
        raise ValueError("full_bias: `bias` must be a 3-D (H, L, S) tensor")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return _named(score_mod, "full_bias")
