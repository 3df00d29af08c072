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
    from torch._C import DispatchKey, DispatchKeySet, _ExcludeDispatchKeyGuard
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
    from torch._dynamo.utils import proxy_args_kwargs
    from torch._dynamo.variables import higher_order_ops as hoo
    from torch._dynamo.variables.builder import wrap_fx_proxy
    from torch._dynamo.variables.lists import ListVariable, TupleVariable
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


def constant_dict_items(tx, dict_var) -> dict:
    """A Dynamo dict variable of constants as a Python dict, ints specialised.

    Automatic dynamic shapes turn an int that changed between two compiles
    into a symbol, ``kernel_options`` values included; the kernels need
    them as numbers, so each symbol is evaluated to its value under a guard.
    """
    from torch._dynamo.variables import SymNodeVariable

    def constant(var):
        if isinstance(var, SymNodeVariable):
            return var.evaluate_expr(tx.output)
        return var.as_python_constant()

    return {constant(key.vt): constant(value) for key, value in dict_var.items.items()}


def variable_builder():
    """``VariableTracker.build``: wraps a Python value for Dynamo."""
    from torch._dynamo.variables.base import VariableTracker

    return VariableTracker.build


def register_dynamo_variable(hop_name: str, variable_cls: type) -> None:
    """Make Dynamo build ``variable_cls`` when it meets the op ``hop_name``."""
    dynamo_api().registry[hop_name] = variable_cls


def is_dynamo_compiling() -> bool:
    """True while Dynamo traces (torch.compile or strict export), not under make_fx.

    ``torch.compiler.is_compiling()`` is also True during non-strict export,
    where no Dynamo variable lifts the tensors the mods capture.
    """
    return torch.compiler.is_dynamo_compiling()


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell torch.compile that ``tensor`` keeps its address across calls.

    A KV store updated in place by a compiled step is then a static input of
    CUDA graphs (``mode="reduce-overhead"``) instead of a mutated input that
    makes Inductor skip graph capture.
    """
    torch._dynamo.mark_static_address(tensor)


def dynamo_recompile_limit(limit: int):
    """Raise Dynamo's per-function recompile limit, and fail loudly past it.

    Failing loudly matters: past the limit Dynamo would silently run the
    function eagerly, where gradients of tensors the mods close over are lost.
    """
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


def recompile_limit_error() -> type[Exception]:
    """The exception Dynamo raises when ``fail_on_recompile_limit_hit`` trips."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return FailOnRecompileLimitHit


def dynamo_specialize_scalars():
    """Context manager: Python numbers Dynamo first meets in its body are constants.

    Dynamo wraps a closure cell or global lazily, when the traced code reads
    it; under ``dynamic=True`` (or after one change) a number would become a
    symbolic input. Inside a mod it must stay a constant of the kernel.
    """
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(specialize_int=True, specialize_float=True)


def dynamo_unsupported_error() -> type[Exception]:
    """The exception Dynamo raises for what it cannot trace (a graph break)."""
    from torch._dynamo.exc import Unsupported

    return Unsupported


def data_dependent_error() -> type[Exception]:
    """What tracing raises when Python needs the value of a symbolic number."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return GuardOnDataDependentSymNode


def dynamo_graph_break(gb_type: str, context: str, explanation: str, hints: list[str]):
    """Raise Dynamo's graph-break exception with our own wording.

    A graph break rather than a hard error: without ``fullgraph`` Dynamo then
    runs the call eagerly, and the eager path reports the same problem.
    """
    import inspect

    from torch._dynamo import exc

    if "gb_type" in inspect.signature(exc.unimplemented).parameters:
        exc.unimplemented(gb_type=gb_type, context=context, explanation=explanation, hints=hints)
    # Older spelling (torch < 2.10).
    exc.unimplemented_v2(gb_type=gb_type, context=context, explanation=explanation, hints=hints)


def is_tracing() -> bool:
    """True under Dynamo, export, or any make_fx/fake/functional tracing."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    from torch._C import _TorchDispatchModeKey as Key

    for key in (Key.PROXY, Key.FAKE, Key.FUNCTIONAL):
        if torch._C._get_dispatch_mode(key) is not None:
            return True
    return False


