"""create_block_mask's interval path against the dense evaluation it replaces.

The oracle is ``_mask_utils.evaluate_block_states`` (every position, nested
vmap) with the layout built by a stable argsort, as create_block_mask did
before the interval path; the new path must give identical tensors. Unit
tests check each interval rule for soundness by sampling points.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flex_inductor import _block_eval, _interval, _mask_utils, block_mask, masks
from flex_inductor.block_mask import BlockMask, _dense_to_ordered, create_block_mask
from flex_inductor.combinators import and_masks, noop_mask, or_masks

CPU = torch.device("cpu")
# Taken before any test patches it (PathSpy counts the calls create_block_mask makes).
DENSE_STATES = _mask_utils.evaluate_block_states

# ---------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------


def argsort_ordered(dense):
    """The layout as it was built before: a stable descending argsort of each row."""
    num = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.bool), dim=-1, descending=True, stable=True)
    return num, indices.to(torch.int32)


def reference_tensors(mask_mod, B, H, Q, KV, block):
    """The eight layout tensors from dense evaluation and argsort."""
    states = DENSE_STATES(mask_mod, (B, H, Q, KV), block, CPU)
    partial, full = states == 1, states == 2
    return [
        t
        for dense in (partial, full, partial.transpose(-2, -1), full.transpose(-2, -1))
        for t in argsort_ordered(dense)
    ]


def assert_same_as_dense(mask_mod, B, H, Q, KV, block, **kwargs):
    bm = create_block_mask(mask_mod, B, H, Q, KV, "cpu", block, **kwargs)
    expected = reference_tensors(mask_mod, B, H, Q, KV, block)
    for name, got, want in zip(
        block_mask._TENSOR_NAMES, bm._flatten_tensors(), expected, strict=True
    ):
        assert got.dtype == torch.int32 and got.is_contiguous(), name
        assert torch.equal(got, want), name
    return bm


class PathSpy:
    """Counts exact evaluations (positions) and dense fallbacks."""

    def __init__(self, monkeypatch):
        self.dense = 0
        self.exact_positions = 0
        dense, blocks = _mask_utils.evaluate_block_states, _mask_utils.evaluate_blocks

        def counting_dense(*args, **kwargs):
            self.dense += 1
            return dense(*args, **kwargs)

        def counting_blocks(mask_mod, vmapped, b, h, q, kv):
            self.exact_positions += q.shape[0] * q.shape[1] * kv.shape[1]
            return blocks(mask_mod, vmapped, b, h, q, kv)

        monkeypatch.setattr(_mask_utils, "evaluate_block_states", counting_dense)
        monkeypatch.setattr(_mask_utils, "evaluate_blocks", counting_blocks)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def named(fn, name):
    fn.__name__ = name
    return fn


def doc_lengths(total, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (total,), generator=gen)
    return lengths[: int((lengths.cumsum(0) < total).sum()) + 1]


def head_window(b, h, q_idx, kv_idx):
    # Depends on b and h: the b/h dimensions of the grid really matter.
    return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= 16 * (h + 1) + 8 * b)


def modular(b, h, q_idx, kv_idx):
    return (q_idx // 64) % 3 == (kv_idx // 48) % 3


def where_abs(b, h, q_idx, kv_idx):
    return torch.where(q_idx > 300, torch.abs(q_idx - kv_idx) <= 40, kv_idx <= q_idx)


def min_max_clamp(b, h, q_idx, kv_idx):
    lo = torch.maximum(q_idx - 100, torch.zeros_like(q_idx))
    hi = torch.minimum(q_idx + 30, q_idx.new_full((), 800)).clamp(max=900)
    return (kv_idx >= lo) & (kv_idx <= hi)


def make_table_masks():
    gen = torch.Generator().manual_seed(0)
    head_offsets = torch.randint(0, 64, (3, 1100), generator=gen)
    batch_docs = torch.randint(0, 3, (2, 1100), generator=gen).sort(-1).values
    scores = torch.rand(1100, generator=gen)

    def table_2d(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx - head_offsets[h, q_idx]

    def batch_document(b, h, q_idx, kv_idx):
        return batch_docs[b, q_idx] == batch_docs[b, kv_idx]

    def float_table(b, h, q_idx, kv_idx):
        return (scores[kv_idx] > 0.5) | (q_idx < kv_idx)

    return [table_2d, batch_document, float_table]


LIBRARY = [
    masks.causal(),
    masks.sliding_window(100),
    masks.sliding_window(37, causal=False),
    masks.prefix_lm(64),
    masks.document(doc_lengths(1100, 1)),
    masks.document(doc_lengths(1100, 2), causal=True),
    masks.document(offsets=[0, 5, 6, 300, 1100]),
    masks.dilated_sliding_window(64, 3),
    masks.dilated_sliding_window(40, 4, causal=False),
    masks.neighborhood_2d(25, 44, 5),
    noop_mask,
    and_masks(),
    or_masks(),
    and_masks(masks.causal(), masks.sliding_window(200)),
    or_masks(masks.prefix_lm(100), masks.sliding_window(50)),
    and_masks(masks.document(doc_lengths(1100, 3)), masks.causal(), masks.prefix_lm(32)),
    named(lambda b, h, q, kv: ~(q >= kv), "not_causal"),
    named(lambda b, h, q, kv: (q < 500) ^ (kv < 300), "xor"),
    named(lambda b, h, q, kv: torch.logical_or(q % 128 == 0, kv > q), "logical_or"),
    head_window,
    modular,
    where_abs,
    min_max_clamp,
    *make_table_masks(),
]

SHAPES = [(1, 1), (17, 113), (113, 17), (1023, 1023), (1000, 600)]
BLOCKS = [(16, 16), (32, 8), (128, 128), (24, 40)]


@pytest.mark.parametrize("mask_mod", LIBRARY, ids=lambda m: m.__name__)
def test_library_masks_match_dense(mask_mod):
    for (Q, KV), block in zip(SHAPES, BLOCKS + BLOCKS[:1], strict=True):
        assert_same_as_dense(mask_mod, 2, 2, Q, KV, block)


@pytest.mark.parametrize(
    "mask_mod", [m for m in LIBRARY if m.__name__ != "float_table"], ids=lambda m: m.__name__
)
def test_library_masks_take_the_interval_path(monkeypatch, mask_mod):
    # float_table compares random scores: most blocks are undecided, so it runs densely.
    spy = PathSpy(monkeypatch)
    create_block_mask(mask_mod, 2, 3, 1023, 1000, "cpu", 64)
    assert spy.dense == 0


@pytest.mark.parametrize("block", [(16, 16), (64, 32), (128, 128), (7, 13)])
@pytest.mark.parametrize("lengths", [(1, 17), (17, 1), (113, 1023), (1023, 113)])
def test_odd_lengths_and_blocks(lengths, block):
    for mask_mod in (masks.causal(), masks.document(doc_lengths(1100, 4)), head_window):
        assert_same_as_dense(mask_mod, 2, 2, *lengths, block)


def test_tiny_chunks_cover_everything():
    for mask_mod in (head_window, masks.document(doc_lengths(1100, 5)), modular):
        assert_same_as_dense(mask_mod, 2, 3, 260, 300, (32, 16), _chunk_elements=7)


def test_block_of_one_position():
    assert_same_as_dense(head_window, 1, 2, 40, 33, (1, 1))
    assert_same_as_dense(modular, 1, 1, 200, 150, (1, 8))


def test_mask_ignoring_batch_and_heads_is_expanded_once():
    bm = assert_same_as_dense(masks.causal(), 3, 4, 256, 256, (64, 64))
    states = _block_eval.evaluate_block_states(masks.causal(), (3, 4, 256, 256), (64, 64), CPU)
    assert states.shape == (3, 4, 4, 4) and states.stride()[:2] == (0, 0)
    assert bm.kv_indices.shape == (3, 4, 4, 4)


# ---------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_mod",
    [masks.causal(), masks.sliding_window(300), masks.prefix_lm(200), noop_mask],
    ids=lambda m: m.__name__,
)
def test_structured_masks_need_no_exact_evaluation(monkeypatch, mask_mod):
    spy = PathSpy(monkeypatch)
    create_block_mask(mask_mod, 1, 1, 4096, 4096, "cpu", 128)
    assert spy.dense == 0 and spy.exact_positions == 0


def random_cuts(total, docs, seed):
    """Document offsets for ``docs`` documents of random lengths (the benchmark's kind)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(total - 1, generator=gen)[: docs - 1] + 1).sort().values
    return [0, *cuts.tolist(), total]


def test_document_mask_evaluates_few_positions(monkeypatch):
    spy = PathSpy(monkeypatch)
    doc = masks.document(offsets=random_cuts(8192, 16, seed=6))
    bm = create_block_mask(doc, 1, 1, 8192, 8192, "cpu", 128)
    assert spy.dense == 0
    # Only blocks whose partiality the sub-tiles could not show: a few of the
    # partial ones, against 8192**2 positions in all.
    partial_positions = int(bm.kv_num_blocks.sum()) * 128 * 128
    assert spy.exact_positions <= partial_positions // 20


def data_dependent_if(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return q_idx >= 0
    return q_idx < 0


def unsupported_op(b, h, q_idx, kv_idx):
    return torch.bitwise_and(q_idx, 3) == torch.bitwise_and(kv_idx, 3)


def reduction(b, h, q_idx, kv_idx):
    return (torch.arange(4) * q_idx).sum() % 7 >= kv_idx % 3


def two_ranged_indices(b, h, q_idx, kv_idx):
    table = torch.eye(300, dtype=torch.bool) | (torch.arange(300)[:, None] > 150)
    return table[q_idx, kv_idx]


@pytest.mark.parametrize(
    "mask_mod", [unsupported_op, reduction, two_ranged_indices], ids=lambda m: m.__name__
)
def test_unsupported_operations_fall_back_with_identical_results(monkeypatch, mask_mod):
    spy = PathSpy(monkeypatch)
    assert_same_as_dense(mask_mod, 1, 2, 300, 280, (32, 16))
    assert spy.dense >= 1


def test_mostly_undecided_masks_run_densely(monkeypatch):
    spy = PathSpy(monkeypatch)
    checker = named(lambda b, h, q, kv: (q + kv) % 2 == 0, "checker")
    assert_same_as_dense(checker, 1, 1, 256, 256, (32, 32))
    assert spy.dense >= 1 and spy.exact_positions == 0


def test_data_dependent_control_flow_fails_as_before():
    with pytest.raises(Exception) as dense_error:
        _mask_utils.evaluate_block_states(data_dependent_if, (1, 1, 64, 64), (16, 16), CPU)
    with pytest.raises(type(dense_error.value)) as error:
        create_block_mask(data_dependent_if, 1, 1, 64, 64, "cpu", 16)
    assert str(error.value) == str(dense_error.value)


def test_infinite_float_ranges_are_not_used_in_arithmetic():
    # -inf + inf is NaN, which compares False both ways: bounds cannot hold it.
    scores = torch.tensor([float("-inf"), 1.0, float("inf"), -2.0] * 75)

    def with_nan(b, h, q_idx, kv_idx):
        return scores[q_idx] + scores[kv_idx] >= float("-inf")

    assert_same_as_dense(with_nan, 1, 1, 300, 300, (16, 16))
    bm = create_block_mask(with_nan, 1, 1, 300, 300, "cpu", 16)
    assert int(bm.kv_num_blocks.sum()) > 0  # the NaN positions make blocks partial


def test_out_of_range_index_raises_the_same_error():
    table = torch.arange(100)

    def overflowing(b, h, q_idx, kv_idx):
        return table[q_idx + 20] >= kv_idx

    with pytest.raises(Exception) as dense_error:
        _mask_utils.evaluate_block_states(overflowing, (1, 1, 100, 100), (16, 16), CPU)
    with pytest.raises(type(dense_error.value)) as error:
        create_block_mask(overflowing, 1, 1, 100, 100, "cpu", 16)
    assert str(error.value) == str(dense_error.value)


def test_random_ops_fail_as_before():
    # vmap refuses random ops; the intervals must not read one draw as a constant.
    def noisy(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (torch.rand(()) < 2)

    with pytest.raises(RuntimeError, match="random"):
        create_block_mask(noisy, 1, 1, 64, 64, "cpu", 16)


def test_bad_return_types_raise_the_same_type_error():
    for bad in (lambda b, h, q, kv: (q >= kv).int(), lambda b, h, q, kv: q - kv):
        with pytest.raises(TypeError, match="mask_mod"):
            create_block_mask(bad, 1, 1, 64, 64, "cpu", 16)


# ---------------------------------------------------------------------------
# Random expression masks
# ---------------------------------------------------------------------------

GEN = torch.Generator().manual_seed(1)
TABLE_1D = torch.randint(-20, 20, (600,), generator=GEN)
TABLE_2D = torch.randint(0, 400, (3, 600), generator=GEN)

leaf = st.one_of(
    st.sampled_from(["q", "kv", "b", "h", "t1q", "t1kv", "t2hq"]),
    st.integers(-60, 60),
)


def _int_expr(children):
    return st.one_of(
        st.tuples(st.sampled_from(["add", "sub", "mul", "min", "max"]), children, children),
        st.tuples(st.sampled_from(["floordiv", "mod"]), children, st.integers(1, 50)),
        st.tuples(st.sampled_from(["abs", "neg"]), children),
        st.tuples(st.just("clamp"), children, st.integers(-50, 50), st.integers(0, 400)),
        st.tuples(st.just("where"), comparison(children), children, children),
    )


def comparison(ints):
    return st.tuples(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]), ints, ints)


int_exprs = st.recursive(leaf, _int_expr, max_leaves=6)
bool_exprs = st.recursive(
    comparison(int_exprs),
    lambda children: st.one_of(
        st.tuples(st.sampled_from(["and", "or", "xor"]), children, children),
        st.tuples(st.just("not"), children),
    ),
    max_leaves=3,
)

_LEAVES = {
    "q": lambda b, h, q, kv: q,
    "kv": lambda b, h, q, kv: kv,
    "b": lambda b, h, q, kv: b,
    "h": lambda b, h, q, kv: h,
    "t1q": lambda b, h, q, kv: TABLE_1D[q],
    "t1kv": lambda b, h, q, kv: TABLE_1D[kv],
    "t2hq": lambda b, h, q, kv: TABLE_2D[h, q],
}
_BINARY = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "min": torch.minimum,
    "max": torch.maximum,
    "lt": lambda x, y: x < y,
    "le": lambda x, y: x <= y,
    "gt": lambda x, y: x > y,
    "ge": lambda x, y: x >= y,
    "eq": lambda x, y: x == y,
    "ne": lambda x, y: x != y,
    "and": lambda x, y: x & y,
    "or": lambda x, y: x | y,
    "xor": lambda x, y: x ^ y,
}


