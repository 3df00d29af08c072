"""PagedKVCache: attention over paged memory equals attention over contiguous memory.

Every attention case builds the same K/V twice: contiguously, ``(B, Hkv, S,
D)`` with random garbage past each sequence's length, and in a paged store
whose page assignment is scrambled (pages handed out interleaved with dummy
sequences that are later erased), with garbage in every slot nobody wrote.
The float64 oracle runs on the contiguous data with the logical BlockMask;
the eager reference and the compiled kernels (Triton's interpreter on CPU)
run on the store with the converted BlockMask and wrapped mods, and must
satisfy the shared tolerance rule. Queries are the last ``L`` tokens of each
sequence (a decode step at position ``cache_len - L``), or a prefill where
``L`` is the longest sequence.
"""

from __future__ import annotations

import math
import random
import re
import runpy
from pathlib import Path

import pytest
import torch
from compile_utils import compile_and_run
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import create_block_mask, flex_attention, flex_attention_reference, masks, mods
from flex_inductor.block_mask import BlockMask
from flex_inductor.paged import PagedKVCache

PAGE = 16
MAX_PAGES = 8
S = PAGE * MAX_PAGES  # logical KV_LEN of the BlockMasks: the longest sequence
HQ, D = 4, 16
# Odd cache lengths beside one exactly a page long; each row of the cache
# below holds one sequence, and query entry b is row ROWS[b].
LENGTHS = (37, 16, 101)
ROWS = (3, 0, 2)
MAX_BATCH = 5  # rows 1 and 4 hold dummy sequences while pages are handed out
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "serve_paged.py"


# ---------------------------------------------------------------------------
# Building the same K/V twice
# ---------------------------------------------------------------------------