# --------------------------------------------------------------------------
# Triton interpreter mode (see docs/debugging.md)
# --------------------------------------------------------------------------

_INTERPRET_ENV = "FLEX_INDUCTOR_INTERPRET"


def interpret_requested() -> bool:
    """Whether the user asked for Triton's interpreter on CPU tensors."""
    return os.environ.get(_INTERPRET_ENV, "0") not in ("", "0", "false", "False")


def interpreter_active() -> bool:
    """True once Inductor runs Triton code for CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" and inductor_config().cpu_backend == "triton"


@functools.cache
def enable_triton_interpreter() -> None:
    """Run Inductor's Triton code for CPU tensors in Triton's interpreter.

    The recipe: ``TRITON_INTERPRET=1`` before triton is imported, Inductor's
    CPU backend set to Triton, and two torch helpers that ask the (absent)
    GPU driver for its target replaced by stand-ins with a fixed hash.
    """
    import sys

    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.language defines its helpers (tl.zeros...) as interpreted or
        # compiled functions when it is imported; too late to switch now.
        raise RuntimeError(
            "flex_inductor: Triton's interpreter must be chosen before triton.language is "
            "imported (importing flex_inductor or torch._inductor imports it). Set "
            "FLEX_INDUCTOR_INTERPRET=1 in the environment before starting Python, or call "
            "flex_inductor._compat.enable_triton_interpreter() before any other import."
        )
    os.environ["TRITON_INTERPRET"] = "1"

    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton

    inductor_config.cpu_backend = "triton"

    class _InterpreterBackend:
        """Stands in for the driver's compiler backend: only its hash is asked."""

        def hash(self) -> str:
            return "flex_inductor-triton-interpreter"

        def parse_options(self, options: dict) -> SimpleNamespace:
            return SimpleNamespace(extern_libs=None)

    _patch_interpreter_scalar_index()
    _patch_interpreter_libdevice()
    _patch_interpreter_bfloat16()
    _patch_interpreter_comparisons()
    backend = _InterpreterBackend()
    torch_triton.triton_backend = lambda: backend
    torch_triton.triton_hash_with_backend = lambda: hashlib.sha256(
        b"flex_inductor-triton-interpreter"
    ).hexdigest().upper()


def _patch_interpreter_scalar_index() -> None:
    """Let the interpreter use a loaded scalar as a loop bound under numpy >= 2.4.

    Triton's interpreter stores scalars as 1-element arrays and converts them
    with ``int(array)``, which numpy 2.4 refuses for arrays with ndim > 0. So
    ``for i in range(0, n)`` with a loaded ``n`` fails there, while the GPU
    compiler accepts it. ``.item()`` converts any 1-element array.
    """
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros((1,), dtype=np.int32))
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_interpreter_bfloat16() -> None:
    """Make bfloat16 arithmetic in Triton's interpreter match a GPU's.

    numpy has no bfloat16, so the interpreter keeps bfloat16 data as its raw
    uint16 bits. Two consequences, both fixed here:

    * ``tl.dot`` multiplied those integers (every bfloat16 result was
      garbage, ~1e10). A bfloat16 is the top half of a float32: shifting the
      bits up 16 gives the exact float32 value to multiply.
    * float32 -> bfloat16 casts truncated, where a GPU rounds to nearest
      even; outputs were up to one bfloat16 ulp off instead of half. Casts
      from other types went through ``astype(uint16)``, i.e. to integers.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flex_inductor_bfloat16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def to_float32(data):
        return (data.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def to_bfloat16_bits(data):
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit.
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        out = (rounded >> np.uint32(16)).astype(np.uint16)
        return np.where(np.isnan(data), np.uint16(0x7FC0), out)

    def as_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle(to_float32(handle.data), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_float32(a), as_float32(b), d, input_precision,
                            max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_type, dst = src.dtype.scalar, dst_type.scalar
        if src_type == tl.bfloat16 and dst != tl.bfloat16:
            return original_cast(self, as_float32(src), dst_type)
        if dst == tl.bfloat16 and src_type != tl.bfloat16:
            data = src.data.astype(np.float32)
            return interpreter.TensorHandle(to_bfloat16_bits(data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._flex_inductor_bfloat16 = True


def _patch_interpreter_comparisons() -> None:
    """Type the interpreter's comparison results as booleans.

    Its comparisons keep the left operand's dtype on a bool array, so a
    float comparison claims float32. Harmless while both sides are blocks,
    but broadcasting a scalar result (``maximum(scalar, tile)`` in Inductor's
    helpers does ``mask |= a != a``) makes float zeros of it, and the ``|``
    then fails: "ufunc 'bitwise_or' not supported for the input types".
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flex_inductor_comparisons", False):
        return
    for name in [n for n in dir(builder) if n.startswith(("create_icmp", "create_fcmp"))]:
        original = getattr(builder, name)

        def compare(self, lhs, rhs, _original=original):
            result = _original(self, lhs, rhs)
            return interpreter.TensorHandle(result.data.astype(np.bool_), tl.int1)

        setattr(builder, name, compare)
    builder._flex_inductor_comparisons = True


