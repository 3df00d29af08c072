"""Tracing ``score_mod`` and ``mask_mod`` into graphs on 0-d placeholders.

The op's proxy rule, its autograd rule and the lowering all need the mods as
FX graphs over five (or four) 0-d tensors plus the captured buffers. This
module builds those graphs: the forward graph of each mod, and the *joint*
graph of ``score_mod`` (its forward plus the gradient with respect to the
score and to every captured buffer that requires grad).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import _compat

# Scores are computed in float32 inside every kernel, whatever the input
# dtype, so the mods are traced on float32 scores.
SCORE_DTYPE = torch.float32
# Indices are int32 in every kernel.
INDEX_DTYPE = torch.int32


def score_placeholders(like: torch.Tensor) -> list[torch.Tensor]:
    """0-d example inputs ``score, b, h, q_idx, kv_idx`` on ``like``'s device."""
    return [torch.zeros((), dtype=SCORE_DTYPE, device=like.device), *index_placeholders(like)]


def index_placeholders(like: torch.Tensor) -> list[torch.Tensor]:
    """0-d example inputs ``b, h, q_idx, kv_idx`` on ``like``'s device."""
    return [torch.zeros((), dtype=INDEX_DTYPE, device=like.device) for _ in range(4)]


def bind_buffers(mod: Callable, buffers: Sequence[torch.Tensor]) -> Callable:
    """``mod`` with its captured buffers appended to every call.

    Graphs traced by Dynamo take the lifted buffers as trailing inputs; a plain
    Python closure takes none. Binding them gives one calling convention.
    """
    if not buffers:
        return mod
    buffers = tuple(buffers)

    def bound(*args):
        return mod(*args, *buffers)

    bound.__name__ = getattr(mod, "__name__", "mod")
    return bound


def trace_under_proxy_mode(
    mod: Callable, example_args: Sequence[torch.Tensor], what: str | None
):
    """Trace ``mod`` into a GraphModule with the tracing mode already active.

    A user mod (``what`` is ``"score_mod"`` or ``"mask_mod"``) is traced under
    :class:`ModTracingMode`, so that indexing a captured tensor is recorded
    as ``aten.index`` (serialisable by export) and an untraceable mod fails
    with an error naming it. The joint graph (``what=None``) is already made
    of aten ops and is retraced as is.
    """
    api = _compat.hop_api()
    if what is None:
        return api.reenter_make_fx(mod)(*example_args)
    with ModTracingMode(what, mod):
        return api.reenter_make_fx(mod)(*example_args)


# --------------------------------------------------------------------------
# Untraceable mods: one error, whichever path found the problem
# --------------------------------------------------------------------------


class UntraceableModError(RuntimeError):
    """A ``score_mod`` or ``mask_mod`` that cannot be traced into a kernel."""


# Why a mod cannot be traced, and what to write instead.
CONTROL_FLOW = (
    "it branches in Python on a tensor value (data-dependent control flow such as "
    "`if score > 0:`)",
    "Mods are traced once on 0-d placeholder tensors, which have no value to branch on; "
    "write the branch with torch.where(condition, a, b).",
)
TO_PYTHON = (
    "it converts a tensor to a Python number (`.item()`, `int()`, `float()`, `.tolist()`, "
    "or indexing a Python list with an index tensor)",
    "Keep every value a tensor: index captured tensors with the index tensors "
    "(`bias[h, q_idx]`) and use the 0-d results directly.",
)
MUTATION = (
    "it mutates a tensor in place (`{op}`)",
    "Mods must be pure functions of their arguments and captured tensors (the kernel "
    "evaluates them once per score, in any order); compute a new tensor instead, and update "
    "captured tensors outside the mod.",
)
SIDE_EFFECT = (
    "it changes Python state outside the mod ({detail})",
    "Mods must be pure functions; move the state change outside the mod.",
)
OTHER = (
    "Dynamo could not trace it ({detail})",
    "See the original error below for the operation that failed.",
)


