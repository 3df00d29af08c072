"""BlockMask: which (query block, kv block) tiles attention visits, and how.

A block is *empty* (skipped), *partial* (visited, mask_mod applied) or
*full* (visited, mask_mod skipped). The kernels read, per query block, the
sorted list of partial kv blocks and the list of full kv blocks; the
backward reads the transposed lists, per kv block. See docs/blockmask.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from flex_inductor import _block_eval, _mask_utils
from flex_inductor._compat import pytree_getattr_key, register_pytree_node
from flex_inductor.combinators import MaskMod, noop_mask

_DEFAULT_BLOCK_SIZE = 128
_EMPTY, _PARTIAL, _FULL = 0, 1, 2

# Names of the eight tensors, in the order of _flatten_tensors().
_TENSOR_NAMES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def _pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, int):
        return (block_size, block_size)
    # No int(): under tracing a size may be symbolic, and int() would pin it.
    q, kv = block_size
    return (q, kv)


# Block index dtypes the kernels read. int16 halves the layout's memory (the
# four index tensors of a 1M-token mask are 1 GiB in int32) and holds block
# indices and counts up to 32767.
INDEX_DTYPES = (torch.int32, torch.int16)


def _check_index_dtype(index_dtype: Any, num_blocks: tuple[int, int]) -> None:
    """Raises unless ``index_dtype`` is one of ``INDEX_DTYPES`` and holds every block index."""
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"`index_dtype` must be torch.int32 or torch.int16, got {index_dtype!r}")
    limit = torch.iinfo(index_dtype).max
    if max(num_blocks) > limit:
        raise ValueError(
            f"`index_dtype` {index_dtype} holds block indices and counts up to {limit}, but "
            f"the layout has (nq, nkv) = {tuple(num_blocks)} blocks; use torch.int32 or "
            "larger blocks"
        )


# Entries ranked at once by _dense_to_ordered: with its int64 temporaries
# (about 22 bytes an entry) a chunk costs about 90 MiB, whatever the size of
# the layout (a full 1M-token layout is 67M entries, 16 chunks).
_ORDER_CHUNK_ENTRIES = 1 << 22


def _dense_to_ordered(
    dense: Tensor, value: int | None = None, dtype: torch.dtype = torch.int32
) -> tuple[Tensor, Tensor]:
    """(count, indices) of the selected entries of each row, ascending.

    The indices of the other entries follow, also ascending, so the padding
    is made of valid block indices that kernels may prefetch safely.

    Args:
        dense: ``(..., rows, cols)``. Leading dimensions that are stride-0
            expansions are computed once.
        value: Entries equal to it are selected; None selects the nonzero ones.
        dtype: Of the counts and indices (one of ``INDEX_DTYPES``).

    Returns:
        Counts ``(..., rows)`` and indices ``(..., rows, cols)``, both contiguous.
    """
    shape = dense.shape
    for dim in range(dense.dim() - 2):
        if dense.shape[dim] > 1 and dense.stride(dim) == 0:
            dense = dense.narrow(dim, 0, 1)
    rows, cols = dense.shape[-2:]
    mats = dense.reshape(-1, rows, cols)
    num = torch.empty(mats.shape[:-1], dtype=dtype, device=dense.device)
    indices = torch.empty(mats.shape, dtype=dtype, device=dense.device)
    col_ids = torch.arange(cols, device=dense.device)
    for mat_rows in _row_chunks(*mats.shape):
        _rank_rows(mats[mat_rows], value, col_ids, num[mat_rows], indices[mat_rows])
    lead = dense.shape[:-2]
    num = num.view(*lead, rows).expand(shape[:-1]).contiguous()
    return num, indices.view(*lead, rows, cols).expand(shape).contiguous()


def _row_chunks(mats: int, rows: int, cols: int) -> Iterator[tuple[slice, slice]]:
    """(matrices, rows) slices of at most about _ORDER_CHUNK_ENTRIES entries each."""
    if rows * cols <= _ORDER_CHUNK_ENTRIES:
        step = _ORDER_CHUNK_ENTRIES // (rows * cols)
        for m in range(0, mats, step):
            yield slice(m, m + step), slice(None)
        return
    step = max(1, _ORDER_CHUNK_ENTRIES // cols)
    for m in range(mats):
        for r in range(0, rows, step):
            yield slice(m, m + 1), slice(r, r + step)


def _rank_rows(x: Tensor, value: int | None, col_ids: Tensor, num: Tensor, out: Tensor) -> None:
    """Writes the count and the ordered indices of the selected entries of ``x``'s rows.

    A rank per entry, then one scatter: selected entries take ranks 0, 1, ...
    in column order, the others follow in column order (a stable partition,
    without sorting).
    """
    if x.stride(-1) != 1:
        # A transposed view: one copy, so that every op below runs along memory.
        x = x.contiguous()
    selected = x != 0 if value is None else x == value
    ranks = selected.cumsum(-1)  # selected entries up to and including each column
    count = ranks[..., -1:].clone()
    num.copy_(count.squeeze(-1))
    ranks -= 1  # the rank of a selected entry
    # An other entry follows all selected ones and the other entries before it.
    others = torch.sub(col_ids, ranks).add_(count - 1)
    torch.where(selected, ranks, others, out=ranks)
    out.scatter_(-1, ranks, col_ids.to(out.dtype).expand(ranks.shape))


def _ordered_to_dense(num: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """Inverse of :func:`_dense_to_ordered`: a 0/1 int32 tensor ``(..., num_cols)``."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < num.unsqueeze(-1)
    # Entries past the count are scattered into a spare column, then dropped.
    cols = torch.where(valid, indices.long(), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.int32, device=num.device)
    dense.scatter_(-1, cols, 1)
    return dense[..., :num_cols]


