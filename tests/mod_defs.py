"""The shared test definitions: every score_mod and mask_mod, built per shape.

Each ``ModCase`` names a score_mod and/or a mask_mod of the library (or a
combination, or a test-only mod that probes one semantic corner) and knows how
to build it for a given ``Dims``. Tests of every layer (reference, op,
compiled kernels) parametrise over ``MOD_CASES`` with ``ids=case_ids``::

    @pytest.mark.parametrize("case", MOD_CASES, ids=case_ids(MOD_CASES))
    def test_something(case):
        built = case.build(Dims(B=2, H=4, L=37, S=53))

Captured tensors are drawn from a generator seeded by the case name, so a
case builds the same tensors every time. Learnable ones come back in
``Built.params`` (they require grad) for gradient tests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flex_inductor import masks, mods
from flex_inductor.block_mask import create_block_mask

ScoreMod = Callable[..., torch.Tensor]
MaskMod = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Dims:
    """What a mod is built for: batch, query heads, query and key lengths, device."""

    B: int
    H: int
    L: int
    S: int
    device: str = "cpu"

    @property
    def max_len(self) -> int:
        return max(self.L, self.S)


@dataclass(frozen=True)
class Built:
    """A case built for one ``Dims``: its mods and its learnable captured tensors."""

    score_mod: ScoreMod | None
    mask_mod: MaskMod | None
    params: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class ModCase:
    """One score_mod / mask_mod pairing.

    ``score_mod_factory(dims, gen)`` returns a score_mod, or
    ``(score_mod, params)`` when it captures learnable tensors.
    ``mask_mod_factory(dims, gen)`` returns a mask_mod. ``gen`` is a CPU
    generator seeded by the case name.
    """

    name: str
    score_mod_factory: Callable | None = None
    mask_mod_factory: Callable | None = None
    tags: frozenset[str] = field(default_factory=frozenset)

    def build(self, dims: Dims) -> Built:
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        score_mod, params = None, ()
        if self.score_mod_factory is not None:
            score_mod = self.score_mod_factory(dims, gen)
            if isinstance(score_mod, tuple):
                score_mod, params = score_mod
        mask_mod = None if self.mask_mod_factory is None else self.mask_mod_factory(dims, gen)
        return Built(score_mod, mask_mod, tuple(params))


def case_ids(cases: list[ModCase]) -> list[str]:
    """Readable pytest ids: the case names."""
    return [case.name for case in cases]


def block_mask_for(
    mask_mod: MaskMod | None, dims: Dims, block_size=16, broadcast: bool = False
):
    """A BlockMask of ``mask_mod`` for ``dims`` (None for no mask_mod).

    Small blocks by default, so that short test sequences still have skipped,
    partial and full blocks. ``broadcast`` builds it with B = H = 1, valid only
    for mods that ignore ``b`` and ``h``.
    """
    if mask_mod is None:
        return None
    B, H = (1, 1) if broadcast else (dims.B, dims.H)
    return create_block_mask(
        mask_mod, B, H, dims.L, dims.S, device=dims.device, BLOCK_SIZE=block_size
    )


# ---------------------------------------------------------------------------
# Builders. Every one takes (dims, gen); window sizes scale with the lengths so
# that each mask is neither empty nor full at any test shape.
# ---------------------------------------------------------------------------


def _randn(gen, *shape, dims: Dims, scale=1.0, learnable=False) -> torch.Tensor:
    t = (torch.randn(*shape, generator=gen) * scale).to(dims.device)
    return t.requires_grad_(learnable)


def _random_lengths(dims: Dims, gen) -> list[int]:
    """Random document lengths covering every position (some of length 1)."""
    total, lengths = dims.max_len, []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, max(2, total // 3), (), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def _window(dims: Dims) -> int:
    return max(1, dims.S // 5)


def _neighborhood(dims: Dims, gen) -> MaskMod:
    # The smallest near-square grid (at least 3 x 3) that holds every position.
    width = max(3, math.isqrt(dims.max_len))
    height = max(3, math.ceil(dims.max_len / width))
    return masks.neighborhood_2d(height, width, 3)


def _relative_bias(dims: Dims, gen):
    bias = _randn(gen, dims.H, 2 * dims.max_len - 1, dims=dims, scale=0.5, learnable=True)
    return mods.relative_position_bias(bias), (bias,)


def _learnable_relative_bias(dims: Dims, gen):
    score_mod, bias = mods.learnable_relative_bias(dims.H, dims.max_len, device=dims.device)
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=gen))
    return score_mod, (bias,)


def _per_head_scale(dims: Dims, gen):
    scales = (torch.rand(dims.H, generator=gen) + 0.5).to(dims.device).requires_grad_()
    return mods.per_head_scale(scales), (scales,)


def _full_bias(dims: Dims, gen):
    bias = _randn(gen, dims.H, dims.L, dims.S, dims=dims, learnable=True)
    return mods.full_bias(bias), (bias,)


def _row_table_sum(dims: Dims, gen) -> ScoreMod:
    """``score + table[q_idx].sum()``: only right if the mod sees 0-d indices."""
    table = _randn(gen, dims.L, 3, dims=dims, scale=0.3)

    def row_table_sum(score, b, h, q_idx, kv_idx):
        return score + table[q_idx].sum()

    return row_table_sum


def _where_even_kv(dims: Dims, gen) -> ScoreMod:
    def halve_odd_kv(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx % 2 == 0, score, score * 0.5)

    return halve_odd_kv


def _head_window(dims: Dims, gen) -> MaskMod:
    """Causal window that widens with the head: depends on ``h``."""
    step = max(1, dims.S // 8)

    def head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= (h + 1) * step)

    return head_window


def _batch_stride(dims: Dims, gen) -> MaskMod:
    """Every ``(b + 2)``-th key: depends on ``b``."""

    def batch_stride(b, h, q_idx, kv_idx):
        return kv_idx % (b + 2) == 0

    return batch_stride


def _dead_rows(dims: Dims, gen) -> MaskMod:
    """Causal, except that every query ``q % 3 == 1`` attends to nothing."""

    def dead_rows(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 1) & (q_idx >= kv_idx)

    return dead_rows


def _const(factory: Callable) -> Callable:
    """A builder for a factory that needs no shape."""
    return lambda dims, gen: factory()


MOD_CASES: list[ModCase] = [
    # score_mods alone
    ModCase("noop", _const(mods.noop)),
    ModCase("alibi", lambda d, g: mods.alibi(d.H, device=d.device)),
    ModCase("softcap", lambda d, g: mods.softcap(2.0)),
    ModCase("relative_position_bias", _relative_bias, tags=frozenset({"learnable"})),
    ModCase("learnable_relative_bias", _learnable_relative_bias, tags=frozenset({"learnable"})),
    ModCase("per_head_scale", _per_head_scale, tags=frozenset({"learnable"})),
    ModCase("full_bias", _full_bias, tags=frozenset({"learnable"})),
    ModCase("row_table_sum", _row_table_sum),
    ModCase("halve_odd_kv", _where_even_kv),
    # mask_mods alone
    ModCase("noop_mask", None, lambda d, g: masks.noop_mask),
    ModCase("causal", None, _const(masks.causal)),
    ModCase("sliding_window", None, lambda d, g: masks.sliding_window(_window(d))),
    ModCase(
        "sliding_window_bidirectional",
        None,
        lambda d, g: masks.sliding_window(_window(d), causal=False),
    ),
    ModCase("prefix_lm", None, lambda d, g: masks.prefix_lm(max(1, d.S // 3))),
    ModCase(
        "document",
        None,
        lambda d, g: masks.document(_random_lengths(d, g), device=d.device),
    ),
    ModCase(
        "document_causal",
        None,
        lambda d, g: masks.document(_random_lengths(d, g), device=d.device, causal=True),
    ),
    ModCase(
        "dilated_sliding_window",
        None,
        lambda d, g: masks.dilated_sliding_window(max(2, d.S // 3), 3),
    ),
    ModCase(
        "dilated_sliding_window_bidirectional",
        None,
        lambda d, g: masks.dilated_sliding_window(max(2, d.S // 3), 2, causal=False),
    ),
    ModCase("neighborhood_2d", None, _neighborhood),
    ModCase("head_window", None, _head_window, tags=frozenset({"per_head"})),
    ModCase("batch_stride", None, _batch_stride, tags=frozenset({"per_batch"})),
    ModCase("dead_rows", None, _dead_rows, tags=frozenset({"dead_rows"})),
    # combinations
    ModCase("softcap_causal", lambda d, g: mods.softcap(2.0), _const(masks.causal)),
    ModCase(
        "alibi_sliding_window",
        lambda d, g: mods.alibi(d.H, device=d.device),
        lambda d, g: masks.sliding_window(_window(d)),
    ),
    ModCase(
        "softcap_document",
        lambda d, g: mods.softcap(3.0),
        lambda d, g: masks.document(_random_lengths(d, g), device=d.device),
    ),
    ModCase(
        "relative_bias_causal",
        _relative_bias,
        _const(masks.causal),
        tags=frozenset({"learnable"}),
    ),
    ModCase(
        "and_causal_document",
        None,
        lambda d, g: masks.and_masks(
            masks.causal(), masks.document(_random_lengths(d, g), device=d.device)
        ),
    ),
    ModCase(
        "or_prefix_lm_sliding_window",
        None,
        lambda d, g: masks.or_masks(masks.prefix_lm(max(1, d.S // 4)), masks.sliding_window(3)),
    ),
]

MOD_CASES_BY_NAME: dict[str, ModCase] = {case.name: case for case in MOD_CASES}


def cases_tagged(tag: str) -> list[ModCase]:
    """The cases carrying ``tag`` (``learnable``, ``per_head``, ``dead_rows``...)."""
    return [case for case in MOD_CASES if tag in case.tags]
