"""BlockMask, create_block_mask, create_mask and the mask combinators.

The oracle for block classification is a dense evaluation: an explicit
Python loop over positions for tiny shapes (which checks ``create_mask``
itself), then ``create_mask`` cut into blocks. torch's own
``create_block_mask`` is a peer for a few masks.
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flex_inductor import _mask_utils
from flex_inductor.block_mask import (
    BlockMask,
    _full_block_mask,
    create_block_mask,
    create_mask,
)
from flex_inductor.combinators import and_masks, noop_mask, or_masks

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------
# Mask mods (inline: the library masks live in flex_inductor/masks.py)
# ---------------------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    mask_mod.__name__ = f"sliding_window_{window}"
    return mask_mod


def document(lengths):
    """Documents of the given lengths, back to back (the last one may run past)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    mask_mod.__name__ = "document"
    return mask_mod


def random_blocks(B, H, Q, KV, block, seed):
    """Random per-position keep table whose blocks are a mix of empty, full, mixed."""
    gen = torch.Generator().manual_seed(seed)
    nq, nkv = math.ceil(Q / block[0]), math.ceil(KV / block[1])
    kind = torch.randint(0, 3, (B, H, nq, nkv), generator=gen)
    kind = kind.repeat_interleave(block[0], 2).repeat_interleave(block[1], 3)[..., :Q, :KV]
    noise = torch.rand(B, H, Q, KV, generator=gen) < 0.5
    table = torch.where(kind == 0, False, torch.where(kind == 1, True, noise))

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx]

    mask_mod.__name__ = f"random_{seed}"
    return mask_mod


def head_dependent(b, h, q_idx, kv_idx):
    # Differs per batch and head, so the b/h dimensions really matter.
    return (q_idx + 3 * h) % (b + 2) <= kv_idx % 5


def reduction_mod(b, h, q_idx, kv_idx):
    # Not elementwise-broadcastable: reduces a per-query table row.
    row = torch.arange(4) * q_idx
    return row.sum() % 7 >= kv_idx % 3


# ---------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------


def loop_mask(mask_mod, B, H, Q, KV):
    """Calls mask_mod once per position on 0-d tensors: the definition itself."""
    out = torch.empty(B, H, Q, KV, dtype=torch.bool)
    with _mask_utils.evaluation_mode():
        for b, h, q, kv in itertools.product(range(B), range(H), range(Q), range(KV)):
            out[b, h, q, kv] = mask_mod(*(torch.tensor(i) for i in (b, h, q, kv)))
    return out


def dense_block_states(mask, block):
    """0 empty / 1 partial / 2 full per block, from a dense mask."""
    B, H, Q, KV = mask.shape
    nq, nkv = math.ceil(Q / block[0]), math.ceil(KV / block[1])
    # -1 marks positions past the end: they belong to no block, so they
    # neither keep a block non-empty nor stop it from being full.
    padded = torch.full((B, H, nq * block[0], nkv * block[1]), -1, dtype=torch.int8)
    padded[..., :Q, :KV] = mask
    tiles = padded.unflatten(3, (nkv, block[1])).unflatten(2, (nq, block[0]))
    any_kept = (tiles == 1).any(5).any(3)
    all_kept = (tiles != 0).all(5).all(3)
    return torch.where(all_kept, 2, torch.where(any_kept, 1, 0)).to(torch.int8)


def ordered_to_dense(num, indices, num_cols):
    """Loop version of the (count, indices) -> 0/1 layout conversion."""
    dense = torch.zeros(*indices.shape[:-1], num_cols, dtype=torch.int32)
    for pos in itertools.product(*(range(s) for s in num.shape)):
        for j in range(int(num[pos])):
            dense[(*pos, int(indices[(*pos, j)]))] = 1
    return dense


