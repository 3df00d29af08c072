"""Golden code of the two backward kernels for ALiBi with learnable slopes.

One training call (``score + slopes[h] * (kv_idx - q_idx)`` with ``slopes``
requiring grad, under a causal BlockMask) is compiled, and the generated
Triton source of each backward template kernel is compared with the text
pinned inline below:

* ``test_dkdv``: the dK/dV kernel, which recomputes the scores (score_mod
  code between ``post_mod_scores`` markers), applies the mask_mod on partial
  blocks only, applies the joint graph's score gradient (``grad_scores``), and
  scatters the slopes' gradient, ``ds * (kv_idx - q_idx)``, with one
  ``tl.atomic_add`` per kept position;
* ``test_dq``: the dQ kernel, with the same score_mod and score gradient and
  no scatter.

Text is normalised as in ``test_golden_forward.py`` (``golden_utils``): the
kernel name's suffix and the config-dependent constexprs (``BLOCK_M1``,
``BLOCK_N1``, ``BLOCK_M2``, ``BLOCK_N2``, ``FLOAT32_PRECISION`` read
``<config>``).

How to read a diff: lines from the jinja templates
(``templates/flex_backward_dkdv.py.jinja``, ``flex_backward_dq.py.jinja``,
comments included) change when a template does; ``tmpN = ...`` lines are
Inductor's code for the mods and the joint graph; ``tl.store(out_ptr0 ...)``
and ``xindex`` lines are Inductor's ``store_output``. A change only in
``tmpN`` lines or argument names (``in_ptr11``) means Inductor's code
generation changed (a torch upgrade): check that the scatter still adds at
``slopes[h]`` with the mask, then accept it.

Regenerate after an intended change::

    EXPECTTEST_ACCEPT=1 .venv/bin/python -m pytest tests/test_golden_backward.py -p no:xdist

expecttest is not installed on the GPU machine; there this module skips.
"""

# The pinned kernels are generated code, with lines as long as Inductor writes them.
# ruff: noqa: E501

from __future__ import annotations

import functools

import pytest

expecttest = pytest.importorskip("expecttest")

import torch  # noqa: E402
from compile_utils import compile_and_run  # noqa: E402
from conftest import DEVICE  # noqa: E402
from golden_utils import normalise_kernel  # noqa: E402

from flex_inductor import create_block_mask, flex_attention, masks, mods  # noqa: E402

_CONFIG_CONSTEXPRS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "FLOAT32_PRECISION")
H, L, E = 4, 64, 16


@functools.cache
def _training_source() -> str:
    """Generated code of one forward and backward call (compiled once per process)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn((1, H, L, E), generator=gen).to(DEVICE, torch.float16).requires_grad_()
        for _ in range(3)
    )
    slopes = torch.tensor(mods.alibi_slopes(H), device=DEVICE, requires_grad=True)
    block_mask = create_block_mask(masks.causal(), 1, 1, L, L, device=DEVICE, BLOCK_SIZE=32)

    def alibi_learnable(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=alibi_learnable, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, grad_outputs=torch.ones_like(q))
    assert slopes.grad is not None
    return result.source


def _kernel(inner: str) -> str:
    return normalise_kernel(_training_source(), "flex_inductor_bwd", inner, _CONFIG_CONSTEXPRS)


class TestGoldenBackward(expecttest.TestCase):
    maxDiff = None

    def test_dkdv(self):
        self.assertExpectedInline(_kernel("_dkdv_inner"), """\
