"""The template options: TMA loads, query-block order, persistent programs.

``USE_TMA`` loads the looped-over tiles through tensor descriptors (Triton's
interpreter emulates them, so CI runs the same kernel text as Hopper);
``LONGEST_FIRST`` launches query blocks last-first; ``PERSISTENT`` launches
a fixed number of forward programs that loop over the tiles (4 off the GPU:
2 per SM, 2 SMs). Each must give the same results as the default kernels
(the float64 oracle, the shared tolerance rule), including the odd shapes
where TMA's zero padding does the bounds checks, and the lowering must fall
back to plain loads where TMA cannot work (misaligned strides).
"""

from __future__ import annotations

import re

import pytest
import torch
from compile_utils import compile_and_run
from flex_inductor.lowering import configs
from flex_inductor.lowering.common import sm_count
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention
from test_backward_kernel import (
    BWD,
    Case,
    assert_template_backward,
    constexpr,
    kernel_source,
    make_qkv,
)

from flex_inductor import create_block_mask, flex_attention, masks, mods

OPTIONS = {
    "tma": {"USE_TMA": True},
    "longest_first": {"LONGEST_FIRST": True},
    "both": {"USE_TMA": True, "LONGEST_FIRST": True},
    "persistent": {"PERSISTENT": True},
    "persistent_longest_first": {"PERSISTENT": True, "LONGEST_FIRST": True},
}


