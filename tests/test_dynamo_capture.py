"""Dynamo capture of flex_attention: one op call, no graph break, the right result.

Every case goes through ``compile_and_run`` (``fullgraph=True``, so a graph
break fails the test) and asserts three facts: exactly one
``flex_inductor_attention`` call per attention call in the Dynamo graph, the
tensors the mods close over lifted into op inputs (not baked in), and a
result within the tolerance rule of the float64 oracle. Most cases use the
``aot_eager`` backend (the op's dense rule, fast); a few use Inductor.

The last section checks that mods which cannot be traced fail with an error
naming the mod and the cause, on every path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from compile_utils import compile_and_run
from mod_defs import MOD_CASES, MOD_CASES_BY_NAME, Dims, block_mask_for, case_ids
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import create_block_mask, flex_attention, masks, mods
from flex_inductor.block_mask import BlockMask

OP = "flex_inductor_attention"
DIMS = Dims(B=2, H=2, L=23, S=29)
E = 8


def _qkv(dims: Dims, seed: int = 0, Hkv: int | None = None, E: int = E):
    gen = torch.Generator().manual_seed(seed)
    Hkv = dims.H if Hkv is None else Hkv
    shapes = ((dims.B, dims.H, dims.L, E), (dims.B, Hkv, dims.S, E), (dims.B, Hkv, dims.S, E))
    return tuple(torch.randn(s, generator=gen).to(dims.device) for s in shapes)


def _assert_matches_oracle(out, q, k, v, score_mod=None, mask=None, lse=None, gqa=False):
    oracle = dense_oracle(q.double(), k.double(), v.double(), score_mod, mask, None, gqa)
    lowp = lowp_attention(q, k, v, score_mod, mask, None, gqa)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")
    if lse is not None:
        assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")


def _op_nodes(result):
    return [
        node
        for gm in result.graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and getattr(node.target, "__name__", "") == OP
    ]


def _lifted(result):
    """``(score_mod_buffers, mask_mod_buffers)`` of the one op call, as FX nodes."""
    (node,) = _op_nodes(result)
    return list(node.args[9]), list(node.args[10])


def _counting_compile(fn, backend="aot_eager", dynamic=None):
    """``torch.compile(fn, fullgraph=True)`` and a counter of its frames, for recompile checks.

    ``compile_and_run`` compiles and runs once; these tests call the same
    compiled function several times.
    """
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic), counter


# ---------------------------------------------------------------------------
# Every mod of the library
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", MOD_CASES, ids=case_ids(MOD_CASES))
def test_every_mod_is_captured_in_one_op_call(case):
    built = case.build(DIMS)
    block_mask = block_mask_for(built.mask_mod, DIMS)
    q, k, v = _qkv(DIMS)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=built.score_mod, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert result.frame_count == 1
    assert result.op_calls() == 1
    _assert_matches_oracle(result.output, q, k, v, built.score_mod, block_mask)


def test_two_attention_calls_give_two_op_calls():
    built = MOD_CASES_BY_NAME["alibi_sliding_window"].build(DIMS)
    block_mask = block_mask_for(built.mask_mod, DIMS)
    q, k, v = _qkv(DIMS)

    def two_layers(q, k, v):
        hidden = flex_attention(q, k, v, score_mod=built.score_mod, block_mask=block_mask)
        return flex_attention(hidden, k, v, score_mod=mods.softcap(5.0))

    result = compile_and_run(two_layers, q, k, v, backend="aot_eager")
    assert result.frame_count == 1
    assert result.op_calls() == 2
    hidden = dense_oracle(q.double(), k.double(), v.double(), built.score_mod, block_mask)[0]
    expected = dense_oracle(hidden, k.double(), v.double(), mods.softcap(5.0))[0]
    torch.testing.assert_close(result.output.double(), expected, rtol=1e-4, atol=1e-5)


def test_return_lse_is_captured():
    q, k, v = _qkv(DIMS)
    block_mask = block_mask_for(masks.causal(), DIMS)

    def attention(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, return_lse=True)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert result.op_calls() == 1
    out, lse = result.output
    _assert_matches_oracle(out, q, k, v, mask=block_mask, lse=lse)


# ---------------------------------------------------------------------------
# What the mods close over: tensors are lifted, Python scalars are baked in
# ---------------------------------------------------------------------------


def test_closure_over_tensor_is_lifted_and_values_do_not_recompile():
    q, k, v = _qkv(DIMS)
    table = torch.randn(DIMS.H, DIMS.L)

    def row_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx]

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=row_bias)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    score_buffers, mask_buffers = _lifted(result)
    assert len(score_buffers) == 1 and mask_buffers == []
    _assert_matches_oracle(result.output, q, k, v, row_bias)

    compiled, counter = _counting_compile(attention)
    first = compiled(q, k, v)
    table.mul_(-3.0)  # new values, same tensor: a lifted input, not a constant
    second = compiled(q, k, v)
    assert counter.frame_count == 1
    assert not torch.allclose(first, second)
    _assert_matches_oracle(second, q, k, v, row_bias)


GLOBAL_HEAD_BIAS = torch.randn(DIMS.H)


def global_head_bias(score, b, h, q_idx, kv_idx):
    return score + GLOBAL_HEAD_BIAS[h]


def test_global_tensor_is_lifted_and_values_do_not_recompile():
    q, k, v = _qkv(DIMS)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=global_head_bias)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert len(_lifted(result)[0]) == 1
    _assert_matches_oracle(result.output, q, k, v, global_head_bias)

    compiled, counter = _counting_compile(attention)
    compiled(q, k, v)
    saved = GLOBAL_HEAD_BIAS.clone()
    try:
        GLOBAL_HEAD_BIAS.add_(10.0)
        out = compiled(q, k, v)
    finally:
        GLOBAL_HEAD_BIAS.copy_(saved)
    assert counter.frame_count == 1
    _assert_matches_oracle(out, q, k, v, lambda s, b, h, qi, ki: s + (saved + 10.0)[h])


class BiasedAttention(torch.nn.Module):
    """A module whose score_mod reads a learnable relative-position bias."""

    def __init__(self, heads: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.bias = torch.nn.Parameter(torch.randn(heads, 2 * max_len - 1) * 0.5)

    def forward(self, q, k, v, block_mask=None):
        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + self.bias[h, q_idx - kv_idx + self.max_len - 1]

        return flex_attention(q, k, v, score_mod=relative_bias, block_mask=block_mask)


def test_module_parameter_is_lifted_and_gets_a_gradient():
    q, k, v = _qkv(DIMS)
    model = BiasedAttention(DIMS.H, DIMS.max_len)
    block_mask = block_mask_for(masks.causal(), DIMS)
    result = compile_and_run(model, q, k, v, block_mask, backend="aot_eager")
    assert result.frame_count == 1 and result.op_calls() == 1
    assert len(_lifted(result)[0]) == 1

    def reference_mod(score, b, h, q_idx, kv_idx):
        return score + model.bias[h, q_idx - kv_idx + DIMS.max_len - 1]

    _assert_matches_oracle(result.output, q, k, v, reference_mod, block_mask)
    result.output.sum().backward()
    assert model.bias.grad is not None and model.bias.grad.abs().sum() > 0


def _softcap_from_settings(settings):
    def attention(q, k, v):
        cap = settings["cap"]

        def capped(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return flex_attention(q, k, v, score_mod=capped)

    return attention


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_python_scalar_is_baked_in_and_a_change_recompiles(backend, device):
    # Inductor runs on the kernels' device (CUDA, or CPU under the interpreter).
    q, k, v = (t.to(device) for t in _qkv(DIMS)) if backend == "inductor" else _qkv(DIMS)
    settings = {"cap": 2.0}
    attention = _softcap_from_settings(settings)
    if backend == "aot_eager":
        result = compile_and_run(attention, q, k, v, backend="aot_eager")
        assert _lifted(result) == ([], [])  # nothing to lift: the scalar is a constant

    compiled, counter = _counting_compile(attention, backend=backend)
    _assert_matches_oracle(compiled(q, k, v), q, k, v, mods.softcap(2.0))
    compiled(q, k, v)
    assert counter.frame_count == 1
    # After a change Dynamo's automatic dynamic hands the float over as a
    # runtime value; our variable bakes it back in, so every value is a
    # constant of its own graph (and a kernel never reads a Python number).
    # Under Inductor one change is enough: it is where the kernel would be
    # handed a Python number; each value compiles our kernels (slow in the
    # interpreter).
    for cap in (0.5, 0.25) if backend == "aot_eager" else (0.5,):
        before = counter.frame_count
        settings["cap"] = cap
        _assert_matches_oracle(compiled(q, k, v), q, k, v, mods.softcap(cap))
        assert counter.frame_count > before, f"cap={cap} reused the graph of another value"
        after = counter.frame_count
        compiled(q, k, v)
        assert counter.frame_count == after
        graph = counter.graphs[-1]
        (node,) = [n for n in graph.graph.nodes if getattr(n.target, "__name__", "") == OP]
        assert list(node.args[9]) == []  # baked into the mod, not an op input


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_int_argument_read_by_a_mod_is_baked_in(backend, device):
    # An int argument of the compiled function would become a SymInt after
    # it changes (automatic dynamic); read inside a mod it stays a constant.
    q, k, v = (t.to(device) for t in _qkv(DIMS)) if backend == "inductor" else _qkv(DIMS)

    def attention(q, k, v, window):
        def near(score, b, h, q_idx, kv_idx):
            return torch.where((q_idx - kv_idx).abs() < window, score, score - 3.0)

        return flex_attention(q, k, v, score_mod=near)

    compiled, counter = _counting_compile(attention, backend=backend)
    windows = (2, 5, 9) if backend == "aot_eager" else (2, 5)
    for calls, window in enumerate(windows, start=1):

        def near(score, b, h, q_idx, kv_idx, window=window):
            return torch.where((q_idx - kv_idx).abs() < window, score, score - 3.0)

        _assert_matches_oracle(compiled(q, k, v, window), q, k, v, near)
        assert counter.frame_count == calls
        graph = counter.graphs[-1].graph
        (node,) = [n for n in graph.nodes if getattr(n.target, "__name__", "") == OP]
        assert list(node.args[9]) == []


def test_kernel_option_ints_that_change_stay_constants(device):
    # A tile size passed into the compiled function changes between calls:
    # automatic dynamic makes it a SymInt on the second compile, and the
    # kernels need numbers (it crashed the lowering of the backward).
    q, k, v = (t.to(device).requires_grad_() for t in _qkv(Dims(B=1, H=2, L=32, S=32)))

    def attention(q, k, v, options):
        return flex_attention(q, k, v, kernel_options=options)

    compiled, counter = _counting_compile(attention, backend="inductor")
    for calls, tile in enumerate((16, 32), start=1):
        out = compiled(q, k, v, {"bwd_BLOCK_M1": tile, "BLOCK_M": tile})
        out.sum().backward()
        assert counter.frame_count == calls
        graph = counter.graphs[-1].graph
        (node,) = [n for n in graph.nodes if getattr(n.target, "__name__", "") == OP]
        options = node.args[8]
        assert options["BLOCK_M"] == tile and type(options["BLOCK_M"]) is int
    _assert_matches_oracle(out, q, k, v, None)


def test_nested_closures_over_graph_intermediates():
    # The mod is made inside the compiled function by a factory that closes
    # over a helper closure, and it captures a tensor computed in the graph.
    q, k, v = _qkv(DIMS)
    weights = torch.randn(DIMS.H)

    def make_mod(head_bias):
        def shifted(h, delta):
            return head_bias[h] * delta

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + shifted(h, (q_idx - kv_idx).abs())

        return score_mod

    def attention(q, k, v, weights):
        head_bias = torch.sigmoid(weights) * -0.1
        return flex_attention(q, k, v, score_mod=make_mod(head_bias))

    result = compile_and_run(attention, q, k, v, weights, backend="aot_eager")
    assert result.frame_count == 1 and result.op_calls() == 1
    assert len(_lifted(result)[0]) == 1
    _assert_matches_oracle(
        result.output, q, k, v, make_mod(torch.sigmoid(weights) * -0.1)
    )


def test_where_and_comparisons():
    q, k, v = _qkv(DIMS)

    def penalise_far(score, b, h, q_idx, kv_idx):
        far = (q_idx - kv_idx).abs() > 4
        return torch.where(far & (h == 1), score - 2.0, torch.where(far, score * 0.5, score))

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + 3) & ~(kv_idx < q_idx - 9) | (kv_idx == 0)

    block_mask = create_block_mask(band, 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=penalise_far, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert result.frame_count == 1 and result.op_calls() == 1
    _assert_matches_oracle(result.output, q, k, v, penalise_far, block_mask)


def test_integer_index_arithmetic():
    # Integer maths on the index tensors, used both as values and as indices.
    q, k, v = _qkv(DIMS)
    bucket_bias = torch.randn(DIMS.H, 8)

    def bucketed(score, b, h, q_idx, kv_idx):
        distance = (q_idx - kv_idx).abs()
        bucket = torch.clamp(distance // 4, max=7)
        return score + bucket_bias[h, bucket] - (kv_idx % 3) * 0.25

    def strided_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx // 8) * 8 - kv_idx < 16)

    block_mask = create_block_mask(
        strided_causal, 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16
    )

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=bucketed, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert result.frame_count == 1 and result.op_calls() == 1
    assert len(_lifted(result)[0]) == 1
    _assert_matches_oracle(result.output, q, k, v, bucketed, block_mask)


def test_mask_mod_tensor_is_lifted():
    q, k, v = _qkv(DIMS)
    built = MOD_CASES_BY_NAME["document_causal"].build(DIMS)
    block_mask = block_mask_for(built.mask_mod, DIMS)

    def attention(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    score_buffers, mask_buffers = _lifted(result)
    assert score_buffers == [] and len(mask_buffers) >= 1
    _assert_matches_oracle(result.output, q, k, v, mask=block_mask)


def test_gqa_is_captured():
    dims = Dims(B=1, H=4, L=17, S=33)
    q, k, v = _qkv(dims, Hkv=2)
    built = MOD_CASES_BY_NAME["alibi_sliding_window"].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=built.score_mod, block_mask=block_mask, enable_gqa=True
        )

    result = compile_and_run(attention, q, k, v, backend="aot_eager")
    assert result.op_calls() == 1
    _assert_matches_oracle(result.output, q, k, v, built.score_mod, block_mask, gqa=True)


# ---------------------------------------------------------------------------
# dynamic=True: one graph for several sequence lengths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ["alibi", "softcap", "halve_odd_kv"])
def test_dynamic_lengths_reuse_one_graph(case_name):
    # No BlockMask: the full mask is built inside the graph from the
    # (symbolic) lengths, so nothing in the call is specialised on them.
    built = MOD_CASES_BY_NAME[case_name].build(DIMS)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=built.score_mod)

    compiled, counter = _counting_compile(attention, dynamic=True)
    for L, S in ((17, 23), (40, 31)):
        q, k, v = _qkv(Dims(B=1, H=DIMS.H, L=L, S=S), seed=L)
        _assert_matches_oracle(compiled(q, k, v), q, k, v, built.score_mod)
    assert counter.frame_count == 1
    assert len(counter.graphs) == 1


# ---------------------------------------------------------------------------
# Inductor: the same capture, lowered to our kernels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ["alibi_sliding_window", "document_causal"])
def test_inductor_capture(case_name, device):
    dims = dataclasses.replace(DIMS, device=device)
    built = MOD_CASES_BY_NAME[case_name].build(dims)
    block_mask = block_mask_for(built.mask_mod, dims)
    q, k, v = _qkv(dims)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=built.score_mod, block_mask=block_mask)

    result = compile_and_run(attention, q, k, v, backend="inductor")
    assert result.frame_count == 1
    assert result.op_calls() == 1
    assert result.kernels("flex_inductor_fwd"), "our forward template was not used"
    _assert_matches_oracle(result.output, q, k, v, built.score_mod, block_mask)


def test_inductor_dynamic_lengths_reuse_one_graph(device):
    slopes_mod = mods.alibi(DIMS.H, device=device)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=slopes_mod)

    compiled, counter = _counting_compile(attention, backend="inductor", dynamic=True)
    for L in (17, 33):
        q, k, v = _qkv(Dims(B=1, H=DIMS.H, L=L, S=L, device=device), seed=L)
        _assert_matches_oracle(compiled(q, k, v), q, k, v, slopes_mod)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------
# Untraceable mods: a clear error naming the mod and the cause
# ---------------------------------------------------------------------------

CAPTURED = torch.randn(DIMS.H, 2 * DIMS.max_len)


def branchy(score, b, h, q_idx, kv_idx):
    if score > 0:
        return score
    return score * 2


def reads_item(score, b, h, q_idx, kv_idx):
    return score + CAPTURED[h, 0].item()


def mutates_capture(score, b, h, q_idx, kv_idx):
    CAPTURED.add_(1.0)
    return score + CAPTURED[h, q_idx]


def sets_item(score, b, h, q_idx, kv_idx):
    CAPTURED[0, 0] = 3.0
    return score


def list_lookup(score, b, h, q_idx, kv_idx):
    return score * [0.5, 2.0][h]


UNTRACEABLE = [
    (branchy, "branches in Python on a tensor value"),
    (reads_item, "converts a tensor to a Python number"),
    (list_lookup, "converts a tensor to a Python number"),
    (mutates_capture, r"mutates a tensor in place \(`add_"),
    (sets_item, r"mutates a tensor in place \(`(setitem|__setitem__)"),
]
UNTRACEABLE_IDS = [mod.__name__ for mod, _ in UNTRACEABLE]


def _expected(what: str, mod, cause: str) -> str:
    return rf"{what} `{mod.__name__}` \(.*test_dynamo_capture.py:\d+\) cannot be traced: it {cause}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("mod", "cause"), UNTRACEABLE, ids=UNTRACEABLE_IDS)
def test_untraceable_score_mod_eager(mod, cause, dtype):
    # float32 takes the compiled path (CUDA or the interpreter), float64
    # the eager reference: both name the mod and the cause.
    q, k, v = (t.to(dtype) for t in _qkv(DIMS))
    before = CAPTURED.clone()
    with pytest.raises(RuntimeError, match=_expected("score_mod", mod, cause)):
        flex_attention(q, k, v, score_mod=mod)
    assert torch.equal(CAPTURED, before), "the mod's mutation ran"


@pytest.mark.parametrize(("mod", "cause"), UNTRACEABLE, ids=UNTRACEABLE_IDS)
def test_untraceable_score_mod_compiled(mod, cause):
    q, k, v = _qkv(DIMS)
    before = CAPTURED.clone()

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=mod)

    with pytest.raises(RuntimeError, match=_expected("score_mod", mod, cause)):
        compile_and_run(attention, q, k, v, backend="aot_eager")
    assert torch.equal(CAPTURED, before), "the mod's mutation ran"


def branchy_mask(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return q_idx >= 0
    return q_idx < 0


def _block_mask_with(mask_mod) -> BlockMask:
    # Every block partial, so that mask_mod decides everything; built from
    # the layout, because create_block_mask would evaluate the mod itself.
    n_q, n_kv = -(-DIMS.L // 16), -(-DIMS.S // 16)
    num = torch.full((1, 1, n_q), n_kv, dtype=torch.int32)
    indices = torch.arange(n_kv, dtype=torch.int32).expand(1, 1, n_q, n_kv).contiguous()
    return BlockMask.from_kv_blocks(
        num, indices, BLOCK_SIZE=16, mask_mod=mask_mod, seq_lengths=(DIMS.L, DIMS.S)
    )


@pytest.mark.parametrize("path", ["eager_float32", "eager_float64", "compiled"])
def test_untraceable_mask_mod(path):
    q, k, v = _qkv(DIMS)
    if path == "eager_float64":
        q, k, v = q.double(), k.double(), v.double()
    block_mask = _block_mask_with(branchy_mask)
    expected = _expected("mask_mod", branchy_mask, "branches in Python on a tensor value")

    def attention(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask)

    with pytest.raises(RuntimeError, match=expected):
        if path == "compiled":
            compile_and_run(attention, q, k, v, backend="aot_eager")
        else:
            attention(q, k, v)


def test_untraceable_nested_mod_is_named_under_compile():
    # A mod defined inside the compiled function is a Dynamo-only object;
    # the error still names it and where it was written.
    q, k, v = _qkv(DIMS)

    def attention(q, k, v):
        def inner_branchy(score, b, h, q_idx, kv_idx):
            return score if kv_idx > q_idx else -score

        return flex_attention(q, k, v, score_mod=inner_branchy)

    with pytest.raises(RuntimeError, match=r"score_mod `inner_branchy` \(.*:\d+\) cannot be"):
        compile_and_run(attention, q, k, v, backend="aot_eager")
