"""Inductor lowering of short-query calls to the split-KV decode template.

The forward lowering hands over here when the query is short (decoding: one
or a few new tokens against a long KV cache). Reads top to bottom: decide
eligibility, pick the number of kv splits from the KV length and the SM count,
append the template, then merge the splits' partial outputs by their lse with
Inductor's own pointwise and reduction lowerings.
"""

from __future__ import annotations

import logging

import torch

from flex_inductor import _compat

from .common import (
    declare_subgraph_symbols,
    device_can_use_templates,
    fixed_inputs,
    fixed_mod_buffers,
    float32_precision,
    is_symbolic_scalar,
    lower_mods_or_warn,
    rounded_head_dim,
    sm_count,
    static_float,
    static_int,
)
from .templates import decode_template

log = logging.getLogger("flex_inductor")
_ind = _compat.inductor_api()

# Query lengths up to this use the decode template; longer ones fill the
# forward template's BLOCK_M rows. Measured on an H100 (docs/performance.md,
# benchmarks/decode_threshold.py, B8 Hq32 Hkv8 D128, KV 16384, GPU time): the
# decode template took 0.32x the forward's time at L=1, 0.41x at 16, 0.48x at
# 32 and 0.75x at 64, so the crossover lies above 64. The threshold stays at
# 16 until the test suite, which checks the forward template with short
# queries, is moved to longer ones; FORCE_DECODE reaches up to 128 meanwhile.
DECODE_MAX_QUERY_LEN = 16
# Packed rows (GQA group x query length) a decode program holds at most.
_MAX_ROWS = 128


def forward_decodes(query, key, block_mask, block_sizes, kernel_options) -> bool:
    """Whether the forward lowering routes this call to the decode template.

    The one statement of that route, also asked by ``prescale.prescale_q``:
    the backward must know whether its forward decoded.
    """
    return device_can_use_templates(query) and decode_eligible(
        query, key, block_mask, block_sizes, kernel_options
    )


def decode_eligible(query, key, block_mask, block_sizes, kernel_options) -> bool:
    """Whether this forward call should use the decode template."""
    if kernel_options.get("FORCE_USE_FLEX_ATTENTION"):
        return False
    sizevars = _ind.V.graph.sizevars
    L = query.get_size()[2]
    if not sizevars.statically_known_leq(L, _MAX_ROWS):
        return False
    q_len = static_int(L)
    q_block = static_int(block_sizes[2])
    # Every query row must sit in the BlockMask's first query block.
    fits = q_len <= q_block and q_len <= _MAX_ROWS
    if kernel_options.get("FORCE_DECODE"):
        if not fits:
            raise ValueError(
                f"kernel_options: FORCE_DECODE needs the query length ({q_len}) to be at most "
                f"the BlockMask's query block size ({q_block}) and {_MAX_ROWS}"
            )
        return True
    return fits and q_len <= DECODE_MAX_QUERY_LEN


