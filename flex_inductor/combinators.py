"""The all-true mask_mod and the ``and`` / ``or`` combinators of mask_mods.

A mask_mod is ``mask_mod(b, h, q_idx, kv_idx) -> Tensor``: it is written for
0-d integer tensors and returns a 0-d bool tensor (True = keep the score).
The same function also runs under ``torch.vmap`` and inside the compiled
kernels, so everything here uses tensor operations only (no Python ``bool``,
no ``if`` on tensor values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def noop_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Keeps every position: the mask_mod of attention without a mask.

    Args:
        b: Batch index (0-d integer tensor).
        h: Head index (0-d integer tensor).
        q_idx: Query position (0-d integer tensor).
        kv_idx: Key/value position (0-d integer tensor).

    Returns:
        A 0-d bool tensor holding True, on the device of ``q_idx``.
    """
    # A real bool tensor, never Python True: callers check the dtype and
    # vmap cannot return Python scalars.
    return q_idx.new_ones((), dtype=torch.bool)


def _name_of(mask_mod: MaskMod) -> str:
    return getattr(mask_mod, "__name__", type(mask_mod).__name__)


def _check_callables(combinator: str, mask_mods: tuple[MaskMod, ...]) -> None:
    for i, mask_mod in enumerate(mask_mods):
        if not callable(mask_mod):
            raise TypeError(
                f"{combinator}: argument {i} must be a callable mask_mod, "
                f"got {type(mask_mod).__name__}"
            )


def _named(fn: MaskMod, name: str) -> MaskMod:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Combines mask_mods so that a position is kept only if all of them keep it.

    Args:
        *mask_mods: The mask_mods to intersect. With none, every position is
            kept.

    Returns:
        A mask_mod named ``and_<name1>_<name2>...``, for example
        ``and_causal_sliding_window_128``.

    Raises:
        TypeError: If an argument is not callable.

    Example:
        >>> causal = lambda b, h, q, kv: q >= kv
        >>> near = lambda b, h, q, kv: q - kv < 4
        >>> both = and_masks(causal, near)
        >>> bool(both(*map(torch.tensor, (0, 0, 5, 3))))
        True
    """
    _check_callables("and_masks", mask_mods)
    if not mask_mods:
        return _named(lambda b, h, q_idx, kv_idx: noop_mask(b, h, q_idx, kv_idx), "and_")

    def and_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Start from the first result rather than a constant True: under
        # vmap every extra ``&`` is a full pass over the evaluated chunk.
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result & mask_mod(b, h, q_idx, kv_idx)
        return result

    return _named(and_mask, "and_" + "_".join(_name_of(m) for m in mask_mods))


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """Combines mask_mods so that a position is kept if any of them keeps it.

    Args:
        *mask_mods: The mask_mods to unite. With none, no position is kept.

    Returns:
        A mask_mod named ``or_<name1>_<name2>...``, for example
        ``or_prefix_lm_64_causal``.

    Raises:
        TypeError: If an argument is not callable.
    """
    _check_callables("or_masks", mask_mods)
    if not mask_mods:
        return _named(lambda b, h, q_idx, kv_idx: q_idx.new_zeros((), dtype=torch.bool), "or_")

    def or_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result | mask_mod(b, h, q_idx, kv_idx)
        return result

    return _named(or_mask, "or_" + "_".join(_name_of(m) for m in mask_mods))