def _forward(q, k, v, score_mod, block_mask, kernel_options, enable_gqa=False):
    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True,
            enable_gqa=enable_gqa, kernel_options=kernel_options,
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    out, lse = result.output
    oracle = dense_oracle(
        q.double(), k.double(), v.double(), score_mod, block_mask, None, enable_gqa
    )
    lowp = lowp_attention(q, k, v, score_mod, block_mask, None, enable_gqa)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")
    assert_close_to_oracle(lse, oracle[1], lowp[1], "lse")
    return result


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize(
    "L, S, E, Ev", [(17, 113, 40, 40), (113, 17, 96, 64), (64, 128, 16, 16)]
)
def test_forward_options_match_the_oracle(device, name, L, S, E, Ev):
    q, k, v = make_qkv(1, 2, L, S, E, Ev=Ev, dtype=torch.float32, device=device)
    block_mask = create_block_mask(masks.causal(), None, None, L, S, device=device, BLOCK_SIZE=32)
    result = _forward(q, k, v, mods.alibi(2, device=device), block_mask, OPTIONS[name])
    source = kernel_source(result, "def _inner(")
    # Without the option, the default: on at this head dim on Hopper only.
    tma = OPTIONS[name].get(
        "USE_TMA", configs.forward_tma_by_default(E, q.dtype, q.device, configs.POSITIONAL)
    )
    assert constexpr(source, "USE_TMA") == str(tma)
    assert constexpr(source, "LONGEST_FIRST") == str(OPTIONS[name].get("LONGEST_FIRST", False))
    persistent = OPTIONS[name].get("PERSISTENT", False)
    assert constexpr(source, "PERSISTENT") == str(persistent)
    tiles = -(-L // int(constexpr(source, "BLOCK_M")))
    if persistent:
        programs = configs.PERSISTENT_PROGRAMS_PER_SM * sm_count(q.device)
        assert constexpr(source, "NUM_PROGRAMS") == str(programs)
        assert _launch_grid(result) == (min(tiles * 2, programs), 1, 1)
    else:
        assert "NUM_PROGRAMS" not in source and "for tile in" not in source
        assert _launch_grid(result) == (tiles, 1, 2)


def _launch_grid(result) -> tuple[int, ...]:
    """The (x, y, z) grid the one forward template kernel is launched with."""
    launches = re.findall(
        r"triton_tem_\w*flex_inductor_fwd\w*\.run\(.*?(\d+), (\d+), (\d+), stream=",
        result.source,
    )
    assert len(launches) == 1, launches
    return tuple(int(n) for n in launches[0])


@pytest.mark.parametrize("longest_first", [False, True], ids=["in_order", "longest_first"])
def test_persistent_forward_and_backward_with_gqa_and_batch(device, longest_first):
    # More tiles than programs, so that each program loops over several,
    # across query heads, kv heads and batches: off the GPU 2 batches x 4
    # query heads x 8 tiles of 16 rows (113, an odd length) over 4 programs;
    # on an H100 2 x 4 x 64 tiles (1023) over 264. On the GPU S stays close
    # to L: with S = 239 every key sat hundreds of positions behind the late
    # queries and ALiBi put all their float32 scores near -200; there dq
    # came out at 6.6x the plain float32 error, over the bound. PERSISTENT was
    # not the cause (on the same problem its out and lse were bit-identical to
    # the default kernel's); the likely one is the exp2 domain's roundings at
    # that magnitude (benchmarks/NOTES.md entry 13).
    L, S = (113, 47) if device == "cpu" else (1023, 1009)
    q, k, v = make_qkv(2, 4, L, S, 16, Hkv=2, dtype=torch.float32, device=device)
    block_mask = create_block_mask(masks.causal(), None, None, L, S, device=device, BLOCK_SIZE=32)
    options = {"PERSISTENT": True, "LONGEST_FIRST": longest_first, "fwd_BLOCK_M": 16}
    score_mod = mods.alibi(4, device=device)
    _forward(q.detach(), k.detach(), v.detach(), score_mod, block_mask, options, enable_gqa=True)
    problem = Case(
        q, k, v, score_mod, block_mask, enable_gqa=True, return_lse=True, kernel_options=options
    )
    grads, result = problem.compiled()
    assert_template_backward(result)
    source = kernel_source(result, "def _inner(")
    assert constexpr(source, "PERSISTENT") == "True"
    assert constexpr(source, "LONGEST_FIRST") == str(longest_first)
    programs = int(constexpr(source, "NUM_PROGRAMS"))
    assert 2 * 4 * -(-L // 16) > programs
    assert _launch_grid(result) == (programs, 1, 1)
    problem.check(grads)


def test_tma_forward_with_gqa_and_fully_masked_rows(device):
    # Rows 0-7 keep nothing: output 0 and lse -inf, read through TMA tiles.
    q, k, v = make_qkv(1, 4, 40, 72, 32, Hkv=2, dtype=torch.float32, device=device)

    def late(b, h, q_idx, kv_idx):
        return (q_idx >= 8) & (kv_idx <= q_idx)

    block_mask = create_block_mask(late, None, None, 40, 72, device=device, BLOCK_SIZE=16)
    result = _forward(q, k, v, None, block_mask, {"USE_TMA": True}, enable_gqa=True)
    out, lse = result.output
    assert (out[:, :, :8] == 0).all() and torch.isneginf(lse[:, :, :8]).all()
    assert not out.isnan().any()


@pytest.mark.parametrize("name", ["tma", "both"])
def test_backward_options_match_the_oracle(device, name):
    q, k, v = make_qkv(1, 2, 47, 33, 40, device=device)
    block_mask = create_block_mask(masks.causal(), None, None, 47, 33, device=device, BLOCK_SIZE=16)
    problem = Case(
        q, k, v, mods.alibi(2, device=device), block_mask, kernel_options=OPTIONS[name]
    )
    grads, result = problem.compiled()
    assert_template_backward(result)
    for marker in ("def _dkdv_inner(", "def _dq_inner("):
        source = kernel_source(result, marker)
        assert constexpr(source, "USE_TMA") == "True"
    assert len([n for n in result.kernels(BWD) if n.startswith("triton_tem_")]) == 2
    problem.check(grads)


def test_misaligned_strides_fall_back_to_plain_loads(device):
    # K and V rows of 41 floats (164 bytes) cannot be TMA tiles: the kernel
    # loads them through pointers, and still gets the right answer.
    q, k, v = make_qkv(1, 2, 32, 48, 40, dtype=torch.float32, device=device)
    k_padded = torch.zeros(1, 2, 48, 41, device=device)
    v_padded = torch.zeros(1, 2, 48, 41, device=device)
    k_padded[..., :40], v_padded[..., :40] = k, v
    k_view, v_view = k_padded[..., :40], v_padded[..., :40]
    result = _forward(q, k_view, v_view, None, None, {"USE_TMA": True})
    source = kernel_source(result, "def _inner(")
    assert constexpr(source, "USE_TMA") == "False"


def test_tma_default_follows_the_measurements(monkeypatch):
    # On by default at head dims 65-128 on Hopper (benchmarks/NOTES.md entry
    # 9); off at 64 and below, off the GPU, and before Hopper.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert configs.use_tma_by_default(128, cuda)
    assert configs.use_tma_by_default(96, cuda)
    assert not configs.use_tma_by_default(64, cuda)
    assert not configs.use_tma_by_default(256, cuda)
    assert not configs.use_tma_by_default(128, cpu)
    # The forward also at D64 and below without a score_mod, in bf16/fp16
    # (entry 11), where it has its own config.
    bf16, fp32 = torch.bfloat16, torch.float32
    assert configs.forward_tma_by_default(64, bf16, cuda, configs.MASK_ONLY)
    assert configs.forward_tma_by_default(64, bf16, cuda, configs.NO_MODS)
    assert not configs.forward_tma_by_default(64, bf16, cuda, configs.POSITIONAL)
    assert not configs.forward_tma_by_default(64, fp32, cuda, configs.MASK_ONLY)
    assert configs.forward_tma_by_default(128, fp32, cuda, configs.POSITIONAL)
    assert configs.default_forward_config(64, bf16, cuda, configs.MASK_ONLY) == configs.Config(
        64, 128, 4, 2
    )
    assert not configs.forward_tma_by_default(64, bf16, cpu, configs.MASK_ONLY)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not configs.use_tma_by_default(128, cuda)
    assert not configs.forward_tma_by_default(64, bf16, cuda, configs.MASK_ONLY)


def test_prescale_is_the_default_for_table_mods_on_hopper(monkeypatch):
    # Measured on the H100 in bf16 for learnable biases only (benchmarks/NOTES.md
    # entries 13 and 14); ALiBi and softcap were slower with it.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    rule = configs.prescale_by_default
    assert rule(bf16, cuda, True)
    assert not rule(bf16, cuda, False)
    for dtype in (torch.float16, torch.float32):
        assert not rule(dtype, cuda, True)
    assert not rule(bf16, cpu, True)
    for capability in ((8, 0), (10, 0)):
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device=None, c=capability: c
        )
        assert not rule(bf16, cuda, True)


def _on_hopper_rule(monkeypatch):
    """The prescale rule as on a Hopper GPU, here (CPU), recording what it is asked."""
    calls = []

    def rule(dtype, device, score_mod_gathers_table):
        calls.append(score_mod_gathers_table)
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
            return original(dtype, torch.device("cuda"), score_mod_gathers_table)

    original = configs.prescale_by_default
    monkeypatch.setattr(configs, "prescale_by_default", rule)
    return calls


def _relative_bias(device, heads, max_len):
    score_mod, bias = mods.learnable_relative_bias(heads, max_len, device=device)
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)))
    return score_mod, bias