def _to_4d(t: Tensor | None, extra: int) -> Tensor | None:
    """Prepends size-1 batch/head dimensions so that t has ``2 + extra`` dims."""
    if t is None:
        return None
    if not extra <= t.dim() <= 2 + extra:
        raise ValueError(f"expected a tensor with {2 + extra} dims (B, H, ...), got {t.dim()}")
    while t.dim() < 2 + extra:
        t = t.unsqueeze(0)
    return t


class BlockMask:
    """A block-sparse attention mask: the block layout plus the mask_mod.

    Shapes (B and H may be 1 to broadcast over batch and heads;
    nq = ceil(Q_LEN / Q_BLOCK_SIZE), nkv = ceil(KV_LEN / KV_BLOCK_SIZE)):

    * ``kv_num_blocks`` ``(B, H, nq)`` and ``kv_indices`` ``(B, H, nq, nkv)``,
      int32 (or int16, see ``index_dtype``): per query block, the partial kv
      blocks (mask_mod applied), ascending, then padding made of valid block
      indices.
    * ``full_kv_num_blocks`` / ``full_kv_indices``: the same for full blocks
      (mask_mod skipped), or None (then every visited block is partial).
    * ``q_num_blocks`` ``(B, H, nkv)`` / ``q_indices`` ``(B, H, nkv, nq)`` and
      ``full_q_num_blocks`` / ``full_q_indices``: the transposed view, per kv
      block, read by the backward.

    Attributes:
        seq_lengths: (Q_LEN, KV_LEN).
        BLOCK_SIZE: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        mask_mod: The mask_mod applied inside partial blocks.
    """

    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int]
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor | None
    full_kv_indices: Tensor | None
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor | None
    full_q_indices: Tensor | None
    mask_mod: MaskMod

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None = None,
        full_kv_indices: Tensor | None = None,
        q_num_blocks: Tensor | None = None,
        q_indices: Tensor | None = None,
        full_q_num_blocks: Tensor | None = None,
        full_q_indices: Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
        mask_mod: MaskMod | None = None,
    ) -> None:
        """Stores the layout as given; see :meth:`from_kv_blocks` for the usual entry.

        Only checks shapes (it runs under tracing too). A missing transposed
        view is computed from the kv view.

        Raises:
            ValueError: If shapes disagree with each other or with the lengths.
        """
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        self.seq_lengths = (seq_lengths[0], seq_lengths[1])
        self.BLOCK_SIZE = _pair(BLOCK_SIZE)
        self.mask_mod = noop_mask if mask_mod is None else mask_mod
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self._check_kv_shapes()
        if q_num_blocks is None or q_indices is None:
            q_num_blocks, q_indices = self._transpose(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                full_q_num_blocks, full_q_indices = self._transpose(
                    full_kv_num_blocks, full_kv_indices
                )
        if (full_q_num_blocks is None) != (full_kv_num_blocks is None):
            raise ValueError("full_q_* must be given exactly when full_kv_* are")
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices

    def _check_kv_shapes(self) -> None:
        nq, nkv = self._num_blocks()
        for num, idx in (
            (self.kv_num_blocks, self.kv_indices),
            (self.full_kv_num_blocks, self.full_kv_indices),
        ):
            if idx is None:
                continue
            if idx.dim() != 4 or tuple(num.shape) != tuple(idx.shape[:-1]):
                raise ValueError(
                    "expected num_blocks (B, H, nq) and indices (B, H, nq, nkv), "
                    f"got {tuple(num.shape)} and {tuple(idx.shape)}"
                )
            if tuple(idx.shape[-2:]) != (nq, nkv):
                raise ValueError(
                    f"indices of shape {tuple(idx.shape)} do not match seq_lengths "
                    f"{self.seq_lengths} with BLOCK_SIZE {self.BLOCK_SIZE}: expected "
                    f"(nq, nkv) = ({nq}, {nkv})"
                )

    def _num_blocks(self) -> tuple[int, int]:
        (q_len, kv_len), (qb, kvb) = self.seq_lengths, self.BLOCK_SIZE
        return (q_len + qb - 1) // qb, (kv_len + kvb - 1) // kvb

    @staticmethod
    def _transpose(num: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        dense = _ordered_to_dense(num, indices, indices.shape[-1])
        return _dense_to_ordered(dense.transpose(-2, -1), dtype=indices.dtype)

    @property
    def index_dtype(self) -> torch.dtype:
        """The dtype of the block counts and indices: torch.int32 or torch.int16."""
        return self.kv_indices.dtype

    # ------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None = None,
        full_kv_indices: Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
        mask_mod: MaskMod | None = None,
        seq_lengths: tuple[int, int] | None = None,
        *,
        index_dtype: torch.dtype = torch.int32,
    ) -> BlockMask:
        """Builds a BlockMask from the kv view; the transposed view is computed.

        Args:
            kv_num_blocks: Partial blocks per query block, ``(B, H, nq)``.
                Leading size-1 dims may be left out (``(nq,)`` or ``(H, nq)``).
            kv_indices: Their kv block indices, ``(B, H, nq, nkv)``.
            full_kv_num_blocks: Full blocks per query block, or None.
            full_kv_indices: Their kv block indices, or None.
            BLOCK_SIZE: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
            mask_mod: Applied inside partial blocks; ``noop_mask`` if None.
            seq_lengths: (Q_LEN, KV_LEN); defaults to (nq * Q_BLOCK_SIZE,
                nkv * KV_BLOCK_SIZE).
            index_dtype: Of the stored counts and indices: torch.int32 (as
                torch's BlockMask), or torch.int16 for half the memory when
                both block counts are at most 32767.

        Returns:
            The BlockMask, with contiguous index tensors of ``index_dtype``.

        Raises:
            TypeError: If ``index_dtype`` is not torch.int32 or torch.int16.
            ValueError: On inconsistent shapes, a lone full_kv_* tensor, or
                more blocks than ``index_dtype`` holds.
        """
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        block_size = _pair(BLOCK_SIZE)
        kv_num_blocks, full_kv_num_blocks = (
            _to_4d(t, 1) for t in (kv_num_blocks, full_kv_num_blocks)
        )
        kv_indices, full_kv_indices = (_to_4d(t, 2) for t in (kv_indices, full_kv_indices))
        if seq_lengths is None:
            seq_lengths = (
                kv_indices.shape[-2] * block_size[0],
                kv_indices.shape[-1] * block_size[1],
            )

        _check_index_dtype(index_dtype, kv_indices.shape[-2:])

        def stored(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(index_dtype).contiguous()

        return cls(
            seq_lengths,
            stored(kv_num_blocks),
            stored(kv_indices),
            stored(full_kv_num_blocks),
            stored(full_kv_indices),
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
        )

    @classmethod
    def _from_states(
        cls,
        states: Tensor,
        seq_lengths: tuple[int, int],
        block_size: tuple[int, int],
        mask_mod: MaskMod,
        index_dtype: torch.dtype = torch.int32,
    ) -> BlockMask:
        """From a ``(B, H, nq, nkv)`` int8 map of 0 empty / 1 partial / 2 full.

        ``states`` may be a stride-0 expansion along B or H; the layout is
        then computed once and copied.
        """
        by_kv = states.transpose(-2, -1)
        return cls(
            seq_lengths,
            *_dense_to_ordered(states, _PARTIAL, index_dtype),
            *_dense_to_ordered(states, _FULL, index_dtype),
            *_dense_to_ordered(by_kv, _PARTIAL, index_dtype),
            *_dense_to_ordered(by_kv, _FULL, index_dtype),
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
        )

    # ------------------------------------------------------------------
    # Flat form: pytree, and the op's arguments
    # ------------------------------------------------------------------

    def _flatten_tensors(self) -> list[Tensor | None]:
        """The eight layout tensors, kv view then q view, partial then full."""
        return [getattr(self, name) for name in _TENSOR_NAMES]

    def _flatten_sizes(self) -> list[int]:
        """``[Q_LEN, KV_LEN, Q_BLOCK_SIZE, KV_BLOCK_SIZE]``."""
        return [*self.seq_lengths, *self.BLOCK_SIZE]

    @classmethod
    def _from_flat(
        cls, tensors: list[Tensor | None], sizes: list[int], mask_mod: MaskMod
    ) -> BlockMask:
        """Inverse of ``_flatten_tensors`` + ``_flatten_sizes`` (no recomputation)."""
        q_len, kv_len, qb, kvb = sizes
        return cls((q_len, kv_len), *tensors, BLOCK_SIZE=(qb, kvb), mask_mod=mask_mod)

    def as_tuple(self, flatten: bool = True) -> tuple[Any, ...]:
        """The fields as a tuple, in torch's order (without its dq_* extras).

        Args:
            flatten: If True, ``(Q_LEN, KV_LEN, *tensors, Q_BLOCK_SIZE,
                KV_BLOCK_SIZE, mask_mod)``; else ``(seq_lengths, *tensors,
                BLOCK_SIZE, mask_mod)``.

        Returns:
            The tuple.
        """
        if flatten:
            return (*self.seq_lengths, *self._flatten_tensors(), *self.BLOCK_SIZE, self.mask_mod)
        return (self.seq_lengths, *self._flatten_tensors(), self.BLOCK_SIZE, self.mask_mod)

    # ------------------------------------------------------------------
    # Dense views and statistics
    # ------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN); B and H are 1 when broadcast."""
        B, H = self.kv_indices.shape[:2]
        return (B, H, *self.seq_lengths)

    def numel(self) -> int:
        """B * H * Q_LEN * KV_LEN: positions covered, sparsity not counted."""
        return math.prod(self.shape)

    def _block_states(self) -> Tensor:
        """int8 ``(B, H, nq, nkv)``: 0 skipped, 1 partial, 2 full."""
        nkv = self.kv_indices.shape[-1]
        states = _ordered_to_dense(self.kv_num_blocks, self.kv_indices, nkv).to(torch.int8)
        if self.full_kv_num_blocks is not None:
            full = _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, nkv)
            # A malformed layout may list a block in both; report it as full.
            states = states.masked_fill(full.bool(), _FULL)
        return states

    def to_dense(self) -> Tensor:
        """int32 ``(B, H, nq, nkv)``: 1 where a block is visited (partial or full)."""
        return (self._block_states() != _EMPTY).to(torch.int32)

    def sparsity(self) -> float:
        """Percentage of blocks skipped, in [0, 100].

        Counted in blocks, so a short last block weighs as much as the others
        (torch counts positions and can go below 0 for such lengths; for
        lengths that are multiples of the block size the two agree).
        """
        visited = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            visited += int(self.full_kv_num_blocks.sum())
        return 100.0 * (1.0 - visited / self.kv_indices.numel())

    # ------------------------------------------------------------------
    # Indexing and devices
    # ------------------------------------------------------------------

    def __getitem__(self, index: Any) -> BlockMask:
        """Selects batches, heads and query blocks; kv blocks are kept whole.

        ``bm[b]``, ``bm[b, h]``, ``bm[b, h, q_blocks]``: each entry is an int,
        a slice, a list or a 1-d index tensor. Integers keep their dimension
        (size 1), so the result is always a 4-d BlockMask. The transposed
        view is recomputed, Q_LEN becomes the length of the selected query
        blocks, and ``mask_mod`` is wrapped to translate the new indices back
        to the original ones, so the result stays a faithful mask.

        Raises:
            IndexError: On more than 3 indices or an empty selection.
            ValueError: If the short last query block is selected anywhere
                but in the last position.
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError("BlockMask takes at most 3 indices: batch, head, query block")
        index = (*index, *(slice(None),) * (3 - len(index)))
        B, H, nq = self.kv_num_blocks.shape
        device = self.kv_indices.device
        sel = [
            torch.arange(n, device=device)[i].reshape(-1)
            for n, i in zip((B, H, nq), index, strict=True)
        ]
        if any(s.numel() == 0 for s in sel):
            raise IndexError("BlockMask index selects nothing")

        def pick(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            for dim, s in enumerate(sel):
                t = t.index_select(dim, s)
            return t.contiguous()

        q_len = self._selected_q_len(sel[2].tolist())
        mask_mod = _mask_utils.remap_mask_mod(self.mask_mod, sel, (B, H, nq), self.BLOCK_SIZE[0])
        return BlockMask(
            (q_len, self.seq_lengths[1]),
            pick(self.kv_num_blocks),
            pick(self.kv_indices),
            pick(self.full_kv_num_blocks),
            pick(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=mask_mod,
        )

    def _selected_q_len(self, q_blocks: list[int]) -> int:
        qb = self.BLOCK_SIZE[0]
        rows = [min(qb, self.seq_lengths[0] - m * qb) for m in q_blocks]
        if any(r < qb for r in rows[:-1]):
            raise ValueError(
                "the last query block is shorter than Q_BLOCK_SIZE, so it can only be "
                "selected in the last position"
            )
        return sum(rows)

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy with every tensor on ``device`` (the mask_mod is shared)."""
        return BlockMask._from_flat(
            [None if t is None else t.to(device) for t in self._flatten_tensors()],
            self._flatten_sizes(),
            self.mask_mod,
        )

    # ------------------------------------------------------------------
    # Pictures
    # ------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, "
            f"BLOCK_SIZE={self.BLOCK_SIZE}, mask_mod={_mask_utils.name_of(self.mask_mod)})"
        )

    def __str__(self) -> str:
        return f"{self!r}\n{self.to_string()}"

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """ASCII picture of the block layout: ``█`` full, ``░`` partial, `` `` empty.

        Each character pair summarises a cell of blocks, downsampled to fit
        ``grid_size``: full or empty only if every block in it is, else partial.

        Args:
            grid_size: Most (rows, cols) of cells; an int for both; -1 for no
                downsampling.
            limit: Most (batch, head) pictures to draw.

        Returns:
            The picture, one ``(b, h)`` section per batch and head.
        """
        states = self._block_states().cpu()
        B, H, nq, nkv = states.shape
        if grid_size == -1:
            max_rows, max_cols = nq, nkv
        else:
            max_rows, max_cols = _pair(grid_size)
        row_step, col_step = math.ceil(nq / max_rows), math.ceil(nkv / max_cols)
        sections = []
        for i, (b, h) in enumerate(itertools.product(range(B), range(H))):
            if i == limit:
                sections.append(
                    f"... ({B * H - limit} more; use to_string(limit=N) or index bm[b, h])"
                )
                break
            lines = [f"({b}, {h})"]
            for r in range(0, nq, row_step):
                cells = []
                for c in range(0, nkv, col_step):
                    cell = states[b, h, r : r + row_step, c : c + col_step]
                    if bool((cell == _FULL).all()):
                        cells.append("██")
                    elif bool((cell == _EMPTY).all()):
                        cells.append("  ")
                    else:
                        cells.append("░░")
                lines.append("".join(cells))
            sections.append("\n".join(lines))
        return "\n".join(sections)

    def save_png(self, path: str, *, limit: int = 4) -> str:
        """Saves the block layout as a PNG: full and partial blocks in two colours.

        Args:
            path: Where to write the file.
            limit: Most (batch, head) panels to draw, side by side.

        Returns:
            ``path``.

        Raises:
            ImportError: If matplotlib (the ``plot`` extra) is not installed.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as e:
            raise ImportError(
                "BlockMask.save_png needs matplotlib: pip install 'flex_inductor[plot]'"
            ) from e
        states = self._block_states().cpu()
        B, H = states.shape[:2]
        pairs = list(itertools.product(range(B), range(H)))[:limit]
        colours = torch.tensor(
            [[1.0, 1.0, 1.0], [0.96, 0.65, 0.14], [0.12, 0.40, 0.75]]  # empty, partial, full
        )
        # Figure without pyplot: no global state, no GUI backend needed.
        fig = Figure(figsize=(4 * len(pairs), 4.4))
        for k, (b, h) in enumerate(pairs):
            ax = fig.add_subplot(1, len(pairs), k + 1)
            ax.imshow(colours[states[b, h].long()].numpy(), interpolation="nearest")
            ax.set_title(f"b={b}, h={h}")
            ax.set_xlabel("kv block")
            ax.set_ylabel("query block")
        fig.legend(
            handles=[
                Patch(color=colours[_FULL].tolist(), label="full"),
                Patch(color=colours[_PARTIAL].tolist(), label="partial"),
            ],
            loc="upper right",
        )
        fig.suptitle(f"{_mask_utils.name_of(self.mask_mod)}: {self.sparsity():.1f}% sparse")
        fig.savefig(path, format="png")
        return path

    to_png = save_png


# ----------------------------------------------------------------------
# pytree: the tensors are the children, so BlockMask passes through
# torch.compile and torch.export like a tuple of tensors.
# ----------------------------------------------------------------------


def _pytree_flatten(bm: BlockMask) -> tuple[list[Tensor | None], tuple]:
    return bm._flatten_tensors(), (bm.seq_lengths, bm.BLOCK_SIZE, bm.mask_mod)


def _pytree_flatten_with_keys(bm: BlockMask) -> tuple[list[tuple[Any, Tensor | None]], tuple]:
    children, context = _pytree_flatten(bm)
    keys = [pytree_getattr_key(name) for name in _TENSOR_NAMES]
    return list(zip(keys, children, strict=True)), context


def _pytree_unflatten(children, context: tuple) -> BlockMask:
    seq_lengths, block_size, mask_mod = context
    return BlockMask._from_flat(list(children), [*seq_lengths, *block_size], mask_mod)


register_pytree_node(
    BlockMask,
    _pytree_flatten,
    _pytree_unflatten,
    serialized_type_name="flex_inductor.block_mask.BlockMask",
    flatten_with_keys_fn=_pytree_flatten_with_keys,
)


# ----------------------------------------------------------------------
# Creation
# ----------------------------------------------------------------------


def _default_device(device: torch.device | str | None) -> torch.device:
    # torch defaults to "cuda", which fails on CPU-only machines.
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_lengths(Q_LEN: int, KV_LEN: int) -> None:
    for name, n in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


def _batch_heads(B: int | None, H: int | None) -> tuple[int, int]:
    for name, n in (("B", B), ("H", H)):
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive int or None, got {n!r}")
    return B or 1, H or 1


def create_block_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
    _compile: bool = False,
    *,
    index_dtype: torch.dtype = torch.int32,
    _chunk_elements: int | None = None,
) -> BlockMask:
    """Builds the BlockMask of ``mask_mod``, mostly from bounds over whole blocks.

    ``mask_mod(b, h, q_idx, kv_idx)`` is first called with intervals (one per
    block: the range of positions it covers) instead of index tensors; the
    bool it returns bounds the mask over each block, which proves most blocks
    empty or full in ``O(nq * nkv)`` work rather than ``O(Q_LEN * KV_LEN)``.
    Undecided blocks are bounded again per sub-tile, and in those still
    undecided the uncertain sub-tiles are evaluated elementwise (nested vmap,
    as mask_mods are written for 0-d tensors). A mask_mod using an operation
    the intervals cannot bound soundly (see ``_interval``), or needing exact
    work on more than half of the grid, is evaluated elementwise everywhere,
    in chunks of whole blocks (32M positions on CPU). Either way peak memory
    does not grow with Q_LEN * KV_LEN, and the result is the same. A block is
    full when every position of it that lies inside the sequences is kept;
    positions past Q_LEN or KV_LEN do not exist and are never passed to
    ``mask_mod``.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool tensor``, written for 0-d tensors.
        B: Batch size, or None to broadcast over batch (size 1).
        H: Number of heads, or None to broadcast over heads (size 1).
        Q_LEN: Query length.
        KV_LEN: Key/value length.
        device: Where to evaluate and store; None picks cuda if available,
            else cpu.
        BLOCK_SIZE: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        _compile: Accepted for compatibility with torch and ignored: chunked
            eager evaluation is already bounded in memory.
        index_dtype: Of the stored block counts and indices. torch.int32 (the
            default, as torch's BlockMask) or torch.int16, which halves the
            layout's memory (a 1M-token mask at block 128: 0.5 GiB instead
            of 1 GiB) and needs both block counts to be at most 32767
            (4M tokens at block 128). The kernels read either.
        _chunk_elements: Most positions evaluated (or blocks bounded) at once;
            None for the defaults (4M blocks bounded, 16M positions of
            undecided blocks, and for the dense evaluation 32M positions on
            CPU, 256M elsewhere). Tests use tiny ones.

    Returns:
        The BlockMask, with full blocks separated from partial ones.

    Raises:
        TypeError: If ``mask_mod`` does not take 4 arguments or does not return
            a bool tensor, or ``index_dtype`` is not torch.int32 or torch.int16.
        ValueError: If a length or block size is not positive, or the layout
            has more blocks than ``index_dtype`` holds.

    Example:
        >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        >>> create_block_mask(causal, None, None, 256, 256, device="cpu").sparsity()
        25.0
    """
    del _compile
    _mask_utils.check_signature(mask_mod)
    _check_lengths(Q_LEN, KV_LEN)
    block_size = _pair(BLOCK_SIZE)
    if min(block_size) < 1:
        raise ValueError(f"BLOCK_SIZE must be positive, got {BLOCK_SIZE}")
    num_blocks = (-(-Q_LEN // block_size[0]), -(-KV_LEN // block_size[1]))
    _check_index_dtype(index_dtype, num_blocks)
    device = _default_device(device)
    B, H = _batch_heads(B, H)
    _mask_utils.probe(mask_mod, device)
    states = _block_eval.evaluate_block_states(
        mask_mod, (B, H, Q_LEN, KV_LEN), block_size, device, _chunk_elements
    )
    return BlockMask._from_states(states, (Q_LEN, KV_LEN), block_size, mask_mod, index_dtype)


def create_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    *,
    _chunk_elements: int | None = None,
) -> Tensor:
    """The dense bool keep-mask of ``mask_mod``: True where attention is allowed.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool tensor``.
        B: Batch size, or None for 1.
        H: Number of heads, or None for 1.
        Q_LEN: Query length.
        KV_LEN: Key/value length.
        device: None picks cuda if available, else cpu.
        _chunk_elements: Most positions evaluated at once; None for the device's
            default.

    Returns:
        bool ``(B, H, Q_LEN, KV_LEN)``. It is dense by nature; chunking only
        bounds the mask_mod's temporaries.

    Raises:
        TypeError: As :func:`create_block_mask`.
    """
    _mask_utils.check_signature(mask_mod)
    _check_lengths(Q_LEN, KV_LEN)
    device = _default_device(device)
    _mask_utils.probe(mask_mod, device)
    return _mask_utils.evaluate_dense(
        mask_mod, (*_batch_heads(B, H), Q_LEN, KV_LEN), device, _chunk_elements
    )


def _full_block_mask(
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
) -> BlockMask:
    """A B=1, H=1 BlockMask in which every block is full (no mask_mod is run).

    Used when the caller passes no block mask.
    """
    tensors, (q_len, kv_len, qb, kvb) = _full_block_mask_flat(Q_LEN, KV_LEN, device, BLOCK_SIZE)
    return BlockMask((q_len, kv_len), *tensors, BLOCK_SIZE=(qb, kvb), mask_mod=noop_mask)


# Set in kernel_options by the dispatch for calls without a BlockMask: their
# all-full mask lists no partial blocks, so the templates compile no partial
# loop (about half the kernel code to compile). Private: users cannot set it.
NO_PARTIAL_BLOCKS_KEY = "_FLEX_INDUCTOR_NO_PARTIAL_BLOCKS"


def _full_block_mask_flat(
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
) -> tuple[list[Tensor], list[int]]:
    """:func:`_full_block_mask` as ``(_flatten_tensors(), _flatten_sizes())``.

    What a compiled call without a block mask passes to the op: under Dynamo,
    tracing the construction of the BlockMask object (its checks, its
    attributes) costs several times more than tracing these tensors.
    """
    qb, kvb = _pair(BLOCK_SIZE)
    nq, nkv = math.ceil(Q_LEN / qb), math.ceil(KV_LEN / kvb)

    # Every tensor is a stride-0 view of one arange (counts[c] == c): one
    # tensor creation instead of ten on every eager call without a mask.
    counts = torch.arange(max(nq, nkv) + 1, dtype=torch.int32, device=device)

    def layout(rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Partial lists are empty; their padding is still valid indices.
        indices = counts[:cols].expand(1, 1, rows, cols)
        empty = counts[:1].expand(1, 1, rows)
        full = counts[cols : cols + 1].expand(1, 1, rows)
        return empty, indices, full, indices

    # In _TENSOR_NAMES order: kv view then q view, partial then full.
    return [*layout(nq, nkv), *layout(nkv, nq)], [Q_LEN, KV_LEN, qb, kvb]
