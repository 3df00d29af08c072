"""Inductor lowering of ``flex_inductor_attention_backward`` to two templates.

Reads top to bottom: fall back to the blockwise dense backward where the
templates cannot run (CPU without the interpreter, float64, deterministic
mode with captured-tensor gradients, captured-tensor gradients that are not
plain scatters, mods that cannot be inlined, BlockMask blocks no tile
divides); pick the config; lower the mods and the joint graph; compute
``delta = rowsum(dO * O) - dlse`` with Inductor's own reduction; then one
dK/dV template (which also scatters the captured-tensor gradients) and one
dQ template.

The templates are deterministic (dk and dv are summed over GQA groups in
registers, in a fixed order) except for the scatter's atomic adds, so
deterministic mode keeps them unless a captured tensor needs a gradient.
"""

from __future__ import annotations

import logging

import torch

from flex_inductor import _compat

from . import backward_configs as configs
from .common import (
    block_mask_input_gen_fns,
    chosen_config,
    declare_subgraph_symbols,
    device_can_use_templates,
    exp2_factor,
    fixed_inputs,
    fixed_mod_buffers,
    float32_precision,
    has_partial_blocks,
    is_identity_score_mod,
    is_symbolic_scalar,
    lower_mask_mod,
    lower_score_mod,
    rounded_head_dim,
    sizes_are_static_multiple,
    static_float,
    static_int,
    use_tma,
)
from .configs import use_tma_by_default
from .fallback import dense_backward_fallback
from .prescale import prescale_q
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
    reason = _why_dense(query, kernel_options, joint_graph)
    if reason is None:
        try:
            return _lower_with_templates(*args)
        except (UnsupportedScatter, UnsupportedConfig) as error:
            reason = str(error)
        except _compat.subgraph_lowering_error() as error:
            # A mod that is not pointwise (``table[q_idx].sum()`` reduces)
            # cannot be inlined; the forward fell back for the same reason.
            reason = f"a mod cannot be inlined ({str(error).splitlines()[0]})"
    log.info("flex_inductor_bwd: blockwise dense backward (%s)", reason)
    return dense_backward_fallback(*args)


class UnsupportedConfig(Exception):
    """No backward tiling fits this BlockMask (use the dense backward)."""


def _why_dense(query, kernel_options, joint_graph) -> str | None:
    if not device_can_use_templates(query):
        return f"no Triton template for {query.get_device()} {query.get_dtype()}"
    deterministic = (
        kernel_options.get("DETERMINISTIC") or torch.are_deterministic_algorithms_enabled()
    )
    if deterministic and any(g is not None for g in _buffer_gradients(joint_graph)):
        # The templates are deterministic except for the atomic adds that
        # scatter captured-tensor gradients, whose order varies from run to
        # run; the dense backward reduces those in a fixed order.
        return "deterministic algorithms requested with captured-tensor gradients"
    return None


def _buffer_gradients(joint_graph) -> list:
    """The joint graph's outputs after the score gradient: ``None`` where no gradient flows."""
    output = next(n for n in joint_graph.graph_module.graph.nodes if n.op == "output")
    values = output.args[0]
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return values[1:]


