"""Backward kernel configs: BLOCK_M1/BLOCK_N1 for dK/dV, BLOCK_M2/BLOCK_N2 for dQ."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class BackwardConfig:
    """Launch parameters of the two backward templates."""

    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    num_warps: int
    num_stages: int


# dQ's query blocks launched last-first, unless kernel_options say otherwise:
# no gain measured (benchmarks/NOTES.md entry 9). TMA: the forward's rule.
LONGEST_FIRST = False

# Hopper, by head dim bound. dK/dV keeps k, v, dk and dv resident (BLOCK_N1
# rows each), so it wants BLOCK_N1 large and BLOCK_M1 small; dQ the reverse.
_SM90 = {
    # H100 bf16 B8 H16 S2048 D64 sweep: 274 TF/s fwd+bwd against 261 for
    # (64, 128, 128, 64, 8, 3) (benchmarks/NOTES.md).
    64: BackwardConfig(32, 128, 64, 64, 4, 3),
    # H100 bf16 B4 H16 S8192 D128 autotune (benchmarks/tune_all.sh, NOTES.md
    # entry 7): (64, 64) tiles with 4 warps and 2 stages were the fastest dK/dV
    # for noop and ALiBi, and the fastest (ALiBi) or within 5% of it (noop) for
    # dQ; the former (64, 128, 128, 64, 8, 2) was 8% (dK/dV) and 5%+ (dQ) slower.
    128: BackwardConfig(64, 64, 64, 64, 4, 2),
    256: BackwardConfig(32, 64, 64, 32, 4, 1),
}
_GENERIC = {
    64: BackwardConfig(32, 64, 64, 32, 4, 2),
    128: BackwardConfig(32, 64, 64, 32, 4, 2),
    256: BackwardConfig(16, 32, 32, 16, 4, 1),
}
# The interpreter runs programs with numpy: small tiles, little padding.
INTERPRETER = BackwardConfig(16, 16, 16, 16, 1, 1)
_FIELDS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps", "num_stages")


def backward_config(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    options: dict,
    q_block: int,
    kv_block: int,
) -> BackwardConfig:
    """The backward config for this shape: the default table, fitted, then ``kernel_options``.

    Default tiles are halved until they divide the BlockMask's block sizes;
    tiles the user pins are checked instead (:func:`check_backward_fits`).

    Args:
        head_dim: The query/key head dim.
        dtype: The inputs' dtype.
        device: The inputs' device.
        options: ``kernel_options``; ``bwd_``-prefixed keys win over plain ones.
        q_block: The BlockMask's query block size.
        kv_block: The BlockMask's kv block size.

    Raises:
        ValueError: A pinned tile does not divide its block size.
    """
    if device.type != "cuda":
        config = INTERPRETER
    else:
        major, _ = torch.cuda.get_device_capability(device)
        table = _SM90 if major >= 9 else _GENERIC
        bound = next((b for b in (64, 128, 256) if head_dim <= b), 256)
        config = table[bound]
        if dtype == torch.float32:
            # float32 tiles take twice the registers and shared memory.
            config = replace(
                config,
                BLOCK_M1=max(16, config.BLOCK_M1 // 2),
                BLOCK_N1=max(16, config.BLOCK_N1 // 2),
                BLOCK_M2=max(16, config.BLOCK_M2 // 2),
                BLOCK_N2=max(16, config.BLOCK_N2 // 2),
            )
    config = shrink_to_fit(config, q_block, kv_block)
    overrides = {}
    for field in _FIELDS:
        value = options.get(f"bwd_{field}", options.get(field))
        if value is not None:
            overrides[field] = int(value)
    config = replace(config, **overrides)
    check_backward_fits(config, q_block, kv_block, options, pinned=overrides)
    return config


def fits_block_mask(config: BackwardConfig, q_block: int, kv_block: int) -> bool:
    """Whether every tile divides its BlockMask block size (the loops step whole blocks)."""
    return not (
        q_block % config.BLOCK_M1
        or kv_block % config.BLOCK_N1
        or q_block % config.BLOCK_M2
        or kv_block % config.BLOCK_N2
    )


def check_backward_fits(
    config: BackwardConfig,
    q_block: int,
    kv_block: int,
    options: dict | None = None,
    pinned=None,
) -> None:
    """Tiles must divide the BlockMask's blocks; say which option is off if not.

    Args:
        config: The backward config, ``kernel_options`` applied.
        q_block: The BlockMask's query block size.
        kv_block: The BlockMask's kv block size.
        options: The ``kernel_options``, to name the key the user wrote
            (``bwd_BLOCK_M1`` or ``BLOCK_M1``).
        pinned: Check only these tile names (default: all four).

    Raises:
        ValueError: A tile does not divide its block size.
    """
    options = options or {}
    pairs = (
        ("BLOCK_M1", config.BLOCK_M1, q_block, "Q"),
        ("BLOCK_N1", config.BLOCK_N1, kv_block, "KV"),
        ("BLOCK_M2", config.BLOCK_M2, q_block, "Q"),
        ("BLOCK_N2", config.BLOCK_N2, kv_block, "KV"),
    )
    for name, tile, block, which in pairs:
        if pinned is not None and name not in pinned:
            continue
        if block % tile:
            key = f"bwd_{name}" if f"bwd_{name}" in options else name
            raise ValueError(
                f"`kernel_options[{key!r}]` = {tile} must divide the BlockMask's {which} block "
                f"size {block}; pick a divisor of {block} or build the BlockMask with a "
                f"BLOCK_SIZE that {tile} divides"
            )


def shrink_to_fit(config: BackwardConfig, q_block: int, kv_block: int) -> BackwardConfig:
    """Halve the default tiles until they divide the BlockMask's block sizes."""

    def fit(tile: int, block: int) -> int:
        while block % tile and tile > 16:
            tile //= 2
        return tile

    return replace(
        config,
        BLOCK_M1=fit(config.BLOCK_M1, q_block),
        BLOCK_N1=fit(config.BLOCK_N1, kv_block),
        BLOCK_M2=fit(config.BLOCK_M2, q_block),
        BLOCK_N2=fit(config.BLOCK_N2, kv_block),
    )


# Candidates benchmarked under max-autotune on CUDA, next to the default:
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages). dK/dV and dQ
# are tuned separately (each kernel keeps its own winner).
BACKWARD_AUTOTUNE = [
    BackwardConfig(32, 128, 64, 64, 4, 3),
    BackwardConfig(64, 128, 128, 64, 8, 3),
    BackwardConfig(32, 64, 64, 32, 4, 3),
    BackwardConfig(64, 64, 128, 32, 4, 2),
    BackwardConfig(32, 128, 64, 64, 8, 2),
    BackwardConfig(16, 64, 32, 32, 4, 2),
]


def autotune_candidates(
    default: BackwardConfig, options: dict, device: torch.device, q_block: int, kv_block: int
) -> list[BackwardConfig]:
    """The configs to benchmark: the default alone unless max-autotune is on.

    Tiles the user pinned in ``kernel_options`` turn autotuning off; so does
    a device without tensor cores to tune for (the interpreter).
    """
    from flex_inductor import _compat

    pinned = any(key in options or f"bwd_{key}" in options for key in _FIELDS)
    if pinned or device.type != "cuda" or not _compat.inductor_config().max_autotune:
        return [default]
    candidates = [default]
    for config in BACKWARD_AUTOTUNE:
        if config != default and fits_block_mask(config, q_block, kv_block):
            candidates.append(config)
    return candidates