def scrambled_cache(lengths, rows, Hkv, seed, device, dtype=torch.float16, spare=3):
    """A cache in which ``rows[b]`` holds ``lengths[b]`` tokens on scattered pages.

    Pages are reserved one at a time, for a randomly chosen sequence or for a
    dummy row, and dummy rows are erased at random times, so the pages of a
    sequence are neither consecutive nor ascending. Every slot of the store
    starts as random garbage.
    """
    rng = random.Random(seed)
    needed = {row: math.ceil(n / PAGE) for row, n in zip(rows, lengths, strict=True)}
    dummies = [r for r in range(MAX_BATCH) if r not in rows]
    cache = PagedKVCache(
        sum(needed.values()) + spare, PAGE, MAX_BATCH, Hkv, D,
        max_pages_per_seq=MAX_PAGES, dtype=dtype, device=device,
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for store in (cache.k_cache, cache.v_cache):
        store.copy_(torch.randn(store.shape, generator=gen))
    while any(len(cache.pages(r)) < n for r, n in needed.items()):
        if rng.random() < 0.4 and cache.num_free_pages > 0:
            dummy = rng.choice(dummies)
            if rng.random() < 0.5 and cache.capacity(dummy) < MAX_PAGES * PAGE:
                cache.reserve(dummy, cache.capacity(dummy) + 1)
            else:
                cache.erase(dummy)
            continue
        row = rng.choice([r for r, n in needed.items() if len(cache.pages(r)) < n])
        if cache.num_free_pages == 0:
            cache.erase(rng.choice(dummies))
        cache.reserve(row, cache.capacity(row) + 1)
    for dummy in dummies:
        cache.erase(dummy)
    return cache


def paged_and_contiguous(lengths, L, Hkv, seed, device, dtype=torch.float16):
    """``(cache, q, k, v)``: contiguous ``k``/``v`` and the same tokens in ``cache``.

    The prefix of each sequence is written row by row, then the last ``L``
    tokens of every sequence in one batched ``write``, as a decode step would.
    """
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(B, HQ, L, D), rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    cache = scrambled_cache(lengths, ROWS[:B], Hkv, seed, device, dtype)
    new = min(L, min(lengths))
    for b, (row, n) in enumerate(zip(ROWS, lengths, strict=False)):
        old = n - new
        cache.write([row], torch.arange(old), k[b : b + 1, :, :old], v[b : b + 1, :, :old])
    positions = torch.stack([torch.arange(n - new, n) for n in lengths]).to(device)
    k_new = torch.stack([k[b, :, n - new : n] for b, n in enumerate(lengths)])
    v_new = torch.stack([v[b, :, n - new : n] for b, n in enumerate(lengths)])
    cache.write(torch.tensor(ROWS[:B]), positions, k_new, v_new)
    return cache, q, k, v


# ---------------------------------------------------------------------------
# Logical mods: query row i of entry b sits at position lengths[b] - L + i
# ---------------------------------------------------------------------------


def logical_mods(case, lengths, L, device):
    """``(score_mod, mask_mod)`` over logical positions for one named case."""
    lengths = torch.tensor(lengths, device=device)
    offsets = lengths - L

    def at_offset(mask_mod):
        # Shift the query to its position in the sequence, and never look
        # past the sequence's last token. Prefill rows before the sequence's
        # start (position < 0) and the kernels' padding rows are clamped, so
        # that mods indexing their tensors by position stay in bounds.
        def shifted(b, h, q_idx, kv_idx):
            position = q_idx + offsets[b]
            inside = (position >= 0) & (kv_idx < lengths[b])
            return inside & mask_mod(b, h, position.clamp(0, S - 1), kv_idx)

        shifted.__name__ = f"{mask_mod.__name__}_at_offset"
        return shifted

    def noop(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    if case == "noop":
        return None, noop
    if case == "causal":
        return None, at_offset(masks.causal())
    if case == "sliding_window":
        return None, at_offset(masks.sliding_window(20))
    if case == "document":
        gen = torch.Generator().manual_seed(7)
        # Document ids ascend along each sequence: random cut points.
        cuts = torch.rand(len(lengths), S, generator=gen) < 0.08
        doc_ids = cuts.cumsum(-1).to(device)

        def same_document(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

        return None, at_offset(same_document)
    if case == "alibi_kv_bias":
        alibi = mods.alibi(HQ, device=device)
        # Indexed by kv position: a physical index (up to n_pages * PAGE)
        # would fall outside it, so this checks score_mod sees logical ones.
        kv_bias = torch.randn(len(lengths), S, generator=torch.Generator().manual_seed(3))
        kv_bias = kv_bias.to(device)

        def alibi_kv_bias(score, b, h, q_idx, kv_idx):
            return alibi(score, b, h, q_idx + offsets[b], kv_idx) + kv_bias[b, kv_idx]

        alibi_kv_bias.__name__ = "alibi_kv_bias"

        return alibi_kv_bias, at_offset(masks.causal())
    raise AssertionError(case)


CASES = ("noop", "causal", "sliding_window", "document", "alibi_kv_bias")
PREFILL = max(LENGTHS)
QUERY_LENGTHS = (1, 3, 16, PREFILL)


def query_length_id(L):
    return f"prefill_L{L}" if L == PREFILL else f"L{L}"


def run_case(case, L, Hkv, device, attention, seed=0):
    """Paged attention by ``attention`` against the oracle on contiguous data."""
    cache, q, k, v = paged_and_contiguous(LENGTHS, L, Hkv, seed, device)
    score_mod, mask_mod = logical_mods(case, LENGTHS, L, device)
    logical = create_block_mask(mask_mod, len(LENGTHS), None, L, S, device=device,
                                BLOCK_SIZE=(16, PAGE))
    rows = torch.tensor(ROWS, device=device)
    physical = cache.convert_logical_block_mask(logical, rows)
    paged_score = cache.get_score_mod(score_mod, rows)
    k_pages, v_pages = cache.physical_kv(len(LENGTHS))
    out, lse = attention(q, k_pages, v_pages, paged_score, physical, Hkv != HQ)

    oracle = dense_oracle(q.double(), k.double(), v.double(), score_mod, logical, None, Hkv != HQ)
    lowp = lowp_attention(q, k, v, score_mod, logical, None, Hkv != HQ)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")
    assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")
    return cache, physical


def eager_reference(q, k, v, score_mod, block_mask, enable_gqa):
    return flex_attention_reference(q, k, v, score_mod, block_mask, enable_gqa=enable_gqa,
                                    return_lse=True)


def auto_compiled(q, k, v, score_mod, block_mask, enable_gqa):
    # flex_attention compiles itself when called eagerly.
    return flex_attention(q, k, v, score_mod, block_mask, enable_gqa=enable_gqa, return_lse=True)


# ---------------------------------------------------------------------------
# Paged == contiguous
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("Hkv", [HQ, 1], ids=["gqa1", "gqa4"])
@pytest.mark.parametrize("L", QUERY_LENGTHS, ids=query_length_id)
@pytest.mark.parametrize("case", CASES)
def test_eager_reference_matches_contiguous(case, L, Hkv, device):
    run_case(case, L, Hkv, device, eager_reference, seed=L)


# Every case at L=1 with GQA 4, the causal cache at L=3 and 16 without GQA,
# and a prefill with a score_mod; the rest of the grid runs with FLEX_INDUCTOR_SLOW=1 (each compile
# takes seconds in the interpreter).
COMPILED_FAST = {(c, 1, 1) for c in CASES} | {
    ("causal", 3, HQ), ("causal", 16, HQ), ("alibi_kv_bias", PREFILL, 1)
}
COMPILED_GRID = [
    pytest.param(c, L, h, marks=() if (c, L, h) in COMPILED_FAST else pytest.mark.slow,
                 id=f"{c}-{query_length_id(L)}-gqa{HQ // h}")
    for c in CASES for L in QUERY_LENGTHS for h in (HQ, 1)
]


@pytest.mark.parametrize("case,L,Hkv", COMPILED_GRID)
def test_compiled_matches_contiguous(case, L, Hkv, device):
    run_case(case, L, Hkv, device, auto_compiled, seed=L + 1)


def test_compiled_reads_store_in_place(device):
    """fullgraph: the wrapped mods trace, one template kernel, no copy of the store.

    The store is expanded to the query batch inside the compiled function;
    the stride-0 view must reach the kernel as a view, not as a
    ``(B, Hkv, n_pages * PAGE, D)`` buffer.
    """
    cache, q, k, v = paged_and_contiguous(LENGTHS, 3, 1, 5, device)
    score_mod, mask_mod = logical_mods("alibi_kv_bias", LENGTHS, 3, device)
    logical = create_block_mask(mask_mod, 3, None, 3, S, device=device, BLOCK_SIZE=(16, PAGE))
    rows = torch.tensor(ROWS, device=device)
    physical = cache.convert_logical_block_mask(logical, rows)
    paged_score = cache.get_score_mod(score_mod, rows)

    def attention(q, k_cache, v_cache):
        k_pages = k_cache.expand(3, *k_cache.shape[1:])
        v_pages = v_cache.expand(3, *v_cache.shape[1:])
        return flex_attention(q, k_pages, v_pages, paged_score, physical, enable_gqa=True)

    with torch.no_grad():
        result = compile_and_run(attention, q, cache.k_cache, cache.v_cache)
    templates = [n for n in result.kernels("") if n.startswith("triton_tem_")]
    assert len(templates) == 1, result.kernels("")
    assert re.search(r"flex_inductor_(fwd|decode)", templates[0]), templates
    N = cache.n_pages * PAGE
    assert f"(3, 1, {N}, {D})" not in result.source, "the store was copied per batch entry"
    oracle = dense_oracle(q.double(), k.double(), v.double(), score_mod, logical, None, True)
    lowp = lowp_attention(q, k, v, score_mod, logical, None, True)
    assert_close_to_oracle(result.output, oracle[0], lowp[0], "out")


def test_noop_mask_with_odd_kv_len(device):
    """A logical KV_LEN inside a page: the slots past it hold no token.

    The logical noop mask's last block is full, but the physical page also
    holds slots 101..111, filled with garbage: the converted mask turns that
    page partial and its mask_mod rejects them. B=1 broadcasts the mask.
    """
    n = 101
    lengths = (n, n, n)
    cache, q, k, v = paged_and_contiguous(lengths, 3, 1, 11, device)
    k, v = k[:, :, :n], v[:, :, :n]
    logical = create_block_mask(masks.noop_mask, None, None, 3, n, device=device,
                                BLOCK_SIZE=(16, PAGE))
    assert logical.full_kv_num_blocks.sum() == 7  # the short last block is full
    physical = cache.convert_logical_block_mask(logical, torch.tensor(ROWS, device=device))
    assert physical.full_kv_num_blocks.flatten().tolist() == [6, 6, 6]
    assert physical.kv_num_blocks.flatten().tolist() == [1, 1, 1]
    k_pages, v_pages = cache.physical_kv(3)
    oracle = dense_oracle(q.double(), k.double(), v.double(), None, None, None, True)
    lowp = lowp_attention(q, k, v, None, None, None, True)
    for attention in (eager_reference, auto_compiled):
        out, lse = attention(q, k_pages, v_pages, None, physical, True)
        assert_close_to_oracle(out, oracle[0], lowp[0], "out")
        assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")


@pytest.mark.parametrize("kv_block", [32, 64])
def test_page_size_dividing_the_kv_block(kv_block, device):
    """Logical blocks of several pages: each page becomes its own physical block."""
    cache, q, k, v = paged_and_contiguous(LENGTHS, 3, 1, 13, device)
    _, mask_mod = logical_mods("sliding_window", LENGTHS, 3, device)
    logical = create_block_mask(mask_mod, 3, None, 3, S, device=device, BLOCK_SIZE=(16, kv_block))
    physical = cache.convert_logical_block_mask(logical, torch.tensor(ROWS, device=device))
    assert physical.BLOCK_SIZE == (16, PAGE)
    out, lse = eager_reference(q, *cache.physical_kv(3), None, physical, True)
    oracle = dense_oracle(q.double(), k.double(), v.double(), None, logical, None, True)
    lowp = lowp_attention(q, k, v, None, logical, None, True)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")
    assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")


# ---------------------------------------------------------------------------
# The converted BlockMask
# ---------------------------------------------------------------------------


def test_scrambled_cache_is_scrambled(device):
    """The helper above really produces scattered, non-ascending page lists."""
    cache = scrambled_cache(LENGTHS, ROWS, 1, 0, device)
    pages = [cache.pages(r) for r in ROWS]
    assert any(p != sorted(p) for p in pages), pages
    assert any(max(p) - min(p) >= len(p) for p in pages), pages


def test_converted_layout(device):
    """Block counts are kept, and each visited page is one the row owns, in place of its block."""
    cache, *_ = paged_and_contiguous(LENGTHS, 1, 1, 0, device)
    _, mask_mod = logical_mods("causal", LENGTHS, 1, device)
    logical = create_block_mask(mask_mod, 3, None, 1, S, device=device, BLOCK_SIZE=(16, PAGE))
    rows = torch.tensor(ROWS, device=device)
    physical = cache.convert_logical_block_mask(logical, rows)
    assert physical.shape == (3, 1, 1, cache.n_pages * PAGE)
    assert torch.equal(physical.kv_num_blocks, logical.kv_num_blocks)
    assert torch.equal(physical.full_kv_num_blocks, logical.full_kv_num_blocks)
    table = cache.page_table[rows].long()
    for b in range(3):
        for num, idx, p_num, p_idx in (
            (logical.kv_num_blocks, logical.kv_indices, physical.kv_num_blocks,
             physical.kv_indices),
            (logical.full_kv_num_blocks, logical.full_kv_indices, physical.full_kv_num_blocks,
             physical.full_kv_indices),
        ):
            expected = sorted(table[b, idx[b, 0, 0, : num[b, 0, 0]].long()].tolist())
            assert p_idx[b, 0, 0, : p_num[b, 0, 0]].tolist() == expected
    # The transposed view was rebuilt for the physical layout.
    assert physical.q_num_blocks.shape == (3, 1, cache.n_pages)


def test_unreserved_blocks_are_dropped(device):
    """A logical mask reaching past a sequence's pages visits only the pages it owns."""
    cache = scrambled_cache((37,), (0,), 1, 1, device)
    logical = create_block_mask(masks.noop_mask, 1, None, 1, S, device=device,
                                BLOCK_SIZE=(16, PAGE))
    physical = cache.convert_logical_block_mask(logical)
    assert physical.full_kv_num_blocks.item() == 3  # ceil(37 / 16) pages, not 8 blocks
    assert physical.kv_num_blocks.item() == 0
    visited = physical.full_kv_indices[0, 0, 0, :3].tolist()
    assert visited == sorted(cache.pages(0))


def test_mask_mod_maps_physical_to_logical(device):
    """The wrapped mask_mod, evaluated densely, is the logical mask moved onto the pages."""
    cache = scrambled_cache((37, 16), (1, 3), 1, 2, device)
    rows = torch.tensor([1, 3], device=device)

    def before_30(b, h, q_idx, kv_idx):
        return kv_idx < 30 - 10 * b

    paged = cache.get_mask_mod(before_30, rows)
    assert paged.__name__ == "paged_before_30"
    n = cache.n_pages * PAGE
    dense = torch.vmap(torch.vmap(lambda b, kv: paged(b, b, b, kv), (None, 0)), (0, None))(
        torch.arange(2, device=device), torch.arange(n, device=device)
    )
    expected = torch.zeros(2, n, dtype=torch.bool)
    for b, row in enumerate((1, 3)):
        for logical_page, page in enumerate(cache.pages(row)):
            for offset in range(PAGE):
                position = logical_page * PAGE + offset
                expected[b, page * PAGE + offset] = position < 30 - 10 * b
    assert torch.equal(dense.cpu(), expected)


def test_score_mod_sees_logical_kv_idx(device):
    cache = scrambled_cache((40,), (2,), 1, 3, device)
    seen = cache.get_score_mod(lambda score, b, h, q_idx, kv_idx: kv_idx.to(score.dtype), [2])
    for logical_page, page in enumerate(cache.pages(2)):
        kv_idx = torch.tensor(page * PAGE + 5, device=device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        assert seen(torch.zeros((), device=device), zero, zero, zero, kv_idx).item() == (
            logical_page * PAGE + 5
        )
    assert cache.get_score_mod(None) is None


def test_physical_kv_is_a_stride0_view(device):
    cache = PagedKVCache(4, PAGE, 2, 2, D, v_head_dim=8, device=device)
    k, v = cache.physical_kv(5)
    assert k.shape == (5, 2, 4 * PAGE, D) and v.shape == (5, 2, 4 * PAGE, 8)
    assert k.stride(0) == 0 and v.stride(0) == 0
    assert k.data_ptr() == cache.k_cache.data_ptr()


# ---------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------


def assert_consistent(cache):
    """The page table, its inverse and the free list describe one partition of the pages."""
    table, inverse = cache.page_table.cpu(), cache.physical_to_logical.cpu()
    owned = []
    for row in range(cache.max_batch):
        pages = cache.pages(row)
        assert table[row, : len(pages)].tolist() == pages
        assert (table[row, len(pages) :] == -1).all()
        expected = torch.full((cache.n_pages,), -1, dtype=torch.int32)
        expected[pages] = torch.arange(len(pages), dtype=torch.int32)
        assert torch.equal(inverse[row], expected)
        assert cache.capacity(row) == len(pages) * cache.page_size
        owned += pages
    assert len(owned) == len(set(owned))
    assert sorted(owned + cache._free) == list(range(cache.n_pages))
    assert cache.num_free_pages == cache.n_pages - len(owned)


def test_reserve_and_erase(device):
    cache = PagedKVCache(6, PAGE, 3, 1, D, max_pages_per_seq=4, device=device)
    cache.reserve(0, 17)
    assert cache.pages(0) == [0, 1] and cache.capacity(0) == 32
    cache.reserve(0, 32)  # already held: nothing happens
    cache.reserve(0, 5)  # reserve never shrinks
    assert cache.pages(0) == [0, 1]
    cache.reserve(1, 1)
    cache.reserve(0, 33)
    assert cache.pages(0) == [0, 1, 3] and cache.pages(1) == [2]
    assert cache.num_free_pages == 2
    assert_consistent(cache)
    cache.erase(0)
    assert cache.pages(0) == [] and cache.num_free_pages == 5
    assert_consistent(cache)
    cache.reserve(2, 64)  # the erased pages come back first, in the same order
    assert cache.pages(2) == [0, 1, 3, 4]
    cache.reserve(1, 0)
    cache.erase(0)  # erasing an empty row is harmless
    assert_consistent(cache)


def test_random_reserve_erase_keeps_tables_consistent(device):
    rng = random.Random(0)
    cache = PagedKVCache(10, PAGE, 4, 1, D, max_pages_per_seq=5, device=device)
    for _ in range(200):
        row = rng.randrange(4)
        if rng.random() < 0.3:
            cache.erase(row)
        else:
            want = cache.capacity(row) + rng.randrange(1, 40)
            try:
                cache.reserve(row, min(want, 5 * PAGE))
            except ValueError:
                assert math.ceil(min(want, 5 * PAGE) / PAGE) - len(cache.pages(row)) > (
                    cache.num_free_pages
                )
        assert_consistent(cache)


def test_write_stores_tokens_at_logical_positions(device):
    """Row-by-row writes, then one batched update; read back through the page table."""
    cache = scrambled_cache((40, 20), (0, 1), 2, 4, device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 40, D, generator=gen).to(device)
    v = torch.randn(2, 2, 40, D, generator=gen).to(device)
    cache.write([0], torch.arange(40), k[:1], v[:1])
    cache.write(torch.tensor([1]), torch.arange(20)[None], k[1:, :, :20], v[1:, :, :20])
    positions = torch.tensor([[5, 6, 19], [0, 18, 19]])
    cache.write(torch.tensor([0, 1]), positions, k[:, :, :3] + 1, v[:, :, :3] + 1)
    for b, n in ((0, 40), (1, 20)):
        slots = torch.tensor(
            [cache.pages(b)[p // PAGE] * PAGE + p % PAGE for p in range(n)], device=device
        )
        expected_k, expected_v = k[b, :, :n].clone(), v[b, :, :n].clone()
        expected_k[:, positions[b]] = k[b, :, :3] + 1
        expected_v[:, positions[b]] = v[b, :, :3] + 1
        assert torch.equal(cache.k_cache[0][:, slots], expected_k)
        assert torch.equal(cache.v_cache[0][:, slots], expected_v)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_out_of_pages_error_is_atomic(device):
    cache = PagedKVCache(4, PAGE, 2, 1, D, device=device)
    cache.reserve(0, 40)
    with pytest.raises(ValueError, match=r"`seq_len` 40 for batch_idx 1 needs 3 more pages "
                                         r"but only 1 of 4 are free"):
        cache.reserve(1, 40)
    assert cache.pages(1) == [] and cache.num_free_pages == 1
    assert_consistent(cache)


def _zeros(S, Dk=D, H=1):
    return torch.zeros(1, H, S, Dk)


ERROR_CASES = {
    "seq_len_too_long": (lambda c: c.reserve(0, 9 * PAGE),
                         r"`seq_len` 144 exceeds .* max_pages_per_seq"),
    "seq_len_negative": (lambda c: c.reserve(0, -1), r"`seq_len` must be a non-negative int"),
    "batch_idx_range": (lambda c: c.reserve(2, 1), r"`batch_idx` must be in \[0, 2\)"),
    "batch_idx_float": (lambda c: c.reserve(1.0, 1), r"`batch_idx` must be an int"),
    "erase_range": (lambda c: c.erase(-1), r"`batch_idx` must be in \[0, 2\)"),
    "write_batch_idx_range": (lambda c: c.write([5], torch.arange(2), _zeros(2), _zeros(2)),
                              r"`batch_idx` entries must be in \[0, 2\)"),
    "write_unreserved": (
        lambda c: c.write([0], torch.arange(20), _zeros(20), _zeros(20)),
        r"`input_pos` 16 of batch_idx 0 lies in a page the row has not reserved",
    ),
    "write_negative": (lambda c: c.write([0], torch.arange(2) - 1, _zeros(2), _zeros(2)),
                       r"`input_pos` has positions outside .* = \[0, 128\)"),
    "write_float_pos": (lambda c: c.write([0], torch.arange(2.0), _zeros(2), _zeros(2)),
                        r"`input_pos` must be an integer tensor"),
    "write_k_heads": (lambda c: c.write([0], torch.arange(2), _zeros(2, H=2), _zeros(2)),
                      r"`k_val` must be \(B, Hkv, S, head_dim\) = \(1, 1, 2, 16\)"),
    "write_v_dim": (lambda c: c.write([0], torch.arange(2), _zeros(2), _zeros(2, Dk=8)),
                    r"`v_val` must be"),
    "write_pos_shape": (
        lambda c: c.write([0], torch.zeros(2, 2, dtype=torch.long), _zeros(2), _zeros(2)),
        r"`input_pos` must be \(B, S\)",
    ),
    "physical_kv_batch": (lambda c: c.physical_kv(0), r"`batch_size` must be a positive int"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_errors(name):
    call, match = ERROR_CASES[name]
    cache = PagedKVCache(8, PAGE, 2, 1, D, max_pages_per_seq=8, device="cpu")
    cache.reserve(0, PAGE)
    with pytest.raises(ValueError, match=match):
        call(cache)


@pytest.mark.parametrize("name", ["n_pages", "page_size", "max_batch", "num_kv_heads",
                                  "head_dim", "v_head_dim", "max_pages_per_seq"])
def test_constructor_errors(name):
    sizes = dict(n_pages=4, page_size=PAGE, max_batch=2, num_kv_heads=1, head_dim=D)
    sizes[name] = 0
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int, got 0"):
        PagedKVCache(**sizes, device="cpu")


def test_convert_errors():
    cache = PagedKVCache(8, PAGE, 4, 1, D, max_pages_per_seq=4, device="cpu")
    noop = masks.noop_mask
    with pytest.raises(TypeError, match="`block_mask` must be a flex_inductor BlockMask"):
        cache.convert_logical_block_mask("mask")
    with pytest.raises(ValueError, match="KV block size 24, which page_size 16 does not divide"):
        cache.convert_logical_block_mask(
            create_block_mask(noop, 1, 1, 1, 48, device="cpu", BLOCK_SIZE=24)
        )
    with pytest.raises(ValueError, match="KV_LEN 80 but a sequence holds at most .* = 64"):
        cache.convert_logical_block_mask(
            create_block_mask(noop, 1, 1, 1, 80, device="cpu", BLOCK_SIZE=16)
        )
    two = create_block_mask(noop, 2, 1, 1, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="batch size 2 but `batch_idx` has 3 entries"):
        cache.convert_logical_block_mask(two, [0, 1, 1])
    with pytest.raises(ValueError, match=r"`batch_idx` entries must be in \[0, 4\)"):
        cache.convert_logical_block_mask(two, [0, 7])
    with pytest.raises(ValueError, match="`batch_idx` must hold integers"):
        cache.convert_logical_block_mask(two, torch.tensor([0.0, 1.0]))
    assert isinstance(cache.convert_logical_block_mask(two), BlockMask)


# ---------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------


def test_serve_paged_example_runs(device, capsys):
    """docs/examples/serve_paged.py serves its toy model and checks itself, tiny settings.

    Four requests in three slots with seven pages: the fourth waits for pages
    that an erased sequence gives back.
    """
    example = runpy.run_path(str(EXAMPLE), run_name="serve_paged")
    report = example["main"](["--device", device, "--requests", "4", "--layers", "1"])
    assert report["finished"] == 4
    assert report["pages_reused"] > 0
    assert report["max_logit_error"] <= report["tolerance"]
    assert "served logits match the no-cache reference" in capsys.readouterr().out