def build(expr, args):
    """Evaluates an expression tree on (b, h, q, kv) (tensors or intervals)."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        return _LEAVES[expr](*args)
    op, *rest = expr
    if op in ("floordiv", "mod"):
        x = build(rest[0], args)
        return x // rest[1] if op == "floordiv" else x % rest[1]
    if op == "clamp":
        return torch.clamp(as_value(build(rest[0], args), args), rest[1], rest[1] + rest[2])
    if op == "where":
        cond, x, y = (build(e, args) for e in rest)
        return torch.where(cond, x, y)
    values = [build(e, args) for e in rest]
    if op in ("abs", "neg", "not"):
        x = as_value(values[0], args)
        return {"abs": torch.abs, "neg": torch.neg, "not": torch.logical_not}[op](x)
    if op in ("min", "max"):
        values = [as_value(v, args) for v in values]
    return _BINARY[op](*values)


def as_value(x, args):
    """A Python int as a 0-d tensor where torch needs a tensor."""
    return torch.tensor(x) if isinstance(x, int) else x


def expression_mask(expr):
    def mask_mod(b, h, q_idx, kv_idx):
        out = build(expr, (b, h, q_idx, kv_idx))
        return out if not isinstance(out, bool) else torch.tensor(out)

    return mask_mod


@settings(max_examples=60, deadline=None, database=None)
@given(
    expr=bool_exprs,
    Q=st.integers(1, 260),
    KV=st.integers(1, 260),
    block=st.sampled_from([(16, 16), (32, 8), (13, 20), (64, 64)]),
    B=st.integers(1, 2),
    H=st.integers(1, 3),
)
def test_random_expression_masks_match_dense(expr, Q, KV, block, B, H):
    mask_mod = expression_mask(expr)
    try:
        expected = reference_tensors(mask_mod, B, H, Q, KV, block)
    except Exception as error:  # e.g. min() of an int and a tensor: both paths raise
        with pytest.raises(type(error)):
            create_block_mask(mask_mod, B, H, Q, KV, "cpu", block)
        return
    bm = create_block_mask(mask_mod, B, H, Q, KV, "cpu", block)
    for got, want in zip(bm._flatten_tensors(), expected, strict=True):
        assert torch.equal(got, want)


def test_random_expressions_mostly_take_the_interval_path(monkeypatch):
    # Guards the property test: it must exercise the interval rules, not only
    # the fallback.
    spy = PathSpy(monkeypatch)
    exprs = [
        ("le", ("add", "q", 5), ("mul", "kv", 2)),
        ("eq", ("mod", "q", 7), ("floordiv", "kv", 30)),
        ("gt", ("where", ("lt", "q", "kv"), "t1q", ("neg", "t2hq")), ("abs", ("sub", "kv", 90))),
        ("ne", ("clamp", ("max", "q", "kv"), 10, 100), ("min", "t1kv", "h")),
    ]
    for expr in exprs:
        assert_same_as_dense(expression_mask(expr), 2, 3, 600, 500, (32, 64))
    assert spy.dense == 0


# ---------------------------------------------------------------------------
# Interval rules: soundness by sampling
# ---------------------------------------------------------------------------


def random_interval(ctx, gen, shape, low=-50, high=50, dtype=torch.int64):
    a = torch.randint(low, high, shape, generator=gen)
    width = torch.randint(0, 30, shape, generator=gen)
    width[..., :2] = 0  # some points
    lo, hi = a.to(dtype), (a + width).to(dtype)
    return _interval.Interval(lo, hi, exact=False, span=(low, high + 30), ctx=ctx)


def random_bool_interval(ctx, gen, shape):
    lo = torch.rand(shape, generator=gen) < 0.3
    hi = lo | (torch.rand(shape, generator=gen) < 0.5)
    return _interval.Interval(lo, hi, exact=False, span=(0, 1), ctx=ctx)


def sample(iv, gen):
    """A tensor of values, each inside its interval."""
    lo, hi = iv.lo, iv.hi
    if lo.dtype == torch.bool:
        return torch.where(
            lo, True, torch.where(hi, torch.rand(lo.shape, generator=gen) < 0.5, False)
        )
    if lo.dtype.is_floating_point:
        return lo + (hi - lo) * torch.rand(lo.shape, generator=gen, dtype=lo.dtype)
    t = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
    return (lo + (t * (hi - lo + 1).double()).floor().long().clamp(max=(hi - lo))).to(lo.dtype)


def assert_contains(result, value):
    assert isinstance(result, _interval.Interval)
    assert result.lo.dtype == value.dtype
    if value.dtype == torch.bool:
        assert bool((~result.lo | value).all()) and bool((result.hi | ~value).all())
    else:
        assert bool((result.lo <= value).all()) and bool((value <= result.hi).all())


INT_OPS = {
    "add": lambda x, y: x + y,
    "radd": lambda x, y: 7 + x,
    "sub": lambda x, y: x - y,
    "rsub": lambda x, y: 3 - x,
    "tensor_sub": lambda x, y: torch.tensor(3) - x,
    "mul": lambda x, y: x * y,
    "mul_neg_const": lambda x, y: x * -3,
    "neg": lambda x, y: -x,
    "abs": lambda x, y: abs(x),
    "floordiv": lambda x, y: x // 7,
    "trunc_div": lambda x, y: torch.div(x, 4, rounding_mode="trunc"),
    "true_div": lambda x, y: x / 3,
    "mod": lambda x, y: x % 5,
    "minimum": torch.minimum,
    "maximum": torch.maximum,
    "clamp": lambda x, y: torch.clamp(x, -10, 20),
    "clamp_interval": lambda x, y: x.clamp(min=y),
    "where": lambda x, y: torch.where(x < y, x, y + 1),
    "where_scalar": lambda x, y: torch.where(x > 0, 1, 0),
    "float": lambda x, y: x.float() * 0.5 - y,
    "int32": lambda x, y: x.int() + 1,
}
BOOL_OPS = {
    "lt": lambda x, y: x < y,
    "le": lambda x, y: x <= y,
    "gt": lambda x, y: x > y,
    "ge": lambda x, y: y >= x,
    "eq": lambda x, y: x == y,
    "ne": lambda x, y: x != y,
    "eq_const": lambda x, y: 3 == x,
    "lt_tensor": lambda x, y: torch.tensor(4) < x,
    "bool": lambda x, y: x.bool(),
}
LOGIC_OPS = {
    "and": lambda p, r: p & r,
    "or": lambda p, r: p | r,
    "xor": lambda p, r: p ^ r,
    "xor_const": lambda p, r: p ^ True,
    "not": lambda p, r: ~p,
    "logical_and": torch.logical_and,
    "logical_not": lambda p, r: torch.logical_not(p),
    "where": lambda p, r: torch.where(p, r, ~r),
    "to_int": lambda p, r: p.long() + r.int(),
}


@pytest.mark.parametrize("name", [*INT_OPS, *BOOL_OPS])
def test_integer_rules_are_sound(name):
    op = {**INT_OPS, **BOOL_OPS}[name]
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    ctx = _interval.IntervalContext()
    x, y = random_interval(ctx, gen, (40, 1)), random_interval(ctx, gen, (1, 30))
    result = op(x, y)
    for _ in range(20):
        assert_contains(result, op(sample(x, gen), sample(y, gen)))


@pytest.mark.parametrize("name", list(LOGIC_OPS))
def test_bool_rules_are_sound(name):
    op = LOGIC_OPS[name]
    gen = torch.Generator().manual_seed(1)
    ctx = _interval.IntervalContext()
    p, r = random_bool_interval(ctx, gen, (40, 1)), random_bool_interval(ctx, gen, (1, 30))
    result = op(p, r)
    for _ in range(20):
        assert_contains(result, op(sample(p, gen), sample(r, gen)))


def test_point_intervals_give_point_results():
    ctx = _interval.IntervalContext()
    q = _interval.point(torch.arange(10), 9, ctx)
    out = (q * 3 + 1) % 4 == 2
    assert out.exact and torch.equal(out.lo, (torch.arange(10) * 3 + 1) % 4 == 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.bool])
def test_table_lookups_are_tight_and_sound(dtype):
    gen = torch.Generator().manual_seed(2)
    table = (torch.randn(3, 257, generator=gen) * 50).to(dtype)
    ctx = _interval.IntervalContext()
    lo = torch.randint(0, 257, (60,), generator=gen)
    hi = (lo + torch.randint(0, 70, (60,), generator=gen)).clamp(max=256)
    h = _interval.point(torch.tensor([[0], [2]]), 2, ctx)
    got = table[h, _interval.ranges(lo, hi, 256, ctx, exact=False)]
    for row, head in enumerate((0, 2)):
        for i in range(60):
            window = table[head, lo[i] : hi[i] + 1]
            assert got.lo[row, i] == window.min() and got.hi[row, i] == window.max()


def test_out_of_range_and_unsupported_indexing_raise():
    ctx = _interval.IntervalContext()
    table = torch.arange(10)
    q = _interval.ranges(torch.tensor([0, 5]), torch.tensor([4, 10]), 10, ctx, exact=False)
    kv = _interval.ranges(torch.tensor([0]), torch.tensor([3]), 10, ctx, exact=False)
    with pytest.raises(_interval.Unsupported):
        table[q]
    with pytest.raises(_interval.Unsupported):
        torch.eye(10)[kv, kv]
    with pytest.raises(_interval.Unsupported):
        table[kv - 1]


@pytest.mark.parametrize(
    "op",
    [
        lambda x: bool(x > 3),
        lambda x: torch.sin(x),
        lambda x: x & 1,
        lambda x: x * 2**62,
        lambda x: x + torch.tensor([1, 2]),
        lambda x: x.int() + torch.tensor(1),  # 0-d and dimensioned promotion differ
        lambda x: x.float() * float("inf") - float("inf"),
        lambda x: (x.float() - float("inf")) + 1.0,
        lambda x: x % -3,
    ],
)
def test_unsound_operations_raise_unsupported(op):
    ctx = _interval.IntervalContext()
    x = _interval.ranges(torch.tensor([0, 5]), torch.tensor([4, 10]), 10, ctx, exact=False)
    with pytest.raises(_interval.Unsupported):
        op(x)


# ---------------------------------------------------------------------------
# The layout: rank and scatter against argsort
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 22])
def test_dense_to_ordered_matches_argsort(monkeypatch, chunk):
    monkeypatch.setattr(block_mask, "_ORDER_CHUNK_ENTRIES", chunk)
    gen = torch.Generator().manual_seed(chunk)
    states = torch.randint(0, 3, (2, 3, 9, 14), generator=gen, dtype=torch.int8)
    for dense in (states, states.transpose(-2, -1), states[:1, :1].expand(2, 3, 9, 14)):
        for value in (1, 2):
            num, idx = _dense_to_ordered(dense, value)
            want_num, want_idx = argsort_ordered(dense == value)
            assert torch.equal(num, want_num) and torch.equal(idx, want_idx)
            assert num.is_contiguous() and idx.is_contiguous()
        num, idx = _dense_to_ordered((dense == 1).int())
        assert torch.equal(idx, argsort_ordered(dense == 1)[1])


def test_from_states_of_an_expanded_map():
    states = torch.randint(0, 3, (1, 1, 5, 7), dtype=torch.int8).expand(2, 3, 5, 7)
    bm = BlockMask._from_states(states, (5 * 16, 7 * 16), (16, 16), noop_mask)
    assert torch.equal(bm._block_states(), states)
    assert all(t.is_contiguous() for t in bm._flatten_tensors())


def test_sub_tiles_stay_inside_the_block_and_sequence():
    tiling = _block_eval._Tiling.of(17, 40)  # 8 sub-tiles of 3; the third block is short
    assert (tiling.count, tiling.size) == (8, 3)
    blocks = torch.tensor([0, 1, 2])
    lo, hi = tiling.ranges(blocks)
    assert bool((lo <= hi).all())
    for k, (first, last) in enumerate([(0, 16), (17, 33), (34, 39)]):
        assert lo[k, 0] == first and int(hi[k].max()) == last and bool((lo[k] >= first).all())
        positions = tiling.positions(blocks[k].expand(8), torch.arange(8))
        assert set(positions.flatten().tolist()) == set(range(first, last + 1))
        assert torch.equal(positions.amin(1), lo[k]) and torch.equal(positions.amax(1), hi[k])


def test_floor_log2_is_exact():
    n = torch.cat([2 ** torch.arange(40), 2 ** torch.arange(1, 40) - 1, torch.arange(1, 1000)])
    assert torch.equal(
        _interval._floor_log2(n), torch.tensor([math.floor(math.log2(v)) for v in n.tolist()])
    )