def check_layout(bm: BlockMask, contiguous: bool = True):
    """Every documented invariant of the index tensors.

    The internal all-full mask (no block_mask given) is made of stride-0
    views of one arange, so it skips the contiguity check.
    """
    B, H, nq, nkv = bm.kv_indices.shape
    assert bm.q_indices.shape == (B, H, nkv, nq)
    for num, idx, n_cols in (
        (bm.kv_num_blocks, bm.kv_indices, nkv),
        (bm.full_kv_num_blocks, bm.full_kv_indices, nkv),
        (bm.q_num_blocks, bm.q_indices, nq),
        (bm.full_q_num_blocks, bm.full_q_indices, nq),
    ):
        assert num.dtype == idx.dtype == torch.int32
        if contiguous:
            assert num.is_contiguous() and idx.is_contiguous()
        assert num.shape == idx.shape[:-1]
        # Padding too must be in range: kernels may prefetch it.
        assert int(idx.min()) >= 0 and int(idx.max()) < n_cols
        for pos in itertools.product(*(range(s) for s in num.shape)):
            listed = idx[pos][: int(num[pos])].tolist()
            assert listed == sorted(set(listed))
    states = bm._block_states()
    # The transposed view lists exactly the transposed blocks.
    partial_t = ordered_to_dense(bm.q_num_blocks, bm.q_indices, nq).transpose(-2, -1)
    full_t = ordered_to_dense(bm.full_q_num_blocks, bm.full_q_indices, nq).transpose(-2, -1)
    assert torch.equal(partial_t, (states == 1).int())
    assert torch.equal(full_t, (states == 2).int())
    # Partial and full lists never share a block.
    partial = ordered_to_dense(bm.kv_num_blocks, bm.kv_indices, nkv)
    full = ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, nkv)
    assert not bool((partial & full).any())


# ---------------------------------------------------------------------------
# create_mask
# ---------------------------------------------------------------------------

TINY_MODS = [
    causal,
    sliding_window(3),
    document([5, 1, 7, 20]),
    head_dependent,
    reduction_mod,
    noop_mask,
]


@pytest.mark.parametrize("mask_mod", TINY_MODS, ids=lambda m: m.__name__)
def test_create_mask_matches_position_loop(mask_mod):
    expected = loop_mask(mask_mod, 2, 3, 9, 11)
    got = create_mask(mask_mod, 2, 3, 9, 11, device="cpu")
    assert got.dtype == torch.bool and got.shape == (2, 3, 9, 11)
    assert torch.equal(got, expected)


def test_create_mask_chunked_equals_whole():
    whole = create_mask(head_dependent, 2, 3, 300, 260, device="cpu")
    tiny_chunks = create_mask(head_dependent, 2, 3, 300, 260, device="cpu", _chunk_elements=1)
    assert torch.equal(whole, tiny_chunks)
    assert torch.equal(whole[1, 2, :9, :11], loop_mask(head_dependent, 2, 3, 9, 11)[1, 2])


def test_create_mask_none_batch_and_heads_broadcast():
    mask = create_mask(causal, None, None, 5, 7)
    assert mask.shape == (1, 1, 5, 7)
    assert mask.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------
# create_block_mask: classification against the dense oracle
# ---------------------------------------------------------------------------

# Odd shapes beside round ones: 1, 17, 113 and 1023 leave a short last block.
LENGTHS = [(1, 1), (17, 113), (113, 17), (128, 256), (1023, 1023)]
BLOCKS = [(16, 16), (32, 8), (128, 128)]