@pytest.mark.parametrize("E", [40, 64])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out_only", "with_lse"])
def test_prescale_default_in_inference(device, monkeypatch, E, return_lse):
    # Off the GPU the default is off, so the Hopper rule is applied here to
    # run the prescaled kernel in CI, at any scale, lse read or not.
    calls = _on_hopper_rule(monkeypatch)
    q, k, v = make_qkv(1, 2, 113, 47, E, dtype=torch.bfloat16, device=device)
    bias_mod, _ = _relative_bias(device, 2, 128)
    block_mask = create_block_mask(
        masks.causal(), None, None, 113, 47, device=device, BLOCK_SIZE=32
    )

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=bias_mod, block_mask=block_mask, return_lse=return_lse
        )

    with torch.no_grad():
        result = compile_and_run(attention, q, k, v)
    assert calls == [True]
    assert constexpr(kernel_source(result, "def _inner("), "PRESCALE_QK") == "True"
    out = result.output[0] if return_lse else result.output
    oracle = dense_oracle(q.double(), k.double(), v.double(), bias_mod, block_mask, None, False)
    lowp = lowp_attention(q, k, v, bias_mod, block_mask, None, False)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")


def test_prescale_default_is_off_for_other_mods_and_when_refused(device, monkeypatch):
    # A table gathered by the mask_mod (not the score_mod), ALiBi, and an
    # explicit PRESCALE_QK=False: no prescale even under the Hopper rule.
    calls = _on_hopper_rule(monkeypatch)
    q, k, v = make_qkv(1, 2, 40, 40, 64, dtype=torch.bfloat16, device=device)
    # On the device already: a copy inside the mask_mod could not be inlined.
    dense = (torch.rand(40, 40, generator=torch.Generator().manual_seed(5)) > 0.5).to(device)

    def table_mask(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx] | (q_idx == kv_idx)

    bias_mod, _ = _relative_bias(device, 2, 64)
    cases = [
        (None, table_mask, {}, False),
        (mods.alibi(2, device=device), None, {}, False),
        (bias_mod, None, {"PRESCALE_QK": False}, None),
    ]
    for score_mod, mask_mod, options, gathers in cases:
        calls.clear()
        block_mask = mask_mod and create_block_mask(
            mask_mod, None, None, 40, 40, device=device, BLOCK_SIZE=16
        )
        result = _forward(q, k, v, score_mod, block_mask, options)
        assert constexpr(kernel_source(result, "def _inner("), "PRESCALE_QK") == "False"
        # The rule is asked only when the option is absent.
        assert calls == ([] if gathers is None else [gathers])


