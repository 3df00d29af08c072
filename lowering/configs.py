"""Kernel configs: the default table, autotuning candidates, user overrides.

A config is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. Defaults are keyed
by GPU capability, head dim and dtype; Hopper (sm90) first. Under
``max-autotune`` the candidates below are all benchmarked and the best kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("flex_inductor")


@dataclass(frozen=True)
class Config:
    """One launch configuration of a template."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# What a score_mod costs per score, beyond the two dots and the exp2; it moves
# the best tile (register pressure, shared memory), so the defaults depend on it.
NO_MODS = "none"  # no score_mod and no mask_mod: plain attention
MASK_ONLY = "mask"  # no score_mod, a mask_mod (causal, document, sliding window)
POINTWISE = "pointwise"  # maths on the score alone (softcap)
POSITIONAL = "positional"  # integer arithmetic on q_idx/kv_idx per score (ALiBi)
TABLE = "table"  # gathers a captured table of 2+ dims per score (learned bias)
SCORE_MOD_KINDS = (NO_MODS, MASK_ONLY, POINTWISE, POSITIONAL, TABLE)

# Forward defaults on Hopper, keyed by (head dim upper bound, dtype is fp32).
# Larger head dims keep less of K/V per stage in shared memory, hence the
# smaller BLOCK_N and fewer stages.
_SM90_FORWARD = {
    # Autotuned on H100 bf16 over BLOCK_M in {64, 128}, BLOCK_N in {32, 64,
    # 128}, 4 or 8 warps, 2-3 stages (benchmarks/tune_all.sh, NOTES.md entry 7):
    # D64 S2048 noop, causal, softcap+causal and document within 2% of their
    # best at (128, 128, 4, 3); D128 S8192 best at (128, 128, 8, 3) for causal,
    # softcap+causal, ALiBi and document (by 7-10% over (128, 64, 4, 2)), and
    # within 1% of the best for noop. Those with their own entry in
    # _SM90_FORWARD_BY_KIND below were retuned later (softcap in entry 15).
    (64, False): Config(128, 128, 4, 3),
    (128, False): Config(128, 128, 8, 3),
    (256, False): Config(64, 32, 4, 2),
    (64, True): Config(128, 32, 4, 3),
    (128, True): Config(64, 32, 4, 3),
    (256, True): Config(32, 32, 4, 2),
}
# Hopper, bf16/fp16, where the score_mod kind moves the best config (same
# tuning runs). Plain attention at D128 ran 504 TF/s at (128, 64, 4, 2) and 483
# at (128, 128, 8, 3) in the benchmark (the autotuner had them within 1%).
# ALiBi's per-score integer tile at D64 wants half the columns (9% faster than
# the next best); a per-score table gather is pipelined
# through shared memory like K and V, so it wants fewer stages and smaller
# tiles (D128: 236 TF/s at (64, 64, 4, 2) against 162 at (128, 64, 4, 2)).
#
# Session 4 (NOTES.md entry 9), with K/V loaded through TMA at D128 and the
# autotuner's inputs fixed: plain attention stays best at (128, 64, 4, 2) (4%
# ahead of (128, 128, 8, 3)), ALiBi at (128, 128, 8, 3) (5% ahead); masks
# without a score_mod moved to (128, 64, 4, 2) (document 7%, causal 2% ahead).
_SM90_FORWARD_BY_KIND = {
    (128, NO_MODS): Config(128, 64, 4, 2),
    (128, MASK_ONLY): Config(128, 64, 4, 2),
    # With TMA loads (forward_tma_by_default): B8 H16 S2048 D64 noop 403 TF/s
    # against 383 for (128, 128, 4, 3) without; causal 324 / 306, document
    # 244 / 229 (benchmarks/NOTES.md entry 11).
    (64, NO_MODS): Config(64, 128, 4, 2),
    (64, MASK_ONLY): Config(64, 128, 4, 2),
    (64, POSITIONAL): Config(128, 64, 4, 3),
    (64, TABLE): Config(128, 64, 4, 1),
    (128, TABLE): Config(64, 64, 4, 2),
    # Softcap+causal with the PTX tanh, autotuned at B4 Hq32 Hkv8 S4096 (NOTES.md
    # entry 14) and A/B'd at both D128 shapes (entry 15): 426 / 396 TF/s
    # against 406 / 374 for (128, 128, 8, 3).
    (128, POINTWISE): Config(64, 64, 4, 3),
}
# Everything else with a CUDA device (Ampere and older): smaller tiles.
_GENERIC_FORWARD = {
    (64, False): Config(128, 64, 4, 3),
    (128, False): Config(64, 64, 4, 3),
    (256, False): Config(64, 32, 4, 2),
    (64, True): Config(64, 32, 4, 2),
    (128, True): Config(32, 32, 4, 2),
    (256, True): Config(32, 32, 4, 1),
}
# Triton's interpreter runs each program with numpy: small tiles keep the
# padded work (and the test suite) small.
INTERPRETER_FORWARD = Config(16, 16, 1, 1)

# Under Triton's interpreter a benchmark times numpy, not a GPU, so
# max-autotune keeps the default there. Tests fill this list to run the
# autotuning path (benchmark, pick, log) on CPU.
INTERPRETER_AUTOTUNE: list[Config] = []

FORWARD_AUTOTUNE = [
    Config(128, 128, 4, 3),
    Config(128, 64, 4, 2),
    Config(128, 128, 8, 3),
    Config(128, 64, 8, 3),
    Config(128, 64, 4, 3),
    Config(128, 32, 4, 3),
    Config(64, 64, 4, 3),
    Config(64, 32, 4, 3),
    Config(64, 64, 4, 2),
    Config(32, 32, 4, 2),
]


