"""Gradients of captured tensors: the joint graph's scatter, as atomic adds.

In the joint graph of ``score_mod``, the gradient of ``buf[i, j]`` is
``zeros_and_scatter(buf.shape, [i, j], grad)``. Inside a backward template,
every (q, kv) position adds its contribution at ``buf[i, j]``: lowered here as
a 0-d ``Scatter`` that atomically adds into a zero-filled float32 buffer.
"""

from __future__ import annotations

import contextlib

import torch

from flex_inductor import _compat

_ind = _compat.inductor_api()


class UnsupportedScatter(Exception):
    """A captured-tensor gradient the templates cannot scatter (use the dense backward)."""


# Zero-filled gradient buffers created while the joint graph is lowered; the
# backward lowering passes them to the template as mutated inputs.
_created: list | None = None


@contextlib.contextmanager
def collect_gradient_buffers():
    """Collect the gradient buffers that scatters lowered in this block write."""
    global _created
    outer, _created = _created, []
    try:
        yield _created
    finally:
        _created = outer


def zeros_and_scatter_lowering(shape, indices, values):
    """``zeros(shape).index_put_(indices, values, accumulate=True)`` for 0-d values."""
    ir = _ind.ir
    ops = _ind.ops

    if len(indices) != len(shape) or any(i is None for i in indices):
        raise UnsupportedScatter("a captured tensor indexed with fewer indices than dims")
    if any(len(i.get_size()) != 0 for i in indices) or len(values.get_size()) != 0:
        raise UnsupportedScatter("a captured tensor indexed with non-scalar indices")
    device = values.get_device()
    grad = _ind.lowerings[torch.ops.aten.full.default](
        list(shape), 0.0, dtype=torch.float32, device=device
    )
    grad.realize()
    if _created is not None:
        _created.append(grad)
    index_loaders = [i.make_loader() for i in indices]
    value_loader = values.make_loader()

    def output_indexer(_index):
        # One index expression per dim of the gradient buffer; the template
        # turns them into an offset with the buffer's strides.
        return [
            ops.indirect_indexing(loader(()), size, check=False)
            for loader, size in zip(index_loaders, shape, strict=True)
        ]

    def inner_fn(_index):
        return ops.to_dtype(value_loader(()), torch.float32)

    scatter = ir.Scatter(
        device=device,
        dtype=torch.float32,
        inner_fn=inner_fn,
        ranges=[],
        output_indexer=output_indexer,
        scatter_mode="atomic_add",
    )
    return ir.ComputedBuffer(
        name=grad.data.data.name,
        layout=ir.MutationLayoutSHOULDREMOVE(grad),
        data=scatter,
    )