def _oracle_with_grads(q, k, v, score_mod, block_mask, scale, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = dense_oracle(*leaves, score_mod, block_mask, scale)
    return [out, *torch.autograd.grad(out, leaves, grad_out.double())]


# How one training call runs, for the prescale tests: (kernel_options, the
# BlockMask's block size, the query length). Every path must recompute in the
# backward the scores the forward's lse came from.
_TRAINING_PATHS = {
    # The three templates.
    "templates": ({}, 32, 113),
    # The forward template, then the dense backward (captured-tensor
    # gradients in deterministic mode).
    "dense_backward": ({"DETERMINISTIC": True}, 32, 113),
    # Both dense: blocks of 8 rows, which no tile steps.
    "dense_both": ({}, 8, 113),
    # The decode forward (4 query rows), which never prescales, then the
    # backward templates, which then must not either.
    "decode": ({}, 32, 4),
}


def _training_run(q, k, v, score_mod, block_mask, options, grad_out):
    """Compiled forward+backward: ``([out, dq, dk, dv], CompileResult)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def attention(q, k, v):
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=options
        )

    result = compile_and_run(attention, *leaves, grad_outputs=grad_out.to(q.dtype))
    torch._dynamo.reset()
    return [result.output, *(t.grad for t in leaves)], result


@pytest.mark.parametrize(
    "path, score_mod_name, how",
    [
        ("templates", "none", "explicit"),
        ("templates", "relative_bias", "explicit"),
        ("templates", "relative_bias", "default"),
        ("dense_backward", "relative_bias", "default"),
        ("dense_both", "relative_bias", "explicit"),
        ("decode", "relative_bias", "explicit"),
    ],
)
def test_prescaled_training_recomputes_the_forward_scores(
    device, monkeypatch, path, score_mod_name, how
):
    # Prescaling at head dim 40, whose scale 40**-0.5 rounding to bf16
    # changes: the backward must recompute the scores from q scaled and
    # rounded as the forward did, or its probabilities do not match the saved
    # lse. The prescaled call is compared with the float64 oracle of the
    # function it computes (q rounded after scaling, scale 1, dq times the
    # scale); its errors must stay near those of the same path without the
    # prescale against the plain oracle. A backward that did not prescale
    # failed this on dq at 1.6x and 2.3x the plain error (q * 4 makes the
    # scores large). "default" asks the Hopper rule instead of the option.
    path_options, block_size, L = _TRAINING_PATHS[path]
    E, S = 40, 47
    if how == "default":
        _on_hopper_rule(monkeypatch)
    q, k, v = make_qkv(1, 2, L, S, E, dtype=torch.bfloat16, device=device)
    q = (q.float() * 4).to(torch.bfloat16)
    # Rounded to bf16 once, so that the kernels and the oracles see the same dO.
    grad_out = torch.randn(1, 2, L, E, generator=torch.Generator().manual_seed(7))
    grad_out = grad_out.to(torch.bfloat16).float().to(device)
    score_mod = None
    if score_mod_name == "relative_bias":
        score_mod, _ = _relative_bias(device, 2, 128)
    block_mask = create_block_mask(
        masks.causal(), None, None, L, S, device=device, BLOCK_SIZE=block_size
    )
    scale = E**-0.5
    plain_ref = _oracle_with_grads(q, k, v, score_mod, block_mask, None, grad_out)
    plain, _ = _training_run(
        q, k, v, score_mod, block_mask, {**path_options, "PRESCALE_QK": False}, grad_out
    )
    prescale_options = dict(path_options) if how == "default" else {
        **path_options, "PRESCALE_QK": True
    }
    ours, result = _training_run(q, k, v, score_mod, block_mask, prescale_options, grad_out)
    code = result.source
    if path == "decode":
        # Nothing prescales: the plain function, within the plain run's error.
        reference = plain_ref
        assert constexpr(kernel_source(result, "def _dkdv_inner("), "PRESCALE_QK") == "False"
        assert "def _decode_inner(" in code
    else:
        reference = _oracle_with_grads(
            (q.float() * scale).to(torch.bfloat16), k, v, score_mod, block_mask, 1.0, grad_out
        )
        reference[1] = reference[1] * scale
    if path in ("templates", "dense_backward"):
        assert constexpr(kernel_source(result, "def _inner("), "PRESCALE_QK") == "True"
    if path == "templates":
        for marker in ("def _dkdv_inner(", "def _dq_inner("):
            assert constexpr(kernel_source(result, marker), "PRESCALE_QK") == "True", marker
    if path in ("dense_backward", "dense_both"):
        assert "flex_inductor.dense_attention_backward." in code
    if path == "dense_both":
        assert "flex_inductor.dense_attention." in code
    names = ("out", "dq", "dk", "dv")
    for name, base, base_ref, mine, ref in zip(
        names, plain, plain_ref, ours, reference, strict=True
    ):
        plain_error = (base.double() - base_ref).abs().max().item()
        error = (mine.double() - ref).abs().max().item()
        assert error <= 1.5 * plain_error + 1e-3, (name, error, plain_error)


def test_explicit_prescale_keeps_float64_precision(device):
    # float64 runs the dense kernels; their prescale multiplies in float64,
    # so the result stays at float64 accuracy (a float32 multiply would put
    # errors near 1e-7 into q).
    E = 40
    q, k, v = make_qkv(1, 2, 17, 33, E, dtype=torch.float64, device=device)
    grad_out = torch.randn(1, 2, 17, E, generator=torch.Generator().manual_seed(7)).to(device)
    bias_mod, _ = _relative_bias(device, 2, 64)
    block_mask = create_block_mask(masks.causal(), None, None, 17, 33, device=device)
    ours, result = _training_run(
        q, k, v, bias_mod, block_mask, {"PRESCALE_QK": True}, grad_out.double()
    )
    assert "flex_inductor.dense_attention_backward." in result.source
    reference = _oracle_with_grads(q, k, v, bias_mod, block_mask, None, grad_out)
    for name, mine, ref in zip(("out", "dq", "dk", "dv"), ours, reference, strict=True):
        assert (mine - ref).abs().max().item() < 1e-12, name
