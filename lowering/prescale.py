"""``PRESCALE_QK``: whether every path of one call scores with q scaled once.

The forward and the backward must compute the same scores, or the
backward's probabilities do not match the lse the forward saved. Rounding
``q * scale`` to the input dtype changes the scores, so the forward and
backward lowerings, and the dense kernels they fall back to, all ask
:func:`prescale_q` the same question and get the same answer.
"""

from __future__ import annotations

import torch

from flex_inductor import _compat

from . import configs
from .common import placeholders
from .decode import forward_decodes

_ind = _compat.inductor_api()

_GATHERS = (torch.ops.aten.index.Tensor, torch.ops.aten.gather.default, torch.ops.aten.take.default)


def gathers_tile(subgraph, first_position: int) -> bool:
    """Whether the mod reads a captured tensor at indices built from both q_idx and kv_idx.

    Args:
        subgraph: The mod's subgraph, arguments ``(..., q_idx, kv_idx, *captured)``.
        first_position: Where q_idx is among the arguments (3 for a score_mod,
            2 for a mask_mod); captured tensors follow kv_idx.
    """
    args = placeholders(subgraph)
    q_idx, kv_idx = args[first_position : first_position + 2]
    captured = set(args[first_position + 2 :])
    reads = {}  # node -> which of q_idx, kv_idx it depends on
    for node in subgraph.graph_module.graph.nodes:
        inputs = node.all_input_nodes
        reads[node] = {node} & {q_idx, kv_idx} or set().union(*(reads[a] for a in inputs))
        if node.target not in _GATHERS or not captured & set(inputs):
            continue
        if set().union(*(reads[a] for a in inputs if a not in captured)) == {q_idx, kv_idx}:
            return True
    return False


def prescale_q(options: dict, query, key, score_mod, block_mask, block_sizes) -> bool:
    """Whether the scores are ``(q * scale rounded to q's dtype) @ k^T``.

    The same answer for every lowering of one call (forward, backward, their
    dense fallbacks), given the forward op's arguments.

    Args:
        options: ``kernel_options``; ``PRESCALE_QK`` there wins over the default.
        query: The query IR node.
        key: The key IR node.
        score_mod: The score_mod's subgraph (the backward's ``fw_graph``).
        block_mask: The BlockMask's tensors.
        block_sizes: The BlockMask's static sizes.
    """
    if forward_decodes(query, key, block_mask, block_sizes, options):
        # The decode template never prescales.
        return False
    explicit = options.get("PRESCALE_QK")
    if explicit is not None:
        return bool(explicit)
    return configs.prescale_by_default(
        query.get_dtype(), query.get_device(), gathers_tile(score_mod, first_position=3)
    )


def scaled(node, factor: float):
    """``node * factor`` multiplied in float32 (float64 for float64) and rounded to its dtype.

    How the templates prescale q, for the dense kernels to do the same
    (float64, which only the dense kernels take, multiplies in float64).
    """
    dtype = node.get_dtype()
    to_dtype = _ind.lowerings[torch.ops.prims.convert_element_type.default]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    product = _ind.lowerings[torch.ops.aten.mul.Tensor](to_dtype(node, wide), factor)
    return to_dtype(product, dtype)
