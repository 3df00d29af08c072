"""The one place where flex_inductor touches private torch APIs.

Every import from ``torch._*`` (and every probe of the torch version) lives
here, as a small cached function, so that a torch upgrade breaks this file
and nothing else. Supported: torch 2.11 (the GPU machine) and torch 2.13
(dev and CI machines).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from types import SimpleNamespace
from typing import Any

import torch


@functools.cache
def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


# --------------------------------------------------------------------------
# pytree
# --------------------------------------------------------------------------


def register_pytree_node(cls: type, flatten_fn, unflatten_fn, **kwargs: Any) -> None:
    """Register ``cls`` as a pytree node (torch.utils._pytree is private)."""
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(cls, flatten_fn, unflatten_fn, **kwargs)


def tree_map(fn, tree):
    """``torch.utils._pytree.tree_map`` (private module)."""
    import torch.utils._pytree as pytree

    return pytree.tree_map(fn, tree)


def is_mutable_overload(target: Any) -> bool:
    """True for an aten overload whose schema mutates an argument."""
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


# --------------------------------------------------------------------------
# Higher-order operators
# --------------------------------------------------------------------------


@functools.cache
def hop_api() -> SimpleNamespace:
    """What the higher-order op needs from torch's generic HOP machinery."""
    from torch._C import DispatchKey, _ExcludeDispatchKeyGuard, DispatchKeySet
    from torch._higher_order_ops.utils import (
        _from_fun,
        reenter_make_fx,
        register_fake,
    )
    from torch._ops import HigherOrderOperator
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import (
        ProxyTorchDispatchMode,
        make_fx,
        track_tensor_tree,
    )
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def below_autograd():
        # Redispatch below the autograd key, so that the forward inside our
        # autograd.Function is not recorded a second time.
        return torch._C._AutoDispatchBelowAutograd()

    return SimpleNamespace(
        HigherOrderOperator=HigherOrderOperator,
        DispatchKey=DispatchKey,
        FakeTensorMode=FakeTensorMode,
        ProxyTorchDispatchMode=ProxyTorchDispatchMode,
        track_tensor_tree=track_tensor_tree,
        make_fx=make_fx,
        reenter_make_fx=reenter_make_fx,
        register_fake=register_fake,
        from_fun=_from_fun,
        below_autograd=below_autograd,
        current_dispatch_mode=_get_current_dispatch_mode,
        ExcludeDispatchKeyGuard=_ExcludeDispatchKeyGuard,
        DispatchKeySet=DispatchKeySet,
    )


@functools.cache
def joint_api() -> SimpleNamespace:
    """What tracing the joint graph of ``score_mod`` needs."""
    import contextlib

    from torch._dispatch.python import suspend_functionalization
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

    @contextlib.contextmanager
    def suspend_tracing():
        # The joint graph is an argument of the backward op, built on the
        # side: keep it out of any functionalization or graph being traced.
        with suspend_functionalization(), disable_functional_mode():
            with disable_proxy_modes_tracing():
                yield

    def fake_mode_for(*tensors):
        mode = detect_fake_mode(tensors)
        return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)

    def fresh_like(t):
        return torch.empty_strided(
            t.size(), t.stride(), device=t.device, dtype=t.dtype, requires_grad=t.requires_grad
        )

    return SimpleNamespace(
        suspend_tracing=suspend_tracing,
        fake_mode_for=fake_mode_for,
        fresh_like=fresh_like,
        make_fx=make_fx,
    )


@contextlib.contextmanager
def autograd_reenabled():
    """Undo an enclosing ``_AutoDispatchBelowAutograd`` for the ``with`` body.

    The dense backward runs as the backward op's kernel, below the autograd
    key; it recomputes each block of the forward under autograd to get the
    gradients of captured tensors, so it needs the autograd key back.
    """
    from torch._C import DispatchKey

    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(DispatchKey.AutogradFunctionality).remove(DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def unique_graph_name(proxy_mode: Any, prefix: str) -> str:
    """A fresh attribute name on the tracer root for a traced subgraph."""
    root = proxy_mode.tracer.root
    i = 0
    while hasattr(root, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


@functools.cache
def transform_getitem_to_index():
    """Context manager that records ``t[idx]`` on tensors as ``aten.index``.

    Indexing a captured tensor with 0-d index tensors would otherwise be
    recorded as Python ``getitem``, which export cannot serialise.
    """
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    return TransformGetItemToIndex


# --------------------------------------------------------------------------
# Dynamo
# --------------------------------------------------------------------------


@functools.cache
def dynamo_api() -> SimpleNamespace:
    """Private Dynamo pieces the op's variable tracker is built from."""
    from torch._dynamo.variables import higher_order_ops as hoo
    from torch._dynamo.variables.builder import wrap_fx_proxy
    from torch._dynamo.variables.lists import ListVariable, TupleVariable
    from torch._dynamo.utils import proxy_args_kwargs
    from torch.fx.experimental.proxy_tensor import set_original_aten_op

    return SimpleNamespace(
        TorchHigherOrderOperatorVariable=hoo.TorchHigherOrderOperatorVariable,
        speculate_subgraph=hoo.speculate_subgraph,
        make_attr=hoo.make_attr,
        discard_graph_changes=hoo.discard_graph_changes,
        registry=hoo._hop_name_to_variable_class,
        wrap_fx_proxy=wrap_fx_proxy,
        proxy_args_kwargs=proxy_args_kwargs,
        set_original_aten_op=set_original_aten_op,
        ListVariable=ListVariable,
        TupleVariable=TupleVariable,
    )


def variable_builder():
    """``VariableTracker.build``: wraps a Python value for Dynamo."""
    from torch._dynamo.variables.base import VariableTracker

    return VariableTracker.build


def register_dynamo_variable(hop_name: str, variable_cls: type) -> None:
    """Make Dynamo build ``variable_cls`` when it meets the op ``hop_name``."""
    dynamo_api().registry[hop_name] = variable_cls


def is_dynamo_compiling() -> bool:
    """True while Dynamo traces (the public torch.compiler spelling)."""
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------
# Triton interpreter mode (see docs/debugging.md)
# --------------------------------------------------------------------------

_INTERPRET_ENV = "FLEX_INDUCTOR_INTERPRET"


def interpret_requested() -> bool:
    """Whether the user asked for Triton's interpreter on CPU tensors."""
    return os.environ.get(_INTERPRET_ENV, "0") not in ("", "0", "false", "False")


@functools.cache
def enable_triton_interpreter() -> None:
    """Run Inductor's Triton code for CPU tensors in Triton's interpreter.

    The recipe: ``TRITON_INTERPRET=1`` before triton is imported, Inductor's
    CPU backend set to Triton, and two torch helpers that ask the (absent)
    GPU driver for its target replaced by stand-ins with a fixed hash.
    """
    import sys

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton reads TRITON_INTERPRET when its runtime is first used; set it
        # now and hope no kernel has been built yet.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton

    inductor_config.cpu_backend = "triton"

    class _InterpreterBackend:
        """Stands in for the driver's compiler backend: only its hash is asked."""

        def hash(self) -> str:
            return "flex_inductor-triton-interpreter"

        def parse_options(self, options: dict) -> SimpleNamespace:
            return SimpleNamespace(extern_libs=None)

    backend = _InterpreterBackend()
    torch_triton.triton_backend = lambda: backend
    torch_triton.triton_hash_with_backend = lambda: hashlib.sha256(
        b"flex_inductor-triton-interpreter"
    ).hexdigest().upper()


def inductor_config():
    """torch._inductor.config (private module)."""
    import torch._inductor.config as config

    return config
