"""Inductor lowering of ``flex_inductor_attention`` to the forward template.

Reads top to bottom: check the inputs can use the Triton template (else fall
back to the blockwise dense kernel; short queries go to the decode
template), pick the candidate configs, lower the two mods to inlinable IR,
allocate ``out`` and ``lse``, append one template choice per config, let
Inductor's autotuner pick, and log the config that won.

Two cases still run the blockwise dense kernel, correctly and
memory-bounded, with a warning: a BlockMask whose blocks no tile divides
(not multiples of 16), and a mod that is not pointwise (it cannot be
inlined).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from flex_inductor import _compat

from . import configs
from .common import (
    block_mask_input_gen_fns,
    chosen_config,
    declare_subgraph_symbols,
    describe_config,
    device_can_use_templates,
    exp2_factor,
    fixed_inputs,
    fixed_mod_buffers,
    float32_precision,
    has_partial_blocks,
    interpret_mode,
    is_identity_score_mod,
    is_symbolic_scalar,
    lower_mods_or_warn,
    output_is_used,
    placeholders,
    rounded_head_dim,
    sizes_are_static_multiple,
    sm_count,
    static_float,
    static_int,
    use_tma,
)
from .decode import forward_decodes, lower_decode
from .prescale import gathers_tile, prescale_q
from .templates import forward_template

log = logging.getLogger("flex_inductor")
_ind = _compat.inductor_api()


def lower_forward(
    query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
    kernel_options, score_mod_buffers, mask_mod_buffers,
):
    """The lowering registered for the forward op; returns ``(out, lse)``."""
    from .fallback import dense_forward_fallback

    fallback_args = (
        query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
        kernel_options, score_mod_buffers, mask_mod_buffers,
    )
    if forward_decodes(query, key, block_mask, block_sizes, kernel_options):
        return lower_decode(*fallback_args)
    if not device_can_use_templates(query):
        return dense_forward_fallback(*fallback_args)
    ir = _ind.ir
    _compat.tag_kernel_name("flex_inductor_fwd")
    device = query.get_device()
    dtype = query.get_dtype()
    B, Hq, L, _ = query.get_size()
    _, Hkv, S, _ = key.get_size()
    # Head dims size registers and tl.arange: they are specialised even when
    # the sequence lengths are dynamic.
    E, Ev = static_int(query.get_size()[-1]), static_int(value.get_size()[-1])
    # Sparse block sizes are loop strides and tile divisors: always static.
    q_block, kv_block = static_int(block_sizes[2]), static_int(block_sizes[3])
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = block_mask[:4]
    has_full = full_kv_num_blocks is not None
    options = dict(kernel_options)
    kind = _score_mod_kind(score_mod, mask_mod)
    candidates = _candidate_configs(E, dtype, device, options, q_block, kv_block, kind)
    if not candidates:
        # Tiles step through whole sparse blocks and tl.dot needs 16 rows, so
        # a BlockMask whose blocks are not multiples of 16 (8, 24...) cannot
        # be walked; the dense kernel reads the same BlockMask correctly.
        log.warning(
            "flex_inductor_fwd: BlockMask block sizes (%d, %d) are not multiples of 16, the "
            "smallest kernel tile; using the blockwise dense kernel",
            q_block, kv_block,
        )
        return dense_forward_fallback(*fallback_args)

    query, key, value = fixed_inputs(query, key, value)
    sparse = fixed_inputs(
        kv_num_blocks, kv_indices,
        full_kv_num_blocks if has_full else kv_num_blocks,
        full_kv_indices if has_full else kv_indices,
    )
    score_buffers = fixed_mod_buffers(score_mod_buffers, device)
    mask_buffers = fixed_mod_buffers(mask_mod_buffers, device)
    subs = lower_mods_or_warn(
        "flex_inductor_fwd", score_mod, mask_mod, score_buffers, mask_buffers, device, (L, S)
    )
    if subs is None:
        return dense_forward_fallback(*fallback_args)
    score_sub, mask_sub = subs

    out_layout = ir.FixedLayout(
        device, dtype, [B, Hq, L, Ev], ir.FlexibleLayout.contiguous_strides([B, Hq, L, Ev])
    )
    lse = _ind.empty_strided([B, Hq, L], None, dtype=torch.float32, device=device)
    lse.realize()
    # OUTPUT_LOGSUMEXP=False is a promise that lse is not needed; if lse is
    # read after all (return_lse, or saved for the backward), an unwritten
    # buffer would be garbage, so the promise is checked against the graph.
    write_lse = bool(options.get("OUTPUT_LOGSUMEXP", True)) or output_is_used(1)
    sm_scale = static_float(scale)
    prescale = prescale_q(options, query, key, score_mod, block_mask, block_sizes)
    # Folding the scale into the row max needs it positive (max commutes
    # with multiplication by a positive factor only).
    identity = is_identity_score_mod(score_mod) and sm_scale > 0
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
        HAS_FULL_BLOCKS=has_full,
        HAS_PARTIAL_BLOCKS=has_partial_blocks(options, has_full),
        PRESCALE_QK=prescale,
        ROWS_GUARANTEED_SAFE=bool(options.get("ROWS_GUARANTEED_SAFE", False)),
        OUTPUT_LOGSUMEXP=write_lse,
        FLOAT32_PRECISION=float32_precision(),
        USE_TMA=use_tma(
            options, configs.forward_tma_by_default(E, dtype, device, kind), device, key, value
        ),
        LONGEST_FIRST=bool(options.get("LONGEST_FIRST", configs.LONGEST_FIRST)),
        PERSISTENT=False,
    )
    num_programs = _persistent_programs(options, device)
    if num_programs:
        # NUM_PROGRAMS only here, so that the default kernel's text gains no
        # more than the PERSISTENT line: the template and _forward_grid read
        # it under PERSISTENT only.
        constexprs.update(PERSISTENT=True, NUM_PROGRAMS=num_programs)
    input_nodes = [query, key, value, lse, *sparse]
    choices: list = []
    configs_of_choices: list = []
    for config in candidates:
        # Bounds checks can go when every tile is whole. The kv loop walks
        # whole sparse blocks, so S must fill its last sparse block, not only
        # its last BLOCK_N tile (S=64 under a 128-wide block reads past S).
        divisible = sizes_are_static_multiple(L, config.BLOCK_M) and sizes_are_static_multiple(
            S, kv_block
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
        else:
            configs_of_choices.append(config)
    if not choices:
        raise RuntimeError("flex_inductor: no forward kernel config could be generated")
    shape = f"B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} E={E} Ev={Ev} {dtype}"
    if len(choices) > 1:
        log.info(
            "flex_inductor_fwd: autotuning %d configs for %s: %s",
            len(choices), shape, ", ".join(describe_config(c) for c in configs_of_choices),
        )
    started = time.perf_counter()
    buffers = [b for b in (*score_buffers, *mask_buffers) if not is_symbolic_scalar(b)]
    out, choice = _compat.select_algorithm(
        "flex_inductor_fwd",
        choices,
        [*input_nodes, *buffers],
        out_layout,
        input_gen_fns=block_mask_input_gen_fns(input_nodes, 4, kv_len=S, kv_block=kv_block),
        return_choice=True,
    )
    chosen = chosen_config(choice, choices, configs_of_choices)
    if len(choices) > 1:
        log.info(
            "flex_inductor_fwd: autotuning took %.1f s; chose %s for %s",
            time.perf_counter() - started, describe_config(chosen), shape,
        )
    else:
        log.info("flex_inductor_fwd: %s for %s", describe_config(chosen), shape)
    # Symbols the mods read (sizes of captured tensors, dynamic floats) must be
    # defined before the kernel runs: the scheduler learns of them here.
    declare_subgraph_symbols(
        out, [*score_buffers, *mask_buffers], [score_sub, mask_sub]
    )
    return out, lse


def _persistent_programs(options: dict, device) -> int:
    """Programs the persistent forward launches, or 0 for one program per tile.

    ``kernel_options["PERSISTENT"]`` is off by default; True launches
    ``configs.PERSISTENT_PROGRAMS_PER_SM`` programs per SM.
    """
    if not options.get("PERSISTENT", False):
        return 0
    return configs.PERSISTENT_PROGRAMS_PER_SM * sm_count(device)


def _score_mod_kind(score_mod, mask_mod) -> str:
    """What the mods do per score (``configs.SCORE_MOD_KINDS``), for the default config."""
    # A captured table indexed by both positions (a bias over q_idx - kv_idx,
    # a dense mask lookup) is a tile-sized gather, which Triton pipelines
    # through shared memory like K and V. Vectors indexed by one position (a
    # document id per token) or by the head are not.
    if gathers_tile(score_mod, first_position=3) or gathers_tile(mask_mod, first_position=2):
        return configs.TABLE
    # Positions read by the score_mod make a tile of position arithmetic per
    # score (ALiBi's kv_idx - q_idx; in float32 since float_positions.py, in
    # integers before, when the configs were tuned), which costs registers; a
    # mask_mod's tile is only evaluated on partial blocks.
    score_args = placeholders(score_mod)
    if any(n.users for n in score_args[3:5]):
        return configs.POSITIONAL
    if not is_identity_score_mod(score_mod):
        return configs.POINTWISE
    # A mask_mod that reads none of its arguments keeps everything (noop_mask).
    if not any(n.users for n in placeholders(mask_mod)):
        return configs.NO_MODS
    return configs.MASK_ONLY


def _candidate_configs(
    head_dim, dtype, device, options, q_block, kv_block, score_mod_kind=configs.MASK_ONLY
):
    """The default config, or every autotuning candidate under max-autotune.

    Empty when no tile fits the BlockMask's block sizes; a ValueError when
    the user pinned tiles that do not divide them.
    """
    default = configs.default_forward_config(head_dim, dtype, device, score_mod_kind)
    if score_mod_kind == configs.TABLE and default.num_stages > 2:
        # A mod that gathers from a captured tensor (a bias table) has its
        # (BLOCK_M, BLOCK_N) float32 loads pipelined like K and V: with three
        # stages the D64 tile needs 240 KiB of shared memory, past the H100's
        # 227 KiB (measured: "out of resource", benchmarks/NOTES.md entry 4).
        default = dataclasses.replace(default, num_stages=2)
    if configs.has_config_override(options, "fwd_"):
        candidates = [configs.apply_overrides(default, options, "fwd_")]
        if not configs.fits_block_mask(candidates[0], q_block, kv_block):
            raise ValueError(
                f"kernel_options: BLOCK_M={candidates[0].BLOCK_M} and BLOCK_N="
                f"{candidates[0].BLOCK_N} must divide the BlockMask's block sizes "
                f"({q_block}, {kv_block})"
            )
        return candidates
    if _compat.inductor_config().max_autotune:
        pool = (
            configs.INTERPRETER_AUTOTUNE
            if device.type != "cuda" or interpret_mode()
            else configs.FORWARD_AUTOTUNE
        )
        candidates = [c for c in pool if configs.fits_block_mask(c, q_block, kv_block)]
        if candidates:
            return candidates
    fitted = configs.shrink_to_fit(default, q_block, kv_block)
    return [fitted] if configs.fits_block_mask(fitted, q_block, kv_block) else []


