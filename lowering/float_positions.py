"""Position arithmetic in float32 where that is exact.

ALiBi's ``score + slopes[h] * (kv_idx - q_idx)`` subtracts two integer
positions and uses the difference in float math. Inlined in a template,
``q_idx`` is a column of BLOCK_M positions and ``kv_idx`` a row of BLOCK_N, so
the difference is a whole (BLOCK_M, BLOCK_N) integer tile, converted to float
score by score: an integer subtract and an integer-to-float conversion per
score, where a float32 subtract would do. Measured on the H100 (ALiBi, D64):
2-3% faster forward and forward+backward in one run each, within the
run-to-run spread (benchmarks/NOTES.md entry 12).

Converting the positions first (BLOCK_M + BLOCK_N conversions) and doing the
arithmetic in float32 gives the same values as long as every intermediate
integer has magnitude below 2**24, which float32 holds exactly, and no
operation can turn a zero into -0.0 (so negation is left out). This pass
proves the bound from the sequence lengths (interval arithmetic over the
expression) and otherwise leaves the graph alone.
"""

from __future__ import annotations

import copy

import torch

aten = torch.ops.aten
prims = torch.ops.prims

# float32 represents every integer of magnitude up to 2**24 exactly.
EXACT_LIMIT = 2**24
_COMBINE = (aten.add.Tensor, aten.sub.Tensor)
# Not neg: the float negation of a zero difference is -0.0, where the
# integer path gives +0.0, and a consumer such as ``score / x`` tells them
# apart (-inf against +inf). Adds, subtracts and abs of +0.0-or-nonzero
# operands never produce -0.0 in round-to-nearest.
_UNARY = (aten.abs.default,)
_FLOAT_MATH = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)


def float_position_arithmetic(
    graph_module: torch.fx.GraphModule, q_arg: int, kv_arg: int, q_len, kv_len
) -> torch.fx.GraphModule:
    """A copy of a mod graph whose position arithmetic feeding float32 math is in float32.

    Args:
        graph_module: A score_mod graph (placeholders in call order).
        q_arg: Position of ``q_idx`` among the placeholders.
        kv_arg: Position of ``kv_idx`` among the placeholders.
        q_len: Largest q_idx plus one (an int), or None when unknown.
        kv_len: Largest kv_idx plus one (an int), or None when unknown.

    Returns:
        The rewritten copy, or ``graph_module`` itself when nothing qualifies.
    """
    if q_len is None or kv_len is None:
        return graph_module
    # Analyse the original first: most mods read no positions, or none in
    # float math, and need no copy (a deep copy also copies the fake values).
    if not _rewrites(graph_module, q_arg, kv_arg, q_len, kv_len)[1]:
        return graph_module
    gm = torch.fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    bounds, rewrites = _rewrites(gm, q_arg, kv_arg, q_len, kv_len)
    floats = {}
    for node, users in rewrites:
        with gm.graph.inserting_before(node):
            as_float = _float_copy(gm.graph, node, bounds, floats)
        for user in users:
            user.replace_input_with(node, as_float)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _rewrites(graph_module, q_arg, kv_arg, q_len, kv_len):
    """Bounds of the position expressions, and those to rewrite with their float users.

    Returns:
        ``(bounds, [(node, users), ...])``: ``bounds`` maps each integer position
        expression to (lowest, highest, largest magnitude on the way, leaves used).
    """
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    leaves = {placeholders[q_arg]: q_len - 1, placeholders[kv_arg]: kv_len - 1}
    bounds = {leaf: (0, top, top, {leaf}) for leaf, top in leaves.items()}
    rewrites = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        found = _interval(node, bounds)
        if found is None:
            continue
        bounds[node] = found
        *_, magnitude, used = found
        # Only a tile of both positions is worth it: one position alone is a
        # row or a column, converted cheaply as it is.
        if len(used) < 2 or magnitude >= EXACT_LIMIT:
            continue
        users = [u for u in node.users if _takes_into_float32(u, node)]
        if users:
            rewrites.append((node, users))
    return bounds, rewrites


def _interval(node, bounds):
    """Bounds of an integer position expression, or None if ``node`` is not one."""
    if node.kwargs or not _is_integer(node):
        return None
    if node.target in _COMBINE and len(node.args) == 2:
        parts = []
        for arg in node.args:
            if arg in bounds:
                parts.append(bounds[arg])
            elif isinstance(arg, int) and not isinstance(arg, bool):
                parts.append((arg, arg, abs(arg), set()))
            else:
                return None
        (a_lo, a_hi, a_mag, a_used), (b_lo, b_hi, b_mag, b_used) = parts
        if not a_used | b_used:
            return None
        if node.target == aten.add.Tensor:
            lo, hi = a_lo + b_lo, a_hi + b_hi
        else:
            lo, hi = a_lo - b_hi, a_hi - b_lo
        return lo, hi, max(a_mag, b_mag, abs(lo), abs(hi)), a_used | b_used
    if node.target in _UNARY and len(node.args) == 1 and node.args[0] in bounds:
        lo, hi, mag, used = bounds[node.args[0]]
        low = 0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
        return low, max(abs(lo), abs(hi)), mag, used
    return None


def _takes_into_float32(user, node) -> bool:
    """Whether ``user`` promotes ``node`` to float32 (so a float32 input gives the same)."""
    if user.op != "call_function" or user.target not in _FLOAT_MATH or user.kwargs:
        return False
    if _dtype(user) != torch.float32:
        return False
    # A float32 result means the other operand is a float32 tensor or a
    # Python number (a bfloat16 tensor would make a bfloat16 result), so the
    # integer operand was promoted to float32 on its own; a float32 operand
    # in its place gives the same value.
    return True


def _float_copy(graph, node, bounds, floats):
    """The float32 version of an integer position expression (memoised in ``floats``)."""
    if node in floats:
        return floats[node]
    if node.op == "placeholder":
        result = graph.call_function(prims.convert_element_type.default, (node, torch.float32))
    else:
        args = tuple(
            _float_copy(graph, a, bounds, floats) if a in bounds else float(a) for a in node.args
        )
        result = graph.call_function(node.target, args)
    floats[node] = result
    return result


def _dtype(node):
    value = node.meta.get("val")
    return getattr(value, "dtype", None)


def _is_integer(node) -> bool:
    dtype = _dtype(node)
    return dtype is not None and not dtype.is_floating_point and dtype != torch.bool
