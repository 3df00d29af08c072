"""Targeted facts about the generated forward code, and the lowering's logs.

Golden files pin the whole kernel for three canonical cases
(``test_golden_forward.py``); everywhere else a test states one fact that
must hold whatever else changes in the template:

* one ``flex_inductor_fwd`` template kernel, launched once, per call;
* no mask_mod code on the full-block path;
* captured tensors loaded through their real strides;
* the chosen kernel config is logged under ``flex_inductor``, and
  autotuning says what it tries and what it picked.
"""

from __future__ import annotations

import logging
import re

import flex_inductor.lowering.configs as configs
import pytest
import torch
from compile_utils import compile_and_run
from oracle import assert_close_to_oracle, dense_oracle, lowp_attention

from flex_inductor import create_block_mask, flex_attention, masks, mods

KERNEL = "flex_inductor_fwd"
# The interpreter-sized config keeps autotuning cheap on CPU.
TINY = configs.Config(16, 16, 1, 1)


def _qkv(B=1, H=2, L=37, S=53, E=16, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, H, L, E), (B, H, S, E), (B, H, S, E))
    return tuple(torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes)


def _compile(fn, *args):
    with torch.no_grad():
        return compile_and_run(fn, *args)


def _templates(result) -> list[str]:
    return [n for n in result.kernels(KERNEL) if n.startswith("triton_tem_")]


def _launches(result, kernel: str) -> int:
    return len(re.findall(rf"\b{kernel}\.run\(", result.source))


