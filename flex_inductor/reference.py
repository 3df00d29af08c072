"""The eager reference: FlexAttention written as plain torch, the spec.

For each query row ``q`` of batch ``b`` and head ``h``::

    s[kv]  = score_mod(scale * q·k[kv], b, h, q, kv)      for kept kv
    out    = sum_kv softmax(s)[kv] * v[kv]
    lse    = log(sum_kv exp(s[kv]))                      (natural log)

A position ``(q, kv)`` is kept when its block of ``block_mask`` is full, or
partial and ``mask_mod(b, h, q, kv)`` is True. A row with no kept position has
``out = 0`` and ``lse = -inf``. With GQA, query head ``h`` reads kv head
``h // (Hq // Hkv)``.

The maths runs in float32 (float64 for float64 inputs), a chunk of query rows
at a time, so that memory is bounded by ``chunk x S`` rather than ``L x S``.
Every fast path is tested against this file; keep it short and obvious.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["flex_attention_reference", "reference_chunk", "reference_forward"]

# Block states of ``BlockMask._block_states()``.
_PARTIAL, _FULL = 1, 2
# Score elements (over B x Hq x rows x S) materialised per chunk: 16 Mi
# float32 values, 64 MiB, whatever L is.
_CHUNK_ELEMENTS = 1 << 24


def flex_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention computed eagerly in plain torch (the written spec).

    Args:
        query: ``(B, Hq, L, E)``.
        key: ``(B, Hkv, S, E)``.
        value: ``(B, Hkv, S, Ev)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on 0-d
            tensors, or None for the identity.
        block_mask: A ``BlockMask``, or None to attend everywhere.
        scale: Multiplies ``q·k`` before ``score_mod``; default ``1/sqrt(E)``.
        enable_gqa: Allow ``Hq`` to be a multiple of ``Hkv``.
        return_lse: Also return the log-sum-exp of the scores.

    Returns:
        ``out`` ``(B, Hq, L, Ev)`` in the query dtype, and with ``return_lse``
        also ``lse`` ``(B, Hq, L)``, float32 (float64 for float64 inputs).

    Raises:
        ValueError: If ``Hq != Hkv`` without ``enable_gqa``.
    """
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    out, lse = reference_forward(query, key, value, score_mod, block_mask, scale)
    return (out, lse) if return_lse else out


def reference_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask,
    scale: float,
    *,
    _chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference forward on validated inputs; GQA is read from the shapes.

    Differentiable with autograd with respect to ``query``, ``key``, ``value``
    and tensors captured by ``score_mod``; fully masked rows get zero gradients.

    Args:
        query: ``(B, Hq, L, E)``.
        key: ``(B, Hkv, S, E)`` with ``Hq % Hkv == 0``.
        value: ``(B, Hkv, S, Ev)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` or None.
        block_mask: A ``BlockMask`` or None (attend everywhere, no mask_mod).
        scale: Multiplies ``q·k`` before ``score_mod``.
        _chunk_size: Query rows per chunk (tests); default keeps each chunk's
            scores under ``_CHUNK_ELEMENTS`` values.

    Returns:
        ``(out, lse)``: ``(B, Hq, L, Ev)`` in the query dtype, and ``(B, Hq, L)``
        natural-log log-sum-exp in float32 (float64 for float64 inputs).
    """
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    chunk = _chunk_size or max(1, _CHUNK_ELEMENTS // (B * Hq * S))
    outs, lses = [], []
    for start in range(0, L, chunk):
        out, lse = reference_chunk(
            query, key, value, score_mod, block_mask, scale, start, min(start + chunk, L)
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def reference_chunk(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask,
    scale: float,
    start: int,
    stop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows ``start:stop`` of :func:`reference_forward`, in float32/64.

    The blockwise backward recomputes one chunk at a time through this.
    """
    B, Hq = query.shape[:2]
    Hkv, S = key.shape[1], key.shape[2]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    # Group the query heads under the kv head they share: (B, Hkv, G, rows, E),
    # so that K and V broadcast over the group instead of being copied.
    q = query[:, :, start:stop].to(dtype).unflatten(1, (Hkv, Hq // Hkv))
    k = key.to(dtype).unsqueeze(2)
    v = value.to(dtype).unsqueeze(2)
    q_idx = torch.arange(start, stop, device=query.device, dtype=torch.int32)
    scores = (q @ k.transpose(-1, -2)).flatten(1, 2) * scale
    if score_mod is not None:
        scores = _on_grid(score_mod, B, Hq, q_idx, S, scores).to(dtype)
    if block_mask is not None:
        scores = scores.masked_fill(~_kept(block_mask, B, Hq, q_idx, S), -math.inf)
    out, lse = _softmax_times_v(scores.unflatten(1, (Hkv, Hq // Hkv)), v)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _softmax_times_v(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores) @ v`` and the log-sum-exp, 0 / -inf on empty rows."""
    # The row max only shifts the exponent for range; the result does not
    # depend on it, so it is kept out of autograd. A row with no finite score
    # shifts by 0, so exp(-inf) = 0 and no inf - inf NaN ever appears.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    p = torch.exp(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    empty = row_sum == 0
    # Dividing an all-zero row by 1 gives 0 output and zero gradients.
    out = (p @ v) / torch.where(empty, 1.0, row_sum)
    lse = torch.where(empty, -math.inf, row_max + torch.log(torch.where(empty, 1.0, row_sum)))
    return out, lse.squeeze(-1)


def _kept(block_mask, B: int, Hq: int, q_idx: torch.Tensor, S: int) -> torch.Tensor:
    """Which positions of a query chunk are attended: bool ``(B|1, Hq|1, rows, S)``."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    kv_idx = torch.arange(S, device=q_idx.device, dtype=torch.int32)
    states = block_mask._block_states()
    states = states[:, :, (q_idx // q_block).long()][:, :, :, (kv_idx // kv_block).long()]
    kept = states == _FULL
    if block_mask.mask_mod is not None:
        # mask_mod sees the input's b and h even when the block mask
        # broadcasts over them (B or H of 1).
        mask = _on_grid(block_mask.mask_mod, B, Hq, q_idx, S)
        kept = kept | ((states == _PARTIAL) & mask)
    return kept


def _on_grid(
    mod: Callable, B: int, H: int, q_idx: torch.Tensor, S: int, score: torch.Tensor | None = None
) -> torch.Tensor:
    """Evaluate ``mod`` at every ``(b, h, q, kv)`` of a ``(B, H, rows, S)`` grid.

    One ``torch.vmap`` per index, nested, so that ``mod`` sees exactly what it
    sees in a kernel: 0-d tensors (``table[q_idx].sum()`` sums one row of
    ``table``, not the chunk's rows). A score_mod is also given ``score``, a
    ``(B, H, rows, S)`` tensor mapped alongside; a mask_mod only the indices.
    """
    device = q_idx.device
    indices = (
        torch.arange(B, device=device, dtype=torch.int32),
        torch.arange(H, device=device, dtype=torch.int32),
        q_idx,
        torch.arange(S, device=device, dtype=torch.int32),
    )
    lead = () if score is None else (score,)
    fn = mod
    # The innermost vmap maps kv and the outermost b, so the output is
    # (B, H, rows, S), and the score's dims are peeled off in that order.
    for level in reversed(range(4)):
        index_dims = tuple(0 if i == level else None for i in range(4))
        fn = torch.vmap(fn, in_dims=(0,) * len(lead) + index_dims)
    return fn(*lead, *indices)
