"""torch.export of modules that use flex_attention, strict and non-strict, and save/load.

The exported graph must hold our op once, with ``score_mod`` and
``mask_mod`` as GraphModule submodules made of serialisable aten ops, and
the tensors the mods close over as explicit op inputs (a parameter stays a
parameter of the program). ``torch.export.save`` / ``torch.export.load`` must
round-trip in a fresh process that imports nothing but ``flex_inductor``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compile_utils import compile_and_run
from mod_defs import Dims

from flex_inductor import create_block_mask, flex_attention, masks, mods

OP = "flex_inductor_attention"
DIMS = Dims(B=1, H=2, L=21, S=21)
E = 8


class CausalAttention(torch.nn.Module):
    """A BlockMask built once and stored on the module; no score_mod."""

    def __init__(self) -> None:
        super().__init__()
        self.block_mask = create_block_mask(
            masks.causal(), 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16
        )

    def forward(self, q, k, v):
        return flex_attention(q, k, v, block_mask=self.block_mask)


class AlibiSlidingWindow(torch.nn.Module):
    """ALiBi: a score_mod closing over a slopes tensor, with a sliding window."""

    def __init__(self) -> None:
        super().__init__()
        self.score_mod = mods.alibi(DIMS.H)
        self.block_mask = create_block_mask(
            masks.sliding_window(5), 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16
        )

    def forward(self, q, k, v):
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask)


class LearnableBias(torch.nn.Module):
    """A learnable relative-position bias parameter, read by a nested closure."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.bias = torch.nn.Parameter(torch.randn(DIMS.H, 2 * DIMS.L - 1, generator=gen))
        self.block_mask = create_block_mask(
            masks.causal(), 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16
        )

    def forward(self, q, k, v):
        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + self.bias[h, q_idx - kv_idx + DIMS.L - 1]

        return flex_attention(q, k, v, score_mod=relative_bias, block_mask=self.block_mask)


class DocumentMask(torch.nn.Module):
    """A mask_mod closing over a document-id tensor, plus a soft-cap."""

    def __init__(self) -> None:
        super().__init__()
        self.block_mask = create_block_mask(
            masks.document([6, 1, 9, 5], causal=True), 1, 1, DIMS.L, DIMS.S, device="cpu",
            BLOCK_SIZE=16,
        )

    def forward(self, q, k, v):
        return flex_attention(q, k, v, score_mod=mods.softcap(3.0), block_mask=self.block_mask)


MODELS = {
    "causal": CausalAttention,
    "alibi": AlibiSlidingWindow,
    "learnable_bias": LearnableBias,
    "document": DocumentMask,
}
STRICT = {"strict": True, "non_strict": False}


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64):
    # float64 by default: called eagerly, the module then runs the blockwise
    # reference (fast on CPU), which is what the exported program must match.
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(DIMS.B, DIMS.H, n, E, generator=gen, dtype=dtype)
        for n in (DIMS.L, DIMS.S, DIMS.S)
    )


