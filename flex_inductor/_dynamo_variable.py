"""Dynamo capture of the forward op.

When Dynamo meets a call of :data:`flex_inductor.op.flex_inductor_attention`
it builds :class:`FlexInductorAttentionVariable`. The variable speculates
``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)``
on 0-d placeholders, installs both as subgraphs of the output graph, and
lifts every tensor they close over (a bias table, a document-id vector, a
parameter) into extra inputs of the op. Python scalars they close over are
baked into the subgraphs and guarded on, so changing one recompiles while
changing a lifted tensor's values does not.
"""

from __future__ import annotations

import torch

from . import _compat
from ._subgraphs import INDEX_DTYPE, SCORE_DTYPE
from ._registration import ensure_lowerings
from .op import FORWARD_NAME

_dyn = _compat.dynamo_api()


class FlexInductorAttentionVariable(_dyn.TorchHigherOrderOperatorVariable):
    """Dynamo's view of a ``flex_inductor_attention`` call."""

    # Named in Dynamo's messages about this op.
    _HOP_NAME = f"flex_inductor.{FORWARD_NAME}"

    def _placeholders(self, tx, query, with_score: bool):
        """0-d tensors the mods are speculated on, created off the graph."""
        build = _compat.variable_builder()

        def scalar(dtype, requires_grad=False):
            kwargs = {"dtype": build(tx, dtype)}
            if requires_grad:
                kwargs["requires_grad"] = build(tx, True)
            return query.call_method(tx, "new_empty", [build(tx, [])], kwargs)

        with _dyn.discard_graph_changes(tx):
            indices = [scalar(INDEX_DTYPE) for _ in range(4)]
            if not with_score:
                return indices
            return [scalar(SCORE_DTYPE), *indices]

    def _install_mod(self, tx, query, fn, name: str, with_score: bool):
        """Speculate one mod; return its graph's attribute proxy and lifted inputs."""
        args = self._placeholders(tx, query, with_score)
        with _compat.transform_getitem_to_index()():
            (_out, _spec), graph, lifted = _dyn.speculate_subgraph(
                tx,
                fn,
                args,
                {},
                description=f"flex_inductor {name}",
                source_target=self.value,
                set_subgraph_inputs="flatten_manual",
            )
        gm = torch.fx.GraphModule(tx.output.nn_modules, graph)
        attr = tx.output.install_subgraph(name, gm)
        return _dyn.make_attr(tx, attr), tuple(lifted)

    def _call_function(self, tx, args, kwargs):
        if kwargs or len(args) < 9:
            raise AssertionError(
                f"{FORWARD_NAME} is called positionally by flex_inductor.flex_attention"
            )
        query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale, options = args[:9]
        ensure_lowerings()
        score_node, score_buffers = self._install_mod(tx, query, score_mod, "score_mod", True)
        mask_node, mask_buffers = self._install_mod(tx, query, mask_mod, "mask_mod", False)

        plain, _ = _dyn.proxy_args_kwargs(
            [query, key, value, block_mask, block_sizes, scale, options], {}
        )
        q, k, v, bm, sizes, scale_p, options_p = plain
        proxy_args = (
            q, k, v, score_node, mask_node, list(bm), list(sizes), scale_p, options_p,
            list(score_buffers), list(mask_buffers),
        )
        with _dyn.set_original_aten_op(self.value):
            proxy = tx.output.create_proxy("call_function", self.value, proxy_args, {})
            return _dyn.wrap_fx_proxy(tx=tx, proxy=proxy, example_value=None)


def register() -> None:
    """Make Dynamo use our variable for our op (idempotent)."""
    _compat.register_dynamo_variable(FORWARD_NAME, FlexInductorAttentionVariable)
