"""Position arithmetic done in float32 where exact (``lowering/float_positions.py``).

The pass must change the cost, never the values: every rewritten graph is
compared bit for bit with the original over a grid of positions, and every
case where float32 would round (lengths past 2**24, a bfloat16 operand, an
integer consumer) must leave the graph alone.
"""

from __future__ import annotations

import re

import pytest
import torch
from compile_utils import compile_and_run
from flex_inductor.lowering.float_positions import EXACT_LIMIT, float_position_arithmetic
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from torch.fx.experimental.proxy_tensor import make_fx

from flex_inductor import flex_attention, mods

Q_ARG, KV_ARG = 3, 4
SLOPES = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float32)


def _at(table, h):
    # aten.index as in traced mods: a Python ``table[h]`` on a 0-d tensor
    # would read h's value while tracing.
    return torch.ops.aten.index.Tensor(table, [h])


def alibi_like(score, b, h, q_idx, kv_idx, slopes):
    return score + _at(slopes, h) * (kv_idx - q_idx)


def abs_distance(score, b, h, q_idx, kv_idx, slopes):
    return score - (q_idx - kv_idx + 3).abs() * 0.1


def divided_by_distance(score, b, h, q_idx, kv_idx, slopes):
    # Division by a zero distance: +inf or -inf by the sign of the score,
    # which the float difference must keep (+0.0, as the integer gives).
    return score / (kv_idx - q_idx)


def negated_distance(score, b, h, q_idx, kv_idx, slopes):
    # The float negation of a zero difference would be -0.0 (the integer
    # path gives +0.0), flipping the sign of score / 0: kept as it is.
    return score / (-(kv_idx - q_idx))


def integer_consumer(score, b, h, q_idx, kv_idx, slopes):
    return torch.where(kv_idx - q_idx > 2, score, score * 0.5)


def bfloat16_operand(score, b, h, q_idx, kv_idx, slopes):
    return score + (_at(slopes.to(torch.bfloat16), h) * (kv_idx - q_idx)).float()


def one_position(score, b, h, q_idx, kv_idx, slopes):
    return score + _at(slopes, h) * (kv_idx + 1)


def _trace(fn):
    # Distinct tensors: make_fx would trace one tensor passed twice as one input.
    b, h, q_idx, kv_idx = (torch.tensor(0, dtype=torch.int32) for _ in range(4))
    example = (torch.tensor(0.0), b, h, q_idx, kv_idx, SLOPES)
    return make_fx(fn, tracing_mode="fake")(*example)


def _evaluate(gm, q_len=37, kv_len=53):
    """The graph over every (q_idx, kv_idx) pair, for each head."""
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(q_len, kv_len, generator=gen) * 4
    q_idx = torch.arange(q_len, dtype=torch.int32)[:, None]
    kv_idx = torch.arange(kv_len, dtype=torch.int32)[None, :]
    b = torch.tensor(0, dtype=torch.int32)
    return [
        gm(score, b, torch.tensor(h, dtype=torch.int32), q_idx, kv_idx, SLOPES) for h in range(3)
    ]


def _integer_to_float_of_a_tile(gm) -> bool:
    """Whether the graph still converts an integer expression of both positions."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        if val is not None and val.dtype == torch.int32:
            if any(
                u.meta.get("val") is not None and u.meta["val"].dtype == torch.float32
                for u in node.users
            ):
                return True
    return False


@pytest.mark.parametrize(
    "fn", [alibi_like, abs_distance, divided_by_distance], ids=lambda f: f.__name__
)
def test_rewritten_graphs_give_identical_values(fn):
    gm = _trace(fn)
    assert _integer_to_float_of_a_tile(gm)
    rewritten = float_position_arithmetic(gm, Q_ARG, KV_ARG, 37, 53)
    assert rewritten is not gm
    converts = [
        n for n in rewritten.graph.nodes if n.target == torch.ops.prims.convert_element_type.default
    ]
    # Each position is converted once, before any arithmetic on it.
    placeholders = [n.name for n in rewritten.graph.nodes if n.op == "placeholder"]
    assert sorted(n.args[0].name for n in converts) == sorted(placeholders[Q_ARG : KV_ARG + 1])
    for got, want in zip(_evaluate(rewritten), _evaluate(gm), strict=True):
        assert got.dtype == want.dtype == torch.float32
        # Bit for bit: torch.equal would take -0.0 for +0.0.
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize(
    "fn",
    [integer_consumer, bfloat16_operand, one_position, negated_distance],
    ids=lambda f: f.__name__,
)
def test_graphs_where_float_would_differ_or_gain_nothing_are_kept(fn):
    gm = _trace(fn)
    assert float_position_arithmetic(gm, Q_ARG, KV_ARG, 37, 53) is gm


@pytest.mark.parametrize(
    "lengths",
    [(EXACT_LIMIT + 1, 53), (37, EXACT_LIMIT + 1), (None, 53), (37, None)],
    ids=["q_past_2**24", "kv_past_2**24", "q_unknown", "kv_unknown"],
)
def test_lengths_float32_cannot_hold_exactly_keep_the_graph(lengths):
    gm = _trace(alibi_like)
    assert float_position_arithmetic(gm, Q_ARG, KV_ARG, *lengths) is gm


def test_abs_distance_bound_counts_the_constant():
    # |q - kv + 3| reaches q_len + 2: at q_len = 2**24 - 2 that is 2**24, past
    # the exact range, while kv - q alone would still fit.
    gm = _trace(abs_distance)
    assert float_position_arithmetic(gm, Q_ARG, KV_ARG, EXACT_LIMIT - 2, 8) is gm
    assert float_position_arithmetic(gm, Q_ARG, KV_ARG, EXACT_LIMIT - 4, 8) is not gm


def test_alibi_kernel_converts_positions_not_the_score_tile(device):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 113, 16, generator=gen).to(device) for _ in range(3))
    alibi = mods.alibi(4, device=device)
    with torch.no_grad():
        result = compile_and_run(lambda q, k, v: flex_attention(q, k, v, score_mod=alibi), q, k, v)
    for position in ("q_idx", "kv_idx"):
        converted = rf"(tmp\d+) = \({position}\)\n\s+tmp\d+ = \1\.to\(tl\.float32\)"
        assert re.search(converted, result.source), position
    # ... and no longer subtracts the raw integer positions.
    integer_tile = r"(tmp\d+) = \(kv_idx\)\n\s+(tmp\d+) = \(q_idx\)\n\s+tmp\d+ = \1 - \2"
    assert not re.search(integer_tile, result.source)
    oracle, _ = dense_oracle(q, k, v, score_mod=alibi)
    lowp, _ = lowp_attention(q, k, v, score_mod=alibi)
    assert_close_to_oracle(result.output, oracle, lowp, "out")
