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
from ._registration import ensure_lowerings
from ._subgraphs import (
    CONTROL_FLOW,
    INDEX_DTYPE,
    MUTATION,
    OTHER,
    SCORE_DTYPE,
    SIDE_EFFECT,
    TO_PYTHON,
    TO_PYTHON_NAMES,
    in_place_name,
    mod_label,
    untraceable_message,
)
from .op import FORWARD_NAME

_dyn = _compat.dynamo_api()


class FlexInductorAttentionVariable(_dyn.TorchHigherOrderOperatorVariable):
    """Dynamo's view of a ``flex_inductor_attention`` call."""

    # Named in Dynamo's messages about this op.
    _HOP_NAME = f"flex_inductor.{FORWARD_NAME}"

    def _placeholders(self, tx, query):
        """0-d tensors ``score, b, h, q_idx, kv_idx`` the mods are speculated on.

        Created off the graph, once for both mods: speculation reads only
        their example values, and gives each subgraph its own inputs.
        """
        build = _compat.variable_builder()

        def scalar(dtype):
            return query.call_method(tx, "new_empty", [build(tx, [])], {"dtype": build(tx, dtype)})

        with _dyn.discard_graph_changes(tx):
            return [scalar(SCORE_DTYPE), *(scalar(INDEX_DTYPE) for _ in range(4))]

    def _install_mod(self, tx, fn, name: str, placeholders, given=()):
        """Speculate one mod; return its graph's attribute proxy and its buffer proxies.

        ``given`` are buffers the call already passes (an exported or
        AOT-level graph calls the op with its mods' buffers); the mod takes
        them after the placeholders, followed by what speculation lifts.

        A mod Dynamo cannot trace becomes a graph break whose message names
        the mod and the cause (see :func:`_untraceable`), instead of Dynamo's
        generic one pointing into flex_inductor.
        """
        args = [*placeholders, *given]
        unsupported = _compat.dynamo_unsupported_error()
        try:
            with _compat.transform_getitem_to_index()(), _compat.dynamo_specialize_scalars():
                # The arguments are already a flat list of tensors and symbolic
                # scalars: "manual" makes them the subgraph's inputs directly,
                # where "flatten_manual" would have Dynamo trace pytree's
                # flatten and unflatten of that list (a third of the time of
                # speculating a small mod).
                (_out, _spec), graph, lifted = _dyn.speculate_subgraph(
                    tx,
                    fn,
                    args,
                    {},
                    description=f"flex_inductor {name}",
                    source_target=self.value,
                    set_subgraph_inputs="manual",
                )
        except unsupported as error:
            if getattr(error, "skip_frame", False):
                raise  # Dynamo is giving up on the whole frame: not ours to reword.
            _untraceable(name, fn, _reason_from_dynamo(error), error)
        except _compat.data_dependent_error() as error:
            # A tensor value used where Python needs a number (a list index).
            _untraceable(name, fn, (TO_PYTHON, {}), error)
        lifted = _specialize_dynamic_scalars(graph, lifted)
        _check_speculated_graph(graph, name, fn)
        gm = torch.fx.GraphModule(tx.output.nn_modules, graph)
        attr = tx.output.install_subgraph(name, gm)
        buffers = [*(g.as_proxy() for g in given), *lifted]
        return _dyn.make_attr(tx, attr), buffers

    def _call_function(self, tx, args, kwargs):
        if kwargs or len(args) < 9:
            raise AssertionError(
                f"{FORWARD_NAME} is called positionally by flex_inductor.flex_attention"
            )
        query, key, value, score_mod, mask_mod, block_mask, block_sizes, scale, options = args[:9]
        ensure_lowerings()
        given = [a.unpack_var_sequence(tx) for a in args[9:11]] + [[], []]
        placeholders = self._placeholders(tx, query)
        score_node, score_buffers = self._install_mod(
            tx, score_mod, "score_mod", placeholders, given[0]
        )
        mask_node, mask_buffers = self._install_mod(
            tx, mask_mod, "mask_mod", placeholders[1:], given[1]
        )

        plain, _ = _dyn.proxy_args_kwargs([query, key, value, block_mask, block_sizes, scale], {})
        q, k, v, bm, sizes, scale_p = plain
        # Numbers, never symbols: tile sizes and flags are kernel constants.
        options_p = _compat.constant_dict_items(tx, options)
        proxy_args = (
            q, k, v, score_node, mask_node, list(bm), list(sizes), scale_p, options_p,
            list(score_buffers), list(mask_buffers),
        )
        with _dyn.set_original_aten_op(self.value):
            proxy = tx.output.create_proxy("call_function", self.value, proxy_args, {})
            return _dyn.wrap_fx_proxy(tx=tx, proxy=proxy, example_value=None)


