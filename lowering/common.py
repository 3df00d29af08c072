"""Pieces shared by the forward, backward and decode lowerings."""

from __future__ import annotations

import functools
import logging
import operator

import sympy
import torch

from flex_inductor import _compat
from flex_inductor._subgraphs import INDEX_DTYPE, SCORE_DTYPE
from flex_inductor.block_mask import NO_PARTIAL_BLOCKS_KEY

from .float_positions import EXACT_LIMIT, float_position_arithmetic
from .subgraph import lower_mod

_ind = _compat.inductor_api()
log = logging.getLogger("flex_inductor")

# Dtypes the Triton templates compute with (tl.dot has no float64 on GPUs).
TEMPLATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")


def interpret_mode() -> bool:
    """True when Inductor's Triton code runs in Triton's interpreter on CPU."""
    return _compat.interpreter_active()


def device_can_use_templates(query) -> bool:
    """Whether ``query``'s device and dtype can run our Triton templates."""
    device = query.get_device()
    if query.get_dtype() not in TEMPLATE_DTYPES:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def fixed_inputs(*nodes):
    """Realize IR inputs so that templates can read their strides.

    Symbolic scalars (a mod that closes over a tensor's size, or a Python
    float that Dynamo made dynamic) are sympy expressions, not buffers: they
    pass through unchanged, and the template receives them as kernel args.
    """
    return [n if n is None or is_symbolic_scalar(n) else _realize(n) for n in nodes]


def fixed_mod_buffers(buffers, device):
    """The tensors a mod captures, realized for the template that inlines the mod.

    As :func:`fixed_inputs`, except that a 0-d CPU tensor becomes a
    one-element buffer on ``device``, viewed as 0-d. Inductor passes a 0-d
    CPU buffer to a Triton kernel by value (a graph input always, another
    buffer when a GPU kernel reads it), but a template's ``modification``
    loads every captured tensor through a pointer (``tl.load(ptr + 0)``).

    Args:
        buffers: The mod's captured tensors (IR nodes) and symbolic scalars.
        device: The device of the kernel that inlines the mod.

    Returns:
        One IR node (or symbolic scalar, passed through) per buffer.
    """
    return [_scalar_in_memory(n, device) for n in fixed_inputs(*buffers)]


def _scalar_in_memory(node, device):
    """``node``, or for a 0-d CPU tensor a copy on ``device`` read through a pointer."""
    if node is None or is_symbolic_scalar(node):
        return node
    if len(node.get_size()) != 0 or node.get_device().type != "cpu":
        return node
    ir = _ind.ir
    if isinstance(node, ir.BaseView):
        # A 0-d view into a larger CPU tensor is passed as a pointer, which a
        # GPU kernel cannot read: first a 0-d buffer of its own, which the copy
        # below then reads by value, as Inductor's own pointwise ops do.
        node = _compat.copy_input(node)
    # A 1-element buffer is never passed by value (only 0-d ones are); the mod
    # was traced on a 0-d tensor, so it reads the copy through a 0-d view.
    copy = _compat.pointwise_copy(node, device, [1])
    layout = ir.FixedLayout(device, node.get_dtype(), [], [])
    return ir.ReinterpretView(data=copy.data, layout=layout)


def _realize(node):
    """``node`` realized with strides a template can read, copied only when needed.

    Inductor's ``realize_inputs`` copies every input without a unit stride.
    A broadcast of one element has none: the all-full BlockMask of a call
    without ``block_mask`` holds ``counts[:1].expand(1, 1, nq)``, as a view in
    a compiled graph or as an input of an eager call's graph. Templates read
    every input through its strides, as well from that as from a copy, so it
    is passed as it is: one kernel fewer to compile, and to launch on every
    call, per such tensor.
    """
    realized = _compat.realize_input(node)
    broadcast = _broadcast_input(realized)
    return broadcast if broadcast is not None else _compat.require_stride1(realized)


