"""Block classification for create_block_mask: interval bounds first, exact evaluation last.

Evaluating a mask_mod at every position is linear in ``Q_LEN * KV_LEN``
(10^12 positions at 1M tokens). Most blocks of a structured mask are
certainly empty or certainly full, and bounds over a whole block prove it
(see :mod:`flex_inductor._interval`). Two passes, the second on far less of
the grid:

1. **Bounds per block.** ``mask_mod`` is called with intervals over chunks of
   query-block rows: one box per block, ``O(nq * nkv)`` work. A block whose
   bounds are certain is empty or full.
2. **Bounds per sub-tile** of the blocks still undecided (up to 8 x 8
   sub-tiles a block). A block with a certainly kept and a certainly dropped
   sub-tile is partial; this settles most blocks that the edge of a causal,
   sliding-window or document mask runs through. The sub-tiles whose bounds
   are uncertain, in blocks still undecided, are then **evaluated exactly**
   (the nested vmap of the elementwise contract), in bounded batches.

Any exception in these passes (an operation the intervals cannot bound,
or an error of the mask_mod itself), or exact work projected past half the
grid, hands the whole grid to the dense chunked evaluation of
:mod:`flex_inductor._mask_utils`, which then behaves (and fails) exactly as it
always has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flex_inductor import _interval, _mask_utils

_EMPTY, _PARTIAL, _FULL = 0, 1, 2
# A block whose bounds have not decided it yet.
_UNDECIDED = 3

# Blocks (or sub-tiles) bounded at once: an int64 (lo, hi) pair for them is
# 64 MiB, and a mask_mod makes a few such temporaries (``q_idx - kv_idx``).
INTERVAL_CHUNK_ENTRIES = 1 << 22
# Positions evaluated exactly at once: 16 MiB of bools, 128 MiB per int64
# temporary. Few sub-tiles get there, so larger batches buy little.
EXACT_CHUNK_ELEMENTS = 1 << 24
# Sub-tiles along each side of a block in the second pass.
SUBTILES = 8
# Exact work projected past this fraction of all positions: the dense pass,
# which evaluates every position anyway, is as cheap and simpler.
DENSE_FRACTION = 0.5


def evaluate_block_states(
    mask_mod: _mask_utils.MaskMod,
    shape: tuple[int, int, int, int],
    block_size: tuple[int, int],
    device: torch.device,
    chunk_elements: int | None = None,
) -> Tensor:
    """Block classification of ``mask_mod`` over ``(B, H, Q_LEN, KV_LEN)``.

    The same result as :func:`_mask_utils.evaluate_block_states`, usually
    without evaluating most positions.

    Args:
        mask_mod: A checked mask_mod.
        shape: (B, H, Q_LEN, KV_LEN).
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        device: Where to evaluate.
        chunk_elements: Most blocks bounded, or positions evaluated, at once;
            None for the defaults.

    Returns:
        int8 ``(B, H, num_q_blocks, num_kv_blocks)``: 0 empty, 1 partial,
        2 full. Dimensions the mask does not depend on are stride-0
        expansions.
    """
    B, H = shape[:2]
    problem = _Problem(
        mask_mod,
        shape,
        block_size,
        device,
        chunk_elements or INTERVAL_CHUNK_ENTRIES,
        chunk_elements or EXACT_CHUNK_ELEMENTS,
    )
    try:
        states, undecided = _bound_blocks(problem)
        free = (states.shape[0] == 1, states.shape[1] == 1)
        settled = _settle(problem, states, undecided)
    except Exception:
        # Unsupported, or the mask_mod's own error: the dense pass decides,
        # and raises that error as it always has.
        settled, free = False, None
    if settled:
        return states.expand(B, H, *states.shape[2:])
    return _mask_utils.evaluate_block_states(
        mask_mod, shape, block_size, device, chunk_elements, free=free
    )


@dataclass
class _Problem:
    """One create_block_mask call, and the range tables its intervals share."""

    mask_mod: _mask_utils.MaskMod
    shape: tuple[int, int, int, int]
    block_size: tuple[int, int]
    device: torch.device
    bound_budget: int  # blocks or sub-tiles bounded at once
    exact_budget: int  # positions evaluated exactly at once

    def __post_init__(self) -> None:
        self.ctx = _interval.IntervalContext()

    def point(self, values: Tensor, dim: int) -> _interval.Interval:
        """Exact b (dim 0) or h (dim 1) indices."""
        return _interval.point(values, self.shape[dim] - 1, self.ctx)

    def ranges(self, lo: Tensor, hi: Tensor, dim: int, exact: bool) -> _interval.Interval:
        """q (dim 2) or kv (dim 3) position ranges."""
        return _interval.ranges(lo, hi, self.shape[dim] - 1, self.ctx, exact)


def _bound_blocks(p: _Problem) -> tuple[Tensor, int]:
    """Pass 1: int8 ``(B', H', nq, nkv)`` of empty / full / undecided, and the undecided count.

    B' (H') is 1 when the bounds do not depend on b (h): then neither does
    the mask, since nothing it computes from b reaches its result.
    """
    B, H, Q_LEN, KV_LEN = p.shape
    QB, KB = p.block_size
    nq, nkv = math.ceil(Q_LEN / QB), math.ceil(KV_LEN / KB)
    b = p.point(torch.arange(B, device=p.device).view(B, 1, 1, 1), 0)
    h = p.point(torch.arange(H, device=p.device).view(1, H, 1, 1), 1)
    kv = _block_ranges(p, torch.arange(nkv, device=p.device), 3, (1, 1, 1, nkv))
    states = None
    undecided = torch.zeros((), dtype=torch.int64, device=p.device)
    # Until the first chunk shows whether b and h matter, size chunks as if they do.
    rows = max(1, p.bound_budget // (B * H * nkv))
    r0 = 0
    while r0 < nq:
        r1 = min(nq, r0 + rows)
        q = _block_ranges(p, torch.arange(r0, r1, device=p.device), 2, (1, 1, r1 - r0, 1))
        lo, hi = _interval.evaluate(p.mask_mod, b, h, q, kv)
        if states is None:
            out_b, out_h = _result_batch_heads(lo, hi)
            states = torch.empty((out_b, out_h, nq, nkv), dtype=torch.int8, device=p.device)
            rows = max(1, p.bound_budget // (out_b * out_h * nkv))
        chunk = states[:, :, r0:r1]
        chunk.copy_(hi).mul_(_UNDECIDED).masked_fill_(lo, _FULL)
        undecided += torch.count_nonzero(chunk == _UNDECIDED)
        r0 = r1
    return states, int(undecided)


def _result_batch_heads(lo: Tensor, hi: Tensor) -> tuple[int, int]:
    """Sizes of the b and h dimensions of a pass-1 result (1 where broadcast)."""
    shape = torch.broadcast_shapes(lo.shape, hi.shape, (1, 1, 1, 1))
    if len(shape) != 4:
        raise _interval.Unsupported(f"mask_mod bounds of shape {tuple(shape)}")
    return shape[0], shape[1]


def _block_ranges(p: _Problem, blocks: Tensor, dim: int, shape: tuple) -> _interval.Interval:
    """The positions of each block along q (dim 2) or kv (dim 3), clipped to the sequence."""
    size, length = p.block_size[dim - 2], p.shape[dim]
    lo = blocks * size
    hi = (lo + size).clamp_(max=length) - 1
    return p.ranges(lo.view(shape), hi.view(shape), dim, exact=size == 1)


@dataclass(frozen=True)
class _Tiling:
    """How pass 2 splits one side of a block: ``count`` sub-tiles of ``size``."""

    block: int
    length: int  # of the sequence
    count: int
    size: int

    @classmethod
    def of(cls, block: int, length: int) -> _Tiling:
        count = min(block, SUBTILES)
        return cls(block, length, count, -(-block // count))

    def block_last(self, blocks: Tensor) -> Tensor:
        """Last real position of each block."""
        return ((blocks + 1) * self.block).clamp_(max=self.length) - 1

    def ranges(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """``(n, count)`` first and last positions of the sub-tiles of each block.

        Sub-tiles past the block's last real position collapse onto it: a
        duplicate of a real position of the block changes neither "some
        kept" nor "all kept".
        """
        offsets = torch.arange(self.count, device=blocks.device) * self.size
        start = blocks[:, None] * self.block + offsets
        last = self.block_last(blocks)[:, None]
        return torch.minimum(start, last), torch.minimum(start + (self.size - 1), last)

    def positions(self, blocks: Tensor, tiles: Tensor) -> Tensor:
        """``(m, size)`` positions of sub-tile ``tiles[i]`` of block ``blocks[i]``."""
        offsets = torch.arange(self.size, device=blocks.device)
        start = blocks * self.block + tiles * self.size
        return torch.minimum(start[:, None] + offsets, self.block_last(blocks)[:, None])


def _settle(p: _Problem, states: Tensor, total: int) -> bool:
    """Pass 2: decides the ``total`` undecided blocks in place, by sub-tile bounds then exactly.

    Returns:
        False, leaving ``states`` half done, when the exact work is projected
        past ``DENSE_FRACTION`` of all positions.
    """
    B, H, Q_LEN, KV_LEN = p.shape
    q_tiling, kv_tiling = _Tiling.of(p.block_size[0], Q_LEN), _Tiling.of(p.block_size[1], KV_LEN)
    tiles = q_tiling.count * kv_tiling.count
    tile_positions = q_tiling.size * kv_tiling.size
    limit = DENSE_FRACTION * states.shape[0] * states.shape[1] * Q_LEN * KV_LEN
    done = exact = 0
    for idx in _undecided_batches(states, max(1, p.bound_budget // tiles), p.bound_budget):
        b, h, qi, ki = _coords(idx, states.shape)
        lo, hi = _bound_tiles(p, q_tiling, kv_tiling, b, h, qi, ki)
        verdict = _verdict(lo, hi)
        # Uncertain sub-tiles of the blocks the bounds left undecided.
        todo = (hi & ~lo) & (verdict == _UNDECIDED)[:, None, None]
        tile_idx = todo.reshape(-1).nonzero().squeeze(1)
        done += len(idx)
        exact += len(tile_idx) * tile_positions
        if exact + (total - done) * exact / done > limit:
            return False
        if len(tile_idx):
            some, every = _evaluate_tiles(p, q_tiling, kv_tiling, (b, h, qi, ki), tile_idx, lo)
            decided = some.any(dim=(1, 2)).to(torch.int8) + every.all(dim=(1, 2)).to(torch.int8)
            verdict = torch.where(verdict == _UNDECIDED, decided, verdict)
        states.view(-1)[idx] = verdict
    return True


def _bound_tiles(
    p: _Problem, q_tiling: _Tiling, kv_tiling: _Tiling, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor
) -> tuple[Tensor, Tensor]:
    """Bool bounds ``(n, q sub-tiles, kv sub-tiles)`` of the mask over each sub-tile."""
    n = len(b)
    q_lo, q_hi = q_tiling.ranges(qi)
    kv_lo, kv_hi = kv_tiling.ranges(ki)
    lo, hi = _interval.evaluate(
        p.mask_mod,
        p.point(b.view(n, 1, 1), 0),
        p.point(h.view(n, 1, 1), 1),
        p.ranges(q_lo[:, :, None], q_hi[:, :, None], 2, exact=q_tiling.size == 1),
        p.ranges(kv_lo[:, None, :], kv_hi[:, None, :], 3, exact=kv_tiling.size == 1),
    )
    shape = (n, q_tiling.count, kv_tiling.count)
    return lo.expand(shape), hi.expand(shape)


def _verdict(lo: Tensor, hi: Tensor) -> Tensor:
    """int8 state of each block from the bounds ``(n, ...)`` of its sub-tiles."""
    dims = tuple(range(1, lo.dim()))
    some_kept, some_dropped = lo.any(dim=dims), ~hi.all(dim=dims)
    verdict = torch.full(lo.shape[:1], _UNDECIDED, dtype=torch.int8, device=lo.device)
    verdict.masked_fill_(some_kept & some_dropped, _PARTIAL)
    verdict.masked_fill_(lo.all(dim=dims), _FULL)
    return verdict.masked_fill_(~hi.any(dim=dims), _EMPTY)


def _evaluate_tiles(
    p: _Problem,
    q_tiling: _Tiling,
    kv_tiling: _Tiling,
    blocks: tuple[Tensor, Tensor, Tensor, Tensor],
    tile_idx: Tensor,
    lo: Tensor,
) -> tuple[Tensor, Tensor]:
    """Whether some / every position of each sub-tile is kept.

    Certain sub-tiles are read from their bounds ``lo``; those in
    ``tile_idx`` (flat indices into ``lo``) are evaluated exactly.
    """
    some = lo.clone(memory_format=torch.contiguous_format)
    every = lo.clone(memory_format=torch.contiguous_format)
    b, h, qi, ki = blocks
    per_block, kv_count = lo.shape[1] * lo.shape[2], lo.shape[2]
    vmapped = _mask_utils.vmap_blocks(p.mask_mod)
    batch = max(1, p.exact_budget // (q_tiling.size * kv_tiling.size))
    some_flat, every_flat = some.view(-1), every.view(-1)
    for start in range(0, len(tile_idx), batch):
        t = tile_idx[start : start + batch]
        block = t.div(per_block, rounding_mode="floor")
        q = q_tiling.positions(qi[block], (t % per_block).div(kv_count, rounding_mode="floor"))
        kv = kv_tiling.positions(ki[block], t % kv_count)
        keep = _mask_utils.evaluate_blocks(p.mask_mod, vmapped, b[block], h[block], q, kv)
        some_flat[t] = keep.any(dim=(1, 2))
        every_flat[t] = keep.all(dim=(1, 2))
    return some, every


def _undecided_batches(states: Tensor, batch: int, scan: int) -> Iterator[Tensor]:
    """Flat indices of the undecided blocks, ``batch`` at a time.

    ``states`` is read ``scan`` entries at a time, so the bool temporaries
    stay small; a caller may settle the blocks of a batch before the next.
    """
    flat = states.view(-1)
    pending: list[Tensor] = []
    count = 0
    for start in range(0, flat.numel(), scan):
        found = (flat[start : start + scan] == _UNDECIDED).nonzero().squeeze(1) + start
        pending.append(found)
        count += len(found)
        while count >= batch:
            ready = torch.cat(pending)
            yield ready[:batch]
            pending, count = [ready[batch:]], count - batch
    if count:
        yield torch.cat(pending)


def _coords(idx: Tensor, grid: torch.Size) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(b, h, q block, kv block) of flat indices into a contiguous ``grid``."""
    _, H, nq, nkv = grid
    rest, ki = idx.div(nkv, rounding_mode="floor"), idx.remainder(nkv)
    rest, qi = rest.div(nq, rounding_mode="floor"), rest.remainder(nq)
    return rest.div(H, rounding_mode="floor"), rest.remainder(H), qi, ki
