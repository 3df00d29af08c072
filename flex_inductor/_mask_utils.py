"""Evaluating a mask_mod over a (b, h, q_idx, kv_idx) grid, chunk by chunk.

The grid of a long sequence does not fit in memory (131072**2 bools are
16 GiB, and a mask_mod's integer temporaries are 8 bytes a position), so
``create_block_mask`` and ``create_mask`` walk it in chunks of whole blocks
and keep only what each chunk reduces to.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flex_inductor._compat import transform_getitem_to_index

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Positions evaluated at once on CPU: 32 MiB of bools, and 256 MiB for each
# int64 temporary a mask_mod makes (``q_idx - kv_idx``). Smaller chunks pay
# more per-chunk overhead (vmap's Python, a dozen small ops that each wait
# for every thread); larger ones run no faster and cost memory.
CPU_CHUNK_ELEMENTS = 1 << 25
# On an accelerator a chunk takes microseconds and the per-chunk Python
# dominates, so chunks are 8x larger: 256 MiB of bools, 2 GiB per int64
# temporary, still far below a dense Q_LEN x KV_LEN mask at long lengths.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 28


def default_chunk_elements(device: torch.device) -> int:
    """The chunk size, in positions, for evaluating on ``device``."""
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def name_of(mask_mod: Callable) -> str:
    """A readable name for error messages and reprs."""
    return getattr(mask_mod, "__name__", type(mask_mod).__name__)


def check_signature(mask_mod: Callable) -> None:
    """Raises TypeError unless ``mask_mod`` takes exactly (b, h, q_idx, kv_idx)."""
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    try:
        params = inspect.signature(mask_mod).parameters.values()
    except (TypeError, ValueError):
        return  # builtins without a signature: let the probe call decide
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    required = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty
    ]
    if len(required) != 4:
        hint = " (a score_mod takes 5; pass a mask_mod here)" if len(required) == 5 else ""
        raise TypeError(
            f"mask_mod {name_of(mask_mod)!r} must take 4 positional arguments "
            f"(b, h, q_idx, kv_idx), but it takes {len(required)}{hint}"
        )


@contextlib.contextmanager
def evaluation_mode() -> Iterator[None]:
    """No autograd, and ``table[idx]`` evaluated as ``aten.index``.

    torch's create_mask does the same: indexing then runs the op that the
    compiled kernels trace (an int index becomes a 0-d tensor too), so a
    mask_mod means the same thing here as inside attention.
    """
    with torch.no_grad(), transform_getitem_to_index()():
        yield


def _check_result(mask_mod: Callable, out: object, expected_dim: int) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"mask_mod {name_of(mask_mod)!r} must return a bool tensor, got {type(out).__name__}"
        )
    if out.dtype != torch.bool:
        raise TypeError(
            f"mask_mod {name_of(mask_mod)!r} must return a bool tensor, got dtype {out.dtype}"
            " (compare with a threshold, e.g. `q_idx >= kv_idx`)"
        )
    if out.dim() != expected_dim:
        raise TypeError(
            f"mask_mod {name_of(mask_mod)!r} must return a 0-d tensor per position, "
            f"got shape {tuple(out.shape[expected_dim:])}"
        )


def probe(mask_mod: Callable, device: torch.device) -> None:
    """Calls ``mask_mod`` once at (0, 0, 0, 0) to check what it returns.

    Args:
        mask_mod: The mask_mod to check.
        device: Device of the index tensors.

    Raises:
        TypeError: If it does not return a 0-d bool tensor.
    """
    zero = torch.zeros((), dtype=torch.int64, device=device)
    with evaluation_mode():
        out = mask_mod(zero, zero, zero, zero)
    _check_result(mask_mod, out, expected_dim=0)


def vmap_bhqkv(mask_mod: MaskMod) -> MaskMod:
    """Lifts an elementwise mask_mod to 1-d index vectors: out[b, h, q, kv].

    Nested vmaps, innermost over kv, reproduce the elementwise semantics
    exactly (a mod may reduce, e.g. ``table[q_idx].sum()``), and vmap keeps
    an output that does not depend on b or h as a stride-0 expansion, which
    :func:`block_states` exploits. A b or h of length 1 is passed as a 0-d
    tensor instead of through a vmap level of size 1 (the same values): each
    level costs Python overhead on every chunk.
    """
    over_q_kv = torch.vmap(
        torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)
    )
    over_h = torch.vmap(over_q_kv, in_dims=(None, 0, None, None))
    lifted = {
        (False, False): over_q_kv,
        (False, True): over_h,
        (True, False): torch.vmap(over_q_kv, in_dims=(0, None, None, None)),
        (True, True): torch.vmap(over_h, in_dims=(0, None, None, None)),
    }

    def bhqkv(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        many_b, many_h = len(b) > 1, len(h) > 1
        out = lifted[many_b, many_h](b if many_b else b[0], h if many_h else h[0], q_idx, kv_idx)
        if not isinstance(out, Tensor):
            return out  # left for evaluate() to reject
        if not many_h:
            out = out.unsqueeze(1 if many_b else 0)
        if not many_b:
            out = out.unsqueeze(0)
        return out

    return bhqkv


def vmap_blocks(mask_mod: MaskMod) -> MaskMod:
    """Lifts an elementwise mask_mod to a batch of blocks: out[n, i, j].

    ``out[n, i, j] = mask_mod(b[n], h[n], q[n, i], kv[n, j])``, with ``b`` and
    ``h`` of shape ``(n,)`` and ``q``, ``kv`` of shape ``(n, rows)``,
    ``(n, cols)``: the same nested vmaps as :func:`vmap_bhqkv`, under one more
    over the blocks, so the mask_mod still sees 0-d tensors.
    """
    over_q_kv = torch.vmap(
        torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)
    )
    return torch.vmap(over_q_kv, in_dims=(0, 0, 0, 0))


def evaluate_blocks(
    mask_mod: Callable, vmapped: MaskMod, b: Tensor, h: Tensor, q: Tensor, kv: Tensor
) -> Tensor:
    """The keep-mask ``(n, rows, cols)`` of a batch of blocks.

    Args:
        mask_mod: The user's mask_mod, for error messages.
        vmapped: ``vmap_blocks(mask_mod)``.
        b: Batch index of each block, int64 ``(n,)``.
        h: Head index of each block, int64 ``(n,)``.
        q: Query positions of each block, int64 ``(n, rows)``.
        kv: Key/value positions of each block, int64 ``(n, cols)``.

    Returns:
        A bool tensor.
    """
    return _evaluate_checked(mask_mod, vmapped, (b, h, q, kv), expected_dim=3)


def _evaluate_checked(mask_mod: Callable, vmapped: MaskMod, args, expected_dim: int) -> Tensor:
    """``vmapped(*args)`` in evaluation mode, its result checked to be a bool mask."""
    with evaluation_mode():
        out = vmapped(*args)
    _check_result(mask_mod, out, expected_dim=expected_dim)
    return out


def evaluate(
    mask_mod: Callable, vmapped: MaskMod, b: Tensor, h: Tensor, q: Tensor, kv: Tensor
) -> Tensor:
    """The keep-mask ``(len(b), len(h), len(q), len(kv))`` of one chunk.

    Args:
        mask_mod: The user's mask_mod, for error messages.
        vmapped: ``vmap_bhqkv(mask_mod)``.
        b: Batch indices, 1-d int64.
        h: Head indices, 1-d int64.
        q: Query positions, 1-d int64.
        kv: Key/value positions, 1-d int64.

    Returns:
        A bool tensor; dimensions the mask does not depend on may be stride-0
        expansions.
    """
    return _evaluate_checked(mask_mod, vmapped, (b, h, q, kv), expected_dim=4)


@dataclass(frozen=True)
class Chunk:
    """A box of the grid, in blocks for q and kv and in indices for b and h."""

    b: slice
    h: slice
    q_blocks: slice
    kv_blocks: slice


def plan_chunks(
    grid: tuple[int, int, int, int],
    block_size: tuple[int, int],
    budget: int,
    free_dims: tuple[bool, bool] = (False, False),
) -> list[Chunk]:
    """Splits a grid of blocks into chunks of at most ``budget`` positions.

    Chunks grow from the innermost (kv) dimension outwards, so that a chunk
    is a run of whole query-block rows whenever one row fits. A single block
    is the smallest chunk, so the true bound is ``max(budget, block area)``.

    Args:
        grid: (B, H, num_q_blocks, num_kv_blocks).
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        budget: Most positions per chunk.
        free_dims: For (b, h): True when the mask does not depend on that
            index; the dimension is then taken whole and costs no memory
            (vmap returns it as a stride-0 expansion).

    Returns:
        The chunks, covering the grid exactly once.
    """
    B, H, nq, nkv = grid
    area = block_size[0] * block_size[1]
    kc = min(nkv, max(1, budget // area))
    qc = min(nq, max(1, budget // (area * kc))) if kc == nkv else 1
    cost = area * kc * qc
    hc = H if free_dims[1] else (min(H, max(1, budget // cost)) if qc == nq else 1)
    cost *= 1 if free_dims[1] else hc
    bc = B if free_dims[0] else (min(B, max(1, budget // cost)) if hc == H else 1)
    return [
        Chunk(
            slice(b0, min(b0 + bc, B)),
            slice(h0, min(h0 + hc, H)),
            slice(q0, min(q0 + qc, nq)),
            slice(k0, min(k0 + kc, nkv)),
        )
        for b0 in range(0, B, bc)
        for h0 in range(0, H, hc)
        for q0 in range(0, nq, qc)
        for k0 in range(0, nkv, kc)
    ]


def free_dims(vmapped: MaskMod, mask_mod: Callable, B: int, H: int, device) -> tuple[bool, bool]:
    """Whether the mask ignores b and h, read from vmap's output strides.

    Only used to size chunks: a wrong answer costs memory, never correctness.
    """
    if B == 1 and H == 1:
        return (True, True)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    out = evaluate(
        mask_mod,
        vmapped,
        torch.arange(B, device=device),
        torch.arange(H, device=device),
        one,
        one,
    )
    return (B == 1 or out.stride(0) == 0, H == 1 or out.stride(1) == 0)


def chunk_positions(chunk: Chunk, block_size: tuple[int, int], seq_lengths, device):
    """The 1-d index vectors (b, h, q, kv) of a chunk, clipped to the sequences."""
    QB, KB = block_size
    Q_LEN, KV_LEN = seq_lengths
    return (
        torch.arange(chunk.b.start, chunk.b.stop, device=device),
        torch.arange(chunk.h.start, chunk.h.stop, device=device),
        torch.arange(
            chunk.q_blocks.start * QB, min(chunk.q_blocks.stop * QB, Q_LEN), device=device
        ),
        torch.arange(
            chunk.kv_blocks.start * KB, min(chunk.kv_blocks.stop * KB, KV_LEN), device=device
        ),
    )


def _group_sizes(n: int, size: int, device: torch.device) -> Tensor:
    """int32 lengths of consecutive groups of ``size`` covering ``n``; the last may be short.

    The short group is the part of the last block that lies inside the
    sequence: positions past the end do not exist, so nothing is padded in.
    Built on the device (no host-to-device copy, which would make the host
    wait for the device on every chunk).
    """
    starts = torch.arange(0, n, size, dtype=torch.int32, device=device)
    return (n - starts).clamp_(max=size)


# A bool is one byte, 0 or 1. Read eight of them as one int64 word and add up
# to 255 words: each byte of the sum counts the ones in its lane without
# carrying into the next, so one pass counts eight positions per add.
_BYTES_PER_WORD = 8
_MAX_WORDS_PER_SUM = 255


def _count_in_words(x: Tensor, size: int) -> Tensor | None:
    """Ones per group of ``size`` along the last dim of a 0/1 uint8 tensor, via words.

    Returns None when ``size`` does not allow it (the caller falls back).
    """
    words = size // _BYTES_PER_WORD
    if size % _BYTES_PER_WORD or not 0 < words <= _MAX_WORDS_PER_SUM:
        return None
    if (
        x.storage_offset() % _BYTES_PER_WORD
        or any(st % _BYTES_PER_WORD for st in x.stride()[:-1])
        or x.stride(-1) != 1
    ):
        # Rows do not start on a word: copy into fresh, canonically strided
        # storage (one cheap pass; .contiguous() may keep odd strides on
        # size-1 dims, which the dtype view rejects).
        x = torch.empty(x.shape, dtype=torch.uint8, device=x.device).copy_(x.view(torch.uint8))
    lanes = x.view(torch.int64).unflatten(-1, (-1, words)).sum(-1)
    return lanes.view(torch.uint8).unflatten(-1, (-1, _BYTES_PER_WORD)).sum(-1, dtype=torch.int32)


def _count_groups(x: Tensor, dim: int, size: int) -> Tensor:
    """int32 number of nonzeros per group of ``size`` along ``dim`` (last group short).

    ``x`` is uint8 0/1 (a bool tensor viewed as bytes: summing bools with a
    wider dtype takes a much slower path in torch).
    """
    n = x.shape[dim]
    main = n - n % size
    parts = []
    if main:
        head = x.narrow(dim, 0, main)
        counts = _count_in_words(head, size) if dim == x.dim() - 1 else None
        if counts is None:
            counts = head.unflatten(dim, (main // size, size)).sum(dim + 1, dtype=torch.int32)
        parts.append(counts)
    if main < n:
        parts.append(x.narrow(dim, main, n - main).sum(dim, keepdim=True, dtype=torch.int32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def block_states(mask: Tensor, block_size: tuple[int, int]) -> Tensor:
    """Classifies each block of an evaluated chunk: 0 empty, 1 partial, 2 full.

    Args:
        mask: ``(b, h, rows, cols)`` bool, rows and cols starting on block
            boundaries.
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).

    Returns:
        int8 ``(b', h', row_blocks, col_blocks)``, where b' (h') is 1 when
        ``mask`` is a stride-0 expansion along that dimension; it broadcasts.
    """
    for dim in (0, 1):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            # Every slice is the same tensor: classify it once.
            mask = mask.narrow(dim, 0, 1)
    QB, KB = block_size
    # Count along kv first: it is contiguous and the result is KB times
    # smaller, so the count along q is cheap.
    counts = _count_groups(_count_groups(mask.view(torch.uint8), 3, KB), 2, QB)
    rows = _group_sizes(mask.shape[2], QB, mask.device)
    cols = _group_sizes(mask.shape[3], KB, mask.device)
    # Positions that exist in each block: full means all of them are kept.
    size = rows[:, None] * cols[None, :]
    return (counts > 0).to(torch.int8) + (counts == size).to(torch.int8)


def evaluate_block_states(
    mask_mod: MaskMod,
    shape: tuple[int, int, int, int],
    block_size: tuple[int, int],
    device: torch.device,
    chunk_elements: int | None = None,
    free: tuple[bool, bool] | None = None,
) -> Tensor:
    """Block classification of ``mask_mod`` over ``(B, H, Q_LEN, KV_LEN)``, densely.

    Every position is evaluated; ``_block_eval.evaluate_block_states`` is the
    faster entry that falls back to this.

    Args:
        mask_mod: A checked mask_mod.
        shape: (B, H, Q_LEN, KV_LEN).
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        device: Where to evaluate.
        chunk_elements: Most positions evaluated at once; None for the
            device's default.
        free: Whether the mask ignores (b, h), when already known (it only
            sizes chunks); None to ask vmap.

    Returns:
        int8 ``(B, H, num_q_blocks, num_kv_blocks)``: 0 empty, 1 partial, 2 full.
    """
    B, H, Q_LEN, KV_LEN = shape
    QB, KB = block_size
    grid = (B, H, math.ceil(Q_LEN / QB), math.ceil(KV_LEN / KB))
    vmapped = vmap_bhqkv(mask_mod)
    states = torch.empty(grid, dtype=torch.int8, device=device)
    if free is None:
        free = free_dims(vmapped, mask_mod, B, H, device)
    budget = chunk_elements or default_chunk_elements(device)
    for chunk in plan_chunks(grid, block_size, budget, free):
        idx = chunk_positions(chunk, block_size, (Q_LEN, KV_LEN), device)
        mask = evaluate(mask_mod, vmapped, *idx)
        states[chunk.b, chunk.h, chunk.q_blocks, chunk.kv_blocks] = block_states(mask, block_size)
    return states


def evaluate_dense(
    mask_mod: MaskMod,
    shape: tuple[int, int, int, int],
    device: torch.device,
    chunk_elements: int | None = None,
) -> Tensor:
    """The dense bool keep-mask ``(B, H, Q_LEN, KV_LEN)`` of ``mask_mod``.

    The result itself is dense; chunking bounds only the mask_mod's
    temporaries.
    """
    B, H, Q_LEN, KV_LEN = shape
    # The chunk geometry needs some block size; 128 keeps rows contiguous.
    block_size = (128, 128)
    grid = (B, H, math.ceil(Q_LEN / 128), math.ceil(KV_LEN / 128))
    vmapped = vmap_bhqkv(mask_mod)
    out = torch.empty(shape, dtype=torch.bool, device=device)
    budget = chunk_elements or default_chunk_elements(device)
    for chunk in plan_chunks(grid, block_size, budget):
        b, h, q, kv = chunk_positions(chunk, block_size, (Q_LEN, KV_LEN), device)
        q0, kv0 = chunk.q_blocks.start * 128, chunk.kv_blocks.start * 128
        rows = slice(q0, q0 + len(q))
        cols = slice(kv0, kv0 + len(kv))
        out[chunk.b, chunk.h, rows, cols] = evaluate(mask_mod, vmapped, b, h, q, kv)
    return out


def _index_map(
    sel: list[int], n: int, unit: int, device: torch.device
) -> Callable[[Tensor], Tensor] | None:
    """Maps an index of a sliced dimension back to the original index.

    Args:
        sel: The selected entries (batches, heads, or query blocks).
        n: Size of the original dimension.
        unit: 0 for batch and head entries; Q_BLOCK_SIZE for query blocks,
            whose positions map block by block.
        device: Where a lookup table must live.

    Returns:
        The map, or None when it is the identity.
    """
    if sel == list(range(n)) or (unit == 0 and n == 1):
        # Unchanged, or a broadcast (size-1) dimension that keeps broadcasting.
        return None
    start = sel[0]
    steps = {b - a for a, b in itertools.pairwise(sel)}
    if unit == 0:
        if len(sel) == 1:
            # One entry kept: it applies to every index the result is used with.
            return lambda i: i * 0 + start
        if len(steps) == 1 and (step := steps.pop()) > 0:
            return lambda i: i * step + start
        table = torch.tensor(sel, dtype=torch.int64, device=device)
        return lambda i: table[i]
    if steps <= {1}:
        return lambda q: q + start * unit
    if len(steps) == 1 and (step := steps.pop()) > 0:
        return lambda q: (q // unit * step + start) * unit + q % unit
    table = torch.tensor(sel, dtype=torch.int64, device=device)
    return lambda q: table[q // unit] * unit + q % unit


def remap_mask_mod(
    mask_mod: MaskMod, sel: list[Tensor], sizes: tuple[int, int, int], q_block: int
) -> MaskMod:
    """The mask_mod of a sliced BlockMask, in the slice's own indices.

    Args:
        mask_mod: The original mask_mod.
        sel: 1-d tensors of the selected batches, heads and query blocks.
        sizes: Original (B, H, num_q_blocks).
        q_block: Q_BLOCK_SIZE.

    Returns:
        ``mask_mod`` itself when nothing moved, else a wrapper named
        ``<name>_sliced`` that calls it with the original indices.
    """
    maps = [
        _index_map(s.tolist(), n, unit, s.device)
        for s, n, unit in zip(sel, sizes, (0, 0, q_block), strict=True)
    ]
    if all(m is None for m in maps):
        return mask_mod
    map_b, map_h, map_q = (m or (lambda i: i) for m in maps)

    def sliced(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(map_b(b), map_h(h), map_q(q_idx), kv_idx)

    sliced.__name__ = sliced.__qualname__ = f"{name_of(mask_mod)}_sliced"
    return sliced
