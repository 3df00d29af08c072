# ruff: noqa: E501  (the pinned kernel source keeps Inductor's long lines)
"""Golden code of the forward kernel for three canonical cases.

Each test compiles one ``flex_attention`` call and compares the generated
Triton source of our template kernel (from ``def triton_tem_..._flex_inductor_fwd``
through the end of its ``_inner`` helper) with the text pinned inline below:

* ``test_noop``: no score_mod, no BlockMask (every block full);
* ``test_causal_block_mask``: a causal BlockMask, so the partial-block pass
  carries the mask_mod (``q_idx >= kv_idx``);
* ``test_alibi_captured_tensor``: ALiBi, whose per-head slopes are a captured
  tensor loaded inside the score_mod code (``tl.load(in_ptr5 + off_h)``).

Volatile text is normalised first (see ``normalise``): the kernel name's
suffix, and the constexprs that depend on the chosen config or the machine
(``BLOCK_M``, ``BLOCK_N``, ``IS_DIVISIBLE``, ``FLOAT32_PRECISION`` read
``<config>``). The ``@triton_heuristics.template(...)`` metadata (device,
hashes, autotune picks, num_warps) is outside the extracted text. Shapes and
strides are fixed by the test, so they stay literal.

How to read a diff: lines from the jinja template (``templates/flex_forward.py.jinja``,
comments included) change when the template does; ``tmpN = ...`` lines are
Inductor's code for the mods, between ``post_mod_scores``/``mask_mod_output``
markers; ``tl.store(out_ptr0 ...)`` and ``xindex`` lines are Inductor's
``store_output``. A template edit should show up as exactly that edit. A
change only in ``tmpN`` lines or in argument names (``in_ptr8``) means
Inductor's code generation changed (a torch upgrade): check the new code
still reads captured tensors with the right strides, then accept it.

Regenerate after an intended change::

    EXPECTTEST_ACCEPT=1 .venv/bin/python -m pytest tests/test_golden_forward.py -p no:xdist

expecttest is not installed on the GPU machine; there this module skips.
"""

from __future__ import annotations

import re

import pytest

expecttest = pytest.importorskip("expecttest")

import torch  # noqa: E402
from compile_utils import compile_and_run  # noqa: E402
from conftest import DEVICE  # noqa: E402

from flex_inductor import create_block_mask, flex_attention, masks, mods  # noqa: E402

_CONFIG_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "IS_DIVISIBLE", "FLOAT32_PRECISION")


def normalise(source: str) -> str:
    """The forward template kernel and its ``_inner``, without volatile text."""
    lines = source.splitlines()
    start = next(
        i for i, line in enumerate(lines)
        if re.match(r"def triton_tem_\w*flex_inductor_fwd\w*\(", line)
    )
    inner = next(i for i in range(start, len(lines)) if lines[i].startswith("def _inner("))
    end = next(i for i in range(inner, len(lines)) if lines[i].startswith("'''"))
    text = "\n".join(line.rstrip() for line in lines[start:end]).strip("\n")
    text = re.sub(r"triton_tem_\w*flex_inductor_fwd\w*", "triton_tem_fused_flex_inductor_fwd", text)
    for name in _CONFIG_CONSTEXPRS:
        text = re.sub(rf"^(\s+{name} : tl\.constexpr = ).*$", r"\1<config>", text, flags=re.M)
    # Runs of blank lines left by empty template hooks depend on the version.
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def kernel_source(fn, *args) -> str:
    with torch.no_grad():
        result = compile_and_run(fn, *args)
    return normalise(result.source)


def _qkv(L=64, S=64, H=4, E=16):
    gen = torch.Generator().manual_seed(0)
    shapes = ((1, H, L, E), (1, H, S, E), (1, H, S, E))
    return tuple(
        torch.randn(s, generator=gen).to(device=DEVICE, dtype=torch.float16) for s in shapes
    )


