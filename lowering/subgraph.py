"""Turning the mods' FX graphs into Inductor IR that templates inline.

A template calls ``{{ modification(0, "post_mod_scores", score="qk", ...) }}``:
Inductor then emits the mod's pointwise code with the placeholders renamed
to the template's variables, and loads of captured tensors indexed through
their real strides. This module builds that IR from a mod's GraphModule by
running Inductor's own pointwise lowering over it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from flex_inductor import _compat

_ind = _compat.inductor_api()

# The placeholder names the templates bind with ``modification(...)``.
SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
# The joint graph also takes the incoming gradient of the modified score.
JOINT_ARGS = (*SCORE_ARGS, "grad_score_mod")


def placeholder(name: str, dtype: torch.dtype, device: torch.device):
    """A 0-d input buffer standing for one template variable."""
    ir = _ind.ir
    layout = ir.FixedLayout(device, dtype, [], [])
    return ir.TensorBox.create(ir.InputBuffer(name=name, layout=layout))


def lower_mod(
    graph_module: torch.fx.GraphModule,
    names_and_dtypes: Sequence[tuple[str, torch.dtype]],
    buffers: Sequence,
    device: torch.device,
    allow_scatter: bool = False,
):
    """Lower a mod graph into the IR a template's ``modification`` inlines.

    Args:
        graph_module: The traced ``score_mod``/``mask_mod``/joint graph.
        names_and_dtypes: One ``(name, dtype)`` per scalar placeholder.
        buffers: Realized IR nodes of the captured tensors (trailing inputs).
        device: The device of the kernel.
        allow_scatter: Allow the joint graph's scatter of captured-tensor
            gradients (lowered as atomic adds into a zero-filled buffer).

    Returns:
        One ``ComputedBuffer`` (or ``None`` for an absent gradient, or a
        list of scatter buffers) per graph output.
    """
    ir = _ind.ir
    args = [placeholder(n, d, device) for n, d in names_and_dtypes]
    kwargs = {}
    if allow_scatter:
        from .scatter import zeros_and_scatter_lowering

        scatter = _compat.zeros_and_scatter_op()
        kwargs = dict(
            allowed_mutations=_compat.ordered_set([scatter]),
            additional_lowerings={scatter: zeros_and_scatter_lowering},
        )
    lowering = _ind.PointwiseSubgraphLowering(
        graph_module, root_graph_lowering=_ind.V.graph, **kwargs
    )
    with _ind.V.set_graph_handler(lowering):
        lowering.run(*args, *buffers)

    def to_buffer(out):
        if out is None or isinstance(out, ir.ComputedBuffer):
            return out
        # TensorBox -> StorageBox -> Pointwise (or the InputBuffer itself, for
        # an identity mod; ``modification`` knows how to load that).
        data = out.data.data
        layout = ir.FlexibleLayout(device=device, dtype=data.get_dtype(), size=data.get_size())
        return ir.ComputedBuffer(name=None, layout=layout, data=data)

    outputs = lowering.graph_outputs
    if isinstance(outputs, (list, tuple)):
        return [to_buffer(o) for o in outputs]
    return to_buffer(outputs)


def first_output_only(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a joint graph that returns only its first output (the score grad).

    Dead-code elimination then drops the captured-tensor gradient scatters,
    which only the dK/dV kernel performs.
    """
    gm = torch.fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    output.args = (first,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
