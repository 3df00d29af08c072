"""The eager backward: gradients by autograd through the reference, a chunk at a time.

Each chunk of query rows is recomputed under autograd and differentiated on
its own, so memory stays bounded by ``chunk x S`` like the forward. This is
the backward op's dense implementation and the spec every backward kernel is
tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from . import _compat
from ._subgraphs import bind_buffers
from .reference import _CHUNK_ELEMENTS, reference_chunk


def reference_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    score_mod: Callable,
    block_mask,
    scale: float,
    score_mod_buffers: list[torch.Tensor],
    *,
    dq_scale: float = 1.0,
    _chunk_size: int | None = None,
):
    """Gradients of the reference forward.

    Args:
        query, key, value: The forward inputs.
        out, lse: The forward outputs (unused: recomputed per chunk, kept in
            the signature because kernels use them).
        grad_out: Gradient of ``out``.
        grad_lse: Gradient of ``lse`` (zeros when ``lse`` was unused).
        score_mod: The mod, taking ``score_mod_buffers`` as trailing inputs.
        block_mask: A ``BlockMask`` whose ``mask_mod`` has its buffers bound.
        scale: The forward's scale.
        score_mod_buffers: Captured tensors; those with ``requires_grad``
            get a gradient.
        dq_scale: Multiplies dq before it is rounded to the query's dtype.
            A prescaled call passes ``q * scale`` as ``query`` and ``scale``
            here, so that ``dq = scale * d(q * scale)`` is rounded once
            (and, in float16, the unscaled gradient never has to fit).

    Returns:
        ``(dq, dk, dv, grad_buffers)`` with ``None`` for buffers that do not
        require grad. dk and dv sum over GQA groups.
    """
    del out, lse  # recomputed chunk by chunk
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    chunk = _chunk_size or max(1, _CHUNK_ELEMENTS // (B * Hq * S))
    needs = [b.requires_grad for b in score_mod_buffers]
    # Sums over chunks are kept in float32 (float64 for float64 inputs).
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    dq = torch.zeros_like(query)
    dk = torch.zeros_like(key, dtype=acc)
    dv = torch.zeros_like(value, dtype=acc)
    grads = [
        torch.zeros_like(b, dtype=acc) if need else None
        for b, need in zip(score_mod_buffers, needs, strict=True)
    ]
    with torch.enable_grad(), _compat.autograd_reenabled(), _deterministic_algorithms():
        # The chunks compute in ``acc`` anyway; a leaf in ``acc`` keeps dq
        # unrounded until the one rounding below.
        q = query.detach().to(acc).requires_grad_(True)
        k = key.detach().requires_grad_(True)
        v = value.detach().requires_grad_(True)
        buffers = [
            b.detach().requires_grad_(need)
            for b, need in zip(score_mod_buffers, needs, strict=True)
        ]
        mod = bind_buffers(score_mod, buffers)
        wrt = [q, k, v, *[b for b, need in zip(buffers, needs, strict=True) if need]]
        for start in range(0, L, chunk):
            stop = min(start + chunk, L)
            out_c, lse_c = reference_chunk(q, k, v, mod, block_mask, scale, start, stop)
            got = torch.autograd.grad(
                (out_c, lse_c),
                wrt,
                (
                    grad_out[:, :, start:stop].to(out_c.dtype),
                    grad_lse[:, :, start:stop].to(lse_c.dtype),
                ),
                allow_unused=True,
            )
            g_q, g_k, g_v, *g_bufs = got
            if g_q is not None:
                dq[:, :, start:stop] = (g_q[:, :, start:stop] * dq_scale).to(dq.dtype)
            if g_k is not None:
                dk += g_k
            if g_v is not None:
                dv += g_v
            it = iter(g_bufs)
            for i, need in enumerate(needs):
                if need:
                    g = next(it)
                    if g is not None:
                        grads[i] += g
    grads = [
        None if g is None else g.to(b.dtype)
        for g, b in zip(grads, score_mod_buffers, strict=True)
    ]
    return dq, dk.to(key.dtype), dv.to(value.dtype), grads


@contextlib.contextmanager
def _deterministic_algorithms():
    """Run the body with deterministic algorithms, whatever the caller asked.

    The gradient of an indexed captured tensor (``bias[h, q_idx - kv_idx]``)
    is an accumulating ``index_put_``, which uses atomic adds on CUDA unless
    deterministic algorithms are on. The compiled backward falls back to this
    function precisely when ``kernel_options={"DETERMINISTIC": True}`` asks for
    reproducible gradients, so they are always on here. ``warn_only``: ops
    that have no deterministic variant (cuBLAS without
    ``CUBLAS_WORKSPACE_CONFIG``) warn instead of failing, as under the user's
    own ``torch.use_deterministic_algorithms(True, warn_only=True)``.
    """
    if torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
