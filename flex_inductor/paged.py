"""A paged KV cache: sequences share one physical K/V store of fixed-size pages.

A server decoding many sequences of different, growing lengths would waste
memory giving each one a contiguous ``max_seq_len`` slice. Here the store is
one pool of ``n_pages`` pages of ``page_size`` tokens; each sequence (a *batch
row*, ``0 <= batch_idx < max_batch``) owns a list of pages, recorded in a page
table. Attention runs directly on the store: a logical ``BlockMask`` (built
over logical positions, as if each sequence were contiguous) is converted into
one over physical pages, and the mods are wrapped so that they still see
logical positions. The kernels need nothing special; ``key`` is the store
expanded to the query's batch (a stride-0 view). See docs/paged_attention.md.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flex_inductor import _compat
from flex_inductor._mask_utils import name_of
from flex_inductor.block_mask import _FULL, _PARTIAL, BlockMask

__all__ = ["PagedKVCache"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

# Marks an unassigned entry of the page table and of physical_to_logical.
UNASSIGNED = -1


def _as_int(value: object, name: str) -> int:
    # operator.index accepts ints, numpy ints and 0-d integer tensors, but
    # not floats or bools (a bool is almost certainly a mistake here).
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an int, got {type(value).__name__}") from None


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


class PagedKVCache:
    """A physical K/V store of fixed-size pages shared by up to ``max_batch`` sequences.

    Each sequence lives in a *batch row* ``0 <= batch_idx < max_batch``. Its
    logical page ``j`` (tokens ``j * page_size`` to ``(j + 1) * page_size - 1``)
    is stored in physical page ``page_table[batch_idx, j]``. Pages are handed
    out by :meth:`reserve`, filled by :meth:`write` and returned by
    :meth:`erase`; the free-page bookkeeping lives on the host, so these calls
    never wait for the device (except the optional check in :meth:`write`).

    ``page_size`` must divide the logical BlockMask's KV block size (equal to
    it is the usual choice): the physical BlockMask then has one KV block per
    page, since consecutive physical pages do not hold consecutive tokens.

    Attributes:
        k_cache: ``(1, Hkv, n_pages * page_size, D)``, the keys of every page.
        v_cache: ``(1, Hkv, n_pages * page_size, Dv)``, the values.
        page_table: int32 ``(max_batch, max_pages_per_seq)``: logical page to
            physical page, ``-1`` where unassigned.
        physical_to_logical: int32 ``(max_batch, n_pages)``: the inverse,
            physical page to the row's logical page, ``-1`` where the page
            does not belong to that row.
        n_pages: Physical pages in the store.
        page_size: Tokens per page.
        max_batch: Batch rows.
        max_pages_per_seq: Most pages one sequence may hold.
    """

    def __init__(
        self,
        n_pages: int,
        page_size: int,
        max_batch: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        max_pages_per_seq: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocates the store (zeroed) and empty page tables.

        Args:
            n_pages: Physical pages in the store.
            page_size: Tokens per page; must divide the KV block size of the
                BlockMasks converted later.
            max_batch: Batch rows (sequences held at once).
            num_kv_heads: ``Hkv`` of the store.
            head_dim: ``D`` of the keys.
            v_head_dim: ``Dv`` of the values; ``head_dim`` if None.
            max_pages_per_seq: Most pages one sequence may hold; ``n_pages``
                if None.
            dtype: Of the store.
            device: Of the store and the tables; cuda if available, else cpu,
                when None.

        Raises:
            ValueError: If a size is not a positive int (the message names it).
        """
        self.n_pages = _positive_int(n_pages, "n_pages")
        self.page_size = _positive_int(page_size, "page_size")
        self.max_batch = _positive_int(max_batch, "max_batch")
        num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        head_dim = _positive_int(head_dim, "head_dim")
        v_head_dim = head_dim if v_head_dim is None else _positive_int(v_head_dim, "v_head_dim")
        self.max_pages_per_seq = (
            self.n_pages
            if max_pages_per_seq is None
            else _positive_int(max_pages_per_seq, "max_pages_per_seq")
        )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        length = self.n_pages * self.page_size
        # Zeroed, not empty: a kernel visiting a partial page multiplies the
        # masked slots' values by a zero probability, and uninitialised
        # memory may hold NaN, which survives that (0 * NaN = NaN). Erased
        # pages keep finite data, so the store never needs clearing again.
        self.k_cache = torch.zeros(1, num_kv_heads, length, head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros(1, num_kv_heads, length, v_head_dim, dtype=dtype, device=device)
        self.page_table = torch.full(
            (self.max_batch, self.max_pages_per_seq), UNASSIGNED, dtype=torch.int32, device=device
        )
        self.physical_to_logical = torch.full(
            (self.max_batch, self.n_pages), UNASSIGNED, dtype=torch.int32, device=device
        )
        # The store and the tables are only ever updated in place: telling
        # torch.compile so lets a compiled decode step that writes the store
        # run as a CUDA graph (mode="reduce-overhead") without copying it.
        for tensor in (self.k_cache, self.v_cache, self.page_table, self.physical_to_logical):
            _compat.mark_static_address(tensor)
        # Host mirrors of the tables' allocation state, so that reserve and
        # erase never read device memory. Free pages form a stack whose top
        # (the end) is the lowest page, so a fresh cache hands out 0, 1, 2...
        self._free: list[int] = list(range(self.n_pages - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(self.max_batch)]

    # ------------------------------------------------------------------
    # Bookkeeping
    # ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the store and the tables live."""
        return self.k_cache.device

    @property
    def num_free_pages(self) -> int:
        """Physical pages not held by any sequence."""
        return len(self._free)

    def pages(self, batch_idx: int) -> list[int]:
        """The physical pages of row ``batch_idx``, in logical order."""
        return list(self._pages[self._check_row(batch_idx)])

    def capacity(self, batch_idx: int) -> int:
        """Tokens row ``batch_idx`` can hold without reserving more pages."""
        return len(self._pages[self._check_row(batch_idx)]) * self.page_size

    def _check_row(self, batch_idx: int) -> int:
        batch_idx = _as_int(batch_idx, "batch_idx")
        if not 0 <= batch_idx < self.max_batch:
            raise ValueError(
                f"`batch_idx` must be in [0, {self.max_batch}) (max_batch), got {batch_idx}"
            )
        return batch_idx

    def reserve(self, batch_idx: int, seq_len: int) -> None:
        """Makes row ``batch_idx`` able to hold ``seq_len`` tokens.

        Assigns free pages to the row's next logical pages until it has
        ``ceil(seq_len / page_size)``; a row that already has enough is left
        alone (reserve never shrinks). Either every needed page is assigned
        or, on error, none is.

        Args:
            batch_idx: The row, ``0 <= batch_idx < max_batch``.
            seq_len: Tokens the row must hold, ``0 <= seq_len <=
                max_pages_per_seq * page_size``.

        Raises:
            ValueError: If ``batch_idx`` or ``seq_len`` is out of range, or if
                there are not enough free pages (the message names
                ``seq_len``, the pages needed and the pages free).
        """
        row = self._check_row(batch_idx)
        seq_len = _as_int(seq_len, "seq_len")
        if seq_len < 0:
            raise ValueError(f"`seq_len` must be a non-negative int, got {seq_len!r}")
        limit = self.max_pages_per_seq * self.page_size
        if seq_len > limit:
            raise ValueError(
                f"`seq_len` {seq_len} exceeds the most one sequence may hold: "
                f"max_pages_per_seq * page_size = {self.max_pages_per_seq} * "
                f"{self.page_size} = {limit}"
            )
        have = len(self._pages[row])
        need = math.ceil(seq_len / self.page_size) - have
        if need <= 0:
            return
        if need > len(self._free):
            raise ValueError(
                f"`seq_len` {seq_len} for batch_idx {row} needs {need} more pages but only "
                f"{len(self._free)} of {self.n_pages} are free; erase finished sequences "
                "or build the cache with a larger n_pages"
            )
        new = [self._free.pop() for _ in range(need)]
        self._pages[row].extend(new)
        # Small host-to-device copies: the tables live on the device, where
        # the kernels' mask_mod reads them.
        physical = torch.tensor(new, dtype=torch.int32).to(self.device)
        logical = torch.arange(have, have + need, dtype=torch.int32).to(self.device)
        self.page_table[row, have : have + need] = physical
        self.physical_to_logical[row, physical.long()] = logical

    def erase(self, batch_idx: int) -> None:
        """Frees every page of row ``batch_idx``; the row becomes empty.

        The pages' K/V data is left in place: nothing reads it until a
        sequence reserves and writes the pages again, because the converted
        mask_mod rejects pages the row does not own.

        Raises:
            ValueError: If ``batch_idx`` is out of range.
        """
        row = self._check_row(batch_idx)
        pages = self._pages[row]
        # Pushed in reverse, so that a reserve right after hands the same
        # pages out in the same order.
        self._free.extend(reversed(pages))
        self._pages[row] = []
        self.page_table[row] = UNASSIGNED
        self.physical_to_logical[row] = UNASSIGNED

    # ------------------------------------------------------------------
    # Writing K/V
    # ------------------------------------------------------------------

    def write(
        self,
        batch_idx: Tensor | Sequence[int],
        input_pos: Tensor,
        k_val: Tensor,
        v_val: Tensor,
        check: bool = True,
    ) -> None:
        """Stores new keys and values at logical positions of some rows.

        One vectorised scatter into the store: token ``s`` of entry ``i``
        goes to logical position ``input_pos[i, s]`` of row ``batch_idx[i]``.
        The positions must lie in pages the rows have reserved.

        Args:
            batch_idx: ``(B,)`` rows, distinct.
            input_pos: ``(B, S)`` logical positions per entry, or ``(S,)`` for
                the same positions in every entry.
            k_val: ``(B, Hkv, S, D)`` keys.
            v_val: ``(B, Hkv, S, Dv)`` values.
            check: Verify that every position lies in a reserved page. The
                check reads the result on the host (a device sync); it is
                skipped under ``torch.compile``. Without it, such a position
                fails inside the indexing kernel (a device-side assert on
                CUDA) instead of raising a ValueError that names it.

        Raises:
            ValueError: On shapes that do not match the store, or (with
                ``check``) positions outside the rows' reserved pages.
        """
        rows = self._rows_tensor(batch_idx)
        B = rows.numel()
        if not isinstance(input_pos, Tensor) or input_pos.dtype.is_floating_point:
            raise ValueError("`input_pos` must be an integer tensor of logical positions")
        input_pos = input_pos.to(self.device, torch.long)
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, -1)
        S = input_pos.shape[-1]
        if input_pos.shape != (B, S):
            raise ValueError(
                f"`input_pos` must be (B, S) = ({B}, S) or (S,), got {tuple(input_pos.shape)}"
            )
        for name, val, store in (("k_val", k_val, self.k_cache), ("v_val", v_val, self.v_cache)):
            expected = (B, store.shape[1], S, store.shape[3])
            if tuple(val.shape) != expected:
                raise ValueError(
                    f"`{name}` must be (B, Hkv, S, head_dim) = {expected}, got {tuple(val.shape)}"
                )
        logical_page = input_pos // self.page_size
        checking = check and not torch.compiler.is_compiling()
        if checking:
            in_range = (input_pos >= 0) & (logical_page < self.max_pages_per_seq)
            if not bool(in_range.all()):
                raise ValueError(
                    "`input_pos` has positions outside [0, max_pages_per_seq * page_size) = "
                    f"[0, {self.max_pages_per_seq * self.page_size})"
                )
        page = self.page_table[rows.unsqueeze(-1), logical_page]
        if checking and not bool((page >= 0).all()):
            bad = (page < 0).nonzero()[0].tolist()
            raise ValueError(
                f"`input_pos` {int(input_pos[bad[0], bad[1]])} of batch_idx "
                f"{int(rows[bad[0]])} lies in a page the row has not reserved; "
                "call reserve(batch_idx, seq_len) first"
            )
        address = (page.long() * self.page_size + input_pos % self.page_size).reshape(-1)
        # (B, H, S, D) -> (1, H, B * S, D): the token order of ``address``.
        # index_copy_ rather than indexed assignment: one kernel, and about
        # a third less host time per decode step (measured on an H100).
        for val, store in ((k_val, self.k_cache), (v_val, self.v_cache)):
            flat = val.transpose(0, 1).reshape(1, store.shape[1], B * S, store.shape[3])
            store.index_copy_(2, address, flat.to(store.dtype))

    def _rows_tensor(self, batch_idx: Tensor | Sequence[int] | None, default: int = 0) -> Tensor:
        """``batch_idx`` as a 1-d long tensor on the device; ``arange(default)`` if None."""
        if batch_idx is None:
            return torch.arange(default, device=self.device)
        rows = torch.as_tensor(batch_idx)
        if rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise ValueError(f"`batch_idx` must hold integers, got dtype {rows.dtype}")
        rows = rows.reshape(-1)
        if rows.device.type == "cpu" and rows.numel() and not torch.compiler.is_compiling():
            # Checked only where it costs no device sync: rows given on the host.
            low, high = int(rows.min()), int(rows.max())
            if low < 0 or high >= self.max_batch:
                raise ValueError(
                    f"`batch_idx` entries must be in [0, {self.max_batch}) (max_batch), "
                    f"got {low if low < 0 else high}"
                )
        rows = rows.to(self.device, torch.long)
        if rows.numel() == 0:
            raise ValueError("`batch_idx` must name at least one batch row")
        return rows

    # ------------------------------------------------------------------
    # Attention over the store
    # ------------------------------------------------------------------

    def physical_kv(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The store as ``flex_attention``'s key and value for a batch of queries.

        Returns:
            ``k_cache`` and ``v_cache`` expanded to ``batch_size`` (stride-0
            views: no copy). Every query batch entry sees the whole store; its
            BlockMask decides which pages it reads.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        k, v = self.k_cache, self.v_cache
        return k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:])

    def convert_logical_block_mask(
        self, block_mask: BlockMask, batch_idx: Tensor | Sequence[int] | None = None
    ) -> BlockMask:
        """The BlockMask over physical pages equivalent to a logical one.

        Query batch entry ``b`` is the sequence in row ``batch_idx[b]``. Each
        logical KV block's pages are looked up in that row of the page table:
        the physical mask visits page ``p`` of entry ``b`` exactly where the
        logical mask visits the block holding ``p``'s logical page, with the
        same kind (partial or full). Two kinds of positions hold no data and
        are never attended: pages the row has not reserved (their blocks are
        dropped), and positions of the last page past the logical ``KV_LEN``
        (that page becomes partial, and the mask_mod rejects them).

        With ``page_size`` equal to the KV block size and every visited block
        reserved, ``kv_num_blocks`` is unchanged. The physical block indices
        are listed in ascending (physical) order, the usual BlockMask format.

        The mask_mod is :meth:`get_mask_mod` of the logical one. It reads the
        page tables when the kernel runs, but the block lists are copied now:
        convert again after :meth:`reserve` or :meth:`erase`.

        Args:
            block_mask: Over logical positions: ``(B, H, Q_LEN, KV_LEN)`` with
                ``KV_LEN <= max_pages_per_seq * page_size``; its KV block size
                a multiple of ``page_size``; ``B`` 1 or ``len(batch_idx)``.
            batch_idx: ``(B,)`` rows of the query batch entries; None means
                ``arange(block_mask B)``.

        Returns:
            A BlockMask of shape ``(B, H, Q_LEN, n_pages * page_size)`` with
            ``BLOCK_SIZE = (Q_BLOCK_SIZE, page_size)``.

        Raises:
            TypeError: If ``block_mask`` is not a BlockMask.
            ValueError: If its sizes do not fit the cache or ``batch_idx``.
        """
        if not isinstance(block_mask, BlockMask):
            raise TypeError(
                f"`block_mask` must be a flex_inductor BlockMask, got {type(block_mask).__name__}"
            )
        q_len, kv_len = block_mask.seq_lengths
        q_block, kv_block = block_mask.BLOCK_SIZE
        mask_b, mask_h = block_mask.kv_num_blocks.shape[:2]
        if kv_block % self.page_size:
            raise ValueError(
                f"`block_mask` has KV block size {kv_block}, which page_size {self.page_size} "
                "does not divide; build it with BLOCK_SIZE=(Q_BLOCK_SIZE, page_size)"
            )
        if kv_len > self.max_pages_per_seq * self.page_size:
            raise ValueError(
                f"`block_mask` has KV_LEN {kv_len} but a sequence holds at most "
                f"max_pages_per_seq * page_size = {self.max_pages_per_seq * self.page_size}"
            )
        if block_mask.kv_num_blocks.device != self.device:
            raise ValueError(
                f"`block_mask` is on {block_mask.kv_num_blocks.device} but the cache is on "
                f"{self.device}"
            )
        rows = self._rows_tensor(batch_idx, default=mask_b)
        B = rows.numel()
        if mask_b not in (1, B):
            raise ValueError(
                f"`block_mask` has batch size {mask_b} but `batch_idx` has {B} entries; "
                "they must match (or the block mask's must be 1)"
            )

        # Logical block states, spread to logical pages and cropped to KV_LEN.
        pages_per_block = kv_block // self.page_size
        n_logical = math.ceil(kv_len / self.page_size)
        states = block_mask._block_states()
        states = states.repeat_interleave(pages_per_block, dim=-1)[..., :n_logical]
        if kv_len % self.page_size:
            # The last page has slots past KV_LEN that hold no logical token;
            # only the mask_mod can exclude them, so that page is partial.
            last = states[..., -1:]
            states = torch.cat([states[..., :-1], last.masked_fill(last == _FULL, _PARTIAL)], -1)
        states = states.expand(B, mask_h, *states.shape[2:])

        # Scatter each logical page's state to its physical page; unassigned
        # logical pages go to a spare column that is dropped.
        physical = self.page_table[rows, :n_logical].long()
        physical = torch.where(physical >= 0, physical, self.n_pages)
        physical = physical[:, None, None, :].expand_as(states)
        physical_states = torch.zeros(
            (*states.shape[:-1], self.n_pages + 1), dtype=states.dtype, device=self.device
        )
        physical_states.scatter_(-1, physical, states)
        mask_mod = self.get_mask_mod(
            block_mask.mask_mod, None if batch_idx is None else rows, kv_len
        )
        return BlockMask._from_states(
            physical_states[..., : self.n_pages],
            (q_len, self.n_pages * self.page_size),
            (q_block, self.page_size),
            mask_mod,
        )

    def _logical_kv(
        self, rows: Tensor | None
    ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``f(b, kv_idx) -> (logical kv_idx, owned)`` for physical ``kv_idx``.

        Written with torch ops on 0-d tensors and indexing of captured
        tensors, so that Dynamo traces it into the kernel.
        """
        page_size = self.page_size
        physical_to_logical = self.physical_to_logical

        def logical_kv(b: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor]:
            row = b if rows is None else rows[b]
            page = kv_idx // page_size
            logical_page = physical_to_logical[row, page]
            owned = logical_page >= 0
            logical = logical_page * page_size + (kv_idx - page * page_size)
            # A page the row does not own gives logical index 0: the mods may
            # index their own tensors with it, so it must be in range.
            return torch.where(owned, logical, 0), owned

        return logical_kv

    def get_mask_mod(
        self,
        mask_mod: MaskMod | None,
        batch_idx: Tensor | Sequence[int] | None = None,
        kv_len: int | None = None,
    ) -> MaskMod:
        """Wraps a logical mask_mod to take physical ``kv_idx``.

        The wrapper maps ``kv_idx`` to the logical position it holds for the
        sequence in row ``batch_idx[b]`` and calls ``mask_mod`` with it; pages
        the row does not own (and, with ``kv_len``, positions at or past it)
        are masked out. ``b``, ``h`` and ``q_idx`` pass through unchanged.

        Args:
            mask_mod: The logical mask_mod; None for one keeping everything.
            batch_idx: ``(B,)`` rows of the query batch entries; None means
                entry ``b`` is row ``b``.
            kv_len: The logical KV_LEN, or None for no bound beyond the pages.

        Returns:
            A mask_mod named ``paged_<name>``.
        """
        rows = None if batch_idx is None else self._rows_tensor(batch_idx)
        logical_kv = self._logical_kv(rows)
        bounded = kv_len is not None and kv_len % self.page_size != 0

        def paged_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            logical, keep = logical_kv(b, kv_idx)
            if bounded:
                keep = keep & (logical < kv_len)
                logical = torch.where(keep, logical, 0)
            if mask_mod is not None:
                keep = keep & mask_mod(b, h, q_idx, logical)
            return keep

        name = "noop_mask" if mask_mod is None else name_of(mask_mod)
        paged_mask_mod.__name__ = paged_mask_mod.__qualname__ = f"paged_{name}"
        return paged_mask_mod

    def get_score_mod(
        self,
        score_mod: ScoreMod | None,
        batch_idx: Tensor | Sequence[int] | None = None,
    ) -> ScoreMod | None:
        """Wraps a logical score_mod to take physical ``kv_idx``.

        ``score_mod`` receives the logical position held at ``kv_idx`` by the
        sequence in row ``batch_idx[b]`` (0 on pages the row does not own;
        the converted mask_mod discards those positions anyway).

        Args:
            score_mod: The logical score_mod, or None.
            batch_idx: As in :meth:`get_mask_mod`; pass the same rows as to
                :meth:`convert_logical_block_mask`.

        Returns:
            A score_mod named ``paged_<name>``, or None for None.
        """
        if score_mod is None:
            return None
        rows = None if batch_idx is None else self._rows_tensor(batch_idx)
        logical_kv = self._logical_kv(rows)

        def paged_score_mod(
            score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
        ) -> Tensor:
            logical, _ = logical_kv(b, kv_idx)
            return score_mod(score, b, h, q_idx, logical)

        paged_score_mod.__name__ = paged_score_mod.__qualname__ = f"paged_{name_of(score_mod)}"
        return paged_score_mod
