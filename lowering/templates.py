"""The TritonTemplate objects, built once from the files in ``templates/``."""

from __future__ import annotations

import functools
from importlib import resources

from flex_inductor import _compat

_ind = _compat.inductor_api()


def template_source(filename: str) -> str:
    """The text of one template file shipped in ``flex_inductor.templates``."""
    return resources.files("flex_inductor.templates").joinpath(filename).read_text()


def _forward_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    # One program per BLOCK_M query rows of one (batch, query head).
    return (cdiv(q_len, meta["BLOCK_M"]), batch, q_heads)


@functools.cache
def forward_template():
    """The forward template; its kernels are named ``triton_flex_inductor_fwd*``."""
    return _ind.TritonTemplate(
        name="flex_inductor_fwd",
        grid=_ind.SymbolicGridFn(_forward_grid),
        source=template_source("flex_forward.py.jinja"),
    )
