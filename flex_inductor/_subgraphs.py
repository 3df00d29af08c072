"""Tracing ``score_mod`` and ``mask_mod`` into graphs on 0-d placeholders.

The op's proxy rule, its autograd rule and the lowering all need the mods as
FX graphs over five (or four) 0-d tensors plus the captured buffers. This
module builds those graphs: the forward graph of each mod, and the *joint*
graph of ``score_mod`` (its forward plus the gradient with respect to the
score and to every captured buffer that requires grad).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

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


def trace_under_proxy_mode(mod: Callable, example_args: Sequence[torch.Tensor]):
    """Trace ``mod`` into a GraphModule with the tracing mode already active."""
    api = _compat.hop_api()
    with _compat.transform_getitem_to_index()():
        return api.reenter_make_fx(mod)(*example_args)


def build_joint_graph(
    score_mod: Callable,
    query: torch.Tensor,
    buffers: Sequence[torch.Tensor],
) -> torch.fx.GraphModule:
    """Trace the joint forward+backward graph of ``score_mod``.

    The graph takes ``(score, b, h, q_idx, kv_idx, grad_score_out, *buffers)``
    and returns ``(grad_score, *grad_buffers)``, where ``grad_buffers`` has one
    entry per buffer (``None`` for buffers that do not require grad, so that a
    mask-only or constant buffer costs nothing in the backward).

    It is traced on fake tensors outside any enclosing functionalization or
    proxy tracing: the joint graph is an argument of the backward op, not part
    of the graph being traced.
    """
    api = _compat.joint_api()
    buffer_needs_grad = [isinstance(b, torch.Tensor) and b.requires_grad for b in buffers]

    def joint(score, b, h, q_idx, kv_idx, grad_score_out, *bufs):
        with torch.enable_grad():
            score = score.detach().requires_grad_(True)
            wrt = [score] + [buf for buf, need in zip(bufs, buffer_needs_grad) if need]
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
        for buf, need in zip(bufs, buffer_needs_grad):
            g = grads.pop(0) if need else None
            if need and g is None:
                g = torch.zeros_like(buf)
            grad_bufs.append(g)
        return (grad_score, *grad_bufs)

    with api.suspend_tracing():
        fake_mode = api.fake_mode_for(query, *buffers)
        with fake_mode:
            example = score_placeholders(query)
            example.append(torch.zeros_like(example[0]))
            fake_buffers = [api.fresh_like(b) for b in buffers]
        with _compat.transform_getitem_to_index()():
            return api.make_fx(joint)(*example, *fake_buffers)
