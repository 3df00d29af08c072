"""Where the Triton templates cannot run: an extern call of the dense op.

Used on CPU without the Triton interpreter and for float64. The dense op is
the blockwise eager reference, so memory stays bounded by one query chunk
(never ``L x S``).
"""

from __future__ import annotations

import logging

import torch

from flex_inductor import _compat
from flex_inductor._dense_op import encode_graph

from .common import static_float
from .prescale import prescale_q, scaled

log = logging.getLogger("flex_inductor")
_ind = _compat.inductor_api()


def dense_forward_fallback(
    query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    """Lower the forward op to an extern call of ``flex_inductor::dense_attention``."""
    log.info(
        "flex_inductor: %s %s has no Triton template here; using the blockwise dense kernel",
        query.get_device(), query.get_dtype(),
    )
    if prescale_q(kernel_options, query, key, score_mod, block_mask, block_sizes):
        # The scores the backward will recompute: q scaled once and rounded.
        query, scale = scaled(query, static_float(scale)), 1.0
    handler = _ind.fallback_handler(
        torch.ops.flex_inductor.dense_attention.default, add_to_fallback_set=False
    )
    out, lse = handler(
        query, key, value, encode_graph(score_mod.graph_module),
        encode_graph(mask_mod.graph_module), list(block_mask), list(block_sizes),
        float(scale), list(score_mod_buffers), list(mask_mod_buffers),
    )
    return out, lse


def dense_backward_fallback(
    query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    """Lower the backward op to an extern call of the blockwise dense backward."""
    # Which captured tensors need a gradient is read off the joint graph: it
    # returns None in the slot of every buffer that does not.
    joint_outputs = _graph_outputs(joint_graph.graph_module)
    needs_grad = [o is not None for o in joint_outputs[1:]]
    # The forward's lse came from q scaled once (and rounded) when it
    # prescaled: recompute those scores, then dq = scale * d(scaled q),
    # scaled inside the op before its one rounding.
    prescale = prescale_q(kernel_options, query, key, fw_graph, block_mask, block_sizes)
    q_scale = static_float(scale)
    handler = _ind.fallback_handler(
        torch.ops.flex_inductor.dense_attention_backward.default, add_to_fallback_set=False
    )
    results = handler(
        scaled(query, q_scale) if prescale else query, key, value, out, lse, grad_out,
        grad_lse, encode_graph(fw_graph.graph_module), encode_graph(mask_mod.graph_module),
        list(block_mask), list(block_sizes), 1.0 if prescale else q_scale,
        q_scale if prescale else 1.0, list(score_mod_buffers), list(mask_mod_buffers), needs_grad,
    )
    dq, dk, dv, *grads = results
    return dq, dk, dv, [g if need else None for g, need in zip(grads, needs_grad, strict=True)]


def _graph_outputs(graph_module: torch.fx.GraphModule) -> list:
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]
