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


# Forward defaults on Hopper, keyed by (head dim upper bound, dtype is fp32).
# Larger head dims keep less of K/V per stage in shared memory, hence the
# smaller BLOCK_N and fewer stages.
_SM90_FORWARD = {
    # Autotuned on H100 bf16 over BLOCK_M, BLOCK_N in {64, 128}, 4 or 8 warps,
    # 2-4 stages (benchmarks/tune_configs.py, benchmarks/NOTES.md entry 4):
    # D64 S2048 best at (128, 128, 4, 3), D128 S8192 at (128, 64, 4, 2).
    (64, False): Config(128, 128, 4, 3),
    (128, False): Config(128, 64, 4, 2),
    (256, False): Config(64, 32, 4, 2),
    (64, True): Config(128, 32, 4, 3),
    (128, True): Config(64, 32, 4, 3),
    (256, True): Config(32, 32, 4, 2),
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


def _table_lookup(table: dict, head_dim: int, is_fp32: bool) -> Config:
    for bound in (64, 128, 256):
        if head_dim <= bound:
            return table[(bound, is_fp32)]
    return table[(256, is_fp32)]


def default_forward_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    """The forward config used when not autotuning."""
    if device.type != "cuda":
        return INTERPRETER_FORWARD
    major, _ = torch.cuda.get_device_capability(device)
    table = _SM90_FORWARD if major >= 9 else _GENERIC_FORWARD
    return _table_lookup(table, head_dim, dtype == torch.float32)


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