def mod_label(mod: Any) -> str:
    """```name` (file:line)`` for a mod, as error messages show it."""
    name = getattr(mod, "__name__", None) or type(mod).__name__
    code = getattr(mod, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"`{name}`{where}"


def untraceable_message(what: str, label: str, reason: tuple[str, str], **details: str) -> str:
    """The one wording of an untraceable-mod error: which mod, why, what to do."""
    cause, hint = reason
    return f"flex_inductor: {what} {label} cannot be traced: {cause.format(**details)}. {hint}"


# Tensor methods that turn a tensor value into a Python value.
TO_PYTHON_NAMES = frozenset(
    {"item", "tolist", "numpy", "__int__", "__float__", "__index__", "__complex__"}
)
# In-place operators as Dynamo records them (``operator.iadd``...).
_OPERATOR_IN_PLACE = frozenset(
    {
        operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
        operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
        operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
    }
)
# Trailing-underscore methods that do not write tensor data.
_NOT_MUTATIONS = frozenset({"requires_grad_", "retain_grad_"})


def in_place_name(target: Any, kwargs: dict | None = None) -> str | None:
    """The name of ``target`` if calling it mutates a tensor argument, else None.

    ``target`` is a Tensor method name (a Dynamo ``call_method``), a function,
    or an aten overload. ``operator.and_`` and friends end in ``_`` but are
    not in-place, so trailing underscores only count outside ``operator``.
    """
    if isinstance(target, str):
        name, module = target, "torch"
    else:
        name = getattr(target, "__name__", "") or ""
        module = getattr(target, "__module__", None) or ""
    if _compat.is_mutable_overload(target) or target in _OPERATOR_IN_PLACE:
        return name
    if kwargs and kwargs.get("out") is not None:
        return f"{name}(out=...)"
    if name in ("__setitem__", "__delitem__"):
        return name
    if module in ("operator", "_operator") or name in _NOT_MUTATIONS:
        return None
    if name.endswith("_") and not name.startswith("_"):
        return name
    return None


class ModTracingMode(TorchFunctionMode):
    """How every mod is traced: tensor indexing as ``aten.index``, clear errors.

    ``bias[h, q_idx]`` with 0-d index tensors would otherwise read the index
    values into Python. Recording it as ``aten.index`` (integers become 0-d
    int64 tensors made with ``full``, which export serialises; no tensor
    constants) keeps it a traceable gather, and the export serialiser knows
    ``aten.index``. A mod that reads tensor values into Python or mutates a
    tensor raises :class:`UntraceableModError` naming the mod.
    """

    def __init__(self, what: str, mod: Any) -> None:
        super().__init__()
        self.what = what
        self.mod = mod

    def _fail(self, reason: tuple[str, str], **details: str):
        raise UntraceableModError(
            untraceable_message(self.what, mod_label(self.mod), reason, **details)
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            indexed = _as_aten_index(args[0], args[1])
            if indexed is not None:
                return indexed
        name = getattr(func, "__name__", "")
        if name == "__bool__":
            self._fail(CONTROL_FLOW)
        if name in TO_PYTHON_NAMES:
            self._fail(TO_PYTHON)
        op = in_place_name(func, kwargs)
        if op is not None:
            self._fail(MUTATION, op=op)
        return func(*args, **kwargs)


def _as_aten_index(tensor: torch.Tensor, index: Any) -> torch.Tensor | None:
    """``tensor[index]`` as one ``aten.index`` when every index is a tensor or int."""
    entries = index if isinstance(index, tuple) else (index,)
    if not entries or not all(
        isinstance(i, torch.Tensor) or (isinstance(i, int) and not isinstance(i, bool))
        for i in entries
    ):
        return None
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in entries):
        return None
    indices = [
        i if isinstance(i, torch.Tensor)
        else torch.full((), i, dtype=torch.int64, device=tensor.device)
        for i in entries
    ]
    return torch.ops.aten.index.Tensor(tensor, indices)


# Mods that passed check_traceable; weak, so that a mod does not outlive its user.
_TRACEABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_traceable(mod: Callable, what: str, like: torch.Tensor) -> None:
    """Trace ``mod`` once on fake 0-d placeholders; raise if it cannot be traced.

    The eager reference evaluates mods with ``vmap``, which would run an
    in-place update for real and fail on ``.item()`` with an error that does
    not name the mod; this check gives the same error as the compiled paths.
    A mod that passed is not traced again (a trace costs about 10 ms).
    """
    try:
        if _TRACEABLE.get(mod) == what:
            return
    except TypeError:  # not weakly referenceable: check every time
        pass
    trace_and_lift(mod, what, like)
    try:
        _TRACEABLE[mod] = what
    except TypeError:
        pass


def trace_and_lift(
    mod: Callable, what: str, like: torch.Tensor
) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Trace ``mod`` and lift the tensors it closes over into graph inputs.

    Outside Dynamo (``make_fx``, non-strict export) nobody lifts the tensors
    a mod captures, and tracing the mod inline would bake them into its graph
    as constants: a parameter would lose its gradient and its updates, and an
    exported graph would hold a copy. Tracing the mod on its own and turning
    each tensor constant into a trailing placeholder gives the calling
    convention of Dynamo's subgraphs: ``graph(*placeholders, *buffers)``.

    Returns:
        The graph and the captured tensors, in placeholder order.
    """
    api = _compat.joint_api()
    with api.suspend_tracing():
        fake_mode = api.fake_mode_for(like)
        with fake_mode:
            example = score_placeholders(like) if what == "score_mod" else index_placeholders(like)
        with ModTracingMode(what, mod):
            graph_module = api.make_fx(mod)(*example)
    return graph_module, _lift_tensor_constants(graph_module)


def _lift_tensor_constants(graph_module: torch.fx.GraphModule) -> list[torch.Tensor]:
    graph = graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    buffers: list[torch.Tensor] = []
    lifted_by_target: dict[str, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if node.target not in lifted_by_target:
            value = getattr(graph_module, node.target, None)
            if not isinstance(value, torch.Tensor):
                continue
            # Placeholders must stay in front: insert after the last one.
            with graph.inserting_after(placeholders[-1]):
                lifted = graph.placeholder(f"captured_{len(buffers)}")
            lifted.meta = dict(node.meta)
            placeholders.append(lifted)
            buffers.append(value)
            lifted_by_target[node.target] = lifted
        node.replace_all_uses_with(lifted_by_target[node.target])
        graph.erase_node(node)
    for target in lifted_by_target:
        delattr(graph_module, target)
    graph_module.recompile()
    return buffers


def build_joint_graph(
    score_mod: Callable,
    query: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    buffers_need_grad: Sequence[bool] | None = None,
) -> torch.fx.GraphModule:
    """Trace the joint forward+backward graph of ``score_mod``.

    The graph takes ``(score, b, h, q_idx, kv_idx, grad_score_out, *buffers)``
    and returns ``(grad_score, *grad_buffers)``, where ``grad_buffers`` has one
    entry per buffer (``None`` for buffers that do not require grad, so that a
    mask-only or constant buffer costs nothing in the backward).

    ``buffers_need_grad`` says which buffers are differentiated; by default,
    those that require grad. (The backward passes what the forward saw: its
    saved tensors need not carry ``requires_grad`` as the inputs did.)

    It is traced on fake tensors outside any enclosing functionalization or
    proxy tracing: the joint graph is an argument of the backward op, not part
    of the graph being traced.
    """
    api = _compat.joint_api()
    if buffers_need_grad is None:
        buffers_need_grad = [isinstance(b, torch.Tensor) and b.requires_grad for b in buffers]
    buffer_needs_grad = list(buffers_need_grad)

    def joint(score, b, h, q_idx, kv_idx, grad_score_out, *bufs):
        with torch.enable_grad():
            score = score.detach().requires_grad_(True)
            wrt = [score] + [buf for buf, need in zip(bufs, buffer_needs_grad, strict=True) if need]
            out = score_mod(score, b, h, q_idx, kv_idx, *bufs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"score_mod must return a tensor, got {type(out).__name__}"
                )
            if out.requires_grad:
                grads = torch.autograd.grad(out, wrt, grad_score_out, allow_unused=True)
            else:
                grads = [None] * len(wrt)
        grads = list(grads)
        grad_score = grads.pop(0)
        if grad_score is None:
            grad_score = torch.zeros_like(score)
        grad_bufs = []
        for buf, need in zip(bufs, buffer_needs_grad, strict=True):
            g = grads.pop(0) if need else None
            if need and g is None:
                g = torch.zeros_like(buf)
            grad_bufs.append(g)
        return (grad_score, *grad_bufs)

    tensors = [b for b in buffers if isinstance(b, torch.Tensor)]
    with api.suspend_tracing():
        fake_mode = api.fake_mode_for(query, *tensors)
        with fake_mode:
            example = score_placeholders(query)
            example.append(torch.zeros_like(example[0]))
            # Under dynamic shapes Dynamo also lifts the symbolic sizes of
            # captured tensors (SymInts): they pass through as they are.
            fake_buffers = [
                api.fresh_like(b).requires_grad_(need) if isinstance(b, torch.Tensor) else b
                for b, need in zip(buffers, buffer_needs_grad, strict=True)
            ]
        with _compat.transform_getitem_to_index()():
            return api.make_fx(joint)(*example, *fake_buffers)
