"""Test oracles: a dense float64 FlexAttention and the tolerance rule.

``dense_oracle`` is deliberately written differently from
``flex_inductor.reference``, so that a shared mistake is unlikely: it builds
the whole ``(B, H, L, S)`` score matrix at once, evaluates the mods with one
flat ``vmap`` over every position (int64 indices), reads the block mask from
its index tensors rather than ``_block_states()``, copies kv heads for GQA and
uses ``torch.softmax`` / ``torch.logsumexp``.

The tolerance rule (FlashAttention's tests, Liger's "2x the reference error"):
an implementation under test may be off the float64 oracle by at most twice
what the same plain maths in the input's low precision is off, plus a small
absolute slack.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_PARTIAL, _FULL = 1, 2


def dense_oracle(q, k, v, score_mod=None, mask=None, scale=None, enable_gqa=False):
    """Float64 dense attention: ``(out, lse)``, both float64.

    Differentiable with respect to q, k, v and tensors captured by the mods;
    rows with no kept position give 0 / -inf and zero (never NaN) gradients.

    Args:
        q: ``(B, Hq, L, E)``.
        k: ``(B, Hkv, S, E)``.
        v: ``(B, Hkv, S, Ev)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` or None.
        mask: None (keep all), a mask_mod (applied everywhere) or a
            ``BlockMask`` (full blocks kept, mask_mod on partial blocks).
        scale: Defaults to ``1/sqrt(E)``.
        enable_gqa: Must be True when ``Hq != Hkv``.
    """
    _check_gqa(q, k, enable_gqa)
    return _dense_attention(q, k, v, score_mod, mask, scale, torch.float64)


def lowp_attention(q, k, v, score_mod=None, mask=None, scale=None, enable_gqa=False):
    """The oracle's plain maths in the inputs' own dtype (the low-precision baseline).

    Scores, softmax and the product with ``v`` all run in ``q.dtype``; the
    score_mod's result is cast back to it (see :func:`cast_score_mod`).
    """
    _check_gqa(q, k, enable_gqa)
    return _dense_attention(q, k, v, score_mod, mask, scale, q.dtype)


def _check_gqa(q, k, enable_gqa: bool) -> None:
    assert enable_gqa or q.shape[1] == k.shape[1], "Hq != Hkv needs enable_gqa=True"


def cast_score_mod(score_mod: Callable | None, dtype: torch.dtype) -> Callable | None:
    """``score_mod`` with its result cast to ``dtype``.

    Mods capture float32 tensors (slopes, biases): in float64 the result is
    promoted to float64, which is what the oracle wants, but in float16 it
    would be promoted to float32. Casting keeps the low-precision baseline in
    low precision throughout.
    """
    if score_mod is None:
        return None

    def cast(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx, kv_idx).to(dtype)

    cast.__name__ = getattr(score_mod, "__name__", "score_mod")
    return cast


def _dense_attention(q, k, v, score_mod, mask, scale, dtype):
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)

    scores = torch.einsum("bhle,bhse->bhls", q, k) * scale
    if score_mod is not None:
        mod = cast_score_mod(score_mod, dtype)
        scores = _flat_vmap(mod, (B, Hq, L, S), scores.device, scores)
    keep = dense_keep_mask(mask, B, Hq, L, S, q.device)

    masked = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(masked, dim=-1)
    # softmax of an all -inf row is NaN; such rows attend to nothing: 0.
    alive = torch.isfinite(lse).unsqueeze(-1)
    probs = torch.where(alive, torch.softmax(masked, dim=-1), 0.0)
    out = torch.einsum("bhls,bhsv->bhlv", probs, v)
    return out, lse


def dense_keep_mask(mask, B: int, H: int, L: int, S: int, device) -> torch.Tensor:
    """Bool ``(B, H, L, S)``: which positions a mask (None, mask_mod or BlockMask) keeps."""
    if mask is None:
        return torch.ones((B, H, L, S), dtype=torch.bool, device=device)
    if callable(mask) and not hasattr(mask, "kv_num_blocks"):
        return _flat_vmap(mask, (B, H, L, S), device)
    block_mask = mask
    states = block_states_from_indices(block_mask)
    q_block, kv_block = block_mask.BLOCK_SIZE
    # Blow each block up to its positions and crop the ragged last blocks.
    states = states.repeat_interleave(q_block, dim=2)[:, :, :L]
    states = states.repeat_interleave(kv_block, dim=3)[:, :, :, :S]
    states = states.expand(B, H, L, S)
    keep = states == _FULL
    if block_mask.mask_mod is not None:
        keep = keep | ((states == _PARTIAL) & _flat_vmap(block_mask.mask_mod, (B, H, L, S), device))
    return keep


def block_states_from_indices(block_mask) -> torch.Tensor:
    """int8 ``(B, H, nq, nkv)`` block states, rebuilt from the index tensors.

    The first ``kv_num_blocks`` entries of ``kv_indices`` are partial blocks,
    the first ``full_kv_num_blocks`` of ``full_kv_indices`` full ones; any
    other block is skipped.
    """
    n_kv = math.ceil(block_mask.seq_lengths[1] / block_mask.BLOCK_SIZE[1])
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    states = torch.zeros((*num.shape, n_kv), dtype=torch.int8, device=num.device)
    listed = [(num, idx, _PARTIAL)]
    if block_mask.full_kv_num_blocks is not None:
        listed.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, _FULL))
    for num, idx, state in listed:
        valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
        # Padding slots may hold any index: point them at block 0 with value 0,
        # which amax leaves alone.
        target = torch.where(valid, idx.long(), 0)
        value = (valid * state).to(torch.int8)
        states = states.scatter_reduce(-1, target, value, reduce="amax")
    return states


def _flat_vmap(mod, shape, device, score=None) -> torch.Tensor:
    # One vmap over every position of the flattened grid, not one per index.
    grids = torch.meshgrid(*(torch.arange(n, device=device) for n in shape), indexing="ij")
    indices = [g.reshape(-1) for g in grids]
    if score is None:
        return torch.vmap(mod)(*indices).reshape(shape)
    return torch.vmap(mod)(score.reshape(-1), *indices).reshape(shape)


def assert_close_to_oracle(ours, oracle, lowp, name: str, atol: float = 1e-5) -> None:
    """Assert ``max|ours - oracle| <= 2 * max|lowp - oracle| + atol``, and no NaN.

    Where the oracle is infinite (the lse of a row with no kept position),
    ``ours`` must equal it exactly.

    Args:
        ours: The result under test.
        oracle: The float64 oracle's result.
        lowp: The low-precision baseline's result.
        name: What is compared, for the message (``"out"``, ``"dq"``...).
        atol: Absolute slack for results the baseline gets exactly right.
    """
    ours, oracle, lowp = (t.detach().to(torch.float64).cpu() for t in (ours, oracle, lowp))
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN at {ours.isnan().nonzero()[:5].tolist()}"
    infinite = ~torch.isfinite(oracle)
    assert torch.equal(ours[infinite], oracle[infinite]), (
        f"{name}: expected {oracle[infinite][:5].tolist()} (non-finite in the oracle), "
        f"got {ours[infinite][:5].tolist()}"
    )
    our_err = (ours - oracle).abs().masked_fill(infinite, 0.0)
    lowp_err = (lowp - oracle).abs().masked_fill(infinite, 0.0).nan_to_num(nan=math.inf)
    worst = int(our_err.argmax()) if our_err.numel() else 0
    bound = 2 * (lowp_err.max().item() if lowp_err.numel() else 0.0) + atol
    got = our_err.max().item() if our_err.numel() else 0.0
    assert got <= bound, (
        f"{name}: max|ours - oracle| = {got:.3g} exceeds 2 * max|lowp - oracle| + atol = "
        f"{bound:.3g} (atol {atol:g}); worst at flat index {worst}: ours "
        f"{ours.reshape(-1)[worst].item():.6g}, oracle {oracle.reshape(-1)[worst].item():.6g}"
    )
