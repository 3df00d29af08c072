"""flex_inductor: FlexAttention as a torch.compile plugin.

Write an attention variant as ``score_mod(score, b, h, q_idx, kv_idx)`` and
``mask_mod(b, h, q_idx, kv_idx)``; get fused, block-sparse, autotuned Triton
kernels. The API mirrors PyTorch's own FlexAttention API, so switching
is one import line::

    from flex_inductor import flex_attention, create_block_mask

Set ``FLEX_INDUCTOR_INTERPRET=1`` before importing flex_inductor to run the
generated Triton kernels in Triton's interpreter on CPU tensors (Triton picks
the interpreter when it is first imported, so there is no switch after import).
"""

from __future__ import annotations

from . import _compat

if _compat.interpret_requested():
    # Before anything imports triton's runtime: the interpreter is chosen
    # when kernels are first built.
    _compat.enable_triton_interpreter()

from . import masks, mods  # noqa: E402
from ._dynamo_variable import register as _register_dynamo_variable  # noqa: E402
from .api import flex_attention  # noqa: E402
from .block_mask import BlockMask, create_block_mask, create_mask  # noqa: E402
from .combinators import and_masks, noop_mask, or_masks  # noqa: E402
from .paged import PagedKVCache  # noqa: E402
from .reference import flex_attention_reference  # noqa: E402

_register_dynamo_variable()


__all__ = [
    "BlockMask",
    "PagedKVCache",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "flex_attention_reference",
    "masks",
    "mods",
    "noop_mask",
    "or_masks",
]