def triton_tem_fused_flex_inductor_bwd(arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_DV, arg_Q_NUM_BLKS, arg_Q_IDX, arg_FULL_Q_NUM_BLKS, arg_FULL_Q_IDX, in_ptr11, in_ptr12, out_ptr0):
    BLOCK_M1 : tl.constexpr = <config>
    BLOCK_N1 : tl.constexpr = <config>
    HAS_SCATTER : tl.constexpr = True
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    PRESCALE_QK : tl.constexpr = False
    IS_DIVISIBLE : tl.constexpr = True
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32
    Q = arg_Q
    K = arg_K
    V = arg_V
    LSE = arg_LSE
    DELTA = arg_DELTA
    DO = arg_DO
    DV = arg_DV
    Q_NUM_BLKS = arg_Q_NUM_BLKS
    Q_IDX = arg_Q_IDX
    FULL_Q_NUM_BLKS = arg_FULL_Q_NUM_BLKS
    FULL_Q_IDX = arg_FULL_Q_IDX

    stride_qz, stride_qh, stride_qm, stride_qk = 4096, 1024, 16, 1
    stride_kz, stride_kh, stride_kn, stride_kk = 4096, 1024, 16, 1
    stride_vz, stride_vh, stride_vn, stride_vk = 4096, 1024, 16, 1
    stride_lz, stride_lh, stride_lm = 256, 64, 1
    stride_dz, stride_dh, stride_dm = 256, 64, 1
    stride_doz, stride_doh, stride_dom, stride_dok = 4096, 1024, 16, 1
    stride_dvz, stride_dvh, stride_dvn, stride_dvk = 4096, 1024, 16, 1
    stride_nz, stride_nh, stride_nn = 2, 2, 1
    stride_iz, stride_ih, stride_in, stride_im = 4, 4, 2, 1
    stride_fnz, stride_fnh, stride_fnn = 2, 2, 1
    stride_fiz, stride_fih, stride_fin, stride_fim = 4, 4, 2, 1

    Q_LEN = 64
    KV_LEN = 64
    SPARSE_Z = 1
    SPARSE_H = 1

    start_n = tl.program_id(0)
    off_z = tl.program_id(1)
    off_hkv = tl.program_id(2)
    sparse_z = off_z % SPARSE_Z
    sparse_n = (start_n * BLOCK_N1) // SPARSE_KV_BLOCK_SIZE

    offs_n = start_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, QK_HEAD_DIM_ROUNDED)
    offs_v = tl.arange(0, V_HEAD_DIM_ROUNDED)

    # Keep this program's K and V in registers: every query block reuses them.
    k = tl.load(
        K + off_z * stride_kz + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
        mask=(offs_n[:, None] < KV_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0,
    )
    v = tl.load(
        V + off_z * stride_vz + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk,
        mask=(offs_n[:, None] < KV_LEN) & (offs_v[None, :] < V_HEAD_DIM), other=0.0,
    )
    dk = tl.zeros([BLOCK_N1, QK_HEAD_DIM_ROUNDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, V_HEAD_DIM_ROUNDED], dtype=tl.float32)

    # GQA: this kv head serves GQA_SHARED_HEADS query heads; their
    # contributions are summed here, in registers.
    for g in range(0, GQA_SHARED_HEADS):
        off_h = off_hkv * GQA_SHARED_HEADS + g
        sparse_h = off_h % SPARSE_H
        Q_base = Q + off_z * stride_qz + off_h * stride_qh
        DO_base = DO + off_z * stride_doz + off_h * stride_doh
        LSE_base = LSE + off_z * stride_lz + off_h * stride_lh
        DELTA_base = DELTA + off_z * stride_dz + off_h * stride_dh
        if USE_TMA:
            # TMA tile copies, zero-filled past Q_LEN and the head dims (see
            # the forward); the lowering checks the alignment they need.
            Q_src = tl.make_tensor_descriptor(
                Q_base, shape=[Q_LEN, QK_HEAD_DIM], strides=[stride_qm, 1],
                block_shape=[BLOCK_M1, QK_HEAD_DIM_ROUNDED],
            )
            DO_src = tl.make_tensor_descriptor(
                DO_base, shape=[Q_LEN, V_HEAD_DIM], strides=[stride_dom, 1],
                block_shape=[BLOCK_M1, V_HEAD_DIM_ROUNDED],
            )
        else:
            Q_src = Q_base
            DO_src = DO_base

        if HAS_PARTIAL_BLOCKS:  # none without a BlockMask (see the forward)
            q_num = tl.load(Q_NUM_BLKS + sparse_z * stride_nz + sparse_h * stride_nh + sparse_n * stride_nn).to(tl.int32)
            q_row = Q_IDX + sparse_z * stride_iz + sparse_h * stride_ih + sparse_n * stride_in
            dk, dv = _dkdv_inner(
                arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_DV, arg_Q_NUM_BLKS, arg_Q_IDX, arg_FULL_Q_NUM_BLKS, arg_FULL_Q_IDX, in_ptr11, in_ptr12, out_ptr0,
                k, v, dk, dv, Q_src, DO_src, LSE_base, DELTA_base, q_row, stride_im, q_num,
                off_z, off_h, offs_n, offs_d, offs_v,
                stride_qm, stride_qk, stride_dom, stride_dok, stride_lm, stride_dm, Q_LEN, KV_LEN,
                IS_FULL_BLOCKS=False,
            )
        if HAS_FULL_BLOCKS:
            q_num = tl.load(FULL_Q_NUM_BLKS + sparse_z * stride_fnz + sparse_h * stride_fnh + sparse_n * stride_fnn).to(tl.int32)
            q_row = FULL_Q_IDX + sparse_z * stride_fiz + sparse_h * stride_fih + sparse_n * stride_fin
            dk, dv = _dkdv_inner(
                arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_DV, arg_Q_NUM_BLKS, arg_Q_IDX, arg_FULL_Q_NUM_BLKS, arg_FULL_Q_IDX, in_ptr11, in_ptr12, out_ptr0,
                k, v, dk, dv, Q_src, DO_src, LSE_base, DELTA_base, q_row, stride_fim, q_num,
                off_z, off_h, offs_n, offs_d, offs_v,
                stride_qm, stride_qk, stride_dom, stride_dok, stride_lm, stride_dm, Q_LEN, KV_LEN,
                IS_FULL_BLOCKS=True,
            )

    dv_ptrs = DV + off_z * stride_dvz + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvk
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < KV_LEN) & (offs_v[None, :] < V_HEAD_DIM))

    # The scale multiplied q @ k^T in the forward, so it multiplies dk once here.
    dk *= SM_SCALE
    idx_z = off_z
    idx_h = off_hkv
    idx_n = offs_n[:, None]
    idx_d = offs_d[None, :]
    mask = (idx_n < KV_LEN) & (idx_d < QK_HEAD_DIM)
    xindex = idx_d + 16*idx_n + 1024*idx_h + 4096*idx_z
    tl.store(out_ptr0 + (tl.broadcast_to(idx_d + 16*idx_n + 1024*idx_h, [BLOCK_N1, QK_HEAD_DIM_ROUNDED])), dk, mask)

