"""Interval evaluation of a mask_mod: the range of its value over a box of positions.

An :class:`Interval` stands for a tensor of boxes (one per block of the
grid): ``lo`` and ``hi`` bound the values an expression takes over every
position of each box. A mask_mod is called once with intervals in place of
its four index tensors; every operation it performs computes bounds of its
result from bounds of its operands, so the bool it returns bounds the mask
over each box: ``lo`` True means every position is kept, ``hi`` False that
none is. Broadcasting does the rest: ``b`` of shape ``(B, 1, 1, 1)``, ``q_idx``
of shape ``(1, 1, nq, 1)`` and so on give one box per (b, h, query block, kv
block) without vmap.

Soundness is the whole point, so everything that is not certainly bounded
raises :class:`Unsupported` (the caller then evaluates exactly):

* Only the operations with a rule below; any other torch function, random
  ops even on plain tensors, and any use of a value in Python control flow.
* Integer results that may overflow their dtype. Every integer interval
  carries a static range (Python ints bounding all its entries, derived
  from the sequence lengths and table extremes without a tensor pass),
  checked against the dtype at each step.
* Float arithmetic on a range that reaches infinity: ``inf - inf`` and
  ``0 * inf`` make NaN, which compares False both ways and so escapes any
  bounds. With finite operands, values stay inside their bounds.
* Type promotion that differs between 0-d tensors (what the mask_mod sees
  elementwise) and the dimensioned tensors that carry the bounds.
* Indexing that may fall outside the table, with more than one ranged index,
  or with fewer indices than the table has dimensions.

Float arithmetic stays sound without directed rounding: the bounds are
computed with the same ops in the same dtype as the values, and rounding to
nearest is monotone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Python ints bounding every entry of an integer interval; None for floats.
Span = tuple[int, int] | None
_Scalar = bool | int | float


class Unsupported(Exception):
    """The mask_mod does something whose range cannot be bounded soundly."""


class IntervalContext:
    """What the intervals of one ``create_block_mask`` call share: facts about tables.

    A table indexed with a ranged index (``doc[q_idx]``) gets a sparse table
    of its minima and maxima along that dimension, built on first use and
    kept for the rest of the call (the same table is queried chunk after
    chunk), and every table read its static range once.
    """

    def __init__(self) -> None:
        self._ranges: dict[tuple[int, int], _RangeTable] = {}
        self._spans: dict[int, tuple[Tensor, Span]] = {}

    def range_table(self, table: Tensor, dim: int) -> _RangeTable:
        """The cached min/max structure of ``table`` along ``dim``."""
        key = (id(table), dim)
        if key not in self._ranges:
            self._ranges[key] = _RangeTable(table, dim)
        return self._ranges[key]

    def span(self, table: Tensor) -> Span:
        """Smallest and largest entry of an integer ``table`` (None for floats).

        Raises:
            Unsupported: If a float table holds a NaN, or the table is empty.
        """
        key = id(table)
        if key not in self._spans:
            # Keeping the table alive keeps its id from being reused.
            self._spans[key] = (table, _table_span(table))
        return self._spans[key][1]


def _table_span(table: Tensor) -> Span:
    if table.numel() == 0:
        raise Unsupported("indexing an empty table")
    if table.dtype.is_floating_point:
        if bool(table.isnan().any()):
            raise Unsupported("a float table holds NaN")
        return None
    if table.dtype == torch.bool:
        return (0, 1)
    if not _is_int(table.dtype):
        raise Unsupported(f"table of dtype {table.dtype}")
    return int(table.min()), int(table.max())


class _RangeTable:
    """Sparse table: level k holds min and max over windows of 2**k along ``dim``.

    A query over ``[lo, hi]`` reads the two windows of the largest level that
    fits, which together cover the range exactly: two gathers a query. Only
    the levels that are queried are kept (intermediate ones are rebuilt from
    the table if ever needed), so a document table at 1M tokens costs two
    levels, not twenty.
    """

    def __init__(self, table: Tensor, dim: int) -> None:
        self.table = table
        self.dim = dim
        self._levels: dict[int, tuple[Tensor, Tensor]] = {}

    def _level(self, k: int) -> tuple[Tensor, Tensor]:
        if k == 0:
            return self.table, self.table
        if k not in self._levels:
            j = max((lvl for lvl in self._levels if lvl < k), default=0)
            mins, maxs = self._level(j)
            while j < k:
                step = 1 << j
                n = mins.shape[self.dim] - step
                mins = torch.minimum(mins.narrow(self.dim, 0, n), mins.narrow(self.dim, step, n))
                maxs = torch.maximum(maxs.narrow(self.dim, 0, n), maxs.narrow(self.dim, step, n))
                j += 1
            self._levels[k] = (mins, maxs)
        return self._levels[k]

    def query(self, index: list[Tensor], lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Min and max of ``table[index]`` with ``index[dim]`` running over ``[lo, hi]``.

        Args:
            index: One int64 index tensor per table dimension (the entry at
                ``dim`` is replaced); they broadcast together.
            lo: First index along ``dim``, int64, within the table.
            hi: Last index, ``>= lo``, within the table.
        """
        level = _floor_log2(hi - lo + 1)
        levels = [int(k) for k in torch.unique(level).tolist()]
        mins = maxs = None
        for k in levels:
            kmins, kmaxs = self._level(k)
            first_at, second_at = index.copy(), index.copy()
            first_at[self.dim], second_at[self.dim] = lo, hi - ((1 << k) - 1)
            if len(levels) > 1:
                # Entries of other levels read clamped (valid) places; where drops them.
                last = kmins.shape[self.dim] - 1
                first_at[self.dim] = lo.clamp(max=last)
                second_at[self.dim] = second_at[self.dim].clamp(0, last)
            first, second = tuple(first_at), tuple(second_at)
            kmin = torch.minimum(kmins[first], kmins[second])
            kmax = torch.maximum(kmaxs[first], kmaxs[second])
            if mins is None:
                mins, maxs = kmin, kmax
            else:
                at_k = level == k
                mins = torch.where(at_k, kmin, mins)
                maxs = torch.where(at_k, kmax, maxs)
        return mins, maxs