def lower_decode(
    query,
    key,
    value,
    score_mod,
    mask_mod,
    block_mask,
    block_sizes,
    scale,
    kernel_options,
    score_mod_buffers,
    mask_mod_buffers,
):
    """Lower a short-query forward call; returns ``(out, lse)`` like the forward."""
    ir, lowerings = _ind.ir, _ind.lowerings
    _compat.tag_kernel_name("flex_inductor_decode")
    device = query.get_device()
    dtype = query.get_dtype()
    B, Hq, L, _ = query.get_size()
    _, Hkv, S, _ = key.get_size()
    E, Ev = static_int(query.get_size()[-1]), static_int(value.get_size()[-1])
    q_len = static_int(L)
    kv_block = static_int(block_sizes[3])
    group = static_int(Hq) // static_int(Hkv)
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = block_mask[:4]
    has_full = full_kv_num_blocks is not None
    # GQA packing needs one BlockMask row for the whole group of heads.
    pack = group > 1 and static_int(kv_num_blocks.get_size()[1]) == 1 and group * q_len <= _MAX_ROWS
    rows = (group if pack else 1) * q_len
    block_m = max(16, 1 << (rows - 1).bit_length())
    options = dict(kernel_options)
    block_n = int(
        options.get("decode_BLOCK_N", options.get("BLOCK_N", _default_block_n(kv_block, device)))
    )
    if kv_block % block_n:
        raise ValueError(
            f"kernel_options: BLOCK_N={block_n} must divide the BlockMask's kv block size "
            f"{kv_block}"
        )
    programs = static_int(B) * (static_int(Hkv) if pack else static_int(Hq))
    split = int(options.get("SPLIT_KV", _choose_splits(programs, S, kv_block, device)))

    query, key, value = fixed_inputs(query, key, value)
    sparse = fixed_inputs(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks if has_full else kv_num_blocks,
        full_kv_indices if has_full else kv_indices,
    )
    score_buffers = fixed_mod_buffers(score_mod_buffers, device)
    mask_buffers = fixed_mod_buffers(mask_mod_buffers, device)
    subs = lower_mods_or_warn(
        "flex_inductor_decode", score_mod, mask_mod, score_buffers, mask_buffers, device
    )
    if subs is None:
        from .fallback import dense_forward_fallback

        return dense_forward_fallback(
            query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale,
            kernel_options, score_mod_buffers, mask_mod_buffers,
        )
    score_sub, mask_sub = subs

    partial_size = [split, B, Hq, L, Ev]
    partial_layout = ir.FixedLayout(
        device, torch.float32, partial_size, ir.FlexibleLayout.contiguous_strides(partial_size)
    )
    partial_lse = _ind.empty_strided([split, B, Hq, L], None, dtype=torch.float32, device=device)
    partial_lse.realize()
    input_nodes = [query, key, value, partial_lse, *sparse]
    choices: list = []
    error = decode_template().maybe_append_choice(
        choices,
        input_nodes=input_nodes,
        layout=partial_layout,
        subgraphs=[score_sub, mask_sub],
        mutated_inputs=[partial_lse],
        call_sizes=[split, B, static_int(Hkv) if pack else static_int(Hq)],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        QUERY_LEN=q_len,
        PACK_GQA=pack,
        GQA_SHARED_HEADS=group,
        SPLIT_KV=split,
        QK_HEAD_DIM=E,
        QK_HEAD_DIM_ROUNDED=rounded_head_dim(E),
        V_HEAD_DIM=Ev,
        V_HEAD_DIM_ROUNDED=rounded_head_dim(Ev),
        SPARSE_KV_BLOCK_SIZE=kv_block,
        SM_SCALE=static_float(scale),
        HAS_FULL_BLOCKS=has_full,
        FLOAT32_PRECISION=float32_precision(),
        num_warps=4,
        num_stages=int(options.get("decode_num_stages", options.get("num_stages", 2))),
    )
    if error is not None:
        raise error
    buffers = [b for b in (*score_buffers, *mask_buffers) if not is_symbolic_scalar(b)]
    partial_out = _compat.select_algorithm(
        "flex_inductor_decode", choices, [*input_nodes, *buffers], partial_layout
    )
    declare_subgraph_symbols(partial_out, [*score_buffers, *mask_buffers], [score_sub, mask_sub])
    log.info(
        "flex_inductor_decode: L=%s group=%s packed=%s splits=%s BLOCK_M=%s BLOCK_N=%s",
        q_len,
        group,
        pack,
        split,
        block_m,
        block_n,
    )
    out, lse = _merge_splits(partial_out, partial_lse, dtype, lowerings)
    return out, lse


def _merge_splits(partial_out, partial_lse, dtype, lowerings):
    """Combine the splits: ``lse = logsumexp_s lse_s``, ``out = sum_s e^(lse_s - lse) out_s``."""
    aten, prims = torch.ops.aten, torch.ops.prims
    where, eq = lowerings[aten.where.self], lowerings[aten.eq.Scalar]
    neg_inf = float("-inf")

    def const_like(x, value):
        return lowerings[aten.full.default](
            list(x.get_size()), value, dtype=x.get_dtype(), device=x.get_device()
        )

    row_max = lowerings[aten.amax.default](partial_lse, [0])
    # All splits empty (a fully masked row): shift by 0 so exp gives 0, not NaN.
    shift = where(eq(row_max, neg_inf), const_like(row_max, 0.0), row_max)
    weights = lowerings[aten.exp.default](lowerings[aten.sub.Tensor](partial_lse, shift))
    total = lowerings[aten.sum.dim_IntList](weights, [0])
    empty = eq(total, 0.0)
    safe_total = where(empty, const_like(total, 1.0), total)
    lse = where(
        empty,
        const_like(total, neg_inf),
        lowerings[aten.add.Tensor](shift, lowerings[aten.log.default](safe_total)),
    )
    scaled = lowerings[aten.mul.Tensor](partial_out, lowerings[aten.unsqueeze.default](weights, -1))
    out = lowerings[aten.div.Tensor](
        lowerings[aten.sum.dim_IntList](scaled, [0]),
        lowerings[aten.unsqueeze.default](safe_total, -1),
    )
    out = lowerings[prims.convert_element_type.default](out, dtype)
    return out, lse


def _default_block_n(kv_block: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the interpreter: small tiles
    return 64 if kv_block % 64 == 0 else 16


def _choose_splits(programs: int, kv_len, kv_block: int, device: torch.device) -> int:
    """Enough kv slices that about two waves of programs fill every SM."""
    sms = sm_count(device)
    kv_blocks = max(1, -(-_compat.size_hint(kv_len) // kv_block))
    wanted = max(1, -(-2 * sms // max(1, programs)))
    return max(1, min(wanted, kv_blocks, 64))