def _patch_interpreter_libdevice() -> None:
    """Give Triton's interpreter numpy versions of the libdevice math functions.

    Inductor emits ``libdevice.tanh(x)`` (softcap), ``libdevice.pow``,
    ``libdevice.log1p``... On a GPU the compiler swaps the stub module
    ``triton.language.extra.libdevice`` for the backend's library; the
    interpreter does not, and each stub returns None. A mod such as a tanh
    soft-cap must still run on CPU, so each function is mapped to the numpy
    function of the same maths, applied to the interpreter's arrays (with
    numpy broadcasting, and bool results for the ``is*`` predicates). Only
    functions with an exact numpy counterpart are provided; the rest keep
    failing loudly.
    """
    import math

    import numpy as np
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.interpreter import TensorHandle

    if getattr(libdevice, "_flex_inductor_numpy", False):
        return
    def vectorized(fn):
        return np.vectorize(fn, otypes=[np.float64])

    same_dtype = {
        "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "trunc": np.trunc,
        "rint": np.rint, "nearbyint": np.rint, "sqrt": np.sqrt, "exp": np.exp,
        "exp2": np.exp2, "expm1": np.expm1, "log": np.log, "log2": np.log2,
        "log10": np.log10, "log1p": np.log1p, "sin": np.sin, "cos": np.cos,
        "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
        "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh, "asinh": np.arcsinh,
        "acosh": np.arccosh, "atanh": np.arctanh, "erf": vectorized(math.erf),
        "erfc": vectorized(math.erfc), "lgamma": vectorized(math.lgamma),
        "rsqrt": lambda x: 1.0 / np.sqrt(x), "pow": np.power, "atan2": np.arctan2,
        "fmod": np.fmod, "hypot": np.hypot, "copysign": np.copysign,
        "nextafter": np.nextafter,
    }
    to_bool = {"isnan": np.isnan, "isinf": np.isinf, "signbit": np.signbit}

    def as_handle_data(arg):
        return arg.handle.data if isinstance(arg, tl.tensor) else np.asarray(arg)

    def wrap(np_fn, result_dtype=None):
        def fn(*args, _semantic=None, **_kwargs):
            first = next(a for a in args if isinstance(a, tl.tensor))
            with np.errstate(all="ignore"):
                data = np_fn(*(as_handle_data(a) for a in args))
            dtype = result_dtype or first.handle.dtype
            data = data.astype(np.bool_ if dtype == tl.int1 else first.handle.data.dtype)
            shapes = [a.shape for a in args if isinstance(a, tl.tensor) and a.type.is_block()]
            shape = list(np.broadcast_shapes(*(tuple(s) for s in shapes))) if shapes else []
            ty = tl.block_type(dtype, shape) if shape else dtype
            return tl.tensor(TensorHandle(data, dtype), ty)

        return fn

    for name, np_fn in same_dtype.items():
        setattr(libdevice, name, wrap(np_fn))
    for name, np_fn in to_bool.items():
        setattr(libdevice, name, wrap(np_fn, tl.int1))
    libdevice._flex_inductor_numpy = True


def inductor_config():
    """torch._inductor.config (private module)."""
    import torch._inductor.config as config

    return config


# --------------------------------------------------------------------------
# Inductor
# --------------------------------------------------------------------------


