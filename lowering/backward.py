"""Inductor lowering of ``flex_inductor_attention_backward`` to two templates.

Reads top to bottom: fall back to the blockwise dense backward where the
templates cannot run (CPU without the interpreter, float64, deterministic
mode, captured-tensor gradients that are not plain scatters); compute
``delta = rowsum(dO * O) - dlse`` with Inductor's own reduction; lower the
mods and the joint graph; then one dK/dV template (which also scatters the
captured-tensor gradients) and one dQ template, each autotuned.
"""

from __future__ import annotations

import logging

import torch

from flex_inductor import _compat

from . import backward_configs as configs
from .common import (
    block_mask_input_gen_fns,
    static_int,
    device_can_use_templates,
    fixed_inputs,
    float32_precision,
    lower_mask_mod,
    lower_score_mod,
    rounded_head_dim,
)
from .fallback import dense_backward_fallback
from .scatter import UnsupportedScatter, collect_gradient_buffers
from .subgraph import JOINT_ARGS, first_output_only, lower_mod
from .templates import backward_dkdv_template, backward_dq_template

log = logging.getLogger("flex_inductor")
_ind = _compat.inductor_api()


def lower_backward(
    query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    """The lowering registered for the backward op; returns ``(dq, dk, dv, grads)``."""
    args = (
        query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
        block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
    )
    reason = _why_dense(query, kernel_options)
    if reason is None:
        try:
            return _lower_with_templates(*args)
        except UnsupportedScatter as error:
            reason = str(error)
    log.info("flex_inductor_bwd: blockwise dense backward (%s)", reason)
    return dense_backward_fallback(*args)


def _why_dense(query, kernel_options) -> str | None:
    if not device_can_use_templates(query):
        return f"no Triton template for {query.get_device()} {query.get_dtype()}"
    if kernel_options.get("DETERMINISTIC") or torch.are_deterministic_algorithms_enabled():
        # Atomic adds of captured-tensor gradients are order-dependent; the
        # dense backward reduces them deterministically.
        return "deterministic algorithms requested"
    return None


def _lower_with_templates(
    query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    ir, V, lowerings = _ind.ir, _ind.V, _ind.lowerings
    aten = torch.ops.aten
    device = query.get_device()
    dtype = query.get_dtype()
    B, Hq, L, E = query.get_size()
    _, Hkv, S, _ = key.get_size()
    Ev = value.get_size()[-1]
    _, _, q_block, kv_block = block_sizes
    has_full = block_mask[2] is not None

    # delta = rowsum(dO * O) - dlse, by Inductor's own fused reduction. The
    # dlse term folds the gradient of the lse output into the softmax's.
    product = lowerings[aten.mul.Tensor](
        lowerings[torch.ops.prims.convert_element_type.default](grad_out, torch.float32),
        lowerings[torch.ops.prims.convert_element_type.default](out, torch.float32),
    )
    delta = lowerings[aten.sub.Tensor](
        lowerings[aten.sum.dim_IntList](product, [-1]),
        lowerings[torch.ops.prims.convert_element_type.default](grad_lse, torch.float32),
    )
    query, key, value, lse, delta, grad_out = fixed_inputs(query, key, value, lse, delta, grad_out)
    score_buffers = fixed_inputs(*score_mod_buffers)
    mask_buffers = fixed_inputs(*mask_mod_buffers)

    score_sub = lower_score_mod(fw_graph, score_buffers, device)
    mask_sub = lower_mask_mod(mask_mod, mask_buffers, device)
    names = [(n, torch.float32 if n in ("score", "grad_score_mod") else torch.int32) for n in JOINT_ARGS]
    with collect_gradient_buffers() as grad_buffers:
        joint_outputs = lower_mod(
            joint_graph.graph_module, names, score_buffers, device, allow_scatter=True
        )
    grad_score_sub, buffer_grads = joint_outputs[0], joint_outputs[1:]
    scatters = [g for g in buffer_grads if g is not None]
    if any(not isinstance(g.data, ir.Scatter) for g in scatters):
        raise UnsupportedScatter("a captured-tensor gradient that is not a plain scatter")

    options = dict(kernel_options)
    constexprs = dict(
        QK_HEAD_DIM=static_int(E),
        QK_HEAD_DIM_ROUNDED=rounded_head_dim(E),
        V_HEAD_DIM=static_int(Ev),
        V_HEAD_DIM_ROUNDED=rounded_head_dim(Ev),
        SPARSE_Q_BLOCK_SIZE=q_block,
        SPARSE_KV_BLOCK_SIZE=kv_block,
        GQA_SHARED_HEADS=V.graph.sizevars.guard_int(Hq) // V.graph.sizevars.guard_int(Hkv),
        SM_SCALE=float(scale),
        HAS_FULL_BLOCKS=has_full,
        FLOAT32_PRECISION=float32_precision(),
    )
    config = configs.backward_config(int(V.graph.sizevars.guard_int(E)), dtype, device, options)
    if any(k in options for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")) or any(
        k.startswith("bwd_BLOCK") for k in options
    ):
        configs.check_backward_fits(config, q_block, kv_block)
    else:
        config = configs.shrink_to_fit(config, q_block, kv_block)

    # dK and dV (and the captured-tensor gradients).
    grad_value = _ind.empty_strided([B, Hkv, S, Ev], None, dtype=value.get_dtype(), device=device)
    grad_value.realize()
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices = block_mask[4:]
    q_sparse = fixed_inputs(
        q_num_blocks, q_indices,
        full_q_num_blocks if has_full else q_num_blocks,
        full_q_indices if has_full else q_indices,
    )
    dk_layout = ir.FixedLayout(
        device, key.get_dtype(), [B, Hkv, S, E], ir.FlexibleLayout.contiguous_strides([B, Hkv, S, E])
    )
    dkdv_inputs = [query, key, value, lse, delta, grad_out, grad_value, *q_sparse]
    choices: list = []
    _compat.tag_kernel_name("flex_inductor_bwd")
    error = backward_dkdv_template().maybe_append_choice(
        choices,
        input_nodes=dkdv_inputs,
        layout=dk_layout,
        subgraphs=[score_sub, mask_sub, grad_score_sub, scatters],
        mutated_inputs=[grad_value, *grad_buffers],
        call_sizes=key.get_size(),
        BLOCK_M1=config.BLOCK_M1,
        BLOCK_N1=config.BLOCK_N1,
        HAS_SCATTER=bool(scatters),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **constexprs,
    )
    if error is not None:
        raise error
    grad_key = _compat.select_algorithm(
        "flex_inductor_bwd_dkdv",
        choices,
        [*dkdv_inputs, *grad_buffers, *score_buffers, *mask_buffers],
        dk_layout,
        input_gen_fns=block_mask_input_gen_fns(first_index=7, kv_len=L, kv_block=q_block),
    )

    # dQ.
    kv_sparse = fixed_inputs(
        block_mask[0], block_mask[1],
        block_mask[2] if has_full else block_mask[0],
        block_mask[3] if has_full else block_mask[1],
    )
    dq_layout = ir.FixedLayout(
        device, dtype, [B, Hq, L, E], ir.FlexibleLayout.contiguous_strides([B, Hq, L, E])
    )
    dq_inputs = [query, key, value, lse, delta, grad_out, *kv_sparse]
    choices = []
    # The dQ kernel reads the mods again: lower fresh IR for its own subgraphs,
    # with only the score gradient of the joint graph (the dK/dV kernel
    # already scatters the captured-tensor gradients).
    score_sub = lower_score_mod(fw_graph, score_buffers, device)
    mask_sub = lower_mask_mod(mask_mod, mask_buffers, device)
    joint_again = lower_mod(
        first_output_only(joint_graph.graph_module), names, score_buffers, device
    )
    error = backward_dq_template().maybe_append_choice(
        choices,
        input_nodes=dq_inputs,
        layout=dq_layout,
        subgraphs=[score_sub, mask_sub, joint_again],
        mutated_inputs=None,
        call_sizes=query.get_size(),
        BLOCK_M2=config.BLOCK_M2,
        BLOCK_N2=config.BLOCK_N2,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **constexprs,
    )
    if error is not None:
        raise error
    grad_query = _compat.select_algorithm(
        "flex_inductor_bwd_dq",
        choices,
        [*dq_inputs, *score_buffers, *mask_buffers],
        dq_layout,
        input_gen_fns=block_mask_input_gen_fns(first_index=6, kv_len=S, kv_block=kv_block),
    )

    # Each scatter writes into the zero-filled buffer of the same name.
    by_name = {g.get_name(): g for g in grad_buffers}
    grads = [
        None
        if grad is None
        else lowerings[torch.ops.prims.convert_element_type.default](
            by_name[grad.get_name()], buffer.get_dtype()
        )
        for buffer, grad in zip(score_buffers, buffer_grads)
    ]
    return grad_query, grad_key, grad_value, grads