def mods_for(Q, KV, block):
    return [
        causal,
        sliding_window(37),
        document([Q // 3 + 1, Q // 2 + 1, max(Q, KV)]),
        random_blocks(2, 1, Q, KV, block, seed=Q + KV),
    ]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda s: f"bs{s[0]}x{s[1]}")
def test_block_classification_matches_dense(lengths, block):
    Q, KV = lengths
    for mask_mod in mods_for(Q, KV, block):
        B = 2 if mask_mod.__name__.startswith("random") else 1
        bm = create_block_mask(mask_mod, B, 1, Q, KV, device="cpu", BLOCK_SIZE=block)
        dense = create_mask(mask_mod, B, 1, Q, KV, device="cpu")
        expected = dense_block_states(dense, block)
        assert torch.equal(bm._block_states(), expected), mask_mod.__name__
        assert bm.seq_lengths == (Q, KV) and bm.BLOCK_SIZE == block
        assert bm.shape == (B, 1, Q, KV)
        assert bm.mask_mod is mask_mod


def test_random_blocks_mod_really_mixes_all_three_states():
    # Guards the test above: the random mask must exercise every state.
    bm = create_block_mask(random_blocks(2, 1, 256, 256, (16, 16), 0), 2, 1, 256, 256, "cpu", 16)
    assert set(bm._block_states().unique().tolist()) == {0, 1, 2}


def test_short_last_block_is_full_when_all_existing_positions_are_kept():
    # 130 = 128 + 2: the second block of each side has 2 real positions.
    bm = create_block_mask(noop_mask, 1, 1, 130, 130, device="cpu")
    assert bm._block_states().unique().tolist() == [2]
    assert int(bm.kv_num_blocks.sum()) == 0


@settings(max_examples=25, deadline=None, database=None)
@given(
    Q=st.integers(1, 70),
    KV=st.integers(1, 70),
    qb=st.integers(1, 24),
    kvb=st.sampled_from([1, 3, 8, 16, 24]),
    seed=st.integers(0, 10_000),
    chunk=st.sampled_from([64, 1000, 1 << 24]),
)
# Once found by this test: odd strides on size-1 dims of a chunk.
@example(Q=37, KV=57, qb=3, kvb=24, seed=6306, chunk=1000)
def test_block_classification_property(Q, KV, qb, kvb, seed, chunk):
    mask_mod = random_blocks(1, 2, Q, KV, (qb, kvb), seed)
    bm = create_block_mask(mask_mod, 1, 2, Q, KV, "cpu", (qb, kvb), _chunk_elements=chunk)
    # create_mask is checked against the position loop above; it is the fast oracle.
    expected = dense_block_states(create_mask(mask_mod, 1, 2, Q, KV, "cpu"), (qb, kvb))
    assert torch.equal(bm._block_states(), expected)


@pytest.mark.parametrize(
    "mask_mod", [causal, head_dependent, reduction_mod], ids=lambda m: m.__name__
)
def test_layout_invariants(mask_mod):
    bm = create_block_mask(mask_mod, 2, 3, 200, 150, device="cpu", BLOCK_SIZE=(32, 16))
    check_layout(bm)


# ---------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_mod", [head_dependent, causal], ids=lambda m: m.__name__)
@pytest.mark.parametrize("chunk", [1, 300, 5000])
def test_chunked_creation_equals_unchunked(mask_mod, chunk):
    args = (mask_mod, 2, 3, 300, 270, "cpu", (32, 64))
    whole = create_block_mask(*args)
    chunked = create_block_mask(*args, _chunk_elements=chunk)
    for a, b in zip(whole._flatten_tensors(), chunked._flatten_tensors(), strict=True):
        assert torch.equal(a, b)


def test_chunks_cover_the_grid_once_and_respect_the_budget():
    grid, block = (3, 5, 7, 11), (16, 32)
    for budget, free in itertools.product(
        [1, 512, 512 * 11, 512 * 77, 10**9], itertools.product([False, True], repeat=2)
    ):
        seen = torch.zeros(grid, dtype=torch.int32)
        for c in _mask_utils.plan_chunks(grid, block, budget, free):
            seen[c.b, c.h, c.q_blocks, c.kv_blocks] += 1
            bh = (1 if free[0] else c.b.stop - c.b.start) * (1 if free[1] else c.h.stop - c.h.start)
            cost = (
                bh * (c.q_blocks.stop - c.q_blocks.start) * (c.kv_blocks.stop - c.kv_blocks.start)
            )
            assert cost * 512 <= max(budget, 512)
        assert bool((seen == 1).all())


def test_batch_and_head_independent_mask_is_not_evaluated_per_batch():
    calls = []

    def counting_causal(b, h, q_idx, kv_idx):
        calls.append(1)
        return q_idx >= kv_idx

    create_block_mask(counting_causal, 64, 64, 128, 128, "cpu", 64)
    # One probe call, one stride probe and one chunk: vmap traces the
    # function once per call, whatever B and H are.
    assert len(calls) <= 3
    bm = create_block_mask(counting_causal, 4, 2, 128, 128, "cpu", 64)
    assert bm.kv_num_blocks.shape == (4, 2, 2)
    assert torch.equal(bm._block_states(), bm._block_states()[:1, :1].expand(4, 2, 2, 2))


# ---------------------------------------------------------------------------
# from_kv_blocks, to_dense, flat forms
# ---------------------------------------------------------------------------


def test_to_dense_round_trip_through_from_kv_blocks():
    bm = create_block_mask(head_dependent, 2, 3, 100, 90, "cpu", (16, 8))
    rebuilt = BlockMask.from_kv_blocks(
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        BLOCK_SIZE=bm.BLOCK_SIZE,
        mask_mod=bm.mask_mod,
        seq_lengths=bm.seq_lengths,
    )
    assert torch.equal(rebuilt.to_dense(), bm.to_dense())
    assert torch.equal(rebuilt._block_states(), bm._block_states())
    for a, b in zip(rebuilt._flatten_tensors(), bm._flatten_tensors(), strict=True):
        assert torch.equal(a, b)
    dense = bm.to_dense()
    assert dense.dtype == torch.int32
    assert torch.equal(dense, (bm._block_states() > 0).int())


def test_from_kv_blocks_without_full_blocks():
    # A 3x4 block pattern; the kv lists are unsorted and padded with junk in range.
    num = torch.tensor([2, 0, 1])
    idx = torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2], [0, 3, 3, 3]])
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(4, 8))
    assert bm.seq_lengths == (12, 32)
    assert bm.kv_indices.shape == (1, 1, 3, 4) and bm.kv_indices.dtype == torch.int32
    assert bm.full_kv_num_blocks is None and bm.full_q_indices is None
    expected = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.int32)
    assert torch.equal(bm.to_dense()[0, 0], expected)
    assert bm.q_num_blocks[0, 0].tolist() == [1, 1, 0, 1]
    assert bm.q_indices[0, 0].tolist() == [[2, 0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert bm.mask_mod is noop_mask
    assert "░" in bm.to_string() and "█" not in bm.to_string()


def test_from_kv_blocks_rejects_inconsistent_input():
    num, idx = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="together"):
        BlockMask.from_kv_blocks(num, idx, full_kv_num_blocks=num)
    with pytest.raises(ValueError, match="seq_lengths"):
        BlockMask.from_kv_blocks(num, idx, seq_lengths=(1000, 10))


def test_flat_round_trip():
    bm = create_block_mask(causal, 2, 1, 70, 50, "cpu", (16, 32))
    tensors, sizes = bm._flatten_tensors(), bm._flatten_sizes()
    assert sizes == [70, 50, 16, 32]
    assert tensors[0] is bm.kv_num_blocks and tensors[7] is bm.full_q_indices
    again = BlockMask._from_flat(tensors, sizes, bm.mask_mod)
    assert again._flatten_tensors() == tensors  # same objects, nothing recomputed
    assert again.seq_lengths == (70, 50) and again.BLOCK_SIZE == (16, 32)
    flat = bm.as_tuple()
    assert flat[:2] == (70, 50) and flat[-3:] == (16, 32, causal)
    assert bm.as_tuple(flatten=False)[0] == (70, 50)


@pytest.mark.parametrize("with_full", [True, False])
def test_pytree_round_trip(with_full):
    bm = create_block_mask(causal, 2, 1, 64, 64, "cpu", 16)
    if not with_full:
        bm = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=16)
    leaves, spec = pytree.tree_flatten(bm)
    # Absent full-block tensors stay in place as None leaves.
    assert len(leaves) == 8 and (leaves[2] is None) == (not with_full)
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, BlockMask)
    assert again._flatten_tensors() == bm._flatten_tensors()
    assert (again.seq_lengths, again.BLOCK_SIZE, again.mask_mod) == (
        bm.seq_lengths,
        bm.BLOCK_SIZE,
        bm.mask_mod,
    )
    doubled = pytree.tree_map_only(torch.Tensor, lambda t: t * 2, bm)
    assert torch.equal(doubled.kv_indices, bm.kv_indices * 2)
    keyed, _ = pytree.tree_flatten_with_path(bm)
    assert pytree.keystr(keyed[0][0]) == ".kv_num_blocks"