# The graph-break type of an untraceable mod; the eager path recognises it.
UNTRACEABLE_GB_TYPE = "flex_inductor: untraceable score_mod or mask_mod"


def _variable_label(fn) -> str:
    """``mod_label`` of the function behind a Dynamo variable, as far as it is known."""
    for attr in ("fn", "value"):
        obj = getattr(fn, attr, None)
        if callable(obj):
            return mod_label(obj)
    try:
        code = fn.get_code()
        return f"`{code.co_name}` ({code.co_filename}:{code.co_firstlineno})"
    except Exception:  # noqa: BLE001 - any variable without a code object
        return f"({type(fn).__name__})"


def _reason_from_dynamo(error: Exception) -> tuple[tuple[str, str], dict[str, str]]:
    """Which of our causes a Dynamo graph break inside a mod is."""
    gb_type = (getattr(error, "gb_type", None) or "").lower()
    text = f"{gb_type}\n{error}".lower()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else gb_type
    if "data-dependent branching" in text or "data dependent branching" in text:
        return CONTROL_FLOW, {}
    if ".item()" in text or "item()" in text or "_local_scalar_dense" in text:
        return TO_PYTHON, {}
    if "indexing list" in text or "index list" in text:
        # A Python list indexed with an index tensor (torch 2.11 words it so).
        return TO_PYTHON, {}
    if "side effect" in text or "mutat" in text:
        return SIDE_EFFECT, {"detail": first_line}
    return OTHER, {"detail": first_line}


def _untraceable(name, fn, reason_and_details, cause=None):
    """Raise the graph break of an untraceable mod, naming it and the cause."""
    reason, details = reason_and_details
    message = untraceable_message(name, _variable_label(fn), reason, **details)
    unsupported = _compat.dynamo_unsupported_error()
    try:
        _compat.dynamo_graph_break(
            UNTRACEABLE_GB_TYPE,
            context=str(cause) if cause is not None else "found in the speculated subgraph",
            explanation=message,
            hints=[],
        )
    except unsupported as error:
        # The eager path re-raises this alone, without Dynamo's framing.
        error.flex_inductor_message = message
        raise error from cause


def _specialize_dynamic_scalars(graph: torch.fx.Graph, lifted: dict) -> dict:
    """Bake a Python scalar that Dynamo made dynamic back into the mod.

    Python scalars a mod closes over are constants of its graph, and
    changing one recompiles. After one change, though, Dynamo's automatic
    dynamic passes a float as a 0-d tensor input and reads it back with
    ``.item()``, which a kernel cannot do. Reading the value here guards on
    it (so a new value recompiles, as for any baked scalar), the constant
    replaces the ``.item()``, and the unused input is dropped from the mod.

    Returns:
        ``lifted`` without the inputs that were baked in.
    """
    kept = {}
    for outer, inner in lifted.items():
        grapharg = outer.node.meta.get("grapharg")
        placeholder = inner.node
        readers = [u for u in placeholder.users if u.op == "call_method" and u.target == "item"]
        symbolic = [r.meta.get("example_value") for r in readers]
        if (
            not getattr(grapharg, "pass_arg_as_tensor", False)
            or len(readers) != len(placeholder.users)
            or not all(isinstance(x, (torch.SymFloat, torch.SymInt)) for x in symbolic)
        ):
            kept[outer] = inner
            continue
        for reader, number in zip(readers, symbolic, strict=True):
            # float()/int() of the symbolic value installs the guard on it.
            value = float(number) if isinstance(number, torch.SymFloat) else int(number)
            for use in list(reader.users):

                def bake(node, reader=reader, value=value):
                    return value if node is reader else node

                use.args = torch.fx.node.map_arg(use.args, bake)
                use.kwargs = torch.fx.node.map_arg(use.kwargs, bake)
            graph.erase_node(reader)
        graph.erase_node(placeholder)
    return kept


def _check_speculated_graph(graph: torch.fx.Graph, name: str, fn) -> None:
    """Reject what Dynamo records without complaint: ``.item()`` and in-place ops."""
    for node in graph.nodes:
        if node.op not in ("call_method", "call_function"):
            continue
        target = node.target
        method = target if node.op == "call_method" else getattr(target, "__name__", "")
        if method in TO_PYTHON_NAMES:
            _untraceable(name, fn, (TO_PYTHON, {}))
        op = in_place_name(target, node.kwargs)
        if op is not None:
            _untraceable(name, fn, (MUTATION, {"op": op}))


def register() -> None:
    """Make Dynamo use our variable for our op (idempotent)."""
    _compat.register_dynamo_variable(FORWARD_NAME, FlexInductorAttentionVariable)