@triton.jit
def _dkdv_inner(
    arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_DV, arg_Q_NUM_BLKS, arg_Q_IDX, arg_FULL_Q_NUM_BLKS, arg_FULL_Q_IDX, in_ptr11, in_ptr12, out_ptr0,
    k, v, dk, dv, Q_src, DO_src, LSE_base, DELTA_base, q_row, stride_row, q_num,
    off_z, off_h, offs_n, offs_d, offs_v,
    stride_qm, stride_qk, stride_dom, stride_dok, stride_lm, stride_dm, Q_LEN, KV_LEN,
    IS_FULL_BLOCKS: tl.constexpr,
):
    \"\"\"Accumulate dk and dv over the query blocks of one transposed-mask row.\"\"\"
    BLOCK_M1 : tl.constexpr = <config>
    BLOCK_N1 : tl.constexpr = <config>
    HAS_SCATTER : tl.constexpr = True
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    PRESCALE_QK : tl.constexpr = False
    IS_DIVISIBLE : tl.constexpr = True
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32

    LOG2E: tl.constexpr = 1.4426950408889634
    Q_STEPS: tl.constexpr = SPARSE_Q_BLOCK_SIZE // BLOCK_M1

    # Indices handed to the mods are clamped into range, as in the forward.
    kv_idx = tl.minimum(offs_n, KV_LEN - 1)[:, None]
    num_steps = q_num * Q_STEPS
    # start_m is loop-carried and the next block index is loaded one step
    # ahead, so that loads never wait on an index load, and int16 indices
    # are widened (see the forward).
    start_m = tl.load(q_row).to(tl.int32) * SPARSE_Q_BLOCK_SIZE
    for step in range(0, num_steps):
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        row_ok = offs_m < Q_LEN

        if USE_TMA:
            q = Q_src.load([start_m, 0])
        else:
            q = tl.load(
                Q_src + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=row_ok[:, None] & (offs_d[None, :] < QK_HEAD_DIM), other=0.0,
            )
        q_scores = q
        if PRESCALE_QK:
            # The scores the forward's lse was taken over: q scaled, then
            # rounded to its dtype, as the forward did (dk still uses q).
            q_scores = (q.to(tl.float32) * SM_SCALE).to(q.dtype)
        qkT = tl.dot(k, tl.trans(q_scores), input_precision=FLOAT32_PRECISION)
        q_idx = tl.minimum(offs_m, Q_LEN - 1)[None, :]
        if SCORE_MOD_IS_IDENTITY:
            # No score_mod: the scale is folded into EXP2_FACTOR below
            # (unless q was prescaled).
            post_mod_scores = qkT
        else:
            if not PRESCALE_QK:
                qkT = qkT * SM_SCALE
            tmp0 = (qkT)
            tmp1 = (off_h)
            tmp2 = tl.load(in_ptr11 + tmp1)
            tmp3 = (kv_idx)
            tmp4 = tmp3.to(tl.float32)
            tmp5 = (q_idx)
            tmp6 = tmp5.to(tl.float32)
            tmp7 = tmp4 - tmp6
            tmp8 = tmp2 * tmp7
            tmp9 = tmp0 + tmp8
            post_mod_scores = tmp9

        keep = row_ok[None, :] & (offs_n[:, None] < KV_LEN)
        if not IS_FULL_BLOCKS:
            tmp10 = (q_idx)
            tmp11 = (kv_idx)
            tmp12 = tmp10 >= tmp11
            mask_mod_output = tmp12

            keep = keep & mask_mod_output
        if not IS_FULL_BLOCKS or not IS_DIVISIBLE:
            # Full blocks of whole tiles keep every position: no select.
            post_mod_scores = tl.where(keep, post_mod_scores, float("-inf"))

        # A fully masked row has lse == -inf; +inf instead makes its p zero.
        lse = tl.load(LSE_base + offs_m * stride_lm, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        # One fused multiply-add per score (see EXP2_FACTOR in the forward).
        pT = tl.math.exp2(post_mod_scores * EXP2_FACTOR - lse[None, :])

        if USE_TMA:
            do = DO_src.load([start_m, 0])
        else:
            do = tl.load(
                DO_src + offs_m[:, None] * stride_dom + offs_v[None, :] * stride_dok,
                mask=row_ok[:, None] & (offs_v[None, :] < V_HEAD_DIM), other=0.0,
            )
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=FLOAT32_PRECISION)
        delta = tl.load(DELTA_base + offs_m * stride_dm, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=FLOAT32_PRECISION)
        dsT = pT * (dpT - delta[None, :])

        if SCORE_MOD_IS_IDENTITY:
            grad_scores = dsT
        else:
            tmp13 = (dsT)
            grad_scores = tmp13

        if not IS_FULL_BLOCKS or not IS_DIVISIBLE:
            grad_scores = tl.where(keep, grad_scores, 0.0)
        # Gradients of captured tensors: one atomic add per kept position.
        tmp14 = (off_h)
        tmp15 = (dsT)
        tmp16 = (kv_idx)
        tmp17 = (q_idx)
        tmp18 = tmp16 - tmp17
        tmp19 = tmp18.to(tl.float32)
        tmp20 = tmp15 * tmp19
        tmp21 = tmp20.to(tl.float32)
        tl.atomic_add(in_ptr12 + tl.broadcast_to(tmp14, tmp21.shape), tmp21, keep, sem='relaxed')

        dk = tl.dot(grad_scores.to(q.dtype), q, dk, input_precision=FLOAT32_PRECISION)

        next_step = step + 1
        next_block = tl.load(q_row + (next_step // Q_STEPS) * stride_row, mask=next_step < num_steps, other=0).to(tl.int32)
        # A select, not a branch: control flow in the loop would stop pipelining.
        start_m = tl.where(next_step % Q_STEPS == 0, next_block * SPARSE_Q_BLOCK_SIZE, start_m + BLOCK_M1)
    return dk, dv
""")

    def test_dq(self):
        self.assertExpectedInline(_kernel("_dq_inner"), """\
def triton_tem_fused_flex_inductor_bwd(arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, in_ptr10, out_ptr0):
    BLOCK_M2 : tl.constexpr = <config>
    BLOCK_N2 : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    PRESCALE_QK : tl.constexpr = False
    IS_DIVISIBLE : tl.constexpr = True
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32
    Q = arg_Q
    K = arg_K
    V = arg_V
    LSE = arg_LSE
    DELTA = arg_DELTA
    DO = arg_DO
    KV_NUM_BLKS = arg_KV_NUM_BLKS
    KV_IDX = arg_KV_IDX
    FULL_KV_NUM_BLKS = arg_FULL_KV_NUM_BLKS
    FULL_KV_IDX = arg_FULL_KV_IDX

    stride_qz, stride_qh, stride_qm, stride_qk = 4096, 1024, 16, 1
    stride_kz, stride_kh, stride_kn, stride_kk = 4096, 1024, 16, 1
    stride_vz, stride_vh, stride_vn, stride_vk = 4096, 1024, 16, 1
    stride_lz, stride_lh, stride_lm = 256, 64, 1
    stride_dz, stride_dh, stride_dm = 256, 64, 1
    stride_doz, stride_doh, stride_dom, stride_dok = 4096, 1024, 16, 1
    stride_nz, stride_nh, stride_nm = 2, 2, 1
    stride_iz, stride_ih, stride_im, stride_in = 4, 4, 2, 1
    stride_fnz, stride_fnh, stride_fnm = 2, 2, 1
    stride_fiz, stride_fih, stride_fim, stride_fin = 4, 4, 2, 1

    Q_LEN = 64
    KV_LEN = 64
    SPARSE_Z = 1
    SPARSE_H = 1

    start_m = tl.program_id(0)
    if LONGEST_FIRST:
        # Longest rows first under causal-like masks (see the forward).
        start_m = tl.num_programs(0) - 1 - start_m
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    off_hkv = off_h // GQA_SHARED_HEADS
    sparse_z = off_z % SPARSE_Z
    sparse_h = off_h % SPARSE_H
    sparse_m = (start_m * BLOCK_M2) // SPARSE_Q_BLOCK_SIZE

    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, QK_HEAD_DIM_ROUNDED)
    offs_v = tl.arange(0, V_HEAD_DIM_ROUNDED)
    row_ok = offs_m < Q_LEN

    # q, dO, lse and delta stay in registers: every kv block reuses them.
    q = tl.load(
        Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
        mask=row_ok[:, None] & (offs_d[None, :] < QK_HEAD_DIM), other=0.0,
    )
    do = tl.load(
        DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_v[None, :] * stride_dok,
        mask=row_ok[:, None] & (offs_v[None, :] < V_HEAD_DIM), other=0.0,
    )
    if PRESCALE_QK:
        # Scores as the forward computed them (q scaled, then rounded to its
        # dtype), so that they match the lse it saved; dq still takes the
        # scale once at the end.
        q = (q.to(tl.float32) * SM_SCALE).to(q.dtype)
    lse = tl.load(LSE + off_z * stride_lz + off_h * stride_lh + offs_m * stride_lm, mask=row_ok, other=float("inf"))
    # A fully masked row has lse == -inf; +inf instead makes its p zero.
    # Kept in the log2 domain, as the loop's exp2 wants it.
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + off_z * stride_dz + off_h * stride_dh + offs_m * stride_dm, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M2, QK_HEAD_DIM_ROUNDED], dtype=tl.float32)

    K_base = K + off_z * stride_kz + off_hkv * stride_kh
    V_base = V + off_z * stride_vz + off_hkv * stride_vh
    if USE_TMA:
        # TMA tile copies, zero-filled past KV_LEN and the head dims (see the forward).
        K_src = tl.make_tensor_descriptor(
            K_base, shape=[KV_LEN, QK_HEAD_DIM], strides=[stride_kn, 1],
            block_shape=[BLOCK_N2, QK_HEAD_DIM_ROUNDED],
        )
        V_src = tl.make_tensor_descriptor(
            V_base, shape=[KV_LEN, V_HEAD_DIM], strides=[stride_vn, 1],
            block_shape=[BLOCK_N2, V_HEAD_DIM_ROUNDED],
        )
    else:
        K_src = K_base
        V_src = V_base
    if HAS_PARTIAL_BLOCKS:  # none without a BlockMask (see the forward)
        kv_num = tl.load(KV_NUM_BLKS + sparse_z * stride_nz + sparse_h * stride_nh + sparse_m * stride_nm).to(tl.int32)
        kv_row = KV_IDX + sparse_z * stride_iz + sparse_h * stride_ih + sparse_m * stride_im
        dq = _dq_inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, in_ptr10, out_ptr0,
            q, do, lse, delta, dq, K_src, V_src, kv_row, stride_in, kv_num,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=False,
        )
    if HAS_FULL_BLOCKS:
        kv_num = tl.load(FULL_KV_NUM_BLKS + sparse_z * stride_fnz + sparse_h * stride_fnh + sparse_m * stride_fnm).to(tl.int32)
        kv_row = FULL_KV_IDX + sparse_z * stride_fiz + sparse_h * stride_fih + sparse_m * stride_fim
        dq = _dq_inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, in_ptr10, out_ptr0,
            q, do, lse, delta, dq, K_src, V_src, kv_row, stride_fin, kv_num,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=True,
        )

    dq *= SM_SCALE
    idx_z = off_z
    idx_h = off_h
    idx_m = offs_m[:, None]
    idx_d = offs_d[None, :]
    mask = (idx_m < Q_LEN) & (idx_d < QK_HEAD_DIM)
    xindex = idx_d + 16*idx_m + 1024*idx_h + 4096*idx_z
    tl.store(out_ptr0 + (tl.broadcast_to(idx_d + 16*idx_m + 1024*idx_h, [BLOCK_M2, QK_HEAD_DIM_ROUNDED])), dq, mask)