def test_block_mask_passes_through_torch_compile():
    bm = create_block_mask(causal, 2, 1, 64, 96, "cpu", 32)

    @torch.compile(fullgraph=True, backend="eager")
    def visited(x, block_mask):
        return x + block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()

    expected = int(bm.to_dense().sum())
    assert visited(torch.zeros(1), bm).item() == expected


@pytest.mark.parametrize("with_full", [True, False])
def test_block_mask_passes_through_export(with_full):
    bm = create_block_mask(causal, 1, 1, 64, 64, "cpu", 32)
    if not with_full:
        bm = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=32)

    class Visited(torch.nn.Module):
        def forward(self, x, block_mask):
            return x * block_mask.kv_num_blocks.sum()

    ep = torch.export.export(Visited(), (torch.ones(2), bm))
    # Two partial blocks on the diagonal; the full one is not counted here.
    assert torch.equal(ep.module()(torch.ones(2), bm), torch.full((2,), 2.0))


# ---------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sliced_base():
    return create_block_mask(head_dependent, 3, 4, 100, 70, "cpu", (16, 8))


@pytest.mark.parametrize(
    "index, expected",
    [
        (1, (slice(1, 2), slice(None), slice(None))),
        (-1, (slice(2, 3), slice(None), slice(None))),
        ((slice(None), 2), (slice(None), slice(2, 3), slice(None))),
        ((0, slice(1, 3)), (slice(0, 1), slice(1, 3), slice(None))),
        ((slice(None), slice(None), slice(2, 5)), (slice(None), slice(None), slice(2, 5))),
        ((slice(None), slice(None, None, 2)), (slice(None), slice(0, 4, 2), slice(None))),
        ((slice(None), slice(None), slice(4, 7)), (slice(None), slice(None), slice(4, 7))),
    ],
    ids=["b", "b_neg", "h", "b_h", "q", "h_step", "q_last"],
)
def test_slicing_selects_blocks_and_keeps_a_faithful_mask_mod(sliced_base, index, expected):
    bm = sliced_base[index]
    assert bm._block_states().dim() == 4
    assert torch.equal(bm._block_states(), sliced_base._block_states()[expected])
    check_layout(bm)
    # The wrapped mask_mod reproduces the selected rows of the original mask.
    qb, q_len = sliced_base.BLOCK_SIZE[0], sliced_base.seq_lengths[0]
    blocks = expected[2]
    start = (blocks.start or 0) * qb
    stop = q_len if blocks.stop is None else min(blocks.stop * qb, q_len)
    original = create_mask(head_dependent, 3, 4, 100, 70, "cpu")
    original = original[expected[:2] + (slice(start, stop),)]
    B, H, Q_LEN, KV_LEN = bm.shape
    assert (Q_LEN, KV_LEN) == original.shape[2:]
    assert torch.equal(create_mask(bm.mask_mod, B, H, Q_LEN, KV_LEN, "cpu"), original)