@functools.cache
def inductor_api() -> SimpleNamespace:
    """Inductor's generic lowering and template machinery."""
    from torch._inductor import ir
    from torch._inductor.lowering import (
        empty_strided,
        fallback_handler,
        lowerings,
        register_lowering,
    )
    from torch._inductor.select_algorithm import (
        SymbolicGridFn,
        TritonTemplate,
        autotune_select_algorithm,
        realize_inputs,
    )
    from torch._inductor.subgraph_lowering import PointwiseSubgraphLowering
    from torch._inductor.virtualized import V, ops

    return SimpleNamespace(
        ir=ir,
        V=V,
        ops=ops,
        empty_strided=empty_strided,
        fallback_handler=fallback_handler,
        lowerings=lowerings,
        register_lowering=register_lowering,
        TritonTemplate=TritonTemplate,
        SymbolicGridFn=SymbolicGridFn,
        autotune_select_algorithm=autotune_select_algorithm,
        realize_inputs=realize_inputs,
        PointwiseSubgraphLowering=PointwiseSubgraphLowering,
    )


@contextlib.contextmanager
def leaf_kernel():
    """Run a custom op's Python body as a leaf kernel, unseen by outer dispatch modes.

    AOT autograd runs a compiled graph's first call under a dispatch mode that
    checks custom ops for aliasing. The dense ops' bodies evaluate the mods
    with ``vmap``, and that mode breaks on batched tensors ("Cannot access
    storage of BatchedTensorImpl"): while a mode handles an op, the
    dispatcher excludes every key above Python, functorch's among them, so
    ``vmap`` inside the body finds its batching keys switched off. A C++
    kernel's inner work is invisible to such modes; this gives a Python body
    the same standing: no outer modes, functorch's keys back on (autograd
    and autocast keys stay as the caller left them).
    """
    from torch._C import DispatchKey
    from torch.utils._python_dispatch import _disable_current_modes

    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in (
        "FuncTorchDynamicLayerFrontMode",
        "FuncTorchDynamicLayerBackMode",
        "FuncTorchBatched",
        "FuncTorchVmapMode",
        "FuncTorchGradWrapper",
        "PythonTLSSnapshot",
        "Functionalize",
        "Conjugate",
        "Negative",
        "ZeroTensor",
        "PreDispatch",
    ):
        if hasattr(DispatchKey, name):
            exclude = exclude.remove(getattr(DispatchKey, name))
    with _disable_current_modes(), torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def size_hint(expr) -> int:
    """A concrete value of a (possibly symbolic) size, for autotuning inputs.

    torch 2.13 calls it ``optimization_hint``; torch 2.11 ``size_hint``.
    """
    sizevars = inductor_api().V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    return int(hint(expr))


def run_and_get_code(fn, *args, **kwargs):
    """Run ``fn``; return ``(result, sources)``: the code Inductor generated meanwhile."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args, **kwargs)


def subgraph_lowering_error() -> type[Exception]:
    """What Inductor raises when a mod is not pointwise (a reduction, a missing lowering)."""
    from torch._inductor.exc import SubgraphLoweringException

    return SubgraphLoweringException


def ordered_set(items=()):
    """Inductor's OrderedSet (private utility)."""
    from torch.utils._ordered_set import OrderedSet

    return OrderedSet(items)


def zeros_and_scatter_op():
    """The op that the joint graph uses for gradients of indexed captured tensors.

    ``TransformGetItemToIndex`` records ``buf[idx]`` as ``aten.index``, whose
    backward in the joint graph is this scatter into a zero tensor.
    """
    import torch._dynamo._trace_wrapped_higher_order_op  # noqa: F401  (registers the op)

    return torch.ops.flex_lib.zeros_and_scatter.default


def pytree_getattr_key(name: str) -> Any:
    """A pytree key path entry naming attribute ``name`` (for flatten_with_keys)."""
    import torch.utils._pytree as pytree

    return pytree.GetAttrKey(name)


@functools.cache
def _select_returns_choice_by_flag() -> bool:
    import inspect

    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    return "return_choice" in inspect.signature(AlgorithmSelectorCache.__call__).parameters


