"""Inductor lowering of ``flex_inductor_attention`` to the forward template.

Reads top to bottom: check the inputs can use the Triton template (else fall
back to the blockwise dense kernel), lower the two mods to inlinable IR,
allocate ``out`` and ``lse``, append one template choice per config, and let
Inductor's autotuner pick.
"""

from __future__ import annotations

import logging

import torch

from flex_inductor import _compat

from . import configs
from .common import (
    block_mask_input_gen_fns,
    device_can_use_templates,
    float32_precision,
    fixed_inputs,
    interpret_mode,
    lower_mask_mod,
    lower_score_mod,
    rounded_head_dim,
    sizes_are_static_multiple,
)
from .templates import forward_template

log = logging.getLogger("flex_inductor")
_ind = _compat.inductor_api()


def lower_forward(
    query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    """The lowering registered for the forward op; returns ``(out, lse)``."""
    from .fallback import dense_forward_fallback

    if not device_can_use_templates(query):
        return dense_forward_fallback(
            query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
            kernel_options, score_mod_buffers, mask_mod_buffers,
        )
    ir, V = _ind.ir, _ind.V
    _compat.tag_kernel_name("flex_inductor_fwd")
    device = query.get_device()
    dtype = query.get_dtype()
    B, Hq, L, E = query.get_size()
    _, Hkv, S, _ = key.get_size()
    Ev = value.get_size()[-1]
    _, _, q_block, kv_block = block_sizes
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = block_mask[:4]
    has_full = full_kv_num_blocks is not None

    query, key, value = fixed_inputs(query, key, value)
    sparse = fixed_inputs(
        kv_num_blocks, kv_indices,
        full_kv_num_blocks if has_full else kv_num_blocks,
        full_kv_indices if has_full else kv_indices,
    )
    score_buffers = fixed_inputs(*score_mod_buffers)
    mask_buffers = fixed_inputs(*mask_mod_buffers)
    score_sub = lower_score_mod(score_mod, score_buffers, device)
    mask_sub = lower_mask_mod(mask_mod, mask_buffers, device)

    out_layout = ir.FixedLayout(
        device, dtype, [B, Hq, L, Ev], ir.FlexibleLayout.contiguous_strides([B, Hq, L, Ev])
    )
    lse = _ind.empty_strided([B, Hq, L], None, dtype=torch.float32, device=device)
    lse.realize()
    options = dict(kernel_options)
    constexprs = dict(
        QK_HEAD_DIM=E,
        QK_HEAD_DIM_ROUNDED=rounded_head_dim(E),
        V_HEAD_DIM=Ev,
        V_HEAD_DIM_ROUNDED=rounded_head_dim(Ev),
        SPARSE_Q_BLOCK_SIZE=q_block,
        SPARSE_KV_BLOCK_SIZE=kv_block,
        GQA_SHARED_HEADS=V.graph.sizevars.guard_int(Hq) // V.graph.sizevars.guard_int(Hkv),
        SM_SCALE=float(scale),
        HAS_FULL_BLOCKS=has_full,
        PRESCALE_QK=bool(options.get("PRESCALE_QK", False)),
        ROWS_GUARANTEED_SAFE=bool(options.get("ROWS_GUARANTEED_SAFE", False)),
        OUTPUT_LOGSUMEXP=bool(options.get("OUTPUT_LOGSUMEXP", True)),
        FLOAT32_PRECISION=float32_precision(),
    )
    input_nodes = [query, key, value, lse, *sparse]
    choices: list = []
    for config in _candidate_configs(E, dtype, device, options, q_block, kv_block):
        # Bounds checks can go when every tile is whole.
        divisible = sizes_are_static_multiple(L, config.BLOCK_M) and sizes_are_static_multiple(
            S, config.BLOCK_N
        )
        error = forward_template().maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=out_layout,
            subgraphs=[score_sub, mask_sub],
            mutated_inputs=[lse],
            call_sizes=query.get_size(),
            BLOCK_M=config.BLOCK_M,
            BLOCK_N=config.BLOCK_N,
            IS_DIVISIBLE=divisible,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            **constexprs,
        )
        if error is not None:
            log.debug("flex_inductor_fwd config %s rejected: %s", config, error)
    if not choices:
        raise RuntimeError("flex_inductor: no forward kernel config could be generated")
    log.info(
        "flex_inductor_fwd: %d candidate config(s) for B=%s Hq=%s L=%s S=%s E=%s Ev=%s %s",
        len(choices), B, Hq, L, S, E, Ev, dtype,
    )
    out = _compat.select_algorithm(
        "flex_inductor_fwd",
        choices,
        [*input_nodes, *score_buffers, *mask_buffers],
        out_layout,
        input_gen_fns=block_mask_input_gen_fns(first_index=4, kv_len=S, kv_block=kv_block),
    )
    return out, lse


def _candidate_configs(head_dim, dtype, device, options, q_block, kv_block):
    """The default config, or every autotuning candidate under max-autotune."""
    head_dim = _compat_int(head_dim)
    default = configs.default_forward_config(head_dim, dtype, device)
    if configs.has_config_override(options, "fwd_"):
        candidates = [configs.apply_overrides(default, options, "fwd_")]
        if not configs.fits_block_mask(candidates[0], q_block, kv_block):
            raise ValueError(
                f"kernel_options: BLOCK_M={candidates[0].BLOCK_M} and BLOCK_N="
                f"{candidates[0].BLOCK_N} must divide the BlockMask's block sizes "
                f"({q_block}, {kv_block})"
            )
        return candidates
    if _compat.inductor_config().max_autotune and device.type == "cuda" and not interpret_mode():
        candidates = [c for c in configs.FORWARD_AUTOTUNE if configs.fits_block_mask(c, q_block, kv_block)]
        if candidates:
            return candidates
    return [configs.shrink_to_fit(default, q_block, kv_block)]


def _compat_int(x) -> int:
    return int(_ind.V.graph.sizevars.guard_int(x)) if not isinstance(x, int) else x