def _broadcast_input(node):
    """``node`` if it reads one element (every dim of size 1 or stride 0), else None.

    A view gets, on its dims of size 1, the strides a contiguous copy would
    have (they are never used, and the kernel text stays that of the copy);
    broadcast dims keep stride 0. A buffer with such a fixed layout (an
    input of the graph) is returned as it is.
    """
    ir = _ind.ir
    is_view = isinstance(node, ir.ReinterpretView)
    if not is_view and not isinstance(node, (ir.TensorBox, ir.StorageBox)):
        return None
    try:
        layout = node.get_layout()
    except NotImplementedError:  # not a buffer
        return None
    if not isinstance(layout, ir.FixedLayout):
        return None
    sizes, strides = list(layout.size), list(layout.stride)
    if any(_compat.statically_known_equals(s, 1) for s in strides):
        return None  # a unit stride: realize_inputs keeps it as it is
    size_one = [_compat.statically_known_equals(size, 1) for size in sizes]
    zero = [_compat.statically_known_equals(stride, 0) for stride in strides]
    if not all(one or z for one, z in zip(size_one, zero, strict=True)):
        return None
    if not is_view:
        return node
    contiguous = ir.FlexibleLayout.contiguous_strides(sizes)
    kept = [c if one else 0 for one, c in zip(size_one, contiguous, strict=True)]
    return ir.ReinterpretView(
        data=node.data,
        layout=ir.FixedLayout(layout.device, layout.dtype, sizes, kept, offset=layout.offset),
    )


def is_symbolic_scalar(node) -> bool:
    """True for a lifted SymInt/SymFloat input (a sympy expression or a number)."""
    return isinstance(node, (sympy.Expr, int, float))


def lower_score_mod(subgraph, buffers, device, lengths=None):
    """IR of ``score_mod`` with placeholders ``score, b, h, q_idx, kv_idx``.

    With ``lengths`` (the query and kv lengths; a template whose q_idx and
    kv_idx stay below them), integer position arithmetic that feeds float
    math is done in float32 where that is exact (see ``float_positions``).
    """
    names = [("score", SCORE_DTYPE), *[(n, INDEX_DTYPE) for n in _INDEX_NAMES]]
    graph_module = subgraph.graph_module
    if lengths is not None:
        q_len, kv_len = (_position_bound(n) for n in lengths)
        graph_module = float_position_arithmetic(graph_module, 3, 4, q_len, kv_len)
    return lower_mod(graph_module, names, buffers, device)


def _position_bound(length) -> int | None:
    """A length as an int, or a power-of-two bound for a dynamic one, or None."""
    if isinstance(length, int):
        return length
    if isinstance(length, sympy.Integer):
        return int(length)
    bound = EXACT_LIMIT // 2
    if _ind.V.graph.sizevars.statically_known_leq(length, bound):
        return bound
    return None


def lower_mask_mod(subgraph, buffers, device):
    """IR of ``mask_mod`` with placeholders ``b, h, q_idx, kv_idx``."""
    names = [(n, INDEX_DTYPE) for n in _INDEX_NAMES]
    return lower_mod(subgraph.graph_module, names, buffers, device)


def rounded_head_dim(head_dim) -> int:
    """Head dims are padded to a power of two, at least 16 (tl.dot's minimum)."""
    head_dim = int(_ind.V.graph.sizevars.guard_int(head_dim))
    return max(16, 1 << (head_dim - 1).bit_length())


def float32_precision() -> str:
    """tl.dot precision for float32 inputs, following torch's matmul setting."""
    return "'ieee'" if torch.get_float32_matmul_precision() == "highest" else "'tf32'"


def sizes_are_static_multiple(size, block: int) -> bool:
    """True when ``size`` is known to be a multiple of ``block`` at compile time."""
    return bool(_ind.V.graph.sizevars.statically_known_multiple_of(size, block))