# Query blocks launched last-first, unless kernel_options say otherwise: it
# moved causal D128 by +2% and noop by -3% on the H100, within the noise
# (benchmarks/NOTES.md entry 9), so it stays off.
LONGEST_FIRST = False

# PERSISTENT=True launches this many forward programs per SM, so that one
# wave fills the GPU if the tuned forward configs fit two CTAs on an SM (an
# assumption, not checked per config). Experimental and off by default:
# measured 4% slower than one program per tile (benchmarks/NOTES.md entry 12).
PERSISTENT_PROGRAMS_PER_SM = 2


def use_tma_by_default(head_dim: int, device: torch.device) -> bool:
    """Whether the kernels load their looped-over tiles through TMA unless told otherwise.

    Measured on the H100 (benchmarks/NOTES.md entry 9): at D128 TMA made the
    forward 0-11% faster (ALiBi most) and forward+backward 4-8%; at D64 it
    made causal 5-10% slower with the D64 configs. Off the GPU (the
    interpreter) it is used only when asked for.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return 64 < head_dim <= 128


def forward_tma_by_default(
    head_dim: int, dtype: torch.dtype, device: torch.device, score_mod_kind: str
) -> bool:
    """Whether the forward loads K and V through TMA unless told otherwise.

    Head dims 65-128 as :func:`use_tma_by_default`. At 64 and below only for
    bf16/fp16 calls without a score_mod, whose config (64, 128, 4, 2) was
    measured with TMA 5-7% ahead of the best without; with a score_mod (ALiBi)
    TMA gained nothing at D64 (benchmarks/NOTES.md entry 11).
    """
    if use_tma_by_default(head_dim, device):
        return True
    return (
        use_tma_by_default(128, device)
        and head_dim <= 64
        and dtype != torch.float32
        and score_mod_kind in (NO_MODS, MASK_ONLY)
    )


def prescale_by_default(
    dtype: torch.dtype, device: torch.device, score_mod_gathers_table: bool
) -> bool:
    """Whether the kernels scale q once (``PRESCALE_QK``) unless told otherwise.

    On Hopper in bf16, for score_mods that gather a captured table indexed by
    both positions (the learnable bias). Measured on the H100: forwards 27-33%
    faster at B8 H16 S2048 D64, B4 H16 S8192 D128 and the GQA shape (NOTES.md
    entry 13), forward+backward 21-46% faster with the backward prescaling
    too (entry 14); ALiBi and softcap became 2-12% slower with it. Why the
    table gather gains was not found; the multiply saved per score is far too
    small to explain it. fp16 was not measured.

    Rounding ``q * scale`` to bf16 changes the scores; the forward, the
    backward and their dense fallbacks all follow this one decision
    (``prescale.prescale_q``), so the backward recomputes the scores the
    forward's lse came from.

    Args:
        dtype: The inputs' dtype.
        device: The inputs' device.
        score_mod_gathers_table: The score_mod reads a captured tensor at
            indices built from both q_idx and kv_idx.

    Returns:
        True to prescale.
    """
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
        and dtype == torch.bfloat16
        and score_mod_gathers_table
    )


def _table_lookup(table: dict, head_dim: int, is_fp32: bool) -> Config:
    for bound in (64, 128, 256):
        if head_dim <= bound:
            return table[(bound, is_fp32)]
    return table[(256, is_fp32)]


def default_forward_config(
    head_dim: int, dtype: torch.dtype, device: torch.device, score_mod_kind: str = MASK_ONLY
) -> Config:
    """The forward config used when not autotuning.

    Args:
        head_dim: The query/key head dim.
        dtype: The inputs' dtype.
        device: The inputs' device.
        score_mod_kind: One of ``SCORE_MOD_KINDS``: what the score_mod does per score.

    Returns:
        The config of the tables above.
    """
    if device.type != "cuda":
        return INTERPRETER_FORWARD
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return _table_lookup(_GENERIC_FORWARD, head_dim, dtype == torch.float32)
    bound = next((b for b in (64, 128) if head_dim <= b), None)
    by_kind = _SM90_FORWARD_BY_KIND.get((bound, score_mod_kind))
    if by_kind is not None and dtype != torch.float32:
        return by_kind
    return _table_lookup(_SM90_FORWARD, head_dim, dtype == torch.float32)


def apply_overrides(config: Config, options: dict, prefix: str) -> Config:
    """Apply ``kernel_options`` (plain or ``prefix``-ed keys) to a config."""
    values = {}
    for field in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
        value = options.get(f"{prefix}{field}", options.get(field))
        values[field] = getattr(config, field) if value is None else int(value)
    return Config(**values)


def has_config_override(options: dict, prefix: str) -> bool:
    """True when the user pinned any launch parameter."""
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    return any(k in options or f"{prefix}{k}" in options for k in keys)


def fits_block_mask(config: Config, q_block: int, kv_block: int) -> bool:
    """Kernel tiles must tile the BlockMask's blocks exactly."""
    return q_block % config.BLOCK_M == 0 and kv_block % config.BLOCK_N == 0


def shrink_to_fit(config: Config, q_block: int, kv_block: int) -> Config:
    """Halve tiles until they divide the BlockMask's block sizes."""
    block_m, block_n = config.BLOCK_M, config.BLOCK_N
    while q_block % block_m and block_m > 16:
        block_m //= 2
    while kv_block % block_n and block_n > 16:
        block_n //= 2
    return Config(block_m, block_n, config.num_warps, config.num_stages)
