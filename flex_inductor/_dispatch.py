"""Where a ``flex_attention`` call goes: the op in place, or a compiled call.

Under ``torch.compile`` or export the op is called in place, and Dynamo (or
the export tracer) captures it. Called eagerly, ``flex_attention`` compiles
itself once per signature and runs the fused kernel, so that users who forget
``torch.compile`` are not silently slow.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import _compat
from ._subgraphs import UntraceableModError, check_traceable, trace_and_lift
from ._version import CODE_VERSION, CODE_VERSION_KEY
from .combinators import noop_mask
from .op import flex_inductor_attention
from .reference import reference_forward


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def op_call(query, key, value, score_mod, block_mask, scale, kernel_options):
    """Call the forward op with the BlockMask flattened; returns ``(out, lse)``."""
    return flex_inductor_attention(
        query,
        key,
        value,
        score_mod,
        block_mask.mask_mod,
        block_mask._flatten_tensors(),
        block_mask._flatten_sizes(),
        scale,
        kernel_options,
        [],
        [],
    )


def _lifted_op_call(query, key, value, score_mod, block_mask, scale, kernel_options):
    """The op under ``make_fx`` or non-strict export, where Dynamo does not lift.

    Each mod is traced on its own and the tensors it closes over become
    explicit op inputs, as Dynamo's variable would make them: parameters
    stay parameters of the traced program (with their gradients), instead of
    constants baked into the mod's graph.
    """
    score_graph, score_buffers = trace_and_lift(score_mod, "score_mod", query)
    mask_graph, mask_buffers = trace_and_lift(block_mask.mask_mod, "mask_mod", query)
    return flex_inductor_attention(
        query,
        key,
        value,
        score_graph,
        mask_graph,
        block_mask._flatten_tensors(),
        block_mask._flatten_sizes(),
        scale,
        kernel_options,
        score_buffers,
        mask_buffers,
    )


def attention(query, key, value, score_mod, block_mask, scale, kernel_options):
    """Normalise the defaults, then run the op in place or compiled."""
    from .block_mask import NO_PARTIAL_BLOCKS_KEY, _full_block_mask, _full_block_mask_flat

    if score_mod is None:
        score_mod = _identity_score
    if _compat.is_dynamo_compiling():
        options = dict(kernel_options or {})
        options[CODE_VERSION_KEY] = CODE_VERSION
        # Our Dynamo variable speculates the mods and lifts what they capture.
        if block_mask is None:
            # The all-full mask goes to the op in its flat form: Dynamo then
            # traces its tensors, not the construction of a BlockMask.
            tensors, sizes = _full_block_mask_flat(query.shape[-2], key.shape[-2], query.device)
            options[NO_PARTIAL_BLOCKS_KEY] = True
            return flex_inductor_attention(
                query, key, value, score_mod, noop_mask, tensors, sizes, scale, options, [], []
            )
        return op_call(query, key, value, score_mod, block_mask, scale, options)
    options = dict(kernel_options or {})
    options[CODE_VERSION_KEY] = CODE_VERSION
    if block_mask is None:
        block_mask = _full_block_mask(query.shape[-2], key.shape[-2], query.device)
        options[NO_PARTIAL_BLOCKS_KEY] = True
    if _compat.is_tracing():
        return _lifted_op_call(query, key, value, score_mod, block_mask, scale, options)
    if not templates_available(query.device, query.dtype):
        # No fused kernel here: the blockwise reference is the implementation,
        # and autograd flows through the tensors the mods close over.
        check_traceable(score_mod, "score_mod", query)
        check_traceable(block_mask.mask_mod, "mask_mod", query)
        return reference_forward(query, key, value, score_mod, block_mask, scale)
    try:
        with _compat.dynamo_recompile_limit(_RECOMPILE_LIMIT):
            return _compiled_op_call()(query, key, value, score_mod, block_mask, scale, options)
    except _compat.dynamo_unsupported_error() as error:
        message = getattr(error, "flex_inductor_message", None)
        if message is None:
            raise
        # Called eagerly, Dynamo's framing (a graph break in our op_call)
        # would only confuse: say what is wrong with the user's mod.
        raise UntraceableModError(message) from None
    except _compat.recompile_limit_error() as error:
        warnings.warn(
            f"flex_inductor: more than {_RECOMPILE_LIMIT} distinct flex_attention signatures "
            f"were compiled in this process; running the eager reference instead ({error})",
            stacklevel=3,
        )
        return reference_forward(query, key, value, score_mod, block_mask, scale)


# Each distinct mod, shape class or dtype is one compiled entry.
_RECOMPILE_LIMIT = 256


def templates_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether our Triton templates can run for this device and dtype."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return device.type == "cuda" or (device.type == "cpu" and _compat.interpreter_active())


@functools.cache
def _compiled_op_call():
    # dynamic=False: each new shape compiles kernels specialised to it, rather
    # than one symbolic kernel after the first shape change.
    return torch.compile(op_call, backend="inductor", fullgraph=True, dynamic=False)