@triton.jit
def _dq_inner(
    arg_Q, arg_K, arg_V, arg_LSE, arg_DELTA, arg_DO, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, in_ptr10, out_ptr0,
    q, do, lse, delta, dq, K_src, V_src, kv_row, stride_row, kv_num,
    off_z, off_h, offs_m, offs_d, offs_v,
    stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
    IS_FULL_BLOCKS: tl.constexpr,
):
    \"\"\"Accumulate dq over the kv blocks of one BlockMask row.\"\"\"
    BLOCK_M2 : tl.constexpr = <config>
    BLOCK_N2 : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    PRESCALE_QK : tl.constexpr = False
    IS_DIVISIBLE : tl.constexpr = True
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32

    KV_STEPS: tl.constexpr = SPARSE_KV_BLOCK_SIZE // BLOCK_N2

    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    row_ok = offs_m < Q_LEN
    num_steps = kv_num * KV_STEPS
    # start_n is loop-carried and the next block index is loaded one step
    # ahead, so that loads never wait on an index load, and int16 indices
    # are widened (see the forward).
    start_n = tl.load(kv_row).to(tl.int32) * SPARSE_KV_BLOCK_SIZE
    for step in range(0, num_steps):
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        col_ok = offs_n < KV_LEN

        # K and V are read in their stored layout and transposed in the dots.
        if USE_TMA:
            k = K_src.load([start_n, 0])
        else:
            k = tl.load(
                K_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                mask=col_ok[:, None] & (offs_d[None, :] < QK_HEAD_DIM), other=0.0,
            )
        qk = tl.dot(q, tl.trans(k), input_precision=FLOAT32_PRECISION)
        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
        if SCORE_MOD_IS_IDENTITY:
            # No score_mod: the scale is folded into EXP2_FACTOR below
            # (unless q was prescaled).
            post_mod_scores = qk
        else:
            if not PRESCALE_QK:
                qk = qk * SM_SCALE
            tmp0 = (qk)
            tmp1 = (off_h)
            tmp2 = tl.load(in_ptr10 + tmp1)
            tmp3 = (kv_idx)
            tmp4 = tmp3.to(tl.float32)
            tmp5 = (q_idx)
            tmp6 = tmp5.to(tl.float32)
            tmp7 = tmp4 - tmp6
            tmp8 = tmp2 * tmp7
            tmp9 = tmp0 + tmp8
            post_mod_scores = tmp9

        keep = row_ok[:, None] & col_ok[None, :]
        if not IS_FULL_BLOCKS:
            tmp10 = (q_idx)
            tmp11 = (kv_idx)
            tmp12 = tmp10 >= tmp11
            mask_mod_output = tmp12

            keep = keep & mask_mod_output
        if not IS_FULL_BLOCKS or not IS_DIVISIBLE:
            # Full blocks of whole tiles keep every position: no select.
            post_mod_scores = tl.where(keep, post_mod_scores, float("-inf"))
        # lse arrives in the log2 domain: one fused multiply-add per score.
        p = tl.math.exp2(post_mod_scores * EXP2_FACTOR - lse[:, None])

        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v = tl.load(
                V_src + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk,
                mask=col_ok[:, None] & (offs_v[None, :] < V_HEAD_DIM), other=0.0,
            )
        dp = tl.dot(do, tl.trans(v), input_precision=FLOAT32_PRECISION)
        ds = p * (dp - delta[:, None])
        if SCORE_MOD_IS_IDENTITY:
            grad_scores = ds
        else:
            tmp13 = (ds)
            grad_scores = tmp13

        if not IS_FULL_BLOCKS or not IS_DIVISIBLE:
            grad_scores = tl.where(keep, grad_scores, 0.0)
        dq = tl.dot(grad_scores.to(k.dtype), k, dq, input_precision=FLOAT32_PRECISION)

        next_step = step + 1
        next_block = tl.load(kv_row + (next_step // KV_STEPS) * stride_row, mask=next_step < num_steps, other=0).to(tl.int32)
        # A select, not a branch: control flow in the loop would stop pipelining.
        start_n = tl.where(next_step % KV_STEPS == 0, next_block * SPARSE_KV_BLOCK_SIZE, start_n + BLOCK_N2)
    return dq
""")
