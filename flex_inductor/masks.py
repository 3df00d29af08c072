"""The mask_mod library: one small named factory per attention pattern.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx`` may
attend to key ``kv_idx`` in batch ``b`` and head ``h``. Every factory returns a
plain function with a readable ``__name__`` (``sliding_window(1024)`` is
``sliding_window_1024``), so test ids, logs and benchmark rows read well.

The functions are written with torch ops on 0-d tensors, because Dynamo later
traces them into Triton kernels: no Python control flow on tensor values, no
``.item()``; only comparisons, integer arithmetic, ``torch.where`` and indexing
of captured tensors with the index tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flex_inductor.combinators import and_masks, noop_mask, or_masks

__all__ = [
    "and_masks",
    "causal",
    "dilated_sliding_window",
    "document",
    "neighborhood_2d",
    "noop_mask",
    "or_masks",
    "prefix_lm",
    "sliding_window",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _named(fn: MaskMod, name: str) -> MaskMod:
    # Every factory returns the same inner function object kind; naming it
    # after its parameters makes each variant identifiable in ids and logs.
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def causal() -> MaskMod:
    """Causal (autoregressive) mask: ``q_idx >= kv_idx``.

    Source: the decoder of "Attention Is All You Need" (Vaswani et al., 2017).

    Returns:
        A mask_mod named ``causal``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return _named(mask_mod, "causal")