def _floor_log2(n: Tensor) -> Tensor:
    """Exact floor(log2(n)) of a positive int64 tensor."""
    k = torch.log2(n.double()).floor().long()
    # log2 of 2**k - 1 may round up to k: correct by one either way.
    k = k - ((1 << k) > n).long()
    return k + ((2 << k) <= n).long()


# ---------------------------------------------------------------------------
# The interval type
# ---------------------------------------------------------------------------


class Interval:
    """Per-box bounds of a value: every value in box i lies in ``[lo[i], hi[i]]``.

    Attributes:
        lo: Lower bounds (a tensor; bool for predicates, where lo True means
            certainly True).
        hi: Upper bounds, same dtype, broadcastable with ``lo``.
        exact: ``lo`` and ``hi`` are the same tensor: every box is a point.
        span: For integer and bool dtypes, Python ints bounding every entry
            of ``lo`` and ``hi``; None for floats.
        ctx: The shared :class:`IntervalContext`.
    """

    __slots__ = ("ctx", "exact", "hi", "lo", "span")
    # Comparisons return intervals, so intervals are not hashable.
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, lo: Tensor, hi: Tensor | None, *, exact: bool, span: Span, ctx: IntervalContext
    ) -> None:
        self.lo = lo
        self.hi = lo if exact else hi
        self.exact = exact
        self.span = span
        self.ctx = ctx

    @property
    def dtype(self) -> torch.dtype:
        return self.lo.dtype

    @property
    def device(self) -> torch.device:
        return self.lo.device

    def __repr__(self) -> str:
        return f"Interval(lo={self.lo}, hi={self.hi})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            raise Unsupported(f"no interval rule for {getattr(func, '__name__', func)}")
        return handler(*args, **(kwargs or {}))

    def __bool__(self) -> bool:
        # Python control flow on a value cannot follow every position of a box.
        # (int(), len() and iteration already fail: no __int__, __len__, __iter__.)
        raise Unsupported("a mask_mod value used in Python control flow")

    def __add__(self, other):
        return _add(self, other)

    def __radd__(self, other):
        return _add(other, self)

    def __sub__(self, other):
        return _sub(self, other)

    def __rsub__(self, other):
        return _sub(other, self)

    def __mul__(self, other):
        return _mul(self, other)

    def __rmul__(self, other):
        return _mul(other, self)

    def __floordiv__(self, other):
        return _floor_divide(self, other)

    def __rfloordiv__(self, other):
        return _floor_divide(other, self)

    def __truediv__(self, other):
        return _div(self, other)

    def __rtruediv__(self, other):
        return _div(other, self)

    def __mod__(self, other):
        return _remainder(self, other)

    def __rmod__(self, other):
        return _remainder(other, self)

    def __neg__(self):
        return _neg(self)

    def __abs__(self):
        return _abs(self)

    def __lt__(self, other):
        return _lt(self, other)

    def __le__(self, other):
        return _le(self, other)

    def __gt__(self, other):
        return _lt(other, self)

    def __ge__(self, other):
        return _le(other, self)

    def __eq__(self, other):  # type: ignore[override]
        return _eq(self, other)

    def __ne__(self, other):  # type: ignore[override]
        return _ne(self, other)

    def __and__(self, other):
        return _and(self, other)

    def __rand__(self, other):
        return _and(other, self)

    def __or__(self, other):
        return _or(self, other)

    def __ror__(self, other):
        return _or(other, self)

    def __xor__(self, other):
        return _xor(self, other)

    def __rxor__(self, other):
        return _xor(other, self)

    def __invert__(self):
        return _invert(self)

    # Tensor methods a mask_mod may call on its indices.
    def abs(self):
        return _abs(self)

    def neg(self):
        return _neg(self)

    def clamp(self, min=None, max=None):  # noqa: A002 (torch's names)
        return _clamp(self, min, max)

    clip = clamp

    def minimum(self, other):
        return _minimum(self, other)

    def maximum(self, other):
        return _maximum(self, other)

    def where(self, condition, other):
        return _where(condition, self, other)

    def to(self, *args, **kwargs):
        return _to(self, *args, **kwargs)

    def long(self):
        return _cast(self, torch.int64)

    def int(self):
        return _cast(self, torch.int32)

    def bool(self):
        return _cast(self, torch.bool)

    def float(self):
        return _cast(self, torch.float32)

    def double(self):
        return _cast(self, torch.float64)

    def logical_and(self, other):
        return _logical_and(self, other)

    def logical_or(self, other):
        return _logical_or(self, other)

    def logical_xor(self, other):
        return _logical_xor(self, other)

    def logical_not(self):
        return _logical_not(self)

    def new_ones(self, size, *, dtype=None, device=None):
        return _new(self, torch.ones, size, dtype, device)

    def new_zeros(self, size, *, dtype=None, device=None):
        return _new(self, torch.zeros, size, dtype, device)

    def new_full(self, size, fill_value, *, dtype=None, device=None):
        return _new(self, lambda s, **kw: torch.full(s, fill_value, **kw), size, dtype, device)


