"""The higher-order ops and every dispatch rule they have.

``flex_inductor_attention`` is the forward and ``flex_inductor_attention_backward``
the backward. Their arguments are plainly typed, so that export can serialise
them: tensors, lists of (optional) tensors, lists of ints, a float, a dict of
kernel options, and the two mods as callables (GraphModules once traced).

Forward signature::

    flex_inductor_attention(
        query, key, value,              # (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
        score_mod, mask_mod,            # callables / GraphModules
        block_mask,                     # list of 8 optional tensors (BlockMask._flatten_tensors)
        block_sizes,                    # [Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE]
        scale, kernel_options,          # float, dict
        score_mod_buffers, mask_mod_buffers,  # tensors the mods close over
    ) -> (out, lse)

Rules, in dispatch order: autograd (an autograd.Function whose backward calls
the backward op with the joint graph of ``score_mod``), functionalization,
proxy tracing (mods become GraphModules on the tracer root), fake (shapes),
and the dense implementation (the blockwise eager reference).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _compat
from ._registration import ensure_lowerings
from ._subgraphs import (
    MUTATION,
    UntraceableModError,
    bind_buffers,
    build_joint_graph,
    index_placeholders,
    mod_label,
    score_placeholders,
    trace_under_proxy_mode,
    untraceable_message,
)

_api = _compat.hop_api()
DispatchKey = _api.DispatchKey

FORWARD_NAME = "flex_inductor_attention"
BACKWARD_NAME = "flex_inductor_attention_backward"


class FlexInductorAttention(_api.HigherOrderOperator):
    """Forward attention with a fused ``score_mod`` and block-sparse ``mask_mod``."""

    def __init__(self) -> None:
        super().__init__(FORWARD_NAME, cacheable=True)

    def __call__(
        self,
        query,
        key,
        value,
        score_mod,
        mask_mod,
        block_mask,
        block_sizes,
        scale,
        kernel_options,
        score_mod_buffers=(),
        mask_mod_buffers=(),
    ):
        return super().__call__(
            query,
            key,
            value,
            score_mod,
            mask_mod,
            list(block_mask),
            list(block_sizes),
            scale,
            kernel_options,
            list(score_mod_buffers),
            list(mask_mod_buffers),
        )


class FlexInductorAttentionBackward(_api.HigherOrderOperator):
    """Gradients of :class:`FlexInductorAttention` from the joint graph of ``score_mod``."""

    def __init__(self) -> None:
        super().__init__(BACKWARD_NAME, cacheable=True)

    def __call__(
        self,
        query,
        key,
        value,
        out,
        lse,
        grad_out,
        grad_lse,
        fw_graph,
        joint_graph,
        mask_mod,
        block_mask,
        block_sizes,
        scale,
        kernel_options,
        score_mod_buffers=(),
        mask_mod_buffers=(),
    ):
        return super().__call__(
            query,
            key,
            value,
            out,
            lse,
            grad_out,
            grad_lse,
            fw_graph,
            joint_graph,
            mask_mod,
            list(block_mask),
            list(block_sizes),
            scale,
            kernel_options,
            list(score_mod_buffers),
            list(mask_mod_buffers),
        )


flex_inductor_attention = FlexInductorAttention()
flex_inductor_attention_backward = FlexInductorAttentionBackward()


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------


def _forward_outputs_like(query: torch.Tensor, value: torch.Tensor):
    """Empty ``(out, lse)`` with the shapes, dtypes and strides the kernels write."""
    B, Hq, L, _ = query.shape
    out = query.new_empty((B, Hq, L, value.shape[-1]))
    lse = query.new_empty((B, Hq, L), dtype=_lse_dtype(query))
    return out, lse


def _lse_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# Dense implementation: the blockwise eager reference
# --------------------------------------------------------------------------


def _block_mask_from_flat(block_mask, block_sizes, mask_mod):
    from .block_mask import BlockMask

    return BlockMask._from_flat(list(block_mask), list(block_sizes), mask_mod)


@flex_inductor_attention.py_impl(DispatchKey.CompositeExplicitAutograd)
def _forward_dense(
    query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    from .reference import reference_forward

    bm = _block_mask_from_flat(block_mask, block_sizes, bind_buffers(mask_mod, mask_mod_buffers))
    out, lse = reference_forward(
        query, key, value, bind_buffers(score_mod, score_mod_buffers), bm, scale
    )
    return out.contiguous(), lse.to(_lse_dtype(query)).contiguous()


@flex_inductor_attention_backward.py_impl(DispatchKey.CompositeExplicitAutograd)
def _backward_dense(
    query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    from .reference_backward import reference_backward

    bm = _block_mask_from_flat(block_mask, block_sizes, bind_buffers(mask_mod, mask_mod_buffers))
    return reference_backward(
        query, key, value, out, lse, grad_out, grad_lse, fw_graph, bm, scale,
        list(score_mod_buffers),
    )


# --------------------------------------------------------------------------
# Fake tensors: shapes only
# --------------------------------------------------------------------------


@flex_inductor_attention.py_impl(_api.FakeTensorMode)
def _forward_fake(
    mode, query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    with mode:
        return _forward_outputs_like(query, value)


@flex_inductor_attention_backward.py_impl(_api.FakeTensorMode)
def _backward_fake(
    mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    with mode:
        return _backward_outputs_like(query, key, value, score_mod_buffers)


def _backward_outputs_like(query, key, value, score_mod_buffers):
    grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    grad_key = torch.empty_like(key, memory_format=torch.contiguous_format)
    grad_value = torch.empty_like(value, memory_format=torch.contiguous_format)
    grad_buffers = [
        torch.empty_like(b) if isinstance(b, torch.Tensor) and b.requires_grad else None
        for b in score_mod_buffers
    ]
    return grad_query, grad_key, grad_value, grad_buffers


# --------------------------------------------------------------------------
# Proxy tracing: the mods become GraphModules registered on the tracer root
# --------------------------------------------------------------------------


def _register_graph(mode, graph, prefix: str):
    name = _compat.unique_graph_name(mode, prefix)
    mode.tracer.root.register_module(name, graph)
    return graph


def _emit(mode, op, args, outputs, name):
    proxy_args = _compat.tree_map(mode.tracer.unwrap_proxy, args)
    out_proxy = mode.tracer.create_proxy("call_function", op, proxy_args, {}, name=name)
    return _api.track_tensor_tree(outputs, out_proxy, constant=None, tracer=mode.tracer)


@flex_inductor_attention.py_impl(_api.ProxyTorchDispatchMode)
def _forward_proxy(
    mode, query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    ensure_lowerings()
    score_graph = trace_under_proxy_mode(
        score_mod, [*score_placeholders(query), *score_mod_buffers], "score_mod"
    )
    _check_no_mutation(score_graph, "score_mod", score_mod)
    score_graph = _register_graph(mode, score_graph, "sdpa_score")
    mask_graph = trace_under_proxy_mode(
        mask_mod, [*index_placeholders(query), *mask_mod_buffers], "mask_mod"
    )
    _check_no_mutation(mask_graph, "mask_mod", mask_mod)
    mask_graph = _register_graph(mode, mask_graph, "sdpa_mask")
    args = (
        query, key, value, score_graph, mask_graph, list(block_mask), list(block_sizes),
        scale, kernel_options, list(score_mod_buffers), list(mask_mod_buffers),
    )
    outputs = flex_inductor_attention(*args)
    return _emit(mode, flex_inductor_attention, args, outputs, FORWARD_NAME)


@flex_inductor_attention_backward.py_impl(_api.ProxyTorchDispatchMode)
def _backward_proxy(
    mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    fw = _register_graph(
        mode,
        trace_under_proxy_mode(
            fw_graph, [*score_placeholders(query), *score_mod_buffers], "score_mod"
        ),
        "fw_graph",
    )
    joint_example = [
        *score_placeholders(query),
        score_placeholders(query)[0],
        *score_mod_buffers,
    ]
    joint = _register_graph(
        mode, trace_under_proxy_mode(joint_graph, joint_example, None), "joint_graph"
    )
    mask = _register_graph(
        mode,
        trace_under_proxy_mode(
            mask_mod, [*index_placeholders(query), *mask_mod_buffers], "mask_mod"
        ),
        "mask_graph",
    )
    args = (
        query, key, value, out, lse, grad_out, grad_lse, fw, joint, mask, list(block_mask),
        list(block_sizes), scale, kernel_options, list(score_mod_buffers),
        list(mask_mod_buffers),
    )
    outputs = flex_inductor_attention_backward(*args)
    return _emit(mode, flex_inductor_attention_backward, args, outputs, BACKWARD_NAME)


# --------------------------------------------------------------------------
# Functionalization
# --------------------------------------------------------------------------


def _check_no_mutation(graph: torch.fx.GraphModule, what: str, mod: Any) -> None:
    """Mods must be pure: a mutation of a captured tensor would be lost.

    :class:`ModTracingMode` already rejects in-place calls it sees; this
    catches what only shows at the aten level.
    """
    for node in graph.graph.nodes:
        if node.op == "call_function" and _compat.is_mutable_overload(node.target):
            raise UntraceableModError(
                untraceable_message(what, mod_label(mod), MUTATION, op=str(node.target))
            )


@flex_inductor_attention.py_functionalize_impl
def _forward_functionalize(
    ctx, query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    unwrap = ctx.unwrap_tensors
    q, k, v = unwrap(query), unwrap(key), unwrap(value)
    bm = unwrap(list(block_mask))
    smb, mmb = unwrap(list(score_mod_buffers)), unwrap(list(mask_mod_buffers))
    with ctx.redispatch_to_next():
        outputs = flex_inductor_attention(
            q, k, v, ctx.functionalize(score_mod), ctx.functionalize(mask_mod), bm,
            block_sizes, scale, kernel_options, smb, mmb,
        )
    return ctx.wrap_tensors(outputs)


@flex_inductor_attention_backward.py_functionalize_impl
def _backward_functionalize(
    ctx, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    unwrap = ctx.unwrap_tensors
    tensors = [unwrap(t) for t in (query, key, value, out, lse, grad_out, grad_lse)]
    bm = unwrap(list(block_mask))
    smb, mmb = unwrap(list(score_mod_buffers)), unwrap(list(mask_mod_buffers))
    with ctx.redispatch_to_next():
        outputs = flex_inductor_attention_backward(
            *tensors, ctx.functionalize(fw_graph), ctx.functionalize(joint_graph),
            ctx.functionalize(mask_mod), bm, block_sizes, scale, kernel_options, smb, mmb,
        )
    return ctx.wrap_tensors(outputs)


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------


class _FlexInductorAutograd(torch.autograd.Function):
    """Saves ``out`` and ``lse``; the backward calls the backward op.

    The joint graph of ``score_mod`` is traced in the backward, where it is
    used: the forward also runs when nothing will be differentiated (Dynamo's
    fake run of the op, AOTAutograd's metadata pass), and tracing it there
    would be thrown away.
    """

    @staticmethod
    def forward(
        ctx, query, key, value, fw_graph, mask_mod, block_mask, block_sizes,
        scale, kernel_options, mask_mod_buffers, *score_mod_buffers,
    ):
        ctx.set_materialize_grads(False)
        with _api.below_autograd():
            out, lse = flex_inductor_attention(
                query, key, value, fw_graph, mask_mod, block_mask, block_sizes, scale,
                kernel_options, score_mod_buffers, mask_mod_buffers,
            )
        ctx._graphs = (fw_graph, mask_mod)
        # Which captured tensors the joint graph differentiates, as at the call.
        ctx._buffers_need_grad = [
            isinstance(b, torch.Tensor) and b.requires_grad for b in score_mod_buffers
        ]
        ctx._static = (list(block_sizes), scale, kernel_options)
        ctx._block_mask_present = [t is not None for t in block_mask]
        ctx._n_score_buffers = len(score_mod_buffers)
        ctx._n_mask_buffers = len(mask_mod_buffers)
        ctx.save_for_backward(
            query, key, value, out, lse,
            *[t for t in block_mask if t is not None],
            *mask_mod_buffers, *score_mod_buffers,
        )
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        saved = list(ctx.saved_tensors)
        query, key, value, out, lse = saved[:5]
        rest = saved[5:]
        block_mask = []
        for present in ctx._block_mask_present:
            block_mask.append(rest.pop(0) if present else None)
        mask_mod_buffers = rest[: ctx._n_mask_buffers]
        score_mod_buffers = rest[ctx._n_mask_buffers :]
        fw_graph, mask_mod = ctx._graphs
        block_sizes, scale, kernel_options = ctx._static
        joint_graph = build_joint_graph(fw_graph, query, score_mod_buffers, ctx._buffers_need_grad)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        dq, dk, dv, grad_buffers = flex_inductor_attention_backward(
            query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
            block_mask, block_sizes, scale, kernel_options, score_mod_buffers,
            mask_mod_buffers,
        )
        # One gradient per forward input: query, key, value, then nothing for
        # the graphs, block mask, sizes, scale, options and mask buffers.
        return (dq, dk, dv, None, None, None, None, None, None, None, *grad_buffers)


@flex_inductor_attention.py_autograd_impl
def _forward_autograd(
    query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    differentiable = [query, key, value, *score_mod_buffers]
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in differentiable
    )
    if not needs_grad:
        with _api.below_autograd():
            return flex_inductor_attention(
                query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
                kernel_options, score_mod_buffers, mask_mod_buffers,
            )
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in mask_mod_buffers):
        raise ValueError(
            "mask_mod: tensors captured by mask_mod must not require grad (a boolean mask has "
            "no gradient); detach them."
        )
    return _FlexInductorAutograd.apply(
        query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
        kernel_options, mask_mod_buffers, *score_mod_buffers,
    )


def _not_differentiable_twice(*args: Any, **kwargs: Any):
    raise RuntimeError(
        "flex_inductor_attention_backward is not differentiable (no double backward)"
    )


flex_inductor_attention_backward.py_autograd_impl(_not_differentiable_twice)


def forward_op_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod,
    block_mask,
    scale: float,
    kernel_options: dict,
) -> tuple:
    """Positional arguments of the forward op for a call with a ``BlockMask``."""
    return (
        query, key, value, score_mod, block_mask.mask_mod, block_mask._flatten_tensors(),
        block_mask._flatten_sizes(), scale, kernel_options, [], [],
    )