def sliding_window(window: int, causal: bool = True) -> MaskMod:
    """Sliding-window (local) attention over the last ``window`` positions.

    Causal: ``0 <= q_idx - kv_idx <= window``. Bidirectional
    (``causal=False``): ``|q_idx - kv_idx| <= window``. Source: Longformer
    (Beltagy et al., 2020) and Mistral 7B; attention-gym ``masks/sliding_window.py``.

    Args:
        window: Largest distance ``|q_idx - kv_idx|`` still attended, ``>= 0``.
        causal: Also forbid attending to later positions.

    Returns:
        A mask_mod named ``sliding_window_<window>`` (causal) or
        ``sliding_window_bidirectional_<window>``.
    """
    window = _non_negative_int(window, "window")

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            distance = q_idx - kv_idx
            return (distance >= 0) & (distance <= window)

        return _named(mask_mod, f"sliding_window_{window}")

    def mask_mod(b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= window

    return _named(mask_mod, f"sliding_window_bidirectional_{window}")


def prefix_lm(prefix_length: int) -> MaskMod:
    """Prefix-LM mask: the first ``prefix_length`` keys are visible to every query.

    Formula: ``kv_idx < prefix_length or q_idx >= kv_idx`` (bidirectional over
    the prefix, causal after it). Source: T5 / UniLM "prefix LM"
    (Raffel et al., 2020); attention-gym ``masks/prefix_lm.py``.

    Args:
        prefix_length: Number of leading positions visible to all queries.

    Returns:
        A mask_mod named ``prefix_lm_<prefix_length>``.
    """
    prefix_length = _non_negative_int(prefix_length, "prefix_length")

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return _named(mask_mod, f"prefix_lm_{prefix_length}")


def document(
    lengths: Sequence[int] | torch.Tensor | None = None,
    offsets: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
    causal: bool = False,
) -> MaskMod:
    """Packed sequences: attend only within the same document.

    Formula: ``doc[q_idx] == doc[kv_idx]`` (and ``q_idx >= kv_idx`` when
    ``causal``), where ``doc`` maps each position of the packed sequence to its
    document index and is captured by the returned function. Source:
    "document masking" of packed pre-training batches (attention-gym
    ``masks/document_mask.py``, FlashAttention's varlen ``cu_seqlens``).

    Args:
        lengths: Length of each document, in packing order.
        offsets: Start of each document plus the total length
            (``[0, l0, l0 + l1, ..., total]``, FlashAttention's ``cu_seqlens``).
            Pass exactly one of ``lengths`` and ``offsets``.
        device: Device of the captured ``doc`` vector; defaults to the device
            of ``lengths``/``offsets`` when those are tensors, else CPU. It must
            match the device of the attention inputs.
        causal: Also apply the causal mask inside each document.

    Returns:
        A mask_mod named ``document`` or ``document_causal``. The total length
        must cover every query and key position.

    Raises:
        ValueError: If not exactly one of ``lengths``/``offsets`` is given, or
            they are not 1-D non-negative (resp. non-decreasing from 0).
    """
    if (lengths is None) == (offsets is None):
        raise ValueError("document: pass exactly one of `lengths` or `offsets`")
    if lengths is not None:
        lengths = _as_index_vector(lengths, device, "lengths")
        if bool((lengths < 0).any()):
            raise ValueError(f"document: `lengths` must be >= 0, got {lengths.tolist()}")
    else:
        offsets = _as_index_vector(offsets, device, "offsets")
        if offsets.numel() < 1 or int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
            raise ValueError(
                "document: `offsets` must start at 0 and be non-decreasing, "
                f"got {offsets.tolist()}"
            )
        lengths = offsets.diff()
    doc_ids = torch.arange(lengths.numel(), device=lengths.device, dtype=torch.int32)
    doc = torch.repeat_interleave(doc_ids, lengths)

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        return _named(mask_mod, "document_causal")

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return _named(mask_mod, "document")


def dilated_sliding_window(window: int, dilation: int, causal: bool = True) -> MaskMod:
    """Dilated sliding window: every ``dilation``-th key within ``window``.

    Formula (causal): ``0 <= q_idx - kv_idx <= window`` and
    ``(q_idx - kv_idx) % dilation == 0``; bidirectional (``causal=False``)
    uses ``|q_idx - kv_idx| <= window``. ``window`` is a distance in positions,
    so each query sees ``window // dilation + 1`` keys (causal). Source:
    Longformer's dilated sliding window (Beltagy et al., 2020).

    Args:
        window: Largest distance ``|q_idx - kv_idx|`` still attended, ``>= 0``.
        dilation: Stride between attended keys, ``>= 1``.
        causal: Also forbid attending to later positions.

    Returns:
        A mask_mod named ``dilated_sliding_window_<window>_d<dilation>``
        (``..._bidirectional_...`` when not causal).
    """
    window = _non_negative_int(window, "window")
    dilation = _non_negative_int(dilation, "dilation")
    if dilation < 1:
        raise ValueError(f"dilated_sliding_window: `dilation` must be >= 1, got {dilation}")

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            distance = q_idx - kv_idx
            return (distance >= 0) & (distance <= window) & (distance % dilation == 0)

        return _named(mask_mod, f"dilated_sliding_window_{window}_d{dilation}")

    def mask_mod(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        # Divisibility does not depend on the sign convention of %, so this is
        # the same under Python's floored and Triton's truncated modulo.
        return (torch.abs(distance) <= window) & (distance % dilation == 0)

    return _named(mask_mod, f"dilated_sliding_window_bidirectional_{window}_d{dilation}")


def neighborhood_2d(height: int, width: int, kernel_size: int) -> MaskMod:
    """2-D neighbourhood attention on a row-major flattened ``height x width`` grid.

    Position ``p`` is pixel ``(p // width, p % width)``. A query at ``(r, c)``
    attends to the ``kernel_size x kernel_size`` window whose start row is
    ``clamp(r - kernel_size // 2, 0, height - kernel_size)`` (columns alike):
    centred on the query, but shifted inwards at the borders so that every
    query sees exactly ``kernel_size**2`` keys. Source: Neighborhood Attention
    Transformer (Hassani et al., 2023) and NATTEN's ``get_window_start``
    (dilation 1).

    Args:
        height: Rows of the grid.
        width: Columns of the grid.
        kernel_size: Odd window side, at most ``min(height, width)``.

    Returns:
        A mask_mod named ``neighborhood_2d_<height>x<width>_k<kernel_size>``.
    """
    height = _non_negative_int(height, "height")
    width = _non_negative_int(width, "width")
    kernel_size = _non_negative_int(kernel_size, "kernel_size")
    if kernel_size % 2 != 1 or kernel_size > min(height, width):
        raise ValueError(
            "neighborhood_2d: `kernel_size` must be odd and at most min(height, width) = "
            f"{min(height, width)}, got {kernel_size}"
        )
    radius = kernel_size // 2

    def mask_mod(b, h, q_idx, kv_idx):
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        row_start = torch.clamp(q_row - radius, 0, height - kernel_size)
        col_start = torch.clamp(q_col - radius, 0, width - kernel_size)
        in_rows = (kv_row >= row_start) & (kv_row < row_start + kernel_size)
        in_cols = (kv_col >= col_start) & (kv_col < col_start + kernel_size)
        return in_rows & in_cols

    return _named(mask_mod, f"neighborhood_2d_{height}x{width}_k{kernel_size}")


def _non_negative_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
    return value


def _as_index_vector(
    values: Sequence[int] | torch.Tensor, device: torch.device | str | None, name: str
) -> torch.Tensor:
    if isinstance(values, torch.Tensor) and device is None:
        device = values.device
    vector = torch.as_tensor(values, dtype=torch.int64, device=device)
    if vector.dim() != 1:
        raise ValueError(f"document: `{name}` must be 1-D, got shape {tuple(vector.shape)}")
    return vector
