"""A custom op that runs the blockwise eager reference from compiled code.

Inductor lowers our op to this op where the Triton templates cannot run: on
CPU without the Triton interpreter, and for float64. The mods travel as
pickled GraphModules in string arguments, so that generated code stays
valid when Inductor's cache replays it in another process.
"""

from __future__ import annotations

import base64
import functools
import pickle

import torch

from . import _compat
from .op import flex_inductor_attention


def encode_graph(graph_module: torch.fx.GraphModule) -> str:
    """A GraphModule as a printable string argument."""
    return base64.b64encode(pickle.dumps(graph_module)).decode("ascii")


@functools.lru_cache(maxsize=256)
def decode_graph(encoded: str) -> torch.fx.GraphModule:
    """The inverse of :func:`encode_graph`, cached per string."""
    return pickle.loads(base64.b64decode(encoded.encode("ascii")))


@torch.library.custom_op("flex_inductor::dense_attention", mutates_args=())
def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: str,
    mask_mod: str,
    block_mask: list[torch.Tensor | None],
    block_sizes: list[int],
    scale: float,
    score_mod_buffers: list[torch.Tensor],
    mask_mod_buffers: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention by the blockwise reference (memory bounded by a chunk)."""
    with _compat.leaf_kernel():
        out, lse = flex_inductor_attention(
            query, key, value, decode_graph(score_mod), decode_graph(mask_mod), block_mask,
            block_sizes, scale, {}, score_mod_buffers, mask_mod_buffers,
        )
    return out, lse


@dense_attention.register_fake
def _(query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
      score_mod_buffers, mask_mod_buffers):
    B, Hq, L, _ = query.shape
    out = query.new_empty((B, Hq, L, value.shape[-1]))
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out, query.new_empty((B, Hq, L), dtype=lse_dtype)


@torch.library.custom_op("flex_inductor::dense_attention_backward", mutates_args=())
def dense_attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    fw_graph: str,
    mask_mod: str,
    block_mask: list[torch.Tensor | None],
    block_sizes: list[int],
    scale: float,
    dq_scale: float,
    score_mod_buffers: list[torch.Tensor],
    mask_mod_buffers: list[torch.Tensor],
    buffer_needs_grad: list[bool],
) -> list[torch.Tensor]:
    """Gradients by the blockwise reference: ``[dq, dk, dv, *buffer grads]``.

    ``dq_scale`` multiplies dq before its rounding (see ``reference_backward``).

    Buffers that need no gradient get an empty tensor in their slot (a
    custom op cannot return None).
    """
    from ._subgraphs import bind_buffers
    from .block_mask import BlockMask
    from .reference_backward import reference_backward

    bm = BlockMask._from_flat(
        list(block_mask), list(block_sizes), bind_buffers(decode_graph(mask_mod), mask_mod_buffers)
    )
    buffers = [
        b.detach().requires_grad_(need)
        for b, need in zip(score_mod_buffers, buffer_needs_grad, strict=True)
    ]
    with _compat.leaf_kernel():
        dq, dk, dv, grads = reference_backward(
            query, key, value, out, lse, grad_out, grad_lse, decode_graph(fw_graph), bm, scale,
            buffers, dq_scale=dq_scale,
        )
    empty = query.new_empty(0)
    return [dq, dk, dv, *[empty if g is None else g for g in grads]]


@dense_attention_backward.register_fake
def _(query, key, value, out, lse, grad_out, grad_lse, fw_graph, mask_mod, block_mask,
      block_sizes, scale, dq_scale, score_mod_buffers, mask_mod_buffers, buffer_needs_grad):
    grads = [
        torch.empty_like(b) if need else query.new_empty(0)
        for b, need in zip(score_mod_buffers, buffer_needs_grad, strict=True)
    ]
    return [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), *grads]