def _method(name: str) -> Callable:
    def forward(self, *args, **kwargs):
        return _HANDLERS[getattr(torch, name)](self, *args, **kwargs)

    forward.__name__ = name
    return forward


for _name in "add sub mul div floor_divide remainder eq ne lt le gt ge".split():
    setattr(Interval, _name, _method(_name))


# ---------------------------------------------------------------------------
# Operands: intervals, or constants (Python scalars and 0-d tensors)
# ---------------------------------------------------------------------------


class _Operand:
    """An interval or a constant, with what type promotion needs to see of it.

    ``logical`` is what the elementwise mask_mod sees (a 0-d value),
    ``physical`` what the bound tensors are (dimensioned for intervals).
    Constants keep their Python or 0-d tensor form as ``lo`` and ``hi``.
    """

    __slots__ = ("exact", "hi", "is_interval", "lo", "logical", "physical", "span")

    def __init__(self, value: Any) -> None:
        if isinstance(value, Interval):
            self.lo, self.hi, self.exact, self.span = value.lo, value.hi, value.exact, value.span
            self.logical, self.physical = _proto(value.dtype, 0), _proto(value.dtype, 1)
            self.is_interval = True
            return
        if isinstance(value, Tensor):
            if value.dim() != 0:
                raise Unsupported("a mask_mod value combined with a non-0-d tensor")
            scalar = value.item()
        elif isinstance(value, _Scalar):
            scalar = value
        else:
            raise Unsupported(f"operand of type {type(value).__name__}")
        if not isinstance(scalar, _Scalar) or (isinstance(scalar, float) and math.isnan(scalar)):
            raise Unsupported(f"constant {scalar!r}")
        self.lo = self.hi = self.logical = self.physical = value
        self.exact, self.is_interval = True, False
        self.span = None if isinstance(scalar, float) else (int(scalar), int(scalar))

    @property
    def dtype(self) -> torch.dtype:
        return torch.result_type(self.logical, self.logical)

    def sign(self) -> int:
        """-1, 0 or 1 for a constant."""
        v = self.lo.item() if isinstance(self.lo, Tensor) else self.lo
        return (v > 0) - (v < 0)


_PROTOS: dict[tuple[torch.dtype, int], Tensor] = {}


def _proto(dtype: torch.dtype, dim: int) -> Tensor:
    """An empty tensor of ``dtype`` with ``dim`` dimensions, for torch.result_type."""
    key = (dtype, dim)
    if key not in _PROTOS:
        _PROTOS[key] = torch.empty((1,) * dim, dtype=dtype)
    return _PROTOS[key]


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _result_dtype(a: _Operand, b: _Operand) -> torch.dtype:
    """The dtype of ``a op b``, as elementwise and as here; Unsupported if they differ.

    Elementwise, an index is a 0-d tensor, so ``doc[q_idx] + torch.tensor(1)``
    (int32 with a 0-d int64) is int64; here the int32 bounds are
    dimensioned and would win. vmap follows either rule depending on the op.
    """
    logical = torch.result_type(a.logical, b.logical)
    if torch.result_type(a.physical, b.physical) != logical:
        raise Unsupported("type promotion differs between 0-d and dimensioned operands")
    return logical


def _arith_dtype(a: _Operand, b: _Operand) -> torch.dtype:
    dtype = _result_dtype(a, b)
    if not (dtype.is_floating_point or _is_int(dtype)):
        raise Unsupported(f"arithmetic in {dtype}")
    return dtype


def _endpoints(x: _Operand, dtype: torch.dtype) -> tuple[Any, Any]:
    """``x``'s bounds in ``dtype``; Python scalars stay scalars (kernel arguments)."""
    if isinstance(x.lo, Tensor):
        lo = x.lo.to(dtype)
        return lo, (lo if x.exact else x.hi.to(dtype))
    return x.lo, x.hi


def _ctx(*values: Any) -> IntervalContext:
    return next(v.ctx for v in values if isinstance(v, Interval))


