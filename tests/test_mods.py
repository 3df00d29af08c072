"""The mods library: names, docstrings, and values against hand-computed formulas."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from flex_inductor import masks, mods

# ---------------------------------------------------------------------------
# Helpers: evaluate a mod on a small grid, the way the kernels see it (0-d).
# ---------------------------------------------------------------------------


def _mask_grid(mask_mod, L: int, S: int, b: int = 0, h: int = 0) -> torch.Tensor:
    """bool (L, S), one plain call per position on 0-d int32 tensors."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return torch.tensor(
        [[bool(mask_mod(i32(b), i32(h), i32(q), i32(kv))) for kv in range(S)] for q in range(L)]
    )


def _score(score_mod, score: float, b: int, h: int, q: int, kv: int) -> float:
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    out = score_mod(torch.tensor(score, dtype=torch.float64), i32(b), i32(h), i32(q), i32(kv))
    return float(out)


# ---------------------------------------------------------------------------
# Names and docstrings
# ---------------------------------------------------------------------------

NAMED = [
    (lambda: masks.causal(), "causal"),
    (lambda: masks.sliding_window(1024), "sliding_window_1024"),
    (lambda: masks.sliding_window(8, causal=False), "sliding_window_bidirectional_8"),
    (lambda: masks.prefix_lm(64), "prefix_lm_64"),
    (lambda: masks.document([2, 3]), "document"),
    (lambda: masks.document([2, 3], causal=True), "document_causal"),
    (lambda: masks.dilated_sliding_window(16, 2), "dilated_sliding_window_16_d2"),
    (
        lambda: masks.dilated_sliding_window(16, 2, causal=False),
        "dilated_sliding_window_bidirectional_16_d2",
    ),
    (lambda: masks.neighborhood_2d(8, 6, 3), "neighborhood_2d_8x6_k3"),
    (lambda: mods.noop(), "noop"),
    (lambda: mods.alibi(8), "alibi_8"),
    (lambda: mods.softcap(30), "softcap_30"),
    (lambda: mods.softcap(2.5), "softcap_2p5"),
    (lambda: mods.relative_position_bias(torch.zeros(2, 7)), "relative_position_bias_4"),
    (lambda: mods.learnable_relative_bias(2, 4)[0], "relative_position_bias_4"),
    (lambda: mods.per_head_scale(torch.ones(2)), "per_head_scale"),
    (lambda: mods.full_bias(torch.zeros(2, 3, 3)), "full_bias"),
]


@pytest.mark.parametrize("make, name", NAMED, ids=[name for _, name in NAMED])
def test_factory_returns_named_function(make, name):
    fn = make()
    assert fn.__name__ == name
    assert fn.__qualname__ == name


FACTORIES = [
    masks.causal,
    masks.sliding_window,
    masks.prefix_lm,
    masks.document,
    masks.dilated_sliding_window,
    masks.neighborhood_2d,
    mods.noop,
    mods.alibi,
    mods.alibi_slopes,
    mods.softcap,
    mods.relative_position_bias,
    mods.learnable_relative_bias,
    mods.per_head_scale,
    mods.full_bias,
]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_factory_docstring_gives_formula_and_source(factory):
    doc = factory.__doc__ or ""
    assert len(doc.strip()) > 40, f"{factory.__name__} needs a docstring"
    assert "Returns:" in doc


def test_reexported_combinators_are_the_combinators_module():
    from flex_inductor import combinators

    assert masks.noop_mask is combinators.noop_mask
    assert masks.and_masks is combinators.and_masks
    assert masks.or_masks is combinators.or_masks


# ---------------------------------------------------------------------------
# mask_mods against brute force
# ---------------------------------------------------------------------------