def _function(source: str, name: str) -> list[str]:
    """The lines of the first ``def name(`` in ``source``, up to the next top-level line."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    body = [lines[start]]
    for line in lines[start + 1:]:
        # A multi-line signature closes with ``):`` in column 0.
        if line and not line[0].isspace() and not line.startswith(")"):
            break
        body.append(line)
    return body


def _indented_block(lines: list[str], header: str) -> tuple[int, int]:
    """``[start, end)`` line range of the block under the line ``header`` (stripped)."""
    start = next(i for i, line in enumerate(lines) if line.strip() == header)
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    return start + 1, end


def _check(out, q, k, v, score_mod=None, mask=None):
    oracle = dense_oracle(q.double(), k.double(), v.double(), score_mod, mask)
    lowp = lowp_attention(q, k, v, score_mod, mask)
    assert_close_to_oracle(out, oracle[0], lowp[0], "out")


# ---------------------------------------------------------------------------
# One template kernel per attention call
# ---------------------------------------------------------------------------


def test_one_template_kernel_per_call(device):
    q, k, v = _qkv(device=device)
    block_mask = create_block_mask(masks.causal(), 1, 1, 37, 53, device=device, BLOCK_SIZE=16)
    result = _compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), q, k, v)
    (kernel,) = _templates(result)
    assert _launches(result, kernel) == 1
    assert result.op_calls() == 1 and result.frame_count == 1


def test_two_calls_two_template_kernels(device):
    q, k, v = _qkv(device=device)
    block_mask = create_block_mask(masks.causal(), 1, 1, 37, 53, device=device, BLOCK_SIZE=16)

    def two_layers(q, k, v):
        hidden = flex_attention(q, k, v, block_mask=block_mask)
        return flex_attention(hidden, k, v, score_mod=mods.softcap(4.0))

    result = _compile(two_layers, q, k, v)
    kernels = _templates(result)
    assert len(kernels) == 2
    assert all(_launches(result, kernel) == 1 for kernel in kernels)
    assert result.op_calls() == 2


# ---------------------------------------------------------------------------
# mask_mod stays off the full-block path
# ---------------------------------------------------------------------------

# Distinctive: a constant found nowhere else in the kernel, and the only
# captured tensor (so the only ``in_ptr`` load) belongs to the mask_mod.
_MARK = 1234567


def _doc_mask(device):
    doc = (torch.arange(53, device=device) // 20).to(torch.int32)

    def doc_or_mark(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) | (kv_idx == _MARK)

    return doc_or_mark


def test_mask_mod_code_only_in_partial_branch(device):
    q, k, v = _qkv(L=53, S=53, device=device)
    mask_mod = _doc_mask(device)
    block_mask = create_block_mask(mask_mod, 1, 1, 53, 53, device=device, BLOCK_SIZE=16)
    result = _compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), q, k, v)
    _check(result.output, q, k, v, None, block_mask)

    inner = _function(result.source, "_inner")
    start, end = _indented_block(inner, "if not IS_FULL_BLOCKS:")
    mask_lines = [
        i for i, line in enumerate(inner) if str(_MARK) in line or "tl.load(in_ptr" in line
    ]
    assert mask_lines, "the mask_mod's code was not found in _inner"
    outside = [inner[i] for i in mask_lines if not start <= i < end]
    assert not outside, f"mask_mod code outside `if not IS_FULL_BLOCKS:`: {outside}"

    # The full-block loop is the same helper specialised with the constexpr
    # IS_FULL_BLOCKS=True, so Triton drops that branch there at compile time.
    (kernel,) = _templates(result)
    body = "\n".join(_function(result.source, kernel))
    assert "IS_FULL_BLOCKS=False" in body and "IS_FULL_BLOCKS=True" in body


@pytest.mark.parametrize("with_block_mask", [False, True], ids=["no-block-mask", "noop-mask"])
def test_calls_without_block_mask_compile_no_partial_loop(device, with_block_mask):
    # Without a BlockMask every block is full: the partial-block loop is left
    # out (HAS_PARTIAL_BLOCKS=False), forward and backward. A user's BlockMask
    # keeps it even when its mask_mod keeps everything: only the dispatch
    # knows its own mask lists no partial blocks.
    from test_backward_kernel import BWD, Case, constexpr, kernel_source

    q, k, v = (t.requires_grad_() for t in _qkv(L=37, S=53, device=device))
    block_mask = (
        create_block_mask(masks.noop_mask, None, None, 37, 53, device=device, BLOCK_SIZE=16)
        if with_block_mask else None
    )
    problem = Case(q, k, v, None, block_mask)
    grads, result = problem.compiled()
    problem.check(grads)
    for marker in ("def _inner(", "def _dq_inner(", "def _dkdv_inner("):
        source = kernel_source(result, marker)
        assert constexpr(source, "HAS_PARTIAL_BLOCKS") == str(with_block_mask), marker
        # Triton drops a branch on a False constexpr at compile time.
        assert "if HAS_PARTIAL_BLOCKS:" in source, marker
    assert len([n for n in result.kernels(BWD) if n.startswith("triton_tem_")]) == 2
    out = result.output
    _check(out.detach(), q.detach(), k.detach(), v.detach(), None, block_mask)


def test_full_blocks_ignore_mask_mod(device):
    # Blocks listed as full are attended whole even where mask_mod says no.
    from flex_inductor.block_mask import BlockMask

    L = S = 48
    nq = nkv = 3
    partial_num = torch.zeros((1, 1, nq), dtype=torch.int32)
    full_num = torch.full((1, 1, nq), nkv, dtype=torch.int32)
    indices = torch.arange(nkv, dtype=torch.int32).expand(1, 1, nq, nkv)
    block_mask = BlockMask.from_kv_blocks(
        partial_num, indices, full_num, indices, BLOCK_SIZE=16,
        mask_mod=lambda b, h, q_idx, kv_idx: q_idx < 0, seq_lengths=(L, S),
    ).to(device)
    q, k, v = _qkv(L=L, S=S, device=device)
    result = _compile(
        lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, return_lse=True), q, k, v
    )
    out, lse = result.output
    assert torch.isfinite(lse).all()
    _check(out, q, k, v)  # same as no mask at all


# ---------------------------------------------------------------------------
# Captured tensors: real strides in the loads
# ---------------------------------------------------------------------------


def _bias_table(layout: str, L: int, S: int, device):
    gen = torch.Generator().manual_seed(1)
    if layout == "contiguous":
        return torch.randn(L, S, generator=gen).to(device), S
    if layout == "transposed":
        return torch.randn(S, L, generator=gen).to(device).t(), L
    # A window into a larger table: row stride S + 5 and a storage offset.
    big = torch.randn(L + 3, S + 5, generator=gen).to(device)
    return big[2:2 + L, 1:1 + S], S + 5


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_captured_tensor_strides(layout, device):
    L, S = 37, 53
    bias, row_stride = _bias_table(layout, L, S, device)
    assert bias.stride() in ((row_stride, 1), (1, row_stride))

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    q, k, v = _qkv(L=L, S=S, device=device)
    result = _compile(lambda q, k, v: flex_attention(q, k, v, score_mod=biased), q, k, v)
    _check(result.output, q, k, v, biased)

    loads = [line for line in _function(result.source, "_inner") if "tl.load(in_ptr" in line]
    assert len(loads) == 1, loads
    # The index multiplies by the table's real stride, never by a contiguous one.
    assert f"{row_stride}*" in loads[0], loads[0]
    other = L if row_stride != L else S
    assert f"{other}*" not in loads[0], loads[0]


# ---------------------------------------------------------------------------
# Logs: chosen kernel and config; autotuning progress
# ---------------------------------------------------------------------------


def test_chosen_config_is_logged(device, caplog):
    q, k, v = _qkv(L=40, S=40, device=device)
    with caplog.at_level(logging.INFO, logger="flex_inductor"):
        _compile(lambda q, k, v: flex_attention(q, k, v, kernel_options={"BLOCK_M": 32}), q, k, v)
    lines = [r.getMessage() for r in caplog.records if r.name == "flex_inductor"]
    chosen = [line for line in lines if line.startswith(f"{KERNEL}: BLOCK_M=")]
    assert len(chosen) == 1, lines
    assert re.search(r"BLOCK_M=32 BLOCK_N=\d+ num_warps=\d+ num_stages=\d+ for B=1 Hq=2", chosen[0])


def test_autotuning_logs_candidates_and_choice(device, caplog, monkeypatch):
    import torch._inductor.config as inductor_config

    if device == "cpu":
        # The interpreter does not autotune unless configs are put up for it.
        monkeypatch.setattr(configs, "INTERPRETER_AUTOTUNE", [TINY, configs.Config(32, 16, 1, 1)])
    q, k, v = _qkv(L=32, S=32, device=device)
    with caplog.at_level(logging.INFO, logger="flex_inductor"):
        with inductor_config.patch(max_autotune=True):
            result = _compile(lambda q, k, v: flex_attention(q, k, v), q, k, v)
    _check(result.output, q, k, v)
    lines = [r.getMessage() for r in caplog.records if r.name == "flex_inductor"]
    start = [line for line in lines if re.match(rf"{KERNEL}: autotuning \d+ configs for ", line)]
    done = [
        line for line in lines if re.match(rf"{KERNEL}: autotuning took [\d.]+ s; chose ", line)
    ]
    assert len(start) == 1 and len(done) == 1, lines
    assert re.search(r"chose BLOCK_M=\d+ BLOCK_N=\d+ num_warps=\d+ num_stages=\d+", done[0])


@pytest.mark.parametrize(
    "kernel, with_block_mask",
    [("forward", False), ("forward", True), ("backward", False)],
    ids=["forward_flat_full_mask", "forward_block_mask", "backward_flat_full_mask"],
)
def test_autotuning_examples_visit_every_kv_block(device, monkeypatch, kernel, with_block_mask):
    """The mask tensors the autotuner benchmarks with make every row visit every kv block.

    The autotuner keeps one example per buffer name. Without ``block_mask``
    the forward's four mask tensors are views of one buffer (each view's
    generator must rebuild that buffer), and the backward reads one saved
    index tensor in two roles; either way no count may read as 0.
    """
    import flex_inductor.lowering.backward as backward
    import flex_inductor.lowering.backward_configs as backward_configs
    import flex_inductor.lowering.forward as forward
    import torch._inductor.config as inductor_config

    from flex_inductor import _compat

    # Two candidates that fit 32-row blocks, on either device, so that it autotunes.
    for pool in ("INTERPRETER_AUTOTUNE", "FORWARD_AUTOTUNE"):
        monkeypatch.setattr(configs, pool, [TINY, configs.Config(32, 16, 1, 1)])
    monkeypatch.setattr(
        backward_configs,
        "autotune_candidates",
        lambda default, *args: [default, backward_configs.BackwardConfig(32, 32, 32, 32, 1, 1)],
    )
    module = forward if kernel == "forward" else backward
    calls = []  # per lowering call: [(buffer name, view layout, is index, example)], n_kv
    real = module.block_mask_input_gen_fns

    def recording(input_nodes, first_index, kv_len, kv_block):
        fns = real(input_nodes, first_index, kv_len, kv_block)
        seen = []
        calls.append((seen, -(-_compat.size_hint(kv_len) // kv_block)))

        def wrap(i, fn):
            def generate(node):
                example = fn(node)
                view = input_nodes[i]
                layout = (
                    [_compat.size_hint(s) for s in view.get_size()],
                    [_compat.size_hint(s) for s in view.get_stride()],
                    _compat.size_hint(view.get_layout().offset),
                )
                seen.append((view.get_name(), layout, (i - first_index) % 2, example))
                return example

            return generate

        return {i: wrap(i, fn) for i, fn in fns.items()}

    monkeypatch.setattr(module, "block_mask_input_gen_fns", recording)
    L, S = 32, 64
    q, k, v = _qkv(L=L, S=S, device=device)
    # Blocks of 32 rows: both candidate tiles fit, so the autotuner runs.
    bm = create_block_mask(masks.causal(), None, None, L, S, device=device, BLOCK_SIZE=32)
    mask = bm if with_block_mask else None
    # A cached compile would skip the lowering, and with it the autotuner.
    with inductor_config.patch(max_autotune=True, force_disable_caches=True):
        if kernel == "forward":
            _compile(lambda q, k, v: flex_attention(q, k, v, block_mask=mask), q, k, v)
        else:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            compile_and_run(
                lambda q, k, v: flex_attention(q, k, v, block_mask=mask), q, k, v,
                grad_outputs=torch.ones_like(q),
            )
    assert len(calls) == (1 if kernel == "forward" else 2)
    for seen, n_kv in calls:
        assert len(seen) == 4
        kept = {name: example for name, _, _, example in seen}  # the autotuner keeps the last
        views = {}
        for name, layout, is_index, example in seen:
            assert torch.equal(example, kept[name])
            # A buffer shared by views arrives flat; the kernel reads it through the view.
            flat = kept[name].dim() == 1 and len(layout[0]) > 1
            views.setdefault(is_index, []).append(
                kept[name].as_strided(*layout) if flat else kept[name]
            )
        for index_rows in views[1]:
            expected = torch.arange(index_rows.shape[-1], dtype=torch.int32)
            assert torch.equal(index_rows.cpu(), expected.expand(index_rows.shape))
            assert index_rows.shape[-1] >= n_kv
        partial, full = views[0]
        # Every row visits every kv block (as partial, full, or both).
        assert ((partial >= n_kv) | (partial + full == n_kv)).all(), (partial, full)
        assert (partial + full >= n_kv).all()