def _export(name: str, strict: bool, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = MODELS[name]()
    return model, torch.export.export(model, _inputs(dtype=dtype), strict=strict)


def _op_node(ep):
    nodes = [n for n in ep.graph.nodes if getattr(n.target, "__name__", "") == OP]
    assert len(nodes) == 1, f"expected one {OP} call, got {len(nodes)}"
    return nodes[0]


def _submodule(ep, node):
    assert node.op == "get_attr", f"a mod must be a submodule, got {node.op} {node.target}"
    graph_module = getattr(ep.graph_module, node.target)
    assert isinstance(graph_module, torch.fx.GraphModule)
    return graph_module


@pytest.mark.parametrize("strict", list(STRICT.values()), ids=list(STRICT))
@pytest.mark.parametrize("name", list(MODELS))
def test_export_graph_holds_our_op_with_mod_submodules(name, strict):
    model, ep = _export(name, strict)
    node = _op_node(ep)
    score_graph, mask_graph = _submodule(ep, node.args[3]), _submodule(ep, node.args[4])
    for graph_module in (score_graph, mask_graph):
        targets = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
        # Only aten ops: the serialiser knows them all (no flat_apply, no
        # Python getitem on tensors, no tensor constants inside the mod).
        assert all(isinstance(t, torch._ops.OpOverload) for t in targets), targets
        assert not [n for n in graph_module.graph.nodes if n.op == "get_attr"]

    inputs = _inputs(seed=1)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


class BlockMaskArgument(torch.nn.Module):
    """The BlockMask is an argument of forward: its tensors become program inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.score_mod = mods.alibi(DIMS.H)

    def forward(self, q, k, v, block_mask):
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask)


@pytest.mark.parametrize("strict", list(STRICT.values()), ids=list(STRICT))
def test_export_with_block_mask_argument(strict):
    model = BlockMaskArgument()
    block_mask = create_block_mask(
        masks.causal(), 1, 1, DIMS.L, DIMS.S, device="cpu", BLOCK_SIZE=16
    )
    ep = torch.export.export(model, (*_inputs(), block_mask), strict=strict)
    node = _op_node(ep)
    user_inputs = set(ep.graph_signature.user_inputs)
    assert {t.name for t in node.args[5] if t is not None} <= user_inputs
    _submodule(ep, node.args[4])
    inputs = _inputs(seed=6)
    torch.testing.assert_close(
        ep.module()(*inputs, block_mask), model(*inputs, block_mask), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("strict", list(STRICT.values()), ids=list(STRICT))
def test_export_lifts_captured_tensors(strict):
    model, ep = _export("learnable_bias", strict)
    node = _op_node(ep)
    score_buffers, mask_buffers = node.args[9], node.args[10]
    parameters = ep.graph_signature.inputs_to_parameters
    assert [parameters.get(b.name) for b in score_buffers] == ["bias"]
    assert mask_buffers == []
    score_graph = _submodule(ep, node.args[3])
    assert torch.ops.aten.index.Tensor in [n.target for n in score_graph.graph.nodes]

    _, ep_alibi = _export("alibi", strict)
    (slopes,) = _op_node(ep_alibi).args[9]
    assert slopes.op == "placeholder"  # an input of the program (a constant), not baked in

    _, ep_doc = _export("document", strict)
    assert len(_op_node(ep_doc).args[10]) >= 1


@pytest.mark.parametrize("strict", list(STRICT.values()), ids=list(STRICT))
def test_exported_parameter_gets_its_gradient(strict):
    model, ep = _export("learnable_bias", strict)
    exported = ep.module()
    inputs = _inputs(seed=2)
    exported(*inputs).square().sum().backward()
    model(*inputs).square().sum().backward()
    exported_bias = dict(exported.named_parameters())["bias"]
    torch.testing.assert_close(exported_bias.grad, model.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strict", list(STRICT.values()), ids=list(STRICT))
def test_exported_program_compiles_again(strict):
    # The exported graph calls our op with its mods' buffers already
    # lifted; Dynamo must pass them through, once each.
    model, ep = _export("learnable_bias", strict)
    exported = ep.module()
    inputs = _inputs(seed=5)
    result = compile_and_run(exported, *inputs, backend="aot_eager")
    assert result.frame_count == 1 and result.op_calls() == 1
    (node,) = [
        n for gm in result.graphs for n in gm.graph.nodes
        if getattr(n.target, "__name__", "") == OP
    ]
    assert len(node.args[9]) == 1  # the bias
    expected = model(*inputs)
    torch.testing.assert_close(result.output, expected, rtol=1e-9, atol=1e-9)
    result.output.square().sum().backward()
    expected.square().sum().backward()
    exported_bias = dict(exported.named_parameters())["bias"]
    torch.testing.assert_close(exported_bias.grad, model.bias.grad, rtol=1e-9, atol=1e-9)


def test_float32_export_and_run_decompositions_keep_our_op():
    # float32 as most models run it; eagerly this module compiles itself
    # (CUDA or the interpreter), the exported program runs the op's dense rule.
    model, ep = _export("alibi", strict=True, dtype=torch.float32)
    decomposed = ep.run_decompositions()
    _op_node(decomposed)
    inputs = _inputs(seed=3, dtype=torch.float32)
    torch.testing.assert_close(decomposed.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Save, then load in a fresh process
# ---------------------------------------------------------------------------

LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    import flex_inductor  # noqa: F401  (registers our op for the deserialiser)

    results = {}
    for entry in json.loads(sys.argv[1]):
        ep = torch.export.load(entry["program"])
        saved = torch.load(entry["io"])
        ops = [getattr(n.target, "__name__", "") for n in ep.graph.nodes]
        module = ep.module()
        out = module(*saved["inputs"])
        result = {
            "op_calls": ops.count("flex_inductor_attention"),
            "max_error": (out - saved["out"]).abs().max().item(),
        }
        if "bias_grad" in saved:
            out.square().sum().backward()
            bias = dict(module.named_parameters())["bias"]
            result["grad_error"] = (bias.grad - saved["bias_grad"]).abs().max().item()
        results[entry["key"]] = result
    print(json.dumps(results))
    """
)


def test_save_load_round_trips_in_a_fresh_process(tmp_path):
    # Every model, both ways, saved here and loaded in one fresh process
    # that imports torch and flex_inductor only (one process: start-up is
    # the slow part).
    entries, expected_keys = [], []
    for name in MODELS:
        for label, strict in STRICT.items():
            key = f"{name}-{label}"
            model, ep = _export(name, strict)
            inputs = _inputs(seed=4)
            out = model(*inputs)
            saved = {"inputs": inputs, "out": out.detach()}
            if name == "learnable_bias":
                out.square().sum().backward()
                saved["bias_grad"] = model.bias.grad
            torch.export.save(ep, tmp_path / f"{key}.pt2")
            torch.save(saved, tmp_path / f"{key}.io.pt")
            entries.append(
                {"key": key, "program": str(tmp_path / f"{key}.pt2"),
                 "io": str(tmp_path / f"{key}.io.pt")}
            )
            expected_keys.append(key)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(entries)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=tmp_path,
    )
    assert proc.returncode == 0, f"loading failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(expected_keys)
    bad = {
        key: r for key, r in results.items()
        if r["op_calls"] != 1 or r["max_error"] > 1e-9 or r.get("grad_error", 0.0) > 1e-9
    }
    assert not bad, f"programs that did not round-trip: {bad}"