def test_slicing_with_index_tensors_and_lists(sliced_base):
    bm = sliced_base[[2, 0], :, torch.tensor([5, 1, 3])]
    states = sliced_base._block_states()[[2, 0]][:, :, [5, 1, 3]]
    assert torch.equal(bm._block_states(), states)
    assert bm.seq_lengths == (48, 70)
    dense = create_mask(head_dependent, 3, 4, 100, 70, "cpu")
    rows = torch.cat([torch.arange(m * 16, m * 16 + 16) for m in (5, 1, 3)])
    assert torch.equal(create_mask(bm.mask_mod, 2, 4, 48, 70, "cpu"), dense[[2, 0]][:, :, rows])
    assert bm.mask_mod.__name__ == "head_dependent_sliced"


def test_slicing_keeps_mask_mod_when_nothing_moves(sliced_base):
    assert sliced_base[:, :, :].mask_mod is head_dependent
    broadcast = create_block_mask(causal, None, None, 64, 64, "cpu", 16)
    assert broadcast[0, 0].mask_mod is causal  # size-1 dims keep broadcasting


def test_slicing_errors(sliced_base):
    with pytest.raises(IndexError):
        sliced_base[0, 0, 0, 0]
    with pytest.raises(IndexError):
        sliced_base[5]
    with pytest.raises(IndexError):
        sliced_base[:, :, 3:3]
    with pytest.raises(ValueError, match="last query block"):
        sliced_base[:, :, [6, 0]]  # block 6 holds rows 96..99 only


# ---------------------------------------------------------------------------
# Small helpers: full mask, device moves, pictures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [(1, 1), (300, 200), (128, 128)])
def test_full_block_mask(lengths):
    bm = _full_block_mask(*lengths, device="cpu", BLOCK_SIZE=(64, 32))
    nq, nkv = math.ceil(lengths[0] / 64), math.ceil(lengths[1] / 32)
    assert bm._block_states().tolist() == [[[[2] * nkv] * nq]]
    assert bm.mask_mod is noop_mask and bm.shape == (1, 1, *lengths)
    check_layout(bm, contiguous=False)
    assert torch.equal(
        bm._block_states(),
        create_block_mask(noop_mask, 1, 1, *lengths, "cpu", (64, 32))._block_states(),
    )