def _result(
    lo: Tensor, hi: Tensor | None, *, exact: bool, span: Span, ctx: IntervalContext
) -> Interval:
    """An interval, after the overflow check its dtype needs."""
    dtype = lo.dtype
    if dtype.is_floating_point:
        span = None
    elif dtype == torch.bool:
        span = (0, 1)
    elif not _is_int(dtype):
        raise Unsupported(f"result of dtype {dtype}")
    else:
        info = torch.iinfo(dtype)
        if span is None or span[0] < info.min or span[1] > info.max:
            raise Unsupported(f"{dtype} result may overflow")
    return Interval(lo, hi, exact=exact, span=span, ctx=ctx)


def _require_finite(dtype: torch.dtype, *bounds: Any) -> None:
    """Float arithmetic only on finite bounds, so that no value can become NaN."""
    if not dtype.is_floating_point:
        return
    for bound in {id(b): b for b in bounds}.values():  # an exact lo is its hi: check once
        if isinstance(bound, Tensor):
            finite = bool(torch.isfinite(bound).all())
        else:
            finite = math.isfinite(bound)
        if not finite:
            raise Unsupported("float arithmetic on a range reaching infinity")


def _spans(a: _Operand, b: _Operand, rule: Callable[[int, int, int, int], Span]) -> Span:
    """``rule(a_min, a_max, b_min, b_max)``, or None when a span is unknown."""
    if a.span is None or b.span is None:
        return None
    return rule(*a.span, *b.span)


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------


def _add(x, y):
    a, b = _Operand(x), _Operand(y)
    dtype = _arith_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    _require_finite(dtype, alo, ahi, blo, bhi)
    exact = a.exact and b.exact
    span = _spans(a, b, lambda a0, a1, b0, b1: (a0 + b0, a1 + b1))
    lo = torch.add(alo, blo)
    hi = None if exact else torch.add(ahi, bhi)
    return _result(lo, hi, exact=exact, span=span, ctx=_ctx(x, y))


def _sub(x, y):
    a, b = _Operand(x), _Operand(y)
    dtype = _arith_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    _require_finite(dtype, alo, ahi, blo, bhi)
    exact = a.exact and b.exact
    span = _spans(a, b, lambda a0, a1, b0, b1: (a0 - b1, a1 - b0))
    lo = torch.sub(alo, bhi) if isinstance(alo, Tensor) else torch.rsub(bhi, alo)
    hi = None
    if not exact:
        hi = torch.sub(ahi, blo) if isinstance(ahi, Tensor) else torch.rsub(blo, ahi)
    return _result(lo, hi, exact=exact, span=span, ctx=_ctx(x, y))


def _corners(a0: int, a1: int, b0: int, b1: int) -> tuple[int, int]:
    products = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
    return min(products), max(products)


def _mul(x, y):
    a, b = _Operand(x), _Operand(y)
    dtype = _arith_dtype(a, b)
    span = _spans(a, b, _corners)
    if not b.is_interval:
        a, b = b, a
    # Now b is an interval; a may be a constant.
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    _require_finite(dtype, alo, ahi, blo, bhi)
    ctx = _ctx(x, y)
    if a.exact and b.exact:
        return _result(torch.mul(blo, alo), None, exact=True, span=span, ctx=ctx)
    if not a.is_interval:
        lo, hi = torch.mul(blo, alo), torch.mul(bhi, alo)
        if a.sign() < 0:
            lo, hi = hi, lo
        return _result(lo, hi, exact=False, span=span, ctx=ctx)
    corners = [torch.mul(p, q) for p in (alo, ahi) for q in (blo, bhi)]
    lo = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(*corners[2:]))
    hi = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(*corners[2:]))
    return _result(lo, hi, exact=False, span=span, ctx=ctx)


def _neg(x):
    a = _Operand(x)
    lo, hi = _endpoints(a, _arith_dtype(a, a))
    span = None if a.span is None else (-a.span[1], -a.span[0])
    return _result(-hi, None if a.exact else -lo, exact=a.exact, span=span, ctx=x.ctx)


def _abs(x):
    a = _Operand(x)
    lo, hi = _endpoints(a, _arith_dtype(a, a))
    span = None
    if a.span is not None:
        low, high = a.span
        if low >= 0:
            return x  # never negative (unsigned, or an index)
        span = (0 if low <= 0 <= high else min(abs(low), abs(high)), max(abs(low), abs(high)))
    if a.exact:
        return _result(lo.abs(), None, exact=True, span=span, ctx=x.ctx)
    # Straddling zero: [0, max(-lo, hi)]; otherwise the bounds, maybe swapped.
    new_lo = torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))
    return _result(new_lo, torch.maximum(-lo, hi), exact=False, span=span, ctx=x.ctx)


def _positive_int_divisor(y: Any) -> int:
    d = _Operand(y)
    if d.is_interval or not _is_int(d.dtype):
        raise Unsupported("division by something other than an int constant")
    value = int(d.lo)
    if value <= 0:
        raise Unsupported("division by a non-positive constant")
    return value


def _int_interval(x: Any) -> _Operand:
    a = _Operand(x)
    if not a.is_interval or not _is_int(a.dtype):
        raise Unsupported("integer division of a non-integer or a constant")
    return a