def select_algorithm(name, choices, input_nodes, layout, input_gen_fns=None, return_choice=False):
    """Autotune over ``choices``; returns the chosen IR node.

    torch 2.13 returns ``(node, choice)``. torch 2.11 returns the node alone,
    or ``(node, choice)`` with ``return_choice=True`` except when there is a
    single choice (then the node alone). With ``return_choice=True`` this
    returns ``(node, choice)`` on both; ``choice`` may be None on 2.11 when
    nothing was autotuned, in which case it is the only candidate.
    """
    api = inductor_api()
    kwargs = {"input_gen_fns": input_gen_fns}
    if _select_returns_choice_by_flag():
        kwargs["return_choice"] = True
    result = api.autotune_select_algorithm(name, choices, input_nodes, layout, **kwargs)
    node, choice = result if isinstance(result, tuple) else (result, None)
    if choice is None and len(choices) == 1:
        choice = choices[0]
    return (node, choice) if return_choice else node


@functools.cache
def _kernel_name_tag(name: str):
    """A never-called operator whose name Inductor copies into kernel names."""
    from torch._ops import HigherOrderOperator

    class _KernelNameTag(HigherOrderOperator):
        def __call__(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError(f"{name} only names kernels")

    return _KernelNameTag(name)


def tag_kernel_name(name: str) -> None:
    """Make the kernels generated for the node being lowered carry ``name``.

    Inductor names a kernel after the ``original_aten`` operator of the FX
    nodes it came from (``triton_tem_fused_<name>_0``), so that profiles and
    generated code show ``flex_inductor_fwd`` / ``_bwd`` / ``_decode``.
    """
    node = inductor_api().V.graph.current_node
    if node is not None:
        node.meta["original_aten"] = _kernel_name_tag(name)


# --------------------------------------------------------------------------
# Fast math (lowering/fast_math.py)
# --------------------------------------------------------------------------


@functools.cache
def fast_math_api() -> SimpleNamespace:
    """What the lowering of ``flex_inductor::tanh_approx`` needs from Inductor.

    ``make_pointwise(fn)`` wraps ``fn`` (a function of ``ops`` values) into a
    pointwise lowering; only its first argument is passed, which has the same
    meaning on torch 2.11 and 2.13. ``exact_tanh`` is Inductor's own lowering
    of ``aten.tanh``.
    """
    from torch._inductor.lowering import lowerings, make_pointwise

    return SimpleNamespace(
        make_pointwise=make_pointwise,
        exact_tanh=lowerings[torch.ops.aten.tanh.default],
    )


def current_fx_node():
    """The FX node Inductor is lowering now (the root graph's, inside a mod), or None."""
    return getattr(inductor_api().V.graph, "current_node", None)


# --------------------------------------------------------------------------
# Template inputs without needless copies (lowering/common.py)
# --------------------------------------------------------------------------


def realize_input(node):
    """``node`` as a realized buffer or a strided view of one (Inductor's ``realize_input``).

    Unlike ``realize_inputs`` it never copies a view for its strides;
    :func:`require_stride1` does that afterwards where needed.
    """
    return inductor_api().ir.ExternKernel.realize_input(node)


def require_stride1(node):
    """``node`` itself if some dimension has stride 1, else a contiguous copy."""
    return inductor_api().ir.ExternKernel.require_stride1(node)


def copy_input(node):
    """A realized contiguous copy of ``node`` on its own device (``ExternKernel.copy_input``)."""
    return inductor_api().ir.ExternKernel.copy_input(node)


def pointwise_copy(node, device, size):
    """A realized buffer of ``size`` on ``device``, every element ``node``'s one value.

    Args:
        node: A 0-d IR node; a GPU kernel may read a 0-d CPU buffer (by value).
        device: The device of the new buffer.
        size: Its sizes.
    """
    ir = inductor_api().ir
    load = node.make_loader()
    copy = ir.Pointwise.create(
        device=device, dtype=node.get_dtype(), inner_fn=lambda index: load(()), ranges=size
    )
    copy.realize()
    return copy


def required_storage_length(sizes, strides, offset: int) -> int:
    """Elements a storage needs to hold a strided view (``torch._prims_common``)."""
    from torch._prims_common import compute_required_storage_length

    return int(compute_required_storage_length(sizes, strides, offset))


def statically_known_equals(left, right) -> bool:
    """Whether two (possibly symbolic) sizes are equal for every value of their symbols."""
    return bool(inductor_api().V.graph.sizevars.statically_known_equals(left, right))