def test_to_device_copies_every_tensor():
    bm = create_block_mask(causal, 1, 1, 64, 64, "cpu", 16)
    moved = bm.to("cpu")
    assert moved is not bm and moved.mask_mod is causal
    for a, b in zip(moved._flatten_tensors(), bm._flatten_tensors(), strict=True):
        assert torch.equal(a, b)


def test_repr_sparsity_numel():
    bm = create_block_mask(causal, None, 2, 256, 256, "cpu")
    assert bm.sparsity() == 25.0
    assert bm.numel() == 2 * 256 * 256
    assert repr(bm) == (
        "BlockMask(shape=(1, 2, 256, 256), sparsity=25.00%, BLOCK_SIZE=(128, 128), mask_mod=causal)"
    )
    assert str(bm).startswith(repr(bm))
    empty = create_block_mask(lambda b, h, q, kv: q < 0, 1, 1, 100, 100, "cpu", 16)
    assert empty.sparsity() == 100.0
    assert _full_block_mask(100, 300, "cpu").sparsity() == 0.0


def test_to_string():
    bm = create_block_mask(causal, 1, 6, 64, 64, "cpu", 16)
    text = bm.to_string(limit=2)
    first = text.splitlines()[:5]
    assert first == ["(0, 0)", "░░      ", "██░░    ", "████░░  ", "██████░░"]
    assert "(0, 1)" in text and "(0, 2)" not in text and "4 more" in text
    # Downsampled: one cell per 2x2 blocks, mixed cells are partial.
    assert bm[0, 0].to_string(grid_size=2).splitlines()[1:] == ["░░  ", "██░░"]
    assert bm.to_string(grid_size=-1).splitlines()[1:5] == first[1:]


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib")
    bm = create_block_mask(causal, 1, 2, 256, 256, "cpu", 32)
    path = tmp_path / "mask.png"
    assert bm.save_png(str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other.png"
    bm.to_png(str(other))
    assert other.stat().st_size > 0


def test_save_png_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    bm = create_block_mask(causal, 1, 1, 64, 64, "cpu", 32)
    with pytest.raises(ImportError, match=r"flex_inductor\[plot\]"):
        bm.save_png(str(tmp_path / "x.png"))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        lambda b, h, q, kv: (q >= kv).int(),
        lambda b, h, q, kv: (q - kv).float(),
        lambda b, h, q, kv: True,
        lambda b, h, q, kv: torch.stack([q >= kv, q < kv]),
    ],
    ids=["int", "float", "python_bool", "not_0d"],
)
def test_mask_mod_must_return_a_bool_tensor(bad):
    with pytest.raises(TypeError, match="mask_mod"):
        create_block_mask(bad, 1, 1, 32, 32, "cpu", 16)
    with pytest.raises(TypeError, match="mask_mod"):
        create_mask(bad, 1, 1, 32, 32, "cpu")


@pytest.mark.parametrize(
    "bad",
    [lambda q, kv: q >= kv, lambda b, h, q: q >= 0, lambda s, b, h, q, kv: q >= kv],
    ids=["2_args", "3_args", "score_mod"],
)
def test_mask_mod_must_take_four_arguments(bad):
    with pytest.raises(TypeError, match="mask_mod"):
        create_block_mask(bad, 1, 1, 32, 32, "cpu", 16)
    with pytest.raises(TypeError, match="mask_mod"):
        create_mask(bad, 1, 1, 32, 32, "cpu")


def test_defaults_are_accepted():
    def with_default(b, h, q_idx, kv_idx, offset=0):
        return q_idx + offset >= kv_idx

    bm = create_block_mask(with_default, None, None, 32, 32, BLOCK_SIZE=16, _compile=True)
    assert bm.kv_indices.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert bm.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("kwargs", [dict(Q_LEN=0), dict(KV_LEN=-1), dict(B=0), dict(BLOCK_SIZE=0)])
def test_bad_sizes_raise_value_error(kwargs):
    args = dict(mask_mod=causal, B=1, H=1, Q_LEN=16, KV_LEN=16, device="cpu") | kwargs
    with pytest.raises(ValueError):
        create_block_mask(**args)


# ---------------------------------------------------------------------------
# Combinators
# ---------------------------------------------------------------------------