def has_partial_blocks(options: dict, has_full: bool) -> bool:
    """Whether the templates need their partial-block loop.

    Not for calls without a BlockMask (the dispatch marks their all-full mask
    in ``options``): it lists every block as full, so the loop would never
    run, and leaving it out halves the kernel code to compile.
    """
    return not (has_full and options.get(NO_PARTIAL_BLOCKS_KEY, False))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 2 off the GPU (Triton's interpreter).

    Two keeps the interpreter's grids small while tests still see more work
    than programs: decode splits to merge, persistent programs with several
    tiles each.
    """
    if device.type != "cuda":
        return 2
    return _sm_count_cached(device.index or 0)


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def use_tma(options: dict, default: bool, device, *nodes) -> bool:
    """Whether a kernel loads its looped-over tiles through TMA tensor descriptors.

    ``kernel_options["USE_TMA"]`` asks for it (or refuses it); else ``default``
    (the kernel's config table) decides. TMA needs Hopper or later (or Triton's interpreter,
    which emulates descriptors) and 16-byte aligned ``nodes``: without them
    the kernel uses plain loads, with a debug log if TMA was asked for.
    """
    wanted = options.get("USE_TMA")
    wanted = default if wanted is None else bool(wanted)
    if not wanted:
        return False
    if device.type == "cuda":
        capable = torch.cuda.get_device_capability(device)[0] >= 9
    else:
        capable = interpret_mode()
    if capable and tma_compatible(*nodes):
        return True
    log.debug("flex_inductor: USE_TMA needs sm90+ and 16-byte aligned inputs; not used")
    return False


def tma_compatible(*nodes) -> bool:
    """Whether Hopper's TMA can copy tiles of these (B, H, S, D) inputs.

    A tensor descriptor needs the base address and every stride but the
    last (which must be 1) to be multiples of 16 bytes. Strides and offsets
    that are not static are taken as unknown, hence incompatible.
    """
    for node in nodes:
        itemsize = node.get_dtype().itemsize
        *outer, last = node.get_stride()
        if not _compat.statically_known_equals(last, 1):
            return False
        offset = node.get_layout().offset
        for value in (*outer, offset):
            if not sizes_are_static_multiple(value * itemsize, 16):
                return False
    return True


def block_mask_input_gen_fns(input_nodes, first_index: int, kv_len, kv_block: int) -> dict:
    """Autotuning inputs for the four BlockMask tensors at ``first_index`` of ``input_nodes``.

    Random index data would index far outside K and V; benchmark instead with
    a mask whose every row visits every kv block. The autotuner keeps one
    example per buffer name and passes that buffer. Two cases share a name:
    one tensor in two roles of the same kind (the backward reads the saved
    index rows as partial and as full rows), which gets the one example of
    that kind; and views with different roles of one buffer, which only the
    flat all-full mask of a call without ``block_mask`` makes (in the
    forward). Its buffer holds ``counts[c] == c`` (partial counts read entry
    0, full counts entry ``n_kv``, index rows entries ``0..n_kv-1``), and is
    rebuilt as it is; separate examples for its views would all read entry 0
    as their counts and time empty loops.
    """
    roles = dict(
        zip(range(first_index, first_index + 4), ("num", "idx", "num", "idx"), strict=True)
    )
    nodes = {i: input_nodes[i] for i in roles}
    n_kv = -(-_compat.size_hint(kv_len) // kv_block)

    def contents(node, role):
        sizes = [_compat.size_hint(s) for s in node.get_size()]
        # The node's dtype: the BlockMask's index_dtype, int32 or int16.
        dtype = node.get_dtype()
        if role == "num":
            return torch.full(sizes, n_kv, dtype=dtype, device=node.get_device())
        row = torch.arange(sizes[-1], dtype=dtype, device=node.get_device())
        return row.expand(sizes).contiguous()

    def counts(node):
        # Only the flat all-full mask shares a buffer between roles, and it
        # is always int32 (an int16 arange would wrap past 32767).
        numel = max(_compat.required_storage_length(*_hinted_layout(n)) for n in nodes.values())
        return torch.arange(numel, dtype=node.get_dtype(), device=node.get_device())

    fns = {}
    for i, role in roles.items():
        sharing = {roles[j] for j in roles if nodes[j].get_name() == nodes[i].get_name()}
        fns[i] = counts if len(sharing) > 1 else (lambda node, role=role: contents(node, role))
    return fns


def _hinted_layout(node) -> tuple[list[int], list[int], int]:
    """(sizes, strides, storage offset) of an IR node, with symbols at their hints."""
    return (
        [_compat.size_hint(s) for s in node.get_size()],
        [_compat.size_hint(s) for s in node.get_stride()],
        _compat.size_hint(node.get_layout().offset),
    )


def static_int(size) -> int:
    """A size the kernel needs as a constexpr (head dims): specialised and guarded."""
    return int(_ind.V.graph.sizevars.guard_int(size))


def static_float(value) -> float:
    """A scalar kernel constant (the softmax scale) as a Python float.

    With dynamic shapes the default scale ``1/sqrt(E)`` arrives as a sympy
    expression in the head dim; once the head dim is specialised (see
    :func:`static_int`) it simplifies to a number.
    """
    if isinstance(value, (int, float)):
        return float(value)
    simplified = _ind.V.graph.sizevars.simplify(value)
    if not simplified.free_symbols:
        return float(simplified)
    raise NotImplementedError(
        f"flex_inductor: the scale must be a compile-time constant, got {value}; "
        "pass scale= as a Python float"
    )


def describe_config(config) -> str:
    """``BLOCK_M=.. BLOCK_N=.. num_warps=.. num_stages=..`` for logs."""
    if config is None:
        return "an unknown config"
    return (
        f"BLOCK_M={config.BLOCK_M} BLOCK_N={config.BLOCK_N} "
        f"num_warps={config.num_warps} num_stages={config.num_stages}"
    )


def declare_subgraph_symbols(out, subgraph_inputs, subgraph_outputs) -> None:
    """Tell the scheduler which symbols the inlined mods of a template use.

    A mod may read a symbolic size or an unbacked scalar (``.item()`` of a
    dynamic float) that no input buffer's layout mentions; Inductor's
    ``TritonTemplateBuffer`` collects them from these two attributes so that
    their definitions are emitted before the kernel call.
    """
    node = out.data.data if hasattr(out, "data") and hasattr(out.data, "data") else out
    if hasattr(node, "subgraph_inps"):
        node.subgraph_inps = list(subgraph_inputs)
        node.subgraph_outs = [o for o in subgraph_outputs if not isinstance(o, (list, tuple))]


def output_is_used(index: int) -> bool:
    """Whether output ``index`` of the op being lowered is read by anything.

    Conservative: True unless every user of the op node is a ``getitem`` and
    none of those reading ``index`` has a user (a graph output counts).
    """
    node = _ind.V.graph.current_node
    if node is None:
        return True
    for user in node.users:
        if user.target is not operator.getitem:
            return True
        if user.args[1] == index and user.users:
            return True
    return False


def is_identity_score_mod(subgraph) -> bool:
    """True when ``score_mod`` returns its ``score`` argument unchanged.

    Templates then skip the mod and fold the softmax scale into the single
    exp2 factor: one multiply-add per score instead of three operations.
    """
    inputs = placeholders(subgraph)
    outputs = [n for n in subgraph.graph_module.graph.nodes if n.op == "output"]
    if not inputs or len(outputs) != 1:
        return False
    result = outputs[0].args[0]
    if isinstance(result, (tuple, list)):
        if len(result) != 1:
            return False
        result = result[0]
    return result is inputs[0]


def placeholders(subgraph) -> list:
    """The subgraph's inputs, in order."""
    return [n for n in subgraph.graph_module.graph.nodes if n.op == "placeholder"]


def exp2_factor(scale: float, fold_scale: bool) -> float:
    """The factor taking a raw (or already scaled) score to the log2 domain."""
    log2e = 1.4426950408889634
    return log2e * scale if fold_scale else log2e


def lower_mods_or_warn(
    kernel: str, score_mod, mask_mod, score_buffers, mask_buffers, device, lengths=None
):
    """Both mods lowered for inlining, or None (with a warning) if one cannot be.

    A mod that is not pointwise (``table[q_idx].sum()`` reduces) cannot be
    inlined into a kernel; the caller then runs the blockwise dense kernel,
    correct and memory-bounded, only slower.
    """
    try:
        return (
            lower_score_mod(score_mod, score_buffers, device, lengths),
            lower_mask_mod(mask_mod, mask_buffers, device),
        )
    except _compat.subgraph_lowering_error() as error:
        log.warning(
            "%s: a mod cannot be inlined into the Triton kernel (%s); "
            "using the blockwise dense kernel",
            kernel, str(error).splitlines()[0],
        )
        return None


def chosen_config(choice, choices, configs_of_choices):
    """The config of the choice the autotuner picked (None if unknown)."""
    for candidate, config in zip(choices, configs_of_choices, strict=False):
        if candidate is choice:
            return config
    return None