class TestGoldenForward(expecttest.TestCase):
    maxDiff = None

    def test_noop(self):
        source = kernel_source(lambda q, k, v: flex_attention(q, k, v), *_qkv())
        self.assertExpectedInline(source, """\
def triton_tem_fused_flex_inductor_fwd(arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, out_ptr0):
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 128
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 128
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = True
    EXP2_FACTOR : tl.constexpr = 0.36067376022224085
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = False
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32
    Q = arg_Q
    K = arg_K
    V = arg_V
    LSE = arg_LSE
    KV_NUM_BLKS = arg_FULL_KV_IDX
    KV_IDX = arg_FULL_KV_IDX
    FULL_KV_NUM_BLKS = arg_FULL_KV_IDX + 1
    FULL_KV_IDX = arg_FULL_KV_IDX

    # m_i is kept in the log2 domain (the loop uses exp2); lse is natural.
    LN2: tl.constexpr = 0.6931471805599453

    stride_qz, stride_qh, stride_qm, stride_qk = 4096, 1024, 16, 1
    stride_kz, stride_kh, stride_kn, stride_kk = 4096, 1024, 16, 1
    stride_vz, stride_vh, stride_vn, stride_vk = 4096, 1024, 16, 1
    stride_lz, stride_lh, stride_lm = 256, 64, 1
    stride_nz, stride_nh, stride_nm = 1, 1, 1
    stride_iz, stride_ih, stride_im, stride_in = 1, 1, 1, 1
    stride_fnz, stride_fnh, stride_fnm = 1, 1, 1
    stride_fiz, stride_fih, stride_fim, stride_fin = 1, 1, 1, 1

    Q_LEN = 64
    KV_LEN = 64
    # The BlockMask may broadcast over batch and heads (size 1).
    SPARSE_Z = 1
    SPARSE_H = 1

    start_m = tl.program_id(0)
    if LONGEST_FIRST:
        # Programs start in launch order. Under a causal-like mask the last
        # query blocks have the most kv blocks: starting them first leaves
        # the short ones to fill the last wave, instead of one long block.
        start_m = tl.num_programs(0) - 1 - start_m
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    # GQA: consecutive query heads share one kv head.
    off_hkv = off_h // GQA_SHARED_HEADS
    sparse_z = off_z % SPARSE_Z
    sparse_h = off_h % SPARSE_H
    # A sparse query block holds SPARSE_Q_BLOCK_SIZE // BLOCK_M programs.
    sparse_m = (start_m * BLOCK_M) // SPARSE_Q_BLOCK_SIZE

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_HEAD_DIM_ROUNDED)
    offs_v = tl.arange(0, V_HEAD_DIM_ROUNDED)

    # Keep q in registers: it is reused for every kv block.
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
    if PRESCALE_QK:
        # Scale once per q element instead of once per score. In float32:
        # a bf16/fp16 tile times a Python float would round the scale itself
        # to 16 bits first (and Triton's interpreter has no bf16 scalars).
        q = (q.to(tl.float32) * SM_SCALE).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_DIM_ROUNDED], dtype=tl.float32)

    K_base = K + off_z * stride_kz + off_hkv * stride_kh
    V_base = V + off_z * stride_vz + off_hkv * stride_vh
    if USE_TMA:
        # Hopper's TMA copies whole tiles to shared memory without per-thread
        # addresses, and zero-fills rows past KV_LEN and columns past the
        # head dim. The lowering checks the 16-byte alignment it needs.
        K_src = tl.make_tensor_descriptor(
            K_base, shape=[KV_LEN, QK_HEAD_DIM], strides=[stride_kn, 1],
            block_shape=[BLOCK_N, QK_HEAD_DIM_ROUNDED],
        )
        V_src = tl.make_tensor_descriptor(
            V_base, shape=[KV_LEN, V_HEAD_DIM], strides=[stride_vn, 1],
            block_shape=[BLOCK_N, V_HEAD_DIM_ROUNDED],
        )
    else:
        K_src = K_base
        V_src = V_base

    # Calls without a BlockMask have full blocks only: no partial loop to compile.
    if HAS_PARTIAL_BLOCKS:
        # Partial blocks: mask_mod decides position by position.
        kv_num = tl.load(KV_NUM_BLKS + sparse_z * stride_nz + sparse_h * stride_nh + sparse_m * stride_nm).to(tl.int32)
        kv_row = KV_IDX + sparse_z * stride_iz + sparse_h * stride_ih + sparse_m * stride_im
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, out_ptr0,
            q, K_src, V_src, kv_row, stride_in, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=False,
        )
    if HAS_FULL_BLOCKS:
        # Full blocks: every position is kept, so mask_mod is skipped.
        kv_num = tl.load(FULL_KV_NUM_BLKS + sparse_z * stride_fnz + sparse_h * stride_fnh + sparse_m * stride_fnm).to(tl.int32)
        kv_row = FULL_KV_IDX + sparse_z * stride_fiz + sparse_h * stride_fih + sparse_m * stride_fim
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, out_ptr0,
            q, K_src, V_src, kv_row, stride_fin, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=True,
        )

    # A row that kept nothing has l_i == 0: its output is 0 and its lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]

    idx_z = off_z
    idx_h = off_h
    idx_m = offs_m[:, None]
    idx_d = offs_v[None, :]
    mask = (idx_m < Q_LEN) & (idx_d < V_HEAD_DIM)
    xindex = idx_d + 16*idx_m + 1024*idx_h + 4096*idx_z
    tl.store(out_ptr0 + (tl.broadcast_to(idx_d + 16*idx_m + 1024*idx_h, [BLOCK_M, V_HEAD_DIM_ROUNDED])), acc, mask)

    if OUTPUT_LOGSUMEXP:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        lse_ptrs = LSE + off_z * stride_lz + off_h * stride_lh + offs_m * stride_lm
        tl.store(lse_ptrs, lse, mask=offs_m < Q_LEN)

@triton.jit
def _inner(
    arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, out_ptr0,
    q, K_src, V_src, kv_row, stride_row, kv_num, acc, l_i, m_i,
    off_z, off_h, offs_m, offs_d, offs_v,
    stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
    IS_FULL_BLOCKS: tl.constexpr,
):
    \"\"\"Online-softmax update of (acc, l_i, m_i) over the kv blocks of one row.\"\"\"
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 128
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 128
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = True
    EXP2_FACTOR : tl.constexpr = 0.36067376022224085
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = False
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32

    # Each sparse kv block is covered by SPARSE_KV_BLOCK_SIZE // BLOCK_N steps.
    KV_STEPS: tl.constexpr = SPARSE_KV_BLOCK_SIZE // BLOCK_N

    # Indices handed to the mods are clamped into range: a mod may load a
    # captured tensor at q_idx or kv_idx, and rows or columns past the end
    # must still load in bounds (they are masked out below).
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    num_steps = kv_num * KV_STEPS
    # start_n is loop-carried and the next block index is loaded one step
    # ahead, so that K and V addresses never wait on an index load and the
    # loads can be software-pipelined. Padding entries of the index row are
    # valid block numbers, so the look-ahead load never leaves the row.
    # Counts and indices may be int16 (create_block_mask's index_dtype): they
    # are widened before any product with a block size could overflow.
    start_n = tl.load(kv_row).to(tl.int32) * SPARSE_KV_BLOCK_SIZE
    for step in range(0, num_steps):
        offs_n = start_n + tl.arange(0, BLOCK_N)

        # K is read in its stored (BLOCK_N, D) layout and transposed in the
        # dot, which Hopper's tensor cores take for free from shared memory.
        # K_src and V_src are tensor descriptors under USE_TMA, else pointers.
        if USE_TMA:
            k = K_src.load([start_n, 0])
        else:
            k_ptrs = K_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
            if IS_DIVISIBLE:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < QK_HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=FLOAT32_PRECISION)

        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
        if SCORE_MOD_IS_IDENTITY:
            # No score_mod: the scale is folded into EXP2_FACTOR below, so
            # each score costs one multiply-add before exp2.
            post_mod_scores = qk
        else:
            if not PRESCALE_QK:
                qk *= SM_SCALE
            tmp0 = (qk)
            post_mod_scores = tmp0

            # The softmax needs a float32 tile whatever the mod returns: a
            # captured float64 table promotes it, and a constant score is [1].
            post_mod_scores, _ = tl.broadcast(post_mod_scores.to(tl.float32), qk)

        if not IS_FULL_BLOCKS:
            tmp1 = tl.full([1], True, tl.int1)
            mask_mod_output = tmp1

            post_mod_scores = tl.where(mask_mod_output, post_mod_scores, float("-inf"))
        if not IS_DIVISIBLE:
            in_bounds = (offs_m[:, None] < Q_LEN) & (offs_n[None, :] < KV_LEN)
            post_mod_scores = tl.where(in_bounds, post_mod_scores, float("-inf"))

        # EXP2_FACTOR takes scores to the log2 domain (times the scale when it
        # was folded). The row max is scaled per row, not per score, and the
        # exp2 argument is one fused multiply-add.
        m_ij = tl.maximum(m_i, tl.max(post_mod_scores, 1) * EXP2_FACTOR)
        if ROWS_GUARANTEED_SAFE:
            m_shift = m_ij
        else:
            # A row with nothing kept yet has m_ij == -inf; shifting by 0
            # instead keeps exp2 at 0 rather than NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(post_mod_scores * EXP2_FACTOR - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v_ptrs = V_src + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk
            if IS_DIVISIBLE:
                v = tl.load(v_ptrs, mask=offs_v[None, :] < V_HEAD_DIM, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_v[None, :] < V_HEAD_DIM), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=FLOAT32_PRECISION)
        m_i = m_ij

        next_step = step + 1
        next_block = tl.load(kv_row + (next_step // KV_STEPS) * stride_row, mask=next_step < num_steps, other=0).to(tl.int32)
        # A select, not a branch: control flow in the loop would stop pipelining.
        start_n = tl.where(next_step % KV_STEPS == 0, next_block * SPARSE_KV_BLOCK_SIZE, start_n + BLOCK_N)
    return acc, l_i, m_i
""")

    def test_causal_block_mask(self):
        block_mask = create_block_mask(masks.causal(), 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=32)
        source = kernel_source(
            lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), *_qkv()
        )
        self.assertExpectedInline(source, """\
def triton_tem_fused_flex_inductor_fwd(arg_Q, arg_K, arg_V, arg_LSE, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, out_ptr0):
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = True
    EXP2_FACTOR : tl.constexpr = 0.36067376022224085
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32
    Q = arg_Q
    K = arg_K
    V = arg_V
    LSE = arg_LSE
    KV_NUM_BLKS = arg_KV_NUM_BLKS
    KV_IDX = arg_KV_IDX
    FULL_KV_NUM_BLKS = arg_FULL_KV_NUM_BLKS
    FULL_KV_IDX = arg_FULL_KV_IDX

    # m_i is kept in the log2 domain (the loop uses exp2); lse is natural.
    LN2: tl.constexpr = 0.6931471805599453

    stride_qz, stride_qh, stride_qm, stride_qk = 4096, 1024, 16, 1
    stride_kz, stride_kh, stride_kn, stride_kk = 4096, 1024, 16, 1
    stride_vz, stride_vh, stride_vn, stride_vk = 4096, 1024, 16, 1
    stride_lz, stride_lh, stride_lm = 256, 64, 1
    stride_nz, stride_nh, stride_nm = 2, 2, 1
    stride_iz, stride_ih, stride_im, stride_in = 4, 4, 2, 1
    stride_fnz, stride_fnh, stride_fnm = 2, 2, 1
    stride_fiz, stride_fih, stride_fim, stride_fin = 4, 4, 2, 1

    Q_LEN = 64
    KV_LEN = 64
    # The BlockMask may broadcast over batch and heads (size 1).
    SPARSE_Z = 1
    SPARSE_H = 1

    start_m = tl.program_id(0)
    if LONGEST_FIRST:
        # Programs start in launch order. Under a causal-like mask the last
        # query blocks have the most kv blocks: starting them first leaves
        # the short ones to fill the last wave, instead of one long block.
        start_m = tl.num_programs(0) - 1 - start_m
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    # GQA: consecutive query heads share one kv head.
    off_hkv = off_h // GQA_SHARED_HEADS
    sparse_z = off_z % SPARSE_Z
    sparse_h = off_h % SPARSE_H
    # A sparse query block holds SPARSE_Q_BLOCK_SIZE // BLOCK_M programs.
    sparse_m = (start_m * BLOCK_M) // SPARSE_Q_BLOCK_SIZE

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_HEAD_DIM_ROUNDED)
    offs_v = tl.arange(0, V_HEAD_DIM_ROUNDED)

    # Keep q in registers: it is reused for every kv block.
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
    if PRESCALE_QK:
        # Scale once per q element instead of once per score. In float32:
        # a bf16/fp16 tile times a Python float would round the scale itself
        # to 16 bits first (and Triton's interpreter has no bf16 scalars).
        q = (q.to(tl.float32) * SM_SCALE).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_DIM_ROUNDED], dtype=tl.float32)

    K_base = K + off_z * stride_kz + off_hkv * stride_kh
    V_base = V + off_z * stride_vz + off_hkv * stride_vh
    if USE_TMA:
        # Hopper's TMA copies whole tiles to shared memory without per-thread
        # addresses, and zero-fills rows past KV_LEN and columns past the
        # head dim. The lowering checks the 16-byte alignment it needs.
        K_src = tl.make_tensor_descriptor(
            K_base, shape=[KV_LEN, QK_HEAD_DIM], strides=[stride_kn, 1],
            block_shape=[BLOCK_N, QK_HEAD_DIM_ROUNDED],
        )
        V_src = tl.make_tensor_descriptor(
            V_base, shape=[KV_LEN, V_HEAD_DIM], strides=[stride_vn, 1],
            block_shape=[BLOCK_N, V_HEAD_DIM_ROUNDED],
        )
    else:
        K_src = K_base
        V_src = V_base

    # Calls without a BlockMask have full blocks only: no partial loop to compile.
    if HAS_PARTIAL_BLOCKS:
        # Partial blocks: mask_mod decides position by position.
        kv_num = tl.load(KV_NUM_BLKS + sparse_z * stride_nz + sparse_h * stride_nh + sparse_m * stride_nm).to(tl.int32)
        kv_row = KV_IDX + sparse_z * stride_iz + sparse_h * stride_ih + sparse_m * stride_im
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, out_ptr0,
            q, K_src, V_src, kv_row, stride_in, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=False,
        )
    if HAS_FULL_BLOCKS:
        # Full blocks: every position is kept, so mask_mod is skipped.
        kv_num = tl.load(FULL_KV_NUM_BLKS + sparse_z * stride_fnz + sparse_h * stride_fnh + sparse_m * stride_fnm).to(tl.int32)
        kv_row = FULL_KV_IDX + sparse_z * stride_fiz + sparse_h * stride_fih + sparse_m * stride_fim
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, out_ptr0,
            q, K_src, V_src, kv_row, stride_fin, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=True,
        )

    # A row that kept nothing has l_i == 0: its output is 0 and its lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]

    idx_z = off_z
    idx_h = off_h
    idx_m = offs_m[:, None]
    idx_d = offs_v[None, :]
    mask = (idx_m < Q_LEN) & (idx_d < V_HEAD_DIM)
    xindex = idx_d + 16*idx_m + 1024*idx_h + 4096*idx_z
    tl.store(out_ptr0 + (tl.broadcast_to(idx_d + 16*idx_m + 1024*idx_h, [BLOCK_M, V_HEAD_DIM_ROUNDED])), acc, mask)

    if OUTPUT_LOGSUMEXP:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        lse_ptrs = LSE + off_z * stride_lz + off_h * stride_lh + offs_m * stride_lm
        tl.store(lse_ptrs, lse, mask=offs_m < Q_LEN)

@triton.jit
def _inner(
    arg_Q, arg_K, arg_V, arg_LSE, arg_KV_NUM_BLKS, arg_KV_IDX, arg_FULL_KV_NUM_BLKS, arg_FULL_KV_IDX, out_ptr0,
    q, K_src, V_src, kv_row, stride_row, kv_num, acc, l_i, m_i,
    off_z, off_h, offs_m, offs_d, offs_v,
    stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
    IS_FULL_BLOCKS: tl.constexpr,
):
    \"\"\"Online-softmax update of (acc, l_i, m_i) over the kv blocks of one row.\"\"\"
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 32
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 32
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = True
    EXP2_FACTOR : tl.constexpr = 0.36067376022224085
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = True
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32

    # Each sparse kv block is covered by SPARSE_KV_BLOCK_SIZE // BLOCK_N steps.
    KV_STEPS: tl.constexpr = SPARSE_KV_BLOCK_SIZE // BLOCK_N

    # Indices handed to the mods are clamped into range: a mod may load a
    # captured tensor at q_idx or kv_idx, and rows or columns past the end
    # must still load in bounds (they are masked out below).
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    num_steps = kv_num * KV_STEPS
    # start_n is loop-carried and the next block index is loaded one step
    # ahead, so that K and V addresses never wait on an index load and the
    # loads can be software-pipelined. Padding entries of the index row are
    # valid block numbers, so the look-ahead load never leaves the row.
    # Counts and indices may be int16 (create_block_mask's index_dtype): they
    # are widened before any product with a block size could overflow.
    start_n = tl.load(kv_row).to(tl.int32) * SPARSE_KV_BLOCK_SIZE
    for step in range(0, num_steps):
        offs_n = start_n + tl.arange(0, BLOCK_N)

        # K is read in its stored (BLOCK_N, D) layout and transposed in the
        # dot, which Hopper's tensor cores take for free from shared memory.
        # K_src and V_src are tensor descriptors under USE_TMA, else pointers.
        if USE_TMA:
            k = K_src.load([start_n, 0])
        else:
            k_ptrs = K_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
            if IS_DIVISIBLE:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < QK_HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=FLOAT32_PRECISION)

        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
        if SCORE_MOD_IS_IDENTITY:
            # No score_mod: the scale is folded into EXP2_FACTOR below, so
            # each score costs one multiply-add before exp2.
            post_mod_scores = qk
        else:
            if not PRESCALE_QK:
                qk *= SM_SCALE
            tmp0 = (qk)
            post_mod_scores = tmp0

            # The softmax needs a float32 tile whatever the mod returns: a
            # captured float64 table promotes it, and a constant score is [1].
            post_mod_scores, _ = tl.broadcast(post_mod_scores.to(tl.float32), qk)

        if not IS_FULL_BLOCKS:
            tmp1 = (q_idx)
            tmp2 = (kv_idx)
            tmp3 = tmp1 >= tmp2
            mask_mod_output = tmp3

            post_mod_scores = tl.where(mask_mod_output, post_mod_scores, float("-inf"))
        if not IS_DIVISIBLE:
            in_bounds = (offs_m[:, None] < Q_LEN) & (offs_n[None, :] < KV_LEN)
            post_mod_scores = tl.where(in_bounds, post_mod_scores, float("-inf"))

        # EXP2_FACTOR takes scores to the log2 domain (times the scale when it
        # was folded). The row max is scaled per row, not per score, and the
        # exp2 argument is one fused multiply-add.
        m_ij = tl.maximum(m_i, tl.max(post_mod_scores, 1) * EXP2_FACTOR)
        if ROWS_GUARANTEED_SAFE:
            m_shift = m_ij
        else:
            # A row with nothing kept yet has m_ij == -inf; shifting by 0
            # instead keeps exp2 at 0 rather than NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(post_mod_scores * EXP2_FACTOR - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v_ptrs = V_src + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk
            if IS_DIVISIBLE:
                v = tl.load(v_ptrs, mask=offs_v[None, :] < V_HEAD_DIM, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_v[None, :] < V_HEAD_DIM), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=FLOAT32_PRECISION)
        m_i = m_ij

        next_step = step + 1
        next_block = tl.load(kv_row + (next_step // KV_STEPS) * stride_row, mask=next_step < num_steps, other=0).to(tl.int32)
        # A select, not a branch: control flow in the loop would stop pipelining.
        start_n = tl.where(next_step % KV_STEPS == 0, next_block * SPARSE_KV_BLOCK_SIZE, start_n + BLOCK_N)
    return acc, l_i, m_i
""")

    def test_alibi_captured_tensor(self):
        alibi = mods.alibi(4, device=DEVICE)
        source = kernel_source(lambda q, k, v: flex_attention(q, k, v, score_mod=alibi), *_qkv())
        self.assertExpectedInline(source, """\
def triton_tem_fused_flex_inductor_fwd(arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, in_ptr5, out_ptr0):
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 128
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 128
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = False
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32
    Q = arg_Q
    K = arg_K
    V = arg_V
    LSE = arg_LSE
    KV_NUM_BLKS = arg_FULL_KV_IDX
    KV_IDX = arg_FULL_KV_IDX
    FULL_KV_NUM_BLKS = arg_FULL_KV_IDX + 1
    FULL_KV_IDX = arg_FULL_KV_IDX

    # m_i is kept in the log2 domain (the loop uses exp2); lse is natural.
    LN2: tl.constexpr = 0.6931471805599453

    stride_qz, stride_qh, stride_qm, stride_qk = 4096, 1024, 16, 1
    stride_kz, stride_kh, stride_kn, stride_kk = 4096, 1024, 16, 1
    stride_vz, stride_vh, stride_vn, stride_vk = 4096, 1024, 16, 1
    stride_lz, stride_lh, stride_lm = 256, 64, 1
    stride_nz, stride_nh, stride_nm = 1, 1, 1
    stride_iz, stride_ih, stride_im, stride_in = 1, 1, 1, 1
    stride_fnz, stride_fnh, stride_fnm = 1, 1, 1
    stride_fiz, stride_fih, stride_fim, stride_fin = 1, 1, 1, 1

    Q_LEN = 64
    KV_LEN = 64
    # The BlockMask may broadcast over batch and heads (size 1).
    SPARSE_Z = 1
    SPARSE_H = 1

    start_m = tl.program_id(0)
    if LONGEST_FIRST:
        # Programs start in launch order. Under a causal-like mask the last
        # query blocks have the most kv blocks: starting them first leaves
        # the short ones to fill the last wave, instead of one long block.
        start_m = tl.num_programs(0) - 1 - start_m
    off_z = tl.program_id(1)
    off_h = tl.program_id(2)
    # GQA: consecutive query heads share one kv head.
    off_hkv = off_h // GQA_SHARED_HEADS
    sparse_z = off_z % SPARSE_Z
    sparse_h = off_h % SPARSE_H
    # A sparse query block holds SPARSE_Q_BLOCK_SIZE // BLOCK_M programs.
    sparse_m = (start_m * BLOCK_M) // SPARSE_Q_BLOCK_SIZE

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_HEAD_DIM_ROUNDED)
    offs_v = tl.arange(0, V_HEAD_DIM_ROUNDED)

    # Keep q in registers: it is reused for every kv block.
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
    if PRESCALE_QK:
        # Scale once per q element instead of once per score. In float32:
        # a bf16/fp16 tile times a Python float would round the scale itself
        # to 16 bits first (and Triton's interpreter has no bf16 scalars).
        q = (q.to(tl.float32) * SM_SCALE).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_DIM_ROUNDED], dtype=tl.float32)

    K_base = K + off_z * stride_kz + off_hkv * stride_kh
    V_base = V + off_z * stride_vz + off_hkv * stride_vh
    if USE_TMA:
        # Hopper's TMA copies whole tiles to shared memory without per-thread
        # addresses, and zero-fills rows past KV_LEN and columns past the
        # head dim. The lowering checks the 16-byte alignment it needs.
        K_src = tl.make_tensor_descriptor(
            K_base, shape=[KV_LEN, QK_HEAD_DIM], strides=[stride_kn, 1],
            block_shape=[BLOCK_N, QK_HEAD_DIM_ROUNDED],
        )
        V_src = tl.make_tensor_descriptor(
            V_base, shape=[KV_LEN, V_HEAD_DIM], strides=[stride_vn, 1],
            block_shape=[BLOCK_N, V_HEAD_DIM_ROUNDED],
        )
    else:
        K_src = K_base
        V_src = V_base

    # Calls without a BlockMask have full blocks only: no partial loop to compile.
    if HAS_PARTIAL_BLOCKS:
        # Partial blocks: mask_mod decides position by position.
        kv_num = tl.load(KV_NUM_BLKS + sparse_z * stride_nz + sparse_h * stride_nh + sparse_m * stride_nm).to(tl.int32)
        kv_row = KV_IDX + sparse_z * stride_iz + sparse_h * stride_ih + sparse_m * stride_im
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, in_ptr5, out_ptr0,
            q, K_src, V_src, kv_row, stride_in, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=False,
        )
    if HAS_FULL_BLOCKS:
        # Full blocks: every position is kept, so mask_mod is skipped.
        kv_num = tl.load(FULL_KV_NUM_BLKS + sparse_z * stride_fnz + sparse_h * stride_fnh + sparse_m * stride_fnm).to(tl.int32)
        kv_row = FULL_KV_IDX + sparse_z * stride_fiz + sparse_h * stride_fih + sparse_m * stride_fim
        acc, l_i, m_i = _inner(
            arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, in_ptr5, out_ptr0,
            q, K_src, V_src, kv_row, stride_fin, kv_num, acc, l_i, m_i,
            off_z, off_h, offs_m, offs_d, offs_v,
            stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
            IS_FULL_BLOCKS=True,
        )

    # A row that kept nothing has l_i == 0: its output is 0 and its lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]

    idx_z = off_z
    idx_h = off_h
    idx_m = offs_m[:, None]
    idx_d = offs_v[None, :]
    mask = (idx_m < Q_LEN) & (idx_d < V_HEAD_DIM)
    xindex = idx_d + 16*idx_m + 1024*idx_h + 4096*idx_z
    tl.store(out_ptr0 + (tl.broadcast_to(idx_d + 16*idx_m + 1024*idx_h, [BLOCK_M, V_HEAD_DIM_ROUNDED])), acc, mask)

    if OUTPUT_LOGSUMEXP:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        lse_ptrs = LSE + off_z * stride_lz + off_h * stride_lh + offs_m * stride_lm
        tl.store(lse_ptrs, lse, mask=offs_m < Q_LEN)

@triton.jit
def _inner(
    arg_Q, arg_K, arg_V, arg_LSE, arg_FULL_KV_IDX, in_ptr5, out_ptr0,
    q, K_src, V_src, kv_row, stride_row, kv_num, acc, l_i, m_i,
    off_z, off_h, offs_m, offs_d, offs_v,
    stride_kn, stride_kk, stride_vn, stride_vk, Q_LEN, KV_LEN,
    IS_FULL_BLOCKS: tl.constexpr,
):
    \"\"\"Online-softmax update of (acc, l_i, m_i) over the kv blocks of one row.\"\"\"
    BLOCK_M : tl.constexpr = <config>
    BLOCK_N : tl.constexpr = <config>
    IS_DIVISIBLE : tl.constexpr = <config>
    QK_HEAD_DIM : tl.constexpr = 16
    QK_HEAD_DIM_ROUNDED : tl.constexpr = 16
    V_HEAD_DIM : tl.constexpr = 16
    V_HEAD_DIM_ROUNDED : tl.constexpr = 16
    SPARSE_Q_BLOCK_SIZE : tl.constexpr = 128
    SPARSE_KV_BLOCK_SIZE : tl.constexpr = 128
    GQA_SHARED_HEADS : tl.constexpr = 1
    SM_SCALE : tl.constexpr = 0.25
    SCORE_MOD_IS_IDENTITY : tl.constexpr = False
    EXP2_FACTOR : tl.constexpr = 1.4426950408889634
    HAS_FULL_BLOCKS : tl.constexpr = True
    HAS_PARTIAL_BLOCKS : tl.constexpr = False
    PRESCALE_QK : tl.constexpr = False
    ROWS_GUARANTEED_SAFE : tl.constexpr = False
    OUTPUT_LOGSUMEXP : tl.constexpr = True
    FLOAT32_PRECISION : tl.constexpr = <config>
    USE_TMA : tl.constexpr = False
    LONGEST_FIRST : tl.constexpr = False
    PERSISTENT : tl.constexpr = False
    INDEX_DTYPE : tl.constexpr = tl.int32

    # Each sparse kv block is covered by SPARSE_KV_BLOCK_SIZE // BLOCK_N steps.
    KV_STEPS: tl.constexpr = SPARSE_KV_BLOCK_SIZE // BLOCK_N

    # Indices handed to the mods are clamped into range: a mod may load a
    # captured tensor at q_idx or kv_idx, and rows or columns past the end
    # must still load in bounds (they are masked out below).
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    num_steps = kv_num * KV_STEPS
    # start_n is loop-carried and the next block index is loaded one step
    # ahead, so that K and V addresses never wait on an index load and the
    # loads can be software-pipelined. Padding entries of the index row are
    # valid block numbers, so the look-ahead load never leaves the row.
    # Counts and indices may be int16 (create_block_mask's index_dtype): they
    # are widened before any product with a block size could overflow.
    start_n = tl.load(kv_row).to(tl.int32) * SPARSE_KV_BLOCK_SIZE
    for step in range(0, num_steps):
        offs_n = start_n + tl.arange(0, BLOCK_N)

        # K is read in its stored (BLOCK_N, D) layout and transposed in the
        # dot, which Hopper's tensor cores take for free from shared memory.
        # K_src and V_src are tensor descriptors under USE_TMA, else pointers.
        if USE_TMA:
            k = K_src.load([start_n, 0])
        else:
            k_ptrs = K_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
            if IS_DIVISIBLE:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < QK_HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_d[None, :] < QK_HEAD_DIM), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=FLOAT32_PRECISION)

        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
        if SCORE_MOD_IS_IDENTITY:
            # No score_mod: the scale is folded into EXP2_FACTOR below, so
            # each score costs one multiply-add before exp2.
            post_mod_scores = qk
        else:
            if not PRESCALE_QK:
                qk *= SM_SCALE
            tmp0 = (qk)
            tmp1 = (off_h)
            tmp2 = tl.load(in_ptr5 + tmp1)
            tmp3 = (kv_idx)
            tmp4 = tmp3.to(tl.float32)
            tmp5 = (q_idx)
            tmp6 = tmp5.to(tl.float32)
            tmp7 = tmp4 - tmp6
            tmp8 = tmp2 * tmp7
            tmp9 = tmp0 + tmp8
            post_mod_scores = tmp9

            # The softmax needs a float32 tile whatever the mod returns: a
            # captured float64 table promotes it, and a constant score is [1].
            post_mod_scores, _ = tl.broadcast(post_mod_scores.to(tl.float32), qk)

        if not IS_FULL_BLOCKS:
            tmp10 = tl.full([1], True, tl.int1)
            mask_mod_output = tmp10

            post_mod_scores = tl.where(mask_mod_output, post_mod_scores, float("-inf"))
        if not IS_DIVISIBLE:
            in_bounds = (offs_m[:, None] < Q_LEN) & (offs_n[None, :] < KV_LEN)
            post_mod_scores = tl.where(in_bounds, post_mod_scores, float("-inf"))

        # EXP2_FACTOR takes scores to the log2 domain (times the scale when it
        # was folded). The row max is scaled per row, not per score, and the
        # exp2 argument is one fused multiply-add.
        m_ij = tl.maximum(m_i, tl.max(post_mod_scores, 1) * EXP2_FACTOR)
        if ROWS_GUARANTEED_SAFE:
            m_shift = m_ij
        else:
            # A row with nothing kept yet has m_ij == -inf; shifting by 0
            # instead keeps exp2 at 0 rather than NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(post_mod_scores * EXP2_FACTOR - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v_ptrs = V_src + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk
            if IS_DIVISIBLE:
                v = tl.load(v_ptrs, mask=offs_v[None, :] < V_HEAD_DIM, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < KV_LEN) & (offs_v[None, :] < V_HEAD_DIM), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=FLOAT32_PRECISION)
        m_i = m_ij

        next_step = step + 1
        next_block = tl.load(kv_row + (next_step // KV_STEPS) * stride_row, mask=next_step < num_steps, other=0).to(tl.int32)
        # A select, not a branch: control flow in the loop would stop pipelining.
        start_n = tl.where(next_step % KV_STEPS == 0, next_block * SPARSE_KV_BLOCK_SIZE, start_n + BLOCK_N)
    return acc, l_i, m_i
""")