def test_combinators_names_and_values():
    window = sliding_window(128)
    both, either = and_masks(causal, window), or_masks(causal, window)
    assert both.__name__ == "and_causal_sliding_window_128"
    assert either.__name__ == "or_causal_sliding_window_128"
    idx = [torch.tensor(i) for i in (0, 0, 300, 100)]
    assert both(*idx).dtype == torch.bool and not bool(both(*idx))
    assert bool(either(*idx))
    dense_c = create_mask(causal, 1, 1, 300, 300, "cpu")
    dense_w = create_mask(window, 1, 1, 300, 300, "cpu")
    assert torch.equal(create_mask(both, 1, 1, 300, 300, "cpu"), dense_c & dense_w)
    assert torch.equal(create_mask(either, 1, 1, 300, 300, "cpu"), dense_c | dense_w)


def test_empty_combinators_and_noop():
    zero = torch.tensor(0)
    keep_all, keep_none = and_masks(), or_masks()
    assert bool(keep_all(zero, zero, zero, zero)) and not bool(keep_none(zero, zero, zero, zero))
    out = noop_mask(zero, zero, zero, zero)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.dim() == 0
    assert bool(create_mask(keep_all, 1, 1, 3, 3, "cpu").all())
    assert not bool(create_mask(keep_none, 1, 1, 3, 3, "cpu").any())
    with pytest.raises(TypeError, match="callable"):
        and_masks(causal, 3)


# ---------------------------------------------------------------------------
# torch's create_block_mask as a peer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_mod",
    [causal, sliding_window(100), document([300, 77, 500, 147]), head_dependent],
    ids=lambda m: m.__name__,
)
def test_same_blocks_as_torch(mask_mod):
    from torch.nn.attention import flex_attention as torch_flex

    for lengths, block in [((512, 1024), (128, 128)), ((1024, 512), (64, 128))]:
        ours = create_block_mask(mask_mod, 2, 2, *lengths, "cpu", block)
        theirs = torch_flex.create_block_mask(mask_mod, 2, 2, *lengths, "cpu", block)
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        assert ours.sparsity() == pytest.approx(theirs.sparsity())
        check_layout(ours)


def test_odd_lengths_visit_the_same_blocks_as_torch():
    # torch pads the short last block with False and calls it partial; we call
    # it full when all its real positions are kept. The visited set agrees.
    from torch.nn.attention import flex_attention as torch_flex

    ours = create_block_mask(noop_mask, 1, 1, 113, 1023, "cpu", 64)
    theirs = torch_flex.create_block_mask(noop_mask, 1, 1, 113, 1023, "cpu", 64)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert int(ours.kv_num_blocks.sum()) == 0 < int(theirs.kv_num_blocks.sum())


# ---------------------------------------------------------------------------
# CUDA: the same layout as on CPU
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    doc_lengths = [300, 77, 500, 147, 1]
    cuda_doc = document(doc_lengths)
    doc = torch.repeat_interleave(torch.arange(5), torch.tensor(doc_lengths)).cuda()

    def cuda_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    for cpu_mod, gpu_mod in [
        (causal, causal),
        (head_dependent, head_dependent),
        (cuda_doc, cuda_document),
    ]:
        for chunk in (1 << 10, 1 << 25):
            args = (2, 3, 1000, 1023, None, (64, 128))
            ours = create_block_mask(gpu_mod, *args, _chunk_elements=chunk)
            assert ours.kv_indices.device.type == "cuda"
            expected = create_block_mask(cpu_mod, 2, 3, 1000, 1023, "cpu", (64, 128))
            for a, b in zip(ours._flatten_tensors(), expected._flatten_tensors(), strict=True):
                assert torch.equal(a.cpu(), b)
            assert torch.equal(
                create_mask(gpu_mod, 2, 3, 1000, 1023).cpu(),
                create_mask(cpu_mod, 2, 3, 1000, 1023, "cpu"),
            )
            sliced = ours[1, :, [2, 5]]
            assert torch.equal(sliced._block_states().cpu(), expected[1, :, [2, 5]]._block_states())
            assert torch.equal(
                create_mask(sliced.mask_mod, 1, 3, 128, 1023).cpu(),
                create_mask(expected[1, :, [2, 5]].mask_mod, 1, 3, 128, 1023, "cpu"),
            )
    full = _full_block_mask(300, 200, "cuda")
    assert full.kv_indices.device.type == "cuda" and full.sparsity() == 0.0
    assert "██" in full.to_string()
    assert full.to("cpu").kv_indices.device.type == "cpu"
