"""BlockMasks with int16 block indices (``index_dtype=torch.int16``).

The layout must equal the int32 one entry for entry, every constructor must
keep the dtype, bad dtypes and too many blocks must be refused, and the
compiled kernels (forward, both backward kernels, decode) must give exactly
the int32 mask's results, including where a block index times the block
size no longer fits in int16 (block 256 and above at block size 128).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import create_block_mask, flex_attention, masks
from flex_inductor.block_mask import _TENSOR_NAMES as TENSORS
from flex_inductor.block_mask import BlockMask


def _assert_same_layout(ours: BlockMask, ref: BlockMask, dtype: torch.dtype) -> None:
    for name in TENSORS:
        got, want = getattr(ours, name), getattr(ref, name)
        assert got.dtype == dtype, name
        assert torch.equal(got.long(), want.long()), name


def test_int16_layout_equals_int32_at_half_the_memory():
    mask = masks.and_masks(masks.causal(), masks.sliding_window(40))
    args = (mask, 2, 1, 113, 200, "cpu", 16)
    ref = create_block_mask(*args)
    small = create_block_mask(*args, index_dtype=torch.int16)
    _assert_same_layout(small, ref, torch.int16)
    assert small.index_dtype == torch.int16 and ref.index_dtype == torch.int32
    nbytes = sum(getattr(small, n).nbytes for n in TENSORS)
    assert 2 * nbytes == sum(getattr(ref, n).nbytes for n in TENSORS)
    assert torch.equal(small.to_dense(), ref.to_dense())


def test_int16_survives_from_kv_blocks_indexing_and_to():
    ref = create_block_mask(masks.causal(), 2, 2, 64, 64, "cpu", 16)
    rebuilt = BlockMask.from_kv_blocks(
        ref.kv_num_blocks,
        ref.kv_indices,
        ref.full_kv_num_blocks,
        ref.full_kv_indices,
        BLOCK_SIZE=16,
        mask_mod=ref.mask_mod,
        index_dtype=torch.int16,
    )
    # The transposed view is computed from the int16 kv view.
    _assert_same_layout(rebuilt, ref, torch.int16)
    _assert_same_layout(rebuilt[1, :, 1:3], ref[1, :, 1:3], torch.int16)
    _assert_same_layout(rebuilt.to("cpu"), ref, torch.int16)


@pytest.mark.parametrize("bad", [torch.int64, torch.int8, "int16", None])
def test_index_dtype_must_be_int32_or_int16(bad):
    with pytest.raises(TypeError, match="`index_dtype` must be torch.int32 or torch.int16"):
        create_block_mask(masks.causal(), None, None, 64, 64, "cpu", 16, index_dtype=bad)
    ref = create_block_mask(masks.causal(), None, None, 64, 64, "cpu", 16)
    with pytest.raises(TypeError, match="`index_dtype`"):
        BlockMask.from_kv_blocks(ref.kv_num_blocks, ref.kv_indices, index_dtype=bad)


def test_int16_refuses_more_blocks_than_it_holds():
    # 32768 kv blocks of one position: the count 32768 does not fit in int16.
    # The check runs before the mask is evaluated.
    with pytest.raises(ValueError, match=r"`index_dtype`.*32767.*\(1, 32768\)"):
        create_block_mask(masks.causal(), None, None, 1, 32768, "cpu", 1, index_dtype=torch.int16)
    create_block_mask(masks.causal(), None, None, 1, 32767, "cpu", 1, index_dtype=torch.int16)


# Whole-block tiles: the interpreter's time goes by programs, and most of
# these programs have no block to visit.
WHOLE_BLOCK_TILES = {
    f"{key}{suffix}": 128 for key in ("BLOCK_M", "BLOCK_N") for suffix in ("", "1", "2")
}


def _run(q, k, v, block_mask, grad):
    for t in (q, k, v):
        t.grad = None
        t.requires_grad_(grad)
    torch._dynamo.reset()
    out, lse = torch.compile(flex_attention, fullgraph=True)(
        q, k, v, block_mask=block_mask, return_lse=True, kernel_options=WHOLE_BLOCK_TILES
    )
    if not grad:
        return out.detach(), lse.detach()
    out.backward(torch.ones_like(out))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _qkv(L, S, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, n, D, generator=gen).to(DEVICE) for n in (L, S, S)]


@pytest.mark.parametrize(
    "L, S, keep",
    [
        # Forward and dQ walk kv blocks 256 and 257 (offsets past 32767).
        (16, 258 * 128, lambda b, h, q, kv: kv >= 258 * 128 - 200),
        # dK/dV walks query blocks 256 and 257. Slow in the interpreter (about
        # 100 s): Inductor's delta reduction runs one program per query row.
        pytest.param(
            258 * 128, 16, lambda b, h, q, kv: q >= 258 * 128 - 200, marks=pytest.mark.slow
        ),
    ],
    ids=["long_kv", "long_q"],
)
def test_int16_kernels_match_int32_past_the_int16_offsets(L, S, keep):
    q, k, v = _qkv(L, S)
    results = {}
    for dtype in (torch.int32, torch.int16):
        bm = create_block_mask(keep, None, None, L, S, DEVICE, 128, index_dtype=dtype)
        results[dtype] = _run(q, k, v, bm, grad=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results.values(), strict=True):
        assert torch.equal(a, b), name
    # And both are right: an index that wrapped would read other blocks.
    ref_out, ref_lse = dense_oracle(q.double(), k.double(), v.double(), mask=keep)
    low_out, _ = lowp_attention(q.detach(), k.detach(), v.detach(), mask=keep)
    assert_close_to_oracle(results[torch.int16][0], ref_out, low_out, "out")


def test_int16_decode_matches_int32_past_the_int16_offsets():
    # One query row: the decode template, reading kv blocks 256 and 257.
    S = 258 * 128

    def keep(b, h, q, kv):
        return kv >= S - 200

    q, k, v = _qkv(1, S)
    got = {}
    for dtype in (torch.int32, torch.int16):
        bm = create_block_mask(keep, None, None, 1, S, DEVICE, 128, index_dtype=dtype)
        got[dtype] = _run(q, k, v, bm, grad=False)
    for a, b in zip(*got.values(), strict=True):
        assert torch.equal(a, b)
    ref_out, _ = dense_oracle(q.double(), k.double(), v.double(), mask=keep)
    low_out, _ = lowp_attention(q, k, v, mask=keep)
    assert_close_to_oracle(got[torch.int16][0], ref_out, low_out, "out")


def test_paged_conversion_of_an_int16_mask_is_int32():
    from flex_inductor.paged import PagedKVCache

    cache = PagedKVCache(8, 16, 2, 1, 16, max_pages_per_seq=4, device="cpu")
    for row in (0, 1):
        cache.reserve(row, 64)
    logical = create_block_mask(masks.causal(), 2, 1, 64, 64, "cpu", 16)
    small = create_block_mask(masks.causal(), 2, 1, 64, 64, "cpu", 16, index_dtype=torch.int16)
    physical = cache.convert_logical_block_mask(small)
    # Physical page numbers may pass 32767, so the result is int32, and it is
    # the conversion of the same layout.
    _assert_same_layout(physical, cache.convert_logical_block_mask(logical), torch.int32)
