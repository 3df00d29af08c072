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


# Hopper, by head dim bound. dK/dV keeps k, v, dk and dv resident (BLOCK_N1
# rows each), so it wants BLOCK_N1 large and BLOCK_M1 small; dQ the reverse.
_SM90 = {
    # H100 bf16 B8 H16 S2048 D64 sweep: 274 TF/s fwd+bwd against 261 for
    # (64, 128, 128, 64, 8, 3) (benchmarks/NOTES.md).
    64: BackwardConfig(32, 128, 64, 64, 4, 3),
    128: BackwardConfig(64, 128, 128, 64, 8, 2),
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


def backward_config(head_dim: int, dtype: torch.dtype, device: torch.device, options: dict):
    """The default backward config for this shape, with ``kernel_options`` applied."""
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
    overrides = {}
    for field in _FIELDS:
        value = options.get(f"bwd_{field}", options.get(field))
        if value is not None:
            overrides[field] = int(value)
    return replace(config, **overrides)


def check_backward_fits(config: BackwardConfig, q_block: int, kv_block: int) -> None:
    """Tiles must divide the BlockMask's blocks; say which option is off if not."""
    pairs = (
        ("BLOCK_M1", config.BLOCK_M1, q_block),
        ("BLOCK_N1", config.BLOCK_N1, kv_block),
        ("BLOCK_M2", config.BLOCK_M2, q_block),
        ("BLOCK_N2", config.BLOCK_N2, kv_block),
    )
    for name, tile, block in pairs:
        if block % tile:
            raise ValueError(
                f"kernel_options: {name}={tile} must divide the BlockMask's block size {block}"
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