def test_causal_values():
    expected = torch.tensor([[q >= kv for kv in range(5)] for q in range(4)])
    assert torch.equal(_mask_grid(masks.causal(), 4, 5), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_values(causal):
    window = 2
    grid = _mask_grid(masks.sliding_window(window, causal=causal), 7, 7)
    for q, kv in itertools.product(range(7), range(7)):
        keep = abs(q - kv) <= window and (q >= kv or not causal)
        assert bool(grid[q, kv]) == keep, (q, kv)
    # The row of query 4 by hand: causal sees 2, 3, 4; bidirectional 2..6.
    assert grid[4].nonzero().flatten().tolist() == ([2, 3, 4] if causal else [2, 3, 4, 5, 6])


def test_prefix_lm_values():
    grid = _mask_grid(masks.prefix_lm(3), 6, 6)
    # Query 0 sees the whole prefix (bidirectional), query 4 the prefix and itself causally.
    assert grid[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert grid[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert not grid[1, 3]


def test_document_from_lengths_equals_from_offsets():
    lengths = [3, 1, 4, 2]
    offsets = [0, 3, 4, 8, 10]
    from_lengths = _mask_grid(masks.document(lengths), 10, 10)
    from_offsets = _mask_grid(masks.document(offsets=torch.tensor(offsets)), 10, 10)
    assert torch.equal(from_lengths, from_offsets)
    doc = [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    expected = torch.tensor([[doc[q] == doc[kv] for kv in range(10)] for q in range(10)])
    assert torch.equal(from_lengths, expected)


def test_document_causal_is_document_and_causal():
    grid = _mask_grid(masks.document([3, 1, 4, 2], causal=True), 10, 10)
    plain = _mask_grid(masks.document([3, 1, 4, 2]), 10, 10)
    assert torch.equal(grid, plain & torch.ones(10, 10, dtype=torch.bool).tril())


def test_document_skips_empty_documents():
    # A zero-length document takes no position.
    assert torch.equal(
        _mask_grid(masks.document([2, 0, 2]), 4, 4), _mask_grid(masks.document([2, 2]), 4, 4)
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({}, "exactly one"),
        ({"lengths": [1], "offsets": [0, 1]}, "exactly one"),
        ({"lengths": [2, -1]}, ">= 0"),
        ({"offsets": [1, 3]}, "start at 0"),
        ({"offsets": [0, 3, 2]}, "non-decreasing"),
        ({"lengths": [[1, 2]]}, "1-D"),
    ],
)
def test_document_rejects_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        masks.document(**kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_sliding_window_brute_force(causal):
    window, dilation, n = 6, 3, 12
    grid = _mask_grid(masks.dilated_sliding_window(window, dilation, causal=causal), n, n)
    for q, kv in itertools.product(range(n), range(n)):
        d = q - kv
        keep = abs(d) <= window and d % dilation == 0 and (d >= 0 or not causal)
        assert bool(grid[q, kv]) == keep, (q, kv)
    # Query 5 by hand: distances 0 and 3 behind it, and -3, -6 ahead when bidirectional.
    assert grid[5].nonzero().flatten().tolist() == ([2, 5] if causal else [2, 5, 8, 11])


def test_dilated_sliding_window_rejects_zero_dilation():
    with pytest.raises(ValueError, match="dilation"):
        masks.dilated_sliding_window(4, 0)


def _natten_window_start(index: int, length: int, kernel_size: int) -> int:
    # NATTEN's get_window_start for dilation 1, written with branches.
    radius = kernel_size // 2
    start = max(index - radius, 0)
    if index + radius >= length:
        start += length - index - radius - 1
    return start


@pytest.mark.parametrize("height, width, kernel_size", [(4, 5, 3), (5, 5, 5), (3, 7, 3)])
def test_neighborhood_2d_brute_force(height, width, kernel_size):
    n = height * width
    grid = _mask_grid(masks.neighborhood_2d(height, width, kernel_size), n, n)
    for q, kv in itertools.product(range(n), range(n)):
        (qr, qc), (kr, kc) = divmod(q, width), divmod(kv, width)
        rs = _natten_window_start(qr, height, kernel_size)
        cs = _natten_window_start(qc, width, kernel_size)
        keep = rs <= kr < rs + kernel_size and cs <= kc < cs + kernel_size
        assert bool(grid[q, kv]) == keep, (q, kv)
    # Every query sees exactly kernel_size**2 keys, borders included.
    assert grid.sum(-1).tolist() == [kernel_size**2] * n


def test_neighborhood_2d_corner_by_hand():
    # 4x4 grid, 3x3 kernel: the corner pixel 0 sees rows 0-2 x cols 0-2.
    grid = _mask_grid(masks.neighborhood_2d(4, 4, 3), 16, 16)
    assert grid[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]


@pytest.mark.parametrize("kernel_size", [2, 7])
def test_neighborhood_2d_rejects_bad_kernel(kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        masks.neighborhood_2d(5, 5, kernel_size)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_window_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="window"):
        masks.sliding_window(bad)


# ---------------------------------------------------------------------------
# score_mods against formulas
# ---------------------------------------------------------------------------


def test_noop_returns_score():
    assert _score(mods.noop(), 1.25, 0, 1, 2, 3) == 1.25


def test_alibi_slopes_for_8_heads():
    assert mods.alibi_slopes(8) == [2.0**-i for i in range(1, 9)]


def test_alibi_slopes_for_non_power_of_two():
    # 12 heads: the 8-head slopes, then slopes 1, 3, 5, 7 of the 16-head sequence.
    sixteen = [2.0 ** (-0.5 * i) for i in range(1, 17)]
    expected = [2.0**-i for i in range(1, 9)] + [sixteen[0], sixteen[2], sixteen[4], sixteen[6]]
    assert mods.alibi_slopes(12) == pytest.approx(expected, rel=1e-12)
    assert mods.alibi_slopes(1) == [2.0**-8]


def test_alibi_value():
    score_mod = mods.alibi(8)
    # head 2 has slope 1/8; kv - q = 3 - 7 = -4.
    assert _score(score_mod, 1.0, 0, 2, 7, 3) == pytest.approx(1.0 - 0.5)


def test_softcap_value():
    assert _score(mods.softcap(2.0), 3.0, 0, 0, 0, 0) == pytest.approx(2.0 * math.tanh(1.5))


@pytest.mark.parametrize("cap", [0, -1.0, math.inf])
def test_softcap_rejects_bad_cap(cap):
    with pytest.raises(ValueError, match="cap"):
        mods.softcap(cap)


def test_relative_position_bias_value():
    bias = torch.arange(2 * 7, dtype=torch.float64).reshape(2, 7)  # max_len 4
    score_mod = mods.relative_position_bias(bias)
    # h=1, q - kv = 2 - 0 = 2 -> column 2 + 3 = 5 -> value 7 + 5 = 12.
    assert _score(score_mod, 0.5, 0, 1, 2, 0) == 12.5
    # q - kv = -3 -> column 0.
    assert _score(score_mod, 0.0, 0, 0, 0, 3) == 0.0


def test_relative_position_bias_rejects_even_width():
    with pytest.raises(ValueError, match="2 \\* max_len - 1"):
        mods.relative_position_bias(torch.zeros(2, 6))


def test_learnable_relative_bias_parameter_gets_gradient():
    score_mod, bias = mods.learnable_relative_bias(3, 5)
    assert isinstance(bias, torch.nn.Parameter)
    assert bias.shape == (3, 9) and bool((bias == 0).all())
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    score_mod(torch.tensor(0.0), i32(0), i32(2), i32(1), i32(4)).backward()
    expected = torch.zeros(3, 9)
    expected[2, 1 - 4 + 4] = 1.0
    assert torch.equal(bias.grad, expected)


def test_per_head_scale_value():
    assert _score(mods.per_head_scale(torch.tensor([1.0, 3.0])), 2.0, 0, 1, 0, 0) == 6.0


def test_full_bias_value():
    bias = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    assert _score(mods.full_bias(bias), 1.0, 0, 1, 2, 3) == 1.0 + 23.0


# ---------------------------------------------------------------------------
# The snippets of the docs run
# ---------------------------------------------------------------------------

_DOCS = Path(__file__).resolve().parent.parent / "docs"


# Slow: flex_attention compiles itself when called eagerly, and on CPU the
# kernels run in Triton's interpreter (tens of seconds for these snippets).
@pytest.mark.slow
@pytest.mark.parametrize("page", ["score_mod.md", "mask_mod.md"])
def test_doc_snippets_run(page, capsys):
    snippets = re.findall(r"```python\n(.*?)```", (_DOCS / page).read_text(), re.DOTALL)
    assert snippets, f"{page} has no python snippet"
    for i, snippet in enumerate(snippets):
        exec(compile(snippet, f"{page}[{i}]", "exec"), {})


# ---------------------------------------------------------------------------
# The shared test definitions cover the whole library
# ---------------------------------------------------------------------------

# Each public factory, and a piece of the __name__ of what it returns.
_NAME_STEMS = {
    "causal": "causal",
    "sliding_window": "sliding_window_",
    "prefix_lm": "prefix_lm_",
    "document": "document",
    "dilated_sliding_window": "dilated_sliding_window_",
    "neighborhood_2d": "neighborhood_2d_",
    "noop_mask": "noop_mask",
    "and_masks": "and_",
    "or_masks": "or_",
    "noop": "noop",
    "alibi": "alibi_",
    "softcap": "softcap_",
    "relative_position_bias": "relative_position_bias_",
    "learnable_relative_bias": "relative_position_bias_",
    "per_head_scale": "per_head_scale",
    "full_bias": "full_bias",
}


def test_mod_defs_cover_every_factory():
    from mod_defs import MOD_CASES, Dims

    factories = (set(masks.__all__) | set(mods.__all__)) - {"alibi_slopes"}
    assert factories == set(_NAME_STEMS), "add the new factory to _NAME_STEMS and mod_defs"
    built = [case.build(Dims(B=1, H=2, L=16, S=16)) for case in MOD_CASES]
    names = [m.__name__ for b in built for m in (b.score_mod, b.mask_mod) if m is not None]
    missing = [f for f, stem in _NAME_STEMS.items() if not any(stem in n for n in names)]
    assert not missing, f"no case in mod_defs.MOD_CASES uses {missing}"