def _lower_with_templates(
    query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, mask_mod,
    block_mask, block_sizes, scale, kernel_options, score_mod_buffers, mask_mod_buffers,
):
    ir, lowerings = _ind.ir, _ind.lowerings
    aten = torch.ops.aten
    device = query.get_device()
    dtype = query.get_dtype()
    B, Hq, L, E = query.get_size()
    _, Hkv, S, _ = key.get_size()
    Ev = value.get_size()[-1]
    # Sparse block sizes are loop strides and tile divisors: always static.
    q_block, kv_block = static_int(block_sizes[2]), static_int(block_sizes[3])
    has_full = block_mask[2] is not None
    options = dict(kernel_options)
    config = configs.backward_config(static_int(E), dtype, device, options, q_block, kv_block)
    if not configs.fits_block_mask(config, q_block, kv_block):
        # Block sizes below the smallest tile (tl.dot needs 16): the kernels
        # step whole sparse blocks, so they cannot walk this mask.
        raise UnsupportedConfig(
            f"BlockMask block sizes ({q_block}, {kv_block}) are not multiples of the "
            f"smallest backward tile ({config})"
        )

    # The mods first: a mod that cannot be inlined raises here, before delta
    # and the gradient buffers exist, and the dense backward takes over.
    score_buffers = fixed_mod_buffers(score_mod_buffers, device)
    mask_buffers = fixed_mod_buffers(mask_mod_buffers, device)
    score_sub = lower_score_mod(fw_graph, score_buffers, device, (L, S))
    mask_sub = lower_mask_mod(mask_mod, mask_buffers, device)
    names = [
        (n, torch.float32 if n in ("score", "grad_score_mod") else torch.int32)
        for n in JOINT_ARGS
    ]
    with collect_gradient_buffers() as grad_buffers:
        joint_outputs = lower_mod(
            joint_graph.graph_module, names, score_buffers, device, allow_scatter=True
        )
    grad_score_sub, buffer_grads = joint_outputs[0], joint_outputs[1:]
    scatters = [g for g in buffer_grads if g is not None]
    if any(not isinstance(g.data, ir.Scatter) for g in scatters):
        raise UnsupportedScatter("a captured-tensor gradient that is not a plain scatter")

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
    # Symbolic scalars a mod reads are kernel arguments, not input buffers.
    buffers = [b for b in (*score_buffers, *mask_buffers) if not is_symbolic_scalar(b)]

    sm_scale = static_float(scale)
    # As in the forward: no score_mod folds the (positive) scale into exp2.
    identity = is_identity_score_mod(fw_graph) and sm_scale > 0
    # PRESCALE_QK: recompute the scores from q scaled and rounded as the
    # forward did, or they would not match its lse.
    prescale = prescale_q(options, query, key, fw_graph, block_mask, block_sizes)
    # Tiles walk whole sparse blocks: bounds checks can go when both lengths
    # fill their last sparse block.
    divisible = sizes_are_static_multiple(L, q_block) and sizes_are_static_multiple(S, kv_block)
    constexprs = dict(
        QK_HEAD_DIM=static_int(E),
        QK_HEAD_DIM_ROUNDED=rounded_head_dim(E),
        V_HEAD_DIM=static_int(Ev),
        V_HEAD_DIM_ROUNDED=rounded_head_dim(Ev),
        SPARSE_Q_BLOCK_SIZE=q_block,
        SPARSE_KV_BLOCK_SIZE=kv_block,
        GQA_SHARED_HEADS=static_int(Hq) // static_int(Hkv),
        SM_SCALE=sm_scale,
        SCORE_MOD_IS_IDENTITY=identity,
        EXP2_FACTOR=exp2_factor(sm_scale, fold_scale=identity and not prescale),
        PRESCALE_QK=prescale,
        IS_DIVISIBLE=divisible,
        HAS_FULL_BLOCKS=has_full,
        HAS_PARTIAL_BLOCKS=has_partial_blocks(options, has_full),
        FLOAT32_PRECISION=float32_precision(),
        # dK/dV loops over Q and dO tiles, dQ over K and V tiles.
        USE_TMA=use_tma(
            options, use_tma_by_default(static_int(E), device), device, query, key, value, grad_out
        ),
        LONGEST_FIRST=bool(options.get("LONGEST_FIRST", configs.LONGEST_FIRST)),
    )

    # dK and dV (and the captured-tensor gradients).
    grad_value = _ind.empty_strided([B, Hkv, S, Ev], None, dtype=value.get_dtype(), device=device)
    grad_value.realize()
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices = block_mask[4:]
    q_sparse = fixed_inputs(
        q_num_blocks, q_indices,
        full_q_num_blocks if has_full else q_num_blocks,
        full_q_indices if has_full else q_indices,
    )
    dk_size = [B, Hkv, S, E]
    dk_layout = ir.FixedLayout(
        device, key.get_dtype(), dk_size, ir.FlexibleLayout.contiguous_strides(dk_size)
    )
    dkdv_inputs = [query, key, value, lse, delta, grad_out, grad_value, *q_sparse]
    choices: list = []
    _compat.tag_kernel_name("flex_inductor_bwd")
    candidates = configs.autotune_candidates(config, options, device, q_block, kv_block)
    dkdv_configs: list = []
    for candidate in candidates:
        error = backward_dkdv_template().maybe_append_choice(
            choices,
            input_nodes=dkdv_inputs,
            layout=dk_layout,
            subgraphs=[score_sub, mask_sub, grad_score_sub, scatters],
            mutated_inputs=[grad_value, *grad_buffers],
            call_sizes=key.get_size(),
            BLOCK_M1=candidate.BLOCK_M1,
            BLOCK_N1=candidate.BLOCK_N1,
            HAS_SCATTER=bool(scatters),
            num_warps=candidate.num_warps,
            num_stages=candidate.num_stages,
            **constexprs,
        )
        if error is not None and candidate is config:
            raise error
        if error is None:
            dkdv_configs.append(candidate)
    if len(candidates) > 1:
        log.info("flex_inductor_bwd: autotuning %d dK/dV configs", len(choices))
    grad_key, choice = _compat.select_algorithm(
        "flex_inductor_bwd_dkdv",
        choices,
        [*dkdv_inputs, *grad_buffers, *buffers],
        dk_layout,
        input_gen_fns=block_mask_input_gen_fns(dkdv_inputs, 7, kv_len=L, kv_block=q_block),
        return_choice=True,
    )
    _log_choice("dK/dV", choice, choices, dkdv_configs, ("BLOCK_M1", "BLOCK_N1"))

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
    score_sub = lower_score_mod(fw_graph, score_buffers, device, (L, S))
    mask_sub = lower_mask_mod(mask_mod, mask_buffers, device)
    joint_again = lower_mod(
        first_output_only(joint_graph.graph_module), names, score_buffers, device
    )
    dq_configs: list = []
    for candidate in candidates:
        error = backward_dq_template().maybe_append_choice(
            choices,
            input_nodes=dq_inputs,
            layout=dq_layout,
            subgraphs=[score_sub, mask_sub, joint_again],
            mutated_inputs=None,
            call_sizes=query.get_size(),
            BLOCK_M2=candidate.BLOCK_M2,
            BLOCK_N2=candidate.BLOCK_N2,
            num_warps=candidate.num_warps,
            num_stages=candidate.num_stages,
            **constexprs,
        )
        if error is not None and candidate is config:
            raise error
        if error is None:
            dq_configs.append(candidate)
    if len(candidates) > 1:
        log.info("flex_inductor_bwd: autotuning %d dQ configs", len(choices))
    grad_query, choice = _compat.select_algorithm(
        "flex_inductor_bwd_dq",
        choices,
        [*dq_inputs, *buffers],
        dq_layout,
        input_gen_fns=block_mask_input_gen_fns(dq_inputs, 6, kv_len=S, kv_block=kv_block),
        return_choice=True,
    )
    _log_choice("dQ", choice, choices, dq_configs, ("BLOCK_M2", "BLOCK_N2"))

    # Symbols the mods read (sizes of captured tensors) must be defined
    # before the kernels run: the scheduler learns of them here.
    declare_subgraph_symbols(grad_key, [*score_buffers, *mask_buffers], [score_sub, mask_sub])
    declare_subgraph_symbols(grad_query, [*score_buffers, *mask_buffers], [score_sub, mask_sub])

    # Each scatter writes into the zero-filled float32 buffer of the same
    # name; a float32 captured tensor takes it as is (a conversion would copy).
    by_name = {g.get_name(): g for g in grad_buffers}
    grads = []
    for buffer, grad in zip(score_buffers, buffer_grads, strict=True):
        if grad is None:
            grads.append(None)
            continue
        summed = by_name[grad.get_name()]
        if buffer.get_dtype() != torch.float32:
            summed = lowerings[torch.ops.prims.convert_element_type.default](
                summed, buffer.get_dtype()
            )
        grads.append(summed)
    return grad_query, grad_key, grad_value, grads


def _log_choice(kernel: str, choice, choices, configs_of_choices, tiles) -> None:
    """Log the config the autotuner picked (the only one without autotuning)."""
    config = chosen_config(choice, choices, configs_of_choices)
    if config is not None:
        fields = (*tiles, "num_warps", "num_stages")
        described = " ".join(f"{f}={getattr(config, f)}" for f in fields)
        log.info("flex_inductor_bwd: %s kernel uses %s", kernel, described)
