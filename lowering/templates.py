"""The TritonTemplate objects, built once from the files in ``templates/``."""

from __future__ import annotations

import functools
from importlib import resources

from flex_inductor import _compat

_ind = _compat.inductor_api()


def template_source(filename: str) -> str:
    """The text of one template file shipped in ``flex_inductor.templates``."""
    return resources.files("flex_inductor.templates").joinpath(filename).read_text()


def _forward_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv, min):
    # One program per BLOCK_M query rows of one (batch, query head), or
    # under PERSISTENT a fixed number of programs that loop over those tiles
    # (no more than there are tiles). ``min`` is sympy's Min for symbolic
    # sizes: SymbolicGridFn passes it by name.
    tiles = cdiv(q_len, meta["BLOCK_M"])
    if meta.get("PERSISTENT"):
        return (min(tiles * batch * q_heads, meta["NUM_PROGRAMS"]), 1, 1)
    return (tiles, batch, q_heads)


@functools.cache
def forward_template():
    """The forward template; its kernels are named ``triton_flex_inductor_fwd*``."""
    return _ind.TritonTemplate(
        name="flex_inductor_fwd",
        grid=_ind.SymbolicGridFn(_forward_grid),
        source=template_source("flex_forward.py.jinja"),
    )


def _dkdv_grid(batch, kv_heads, kv_len, head_dim, meta, *, cdiv):
    # One program per BLOCK_N1 kv rows of one (batch, kv head).
    return (cdiv(kv_len, meta["BLOCK_N1"]), batch, kv_heads)


def _dq_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    # One program per BLOCK_M2 query rows of one (batch, query head).
    return (cdiv(q_len, meta["BLOCK_M2"]), batch, q_heads)


@functools.cache
def backward_dkdv_template():
    """The dK/dV backward template (kernels named ``*flex_inductor_bwd*``)."""
    return _ind.TritonTemplate(
        name="flex_inductor_bwd_dkdv",
        grid=_ind.SymbolicGridFn(_dkdv_grid),
        source=template_source("flex_backward_dkdv.py.jinja"),
    )


@functools.cache
def backward_dq_template():
    """The dQ backward template (kernels named ``*flex_inductor_bwd*``)."""
    return _ind.TritonTemplate(
        name="flex_inductor_bwd_dq",
        grid=_ind.SymbolicGridFn(_dq_grid),
        source=template_source("flex_backward_dq.py.jinja"),
    )


def _decode_grid(splits, batch, heads, meta):
    # One program per (kv slice, batch, kv head or query head).
    return (splits, batch, heads)


@functools.cache
def decode_template():
    """The split-KV decode template (kernels named ``*flex_inductor_decode*``)."""
    return _ind.TritonTemplate(
        name="flex_inductor_decode",
        grid=_decode_grid,
        source=template_source("flex_decode.py.jinja"),
    )
