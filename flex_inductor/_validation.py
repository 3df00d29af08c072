"""Argument checks for ``flex_attention``, with errors that say what to fix.

Every error names the offending argument and what was expected, so a user
never has to read a kernel to learn that ``key`` had the wrong head count.
The checks read shapes, dtypes and devices only, except one call of the
block mask's ``mask_mod`` on 0-d tensors to check that it returns a bool.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["KERNEL_OPTION_KEYS", "TUNING_KEYS", "TUNING_PREFIXES", "validate_inputs"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Per-kernel tuning knobs; each may also be given for one kernel only, with
# one of TUNING_PREFIXES (``fwd_BLOCK_M``, ``bwd_num_warps``, ...).
TUNING_KEYS = (
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "BLOCK_M1",
    "BLOCK_N1",
    "BLOCK_M2",
    "BLOCK_N2",
)
TUNING_PREFIXES = ("fwd_", "bwd_", "decode_")
# Every key ``kernel_options`` accepts. A set, so that code adding a kernel
# option can register it here (``KERNEL_OPTION_KEYS.add(...)``).
KERNEL_OPTION_KEYS: set[str] = {
    *TUNING_KEYS,
    *(prefix + key for prefix in TUNING_PREFIXES for key in TUNING_KEYS),
    "PRESCALE_QK",
    "ROWS_GUARANTEED_SAFE",
    "BLOCKS_ARE_CONTIGUOUS",
    "OUTPUT_LOGSUMEXP",
    "FORCE_USE_FLEX_ATTENTION",
    "FORCE_DECODE",
    "DETERMINISTIC",
    "SPLIT_KV",
    "BACKEND",
    "USE_TMA",
    "LONGEST_FIRST",
    "PERSISTENT",
}


def validate_inputs(
    query: Any,
    key: Any,
    value: Any,
    score_mod: Any,
    block_mask: Any,
    scale: Any,
    enable_gqa: Any,
    return_lse: Any,
    kernel_options: Any,
) -> None:
    """Check the arguments of ``flex_attention``.

    Args:
        query: Expected ``(B, Hq, L, E)`` tensor.
        key: Expected ``(B, Hkv, S, E)`` tensor.
        value: Expected ``(B, Hkv, S, Ev)`` tensor.
        score_mod: None or a callable taking 5 positional arguments.
        block_mask: None or a ``BlockMask`` for ``(L, S)`` on the inputs' device.
        scale: None or a positive finite number.
        enable_gqa: bool; required when ``Hq != Hkv``.
        return_lse: bool.
        kernel_options: None or a dict with keys from ``KERNEL_OPTION_KEYS``.

    Raises:
        TypeError: An argument has the wrong type, or a mod the wrong arity or
            return type.
        ValueError: Shapes, dtypes, devices or values are inconsistent.
    """
    _check_tensors(query, key, value)
    _check_heads(query, key, enable_gqa)
    _check_flag(return_lse, "return_lse")
    _check_mod(score_mod, "score_mod", 5)
    if block_mask is not None:
        _check_block_mask(block_mask, query, key)
    _check_scale(scale)
    _check_kernel_options(kernel_options)
    _check_tiles(kernel_options, block_mask)


def _check_tensors(query: Any, key: Any, value: Any) -> None:
    named = {"query": query, "key": key, "value": value}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"`{name}` must be 4-D (B, H, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"`{name}` has dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
            )
    for name, t in named.items():
        if t.dtype != query.dtype:
            raise ValueError(f"`{name}` has dtype {t.dtype} but `query` has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"`{name}` is on {t.device} but `query` is on {query.device}")
        if t.shape[0] != query.shape[0]:
            raise ValueError(
                f"`{name}` has batch size {t.shape[0]} but `query` has {query.shape[0]}"
            )
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(
                f"`{name}` must have non-empty sequence and head dims, got shape {tuple(t.shape)}"
            )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"`key` head_dim (E) is {key.shape[-1]} but `query`'s is {query.shape[-1]}; "
            "they must match"
        )
    if value.shape[1] != key.shape[1] or value.shape[2] != key.shape[2]:
        raise ValueError(
            f"`value` must have the heads and sequence length of `key` "
            f"({key.shape[1]}, {key.shape[2]}), got ({value.shape[1]}, {value.shape[2]})"
        )


def _check_heads(query: torch.Tensor, key: torch.Tensor, enable_gqa: Any) -> None:
    _check_flag(enable_gqa, "enable_gqa")
    hq, hkv = query.shape[1], key.shape[1]
    if hq == hkv:
        return
    if not enable_gqa:
        raise ValueError(
            f"`query` has {hq} heads but `key`/`value` have {hkv}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if hq % hkv != 0:
        raise ValueError(
            f"enable_gqa: `query` heads ({hq}) must be a multiple of `key`/`value` heads ({hkv})"
        )


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")


def _check_mod(mod: Any, name: str, arity: int) -> None:
    """``mod`` is None or callable with ``arity`` positional parameters."""
    if mod is None:
        return
    if not callable(mod):
        raise TypeError(f"`{name}` must be callable, got {type(mod).__name__}")
    if torch.compiler.is_compiling():
        # Dynamo cannot run inspect.signature on a closure defined inside the
        # compiled function; a wrong arity fails speculation with the mod named.
        return
    try:
        params = inspect.signature(mod).parameters.values()
    except (TypeError, ValueError):
        return  # Some builtins have no signature: nothing to check.
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(p.default is p.empty for p in positional)
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    keyword_only = any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params)
    if required > arity or (len(positional) < arity and not variadic) or keyword_only:
        expected = "(score, b, h, q_idx, kv_idx)" if arity == 5 else "(b, h, q_idx, kv_idx)"
        raise TypeError(
            f"`{name}` must take {arity} positional arguments {expected}, "
            f"but its signature is {inspect.signature(mod)}"
        )


def _check_block_mask(block_mask: Any, query: torch.Tensor, key: torch.Tensor) -> None:
    from flex_inductor.block_mask import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"`block_mask` must be a flex_inductor BlockMask (see create_block_mask), "
            f"got {type(block_mask).__name__}"
        )
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    if tuple(block_mask.seq_lengths) != (L, S):
        raise ValueError(
            f"`block_mask` was built for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} "
            f"but the inputs have ({L}, {S}); build it with create_block_mask(..., {L}, {S})"
        )
    q_block, kv_block = block_mask.BLOCK_SIZE
    expected_blocks = (math.ceil(L / q_block), math.ceil(S / kv_block))
    got_blocks = (block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1])
    if got_blocks != expected_blocks:
        raise ValueError(
            f"`block_mask` has {got_blocks} (q, kv) blocks but BLOCK_SIZE {(q_block, kv_block)} "
            f"over ({L}, {S}) needs {expected_blocks}"
        )
    mask_b, mask_h = block_mask.kv_num_blocks.shape[:2]
    if mask_b not in (1, B) or mask_h not in (1, Hq):
        raise ValueError(
            f"`block_mask` has (B, H) = ({mask_b}, {mask_h}); each must be 1 (broadcast) or "
            f"the query's ({B}, {Hq})"
        )
    if block_mask.kv_num_blocks.device != query.device:
        raise ValueError(
            f"`block_mask` is on {block_mask.kv_num_blocks.device} but `query` is on "
            f"{query.device}; build it with device=query.device or call .to(device)"
        )
    _check_mod(block_mask.mask_mod, "block_mask.mask_mod", 4)
    _check_mask_mod_returns_bool(block_mask.mask_mod, query.device)


def _check_mask_mod_returns_bool(mask_mod: Callable | None, device: torch.device) -> None:
    # One call on 0-d int32 tensors, the kernels' index type: cheap, and it
    # turns a confusing failure deep in the kernel into a clear one here.
    # While Dynamo traces, the call would only add dead ops to the graph.
    if mask_mod is None or torch.compiler.is_compiling():
        return
    index = torch.zeros((), dtype=torch.int32, device=device)
    try:
        result = mask_mod(index, index, index, index)
    except Exception as exc:
        raise TypeError(
            f"`block_mask.mask_mod` failed when called on 0-d int32 tensors "
            f"(b, h, q_idx, kv_idx): {exc!r}"
        ) from exc
    if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
        got = result.dtype if isinstance(result, torch.Tensor) else type(result).__name__
        raise TypeError(
            f"`block_mask.mask_mod` must return a bool tensor, got {got}; "
            "use comparisons and & | ~ rather than arithmetic"
        )


def _check_scale(scale: Any) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be positive and finite, got {scale}")


def _check_kernel_options(kernel_options: Any) -> None:
    if kernel_options is None:
        return
    if not isinstance(kernel_options, dict):
        raise TypeError(
            f"`kernel_options` must be a dict or None, got {type(kernel_options).__name__}"
        )
    unknown = sorted(str(k) for k in kernel_options if k not in KERNEL_OPTION_KEYS)
    if unknown:
        raise ValueError(
            f"`kernel_options` has unknown keys {unknown}; valid keys: "
            f"{', '.join(sorted(KERNEL_OPTION_KEYS))}"
        )
    persistent = kernel_options.get("PERSISTENT", False)
    # A bool only: an int count would compare equal to True (1 == True) in
    # Dynamo's guards and caches, and so share a kernel with another setting.
    if not isinstance(persistent, bool):
        raise TypeError(
            f"`kernel_options['PERSISTENT']` must be a bool, got {type(persistent).__name__}"
        )


# Pinned tiles and the BlockMask block ("Q" or "KV") each must divide, with
# the kernel-specific prefix that overrides the plain key.
_TILES = (
    ("fwd_", "BLOCK_M", "Q"),
    ("fwd_", "BLOCK_N", "KV"),
    ("bwd_", "BLOCK_M1", "Q"),
    ("bwd_", "BLOCK_N1", "KV"),
    ("bwd_", "BLOCK_M2", "Q"),
    ("bwd_", "BLOCK_N2", "KV"),
)


def _check_tiles(kernel_options: dict | None, block_mask: Any) -> None:
    # The kernels walk the BlockMask's blocks in whole tiles, so a pinned tile
    # must divide its block size. Checked at the call, so that the user gets a
    # ValueError here rather than a failure deep inside compilation (for the
    # backward, only at the first loss.backward()).
    if not kernel_options:
        return
    from flex_inductor.block_mask import _DEFAULT_BLOCK_SIZE

    q_block, kv_block = (
        block_mask.BLOCK_SIZE if block_mask is not None
        else (_DEFAULT_BLOCK_SIZE, _DEFAULT_BLOCK_SIZE)
    )
    for prefix, name, which in _TILES:
        block = q_block if which == "Q" else kv_block
        key = f"{prefix}{name}" if f"{prefix}{name}" in kernel_options else name
        tile = kernel_options.get(key)
        if tile is None:
            continue
        if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
            raise ValueError(f"`kernel_options[{key!r}]` must be a positive int, got {tile!r}")
        if block % tile:
            raise ValueError(
                f"`kernel_options[{key!r}]` = {tile} must divide the BlockMask's {which} block "
                f"size {block}; pick a divisor of {block} or build the BlockMask with a "
                f"BLOCK_SIZE that {tile} divides"
            )