def _trunc_div(v: int, d: int) -> int:
    return -(-v // d) if v < 0 else v // d


def _divide_int(x, y, rounding_mode: str):
    """``x // d`` (floor) or trunc division by a positive constant: monotone in x."""
    a = _int_interval(x)
    d = _positive_int_divisor(y)
    lo, hi = _endpoints(a, _result_dtype(a, _Operand(y)))
    rule = (lambda v: v // d) if rounding_mode == "floor" else (lambda v: _trunc_div(v, d))
    span = (rule(a.span[0]), rule(a.span[1]))

    def div(t):
        return torch.div(t, d, rounding_mode=rounding_mode)

    return _result(div(lo), None if a.exact else div(hi), exact=a.exact, span=span, ctx=x.ctx)


def _floor_divide(x, y):
    return _divide_int(x, y, "floor")


def _div(x, y, *, rounding_mode: str | None = None):
    if rounding_mode is not None:
        return _divide_int(x, y, rounding_mode)
    # True division by a positive constant: monotone, float result.
    a, b = _Operand(x), _Operand(y)
    if not a.is_interval or b.is_interval or b.sign() <= 0:
        raise Unsupported("true division other than by a positive constant")
    dtype = _true_div_dtype(a.logical, b.logical)
    if _true_div_dtype(a.physical, b.physical) != dtype:
        raise Unsupported("type promotion differs between 0-d and dimensioned operands")
    lo, hi = _endpoints(a, dtype)
    _require_finite(dtype, lo, hi, b.lo)
    hi = None if a.exact else torch.div(hi, b.lo)
    return _result(torch.div(lo, b.lo), hi, exact=a.exact, span=None, ctx=x.ctx)


def _true_div_dtype(x: Any, y: Any) -> torch.dtype:
    dtype = torch.result_type(x, y)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _remainder(x, y):
    """``x % c`` for a positive int c: exact within one period, else [0, c - 1]."""
    a = _int_interval(x)
    c = _positive_int_divisor(y)
    lo, hi = _endpoints(a, _result_dtype(a, _Operand(y)))
    low, high = a.span
    span = (low % c, high % c) if low // c == high // c else (0, c - 1)
    if a.exact:
        return _result(torch.remainder(lo, c), None, exact=True, span=span, ctx=x.ctx)
    same_period = torch.div(lo, c, rounding_mode="floor") == torch.div(hi, c, rounding_mode="floor")
    new_lo = torch.where(same_period, torch.remainder(lo, c), 0)
    new_hi = torch.where(same_period, torch.remainder(hi, c), c - 1)
    return _result(new_lo, new_hi, exact=False, span=span, ctx=x.ctx)


# ---------------------------------------------------------------------------
# Minimum, maximum, clamp
# ---------------------------------------------------------------------------


def _lower(a: Any, b: Any, dtype: torch.dtype) -> Any:
    """Elementwise min of two bounds, tensors or scalars."""
    if dtype == torch.bool:
        return a & b if isinstance(a, Tensor) else b & a
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.minimum(a, b)
    if isinstance(a, Tensor):
        return a.clamp(max=b)
    if isinstance(b, Tensor):
        return b.clamp(max=a)
    return min(a, b)


def _upper(a: Any, b: Any, dtype: torch.dtype) -> Any:
    """Elementwise max of two bounds, tensors or scalars."""
    if dtype == torch.bool:
        return a | b if isinstance(a, Tensor) else b | a
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.maximum(a, b)
    if isinstance(a, Tensor):
        return a.clamp(min=b)
    if isinstance(b, Tensor):
        return b.clamp(min=a)
    return max(a, b)


def _extreme(x, y, upper: bool, dtype: torch.dtype | None = None) -> Interval:
    """Elementwise max (``upper``) or min of two operands: monotone in both."""
    a, b = _Operand(x), _Operand(y)
    dtype = dtype or _result_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    pick, span_pick = (_upper, max) if upper else (_lower, min)
    exact = a.exact and b.exact
    span = _spans(a, b, lambda a0, a1, b0, b1: (span_pick(a0, b0), span_pick(a1, b1)))
    lo = pick(alo, blo, dtype)
    hi = None if exact else pick(ahi, bhi, dtype)
    return _result(lo, hi, exact=exact, span=span, ctx=_ctx(x, y))


def _minimum(x, y):
    if not all(isinstance(v, Interval | Tensor) for v in (x, y)):
        raise Unsupported("torch.minimum takes tensors")  # as torch does
    return _extreme(x, y, upper=False)


def _maximum(x, y):
    if not all(isinstance(v, Interval | Tensor) for v in (x, y)):
        raise Unsupported("torch.maximum takes tensors")  # as torch does
    return _extreme(x, y, upper=True)


def _clamp(x, min=None, max=None):  # noqa: A002 (torch's names)
    if not isinstance(x, Interval):
        raise Unsupported("clamp of a constant by an interval")
    out = x
    for limit, upper in ((min, True), (max, False)):
        if limit is not None:
            if _result_dtype(_Operand(out), _Operand(limit)) != x.dtype:
                raise Unsupported("clamp that changes the dtype")
            out = _extreme(out, limit, upper, x.dtype)
    return out


# ---------------------------------------------------------------------------
# Comparisons and logic
# ---------------------------------------------------------------------------


def _bool_result(lo: Tensor, hi: Tensor | None, exact: bool, ctx: IntervalContext) -> Interval:
    return Interval(lo, hi, exact=exact, span=(0, 1), ctx=ctx)


def _compare(op: Callable, a: Any, b: Any) -> Tensor:
    if isinstance(a, Tensor):
        return op(a, b)
    # Scalar on the left: flip the comparison.
    return {torch.lt: torch.gt, torch.le: torch.ge, torch.eq: torch.eq}[op](b, a)


def _lt(x, y, strict: bool = True):
    a, b = _Operand(x), _Operand(y)
    dtype = _result_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    op = torch.lt if strict else torch.le
    exact = a.exact and b.exact
    # Certain when the largest x beats the smallest y; possible when the smallest does.
    lo = _compare(op, ahi, blo)
    hi = None if exact else _compare(op, alo, bhi)
    return _bool_result(lo, hi, exact, _ctx(x, y))


def _le(x, y):
    return _lt(x, y, strict=False)


def _eq(x, y):
    a, b = _Operand(x), _Operand(y)
    dtype = _result_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    ctx = _ctx(x, y)
    lo = _compare(torch.eq, alo, blo)
    if a.exact and b.exact:
        return _bool_result(lo, None, True, ctx)
    # Certainly equal only when both are the same point.
    if not a.exact:
        lo = lo & (alo == ahi)
    if not b.exact:
        lo = lo & (blo == bhi)
    hi = _compare(torch.le, alo, bhi) & _compare(torch.le, blo, ahi)
    return _bool_result(lo, hi, False, ctx)


def _ne(x, y):
    return _invert(_eq(x, y))


def _bool_operand(x: Any) -> _Operand:
    a = _Operand(x)
    if a.dtype != torch.bool:
        raise Unsupported("bitwise op on a non-bool")
    return a


def _and(x, y):
    a, b = _bool_operand(x), _bool_operand(y)
    exact = a.exact and b.exact
    lo = _lower(a.lo, b.lo, torch.bool)
    hi = None if exact else _lower(a.hi, b.hi, torch.bool)
    return _bool_result(lo, hi, exact, _ctx(x, y))


def _or(x, y):
    a, b = _bool_operand(x), _bool_operand(y)
    exact = a.exact and b.exact
    lo = _upper(a.lo, b.lo, torch.bool)
    hi = None if exact else _upper(a.hi, b.hi, torch.bool)
    return _bool_result(lo, hi, exact, _ctx(x, y))


def _xor(x, y):
    a, b = _bool_operand(x), _bool_operand(y)
    if not (a.is_interval and b.is_interval):
        interval, constant = (x, b) if a.is_interval else (y, a)
        return _invert(interval) if bool(constant.lo) else interval
    if a.exact and b.exact:
        return _bool_result(a.lo ^ b.lo, None, True, _ctx(x, y))
    # Certain only where both are: then x ^ y is the xor of the two points.
    lo = (a.lo & ~b.hi) | (~a.hi & b.lo)
    hi = (a.hi & ~b.lo) | (~a.lo & b.hi)
    return _bool_result(lo, hi, False, _ctx(x, y))


def _invert(x):
    a = _bool_operand(x)
    if a.exact:
        return _bool_result(~a.lo, None, True, x.ctx)
    return _bool_result(~a.hi, ~a.lo, False, x.ctx)


def _truth(x: Any) -> Any:
    """``x != 0`` as a bool interval (what logical_* and ``.bool()`` see)."""
    if isinstance(x, Interval):
        return x if x.dtype == torch.bool else _ne(x, 0)
    return _Operand(x).lo != 0 if isinstance(x, Tensor) else bool(x)


def _logical_and(x, y):
    return _and(_truth(x), _truth(y))


def _logical_or(x, y):
    return _or(_truth(x), _truth(y))


def _logical_xor(x, y):
    return _xor(_truth(x), _truth(y))


def _logical_not(x):
    return _invert(_truth(x))


def _where(condition, input, other):  # noqa: A002 (torch's names)
    cond = _bool_operand(condition)
    a, b = _Operand(input), _Operand(other)
    dtype = _result_dtype(a, b)
    (alo, ahi), (blo, bhi) = _endpoints(a, dtype), _endpoints(b, dtype)
    ctx = _ctx(condition, input, other)
    if not isinstance(alo, Tensor) and not isinstance(blo, Tensor):
        # torch.where(cond, 1, 0): the branches need a tensor to broadcast with.
        alo = ahi = torch.full((), alo, dtype=dtype, device=_device(condition, input, other))
    span = _spans(a, b, lambda a0, a1, b0, b1: (min(a0, b0), max(a1, b1)))
    if cond.exact and a.exact and b.exact:
        return _result(torch.where(cond.lo, alo, blo), None, exact=True, span=span, ctx=ctx)
    # Where the condition is unknown, either branch may be taken.
    lo = torch.where(cond.lo, alo, torch.where(cond.hi, _lower(alo, blo, dtype), blo))
    hi = torch.where(cond.lo, ahi, torch.where(cond.hi, _upper(ahi, bhi, dtype), bhi))
    return _result(lo, hi, exact=False, span=span, ctx=ctx)


def _device(*values: Any) -> torch.device:
    return next(v.device for v in values if isinstance(v, Interval))


# ---------------------------------------------------------------------------
# Casts and constructors
# ---------------------------------------------------------------------------


def _cast(x: Interval, dtype: torch.dtype) -> Interval:
    """``x.to(dtype)``: monotone casts only (integers must fit the new dtype)."""
    src = x.dtype
    if dtype == src:
        return x
    if dtype == torch.bool:
        return _ne(x, 0)
    if dtype.is_complex or (src.is_floating_point and not dtype.is_floating_point):
        raise Unsupported(f"cast from {src} to {dtype}")
    lo = x.lo.to(dtype)
    hi = None if x.exact else x.hi.to(dtype)
    # _result rejects integer ranges the new dtype cannot hold.
    return _result(lo, hi, exact=x.exact, span=x.span, ctx=x.ctx)


def _to(x: Interval, *args, **kwargs) -> Interval:
    """``x.to(dtype)``; moving devices or other options is not supported."""
    dtype = kwargs.pop("dtype", None)
    if args and isinstance(args[0], torch.dtype) and dtype is None:
        dtype, args = args[0], args[1:]
    if args or kwargs or dtype is None:
        raise Unsupported("Tensor.to other than to a dtype")
    return _cast(x, dtype)


def _new(x: Interval, make: Callable, size, dtype, device) -> Tensor:
    """``x.new_ones(size)`` and friends: constants, whatever x holds."""
    return make(size, dtype=dtype or x.dtype, device=device or x.device)


def _like(make: Callable) -> Callable:
    def like(x, *args, dtype=None, **kwargs):
        if kwargs or not isinstance(x, Interval):
            raise Unsupported("*_like with options")
        return make((), *args, dtype=dtype or x.dtype, device=x.device)

    return like


# ---------------------------------------------------------------------------
# Indexing a captured tensor
# ---------------------------------------------------------------------------


def _getitem(table: Any, index: Any) -> Interval:
    """``table[i0, i1, ...]`` with intervals among the indices.

    Point indices gather; one ranged index reads the table's min and max
    over the range from a sparse table.
    """
    if not isinstance(table, Tensor):
        raise Unsupported("indexing an interval")
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != table.dim() or not any(isinstance(i, Interval) for i in index):
        raise Unsupported("indexing that leaves a dimension of the table")
    ctx = _ctx(*index)
    span = ctx.span(table)
    points: list[Tensor] = []
    ranged: int | None = None
    for dim, i in enumerate(index):
        lo, hi = _index_bounds(i, table, dim)
        points.append(lo)
        if hi is not lo:
            if ranged is not None:
                raise Unsupported("more than one ranged index")
            ranged, ranged_hi = dim, hi
    if ranged is None:
        return Interval(table[tuple(points)], None, exact=True, span=span, ctx=ctx)
    mins, maxs = ctx.range_table(table, ranged).query(points, points[ranged], ranged_hi)
    return Interval(mins, maxs, exact=False, span=span, ctx=ctx)


def _index_bounds(i: Any, table: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """int64 (lo, hi) of one index, checked to lie inside ``table``'s dim.

    Returns the same tensor twice for a point index. Negative indices are
    refused too: elementwise they would wrap around.
    """
    size = table.shape[dim]
    if isinstance(i, Interval):
        if not _is_int(i.dtype):
            raise Unsupported(f"index of dtype {i.dtype}")
        lo = i.lo.long()
        hi = lo if i.exact else i.hi.long()
        low, high = i.span
        # The static range usually settles it; else look (a device sync).
        if (low < 0 and int(lo.min()) < 0) or (high >= size and int(hi.max()) >= size):
            raise Unsupported("index may fall outside the table")
        return lo, hi
    if isinstance(i, bool) or not isinstance(i, int | Tensor):
        raise Unsupported(f"index of type {type(i).__name__}")
    if isinstance(i, Tensor) and (i.dim() != 0 or not _is_int(i.dtype)):
        raise Unsupported("tensor index that is not a 0-d integer")
    value = int(i)
    if not 0 <= value < size:
        raise Unsupported("index may fall outside the table")
    point = torch.full((), value, dtype=torch.int64, device=table.device)
    return point, point


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------

_HANDLERS: dict[Any, Callable] = {}


def _register(handler: Callable, *names: str, swapped: tuple[str, ...] = ()) -> None:
    """Maps torch.<name> and Tensor.<name> to ``handler`` (``swapped``: arguments reversed)."""
    for name in (*names, *swapped):
        for owner in (torch, torch.Tensor):
            func = getattr(owner, name, None)
            if func is not None:
                _HANDLERS[func] = handler if name in names else lambda x, y: handler(y, x)


def _no_kwargs(handler: Callable) -> Callable:
    def call(*args, **kwargs):
        if kwargs:
            raise Unsupported("keyword arguments such as out=")
        return handler(*args)

    return call


_register(_no_kwargs(_add), "add", "__add__", "__radd__")
_register(_no_kwargs(_sub), "sub", "subtract", "__sub__", swapped=("__rsub__", "rsub"))
_register(_no_kwargs(_mul), "mul", "multiply", "__mul__", "__rmul__")
_register(_no_kwargs(_floor_divide), "floor_divide", "__floordiv__", swapped=("__rfloordiv__",))
_register(_no_kwargs(_remainder), "remainder", "__mod__", swapped=("__rmod__",))
_register(_div, "div", "divide", "true_divide", "__truediv__", swapped=("__rtruediv__",))
_register(_no_kwargs(_neg), "neg", "negative", "__neg__")
_register(_no_kwargs(_abs), "abs", "absolute", "__abs__")
_register(_no_kwargs(_lt), "lt", "less", "__lt__")
_register(_no_kwargs(_le), "le", "less_equal", "__le__")
_register(_no_kwargs(_lt), swapped=("gt", "greater", "__gt__"))
_register(_no_kwargs(_le), swapped=("ge", "greater_equal", "__ge__"))
_register(_no_kwargs(_eq), "eq", "__eq__")
_register(_no_kwargs(_ne), "ne", "not_equal", "__ne__")
_register(_no_kwargs(_and), "bitwise_and", "__and__", "__rand__")
_register(_no_kwargs(_or), "bitwise_or", "__or__", "__ror__")
_register(_no_kwargs(_xor), "bitwise_xor", "__xor__", "__rxor__")
_register(_no_kwargs(_invert), "bitwise_not", "__invert__")
_register(_no_kwargs(_logical_and), "logical_and")
_register(_no_kwargs(_logical_or), "logical_or")
_register(_no_kwargs(_logical_xor), "logical_xor")
_register(_no_kwargs(_logical_not), "logical_not")
_register(_no_kwargs(_minimum), "minimum")
_register(_no_kwargs(_maximum), "maximum")
_register(_clamp, "clamp", "clip")
_register(_no_kwargs(_where), "where")
_HANDLERS[torch.Tensor.where] = _no_kwargs(lambda x, condition, other: _where(condition, x, other))
_HANDLERS[torch.Tensor.__getitem__] = _getitem
_HANDLERS[torch.ones_like] = _like(torch.ones)
_HANDLERS[torch.zeros_like] = _like(torch.zeros)
_HANDLERS[torch.full_like] = _like(torch.full)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

_RANDOM_OPS = frozenset(
    func
    for owner, names in (
        (
            torch,
            "rand rand_like randn randn_like randint randint_like randperm bernoulli "
            "multinomial normal poisson dropout alpha_dropout feature_dropout "
            "feature_alpha_dropout rrelu",
        ),
        (
            torch.Tensor,
            "bernoulli bernoulli_ cauchy_ exponential_ geometric_ log_normal_ multinomial "
            "normal_ random_ uniform_",
        ),
        (
            torch.nn.functional,
            "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
            "rrelu gumbel_softmax",
        ),
    )
    for name in names.split()
    if (func := getattr(owner, name, None)) is not None
)


class _NoRandomness(TorchFunctionMode):
    """Rejects random ops, even on plain tensors.

    Elementwise a random op draws per position, and vmap refuses it; here it
    would draw once for a whole chunk, and its result would pass for a
    constant.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_OPS:
            raise Unsupported(f"random op {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def evaluate(
    mask_mod: Callable, b: Interval, h: Interval, q_idx: Interval, kv_idx: Interval
) -> tuple[Tensor, Tensor]:
    """Bounds of ``mask_mod`` over boxes: (certainly kept, possibly kept).

    Args:
        mask_mod: The mask_mod, written for 0-d tensors.
        b: Batch indices (points).
        h: Head indices (points).
        q_idx: Query ranges.
        kv_idx: Key/value ranges.

    Returns:
        Two bool tensors that broadcast with the inputs.

    Raises:
        Unsupported: If the mask_mod does something without a sound rule, or
            does not return a bool.
    """
    with torch.no_grad(), _NoRandomness():
        out = mask_mod(b, h, q_idx, kv_idx)
    if isinstance(out, Interval):
        if out.dtype != torch.bool:
            raise Unsupported(f"mask_mod returned {out.dtype}")
        return out.lo, out.hi
    if isinstance(out, Tensor) and out.dim() == 0 and out.dtype == torch.bool:
        return out, out  # ignores its inputs: the same everywhere
    raise Unsupported(f"mask_mod returned {type(out).__name__}")


def point(values: Tensor, last: int, ctx: IntervalContext) -> Interval:
    """Exactly ``values``: int64 indices in ``[0, last]``."""
    return Interval(values, None, exact=True, span=(0, last), ctx=ctx)


def ranges(lo: Tensor, hi: Tensor, last: int, ctx: IntervalContext, exact: bool) -> Interval:
    """Index ranges ``[lo, hi]`` within ``[0, last]``; ``exact`` when each is one index."""
    return Interval(lo, hi, exact=exact, span=(0, last), ctx=ctx)
