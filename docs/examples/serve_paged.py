"""Serve a toy transformer with a paged KV cache: batched greedy decoding.

Requests with prompts of different lengths arrive in a queue; the server holds
at most ``--slots`` sequences at once. Each admitted request is prefilled
(its prompt's K/V written into pages it reserves), then every step decodes one
token for all slots together. A sequence that reaches its token budget is
erased: its pages return to the free pool and the next request reuses them.
Attention runs directly on the paged store through
``PagedKVCache.convert_logical_block_mask`` and the wrapped ALiBi score_mod.

At the end, every finished sequence is run again without any cache, through
plain SDPA with an additive causal ALiBi bias, and the served logits must
match.

    python docs/examples/serve_paged.py                  # cuda if available
    python docs/examples/serve_paged.py --device cpu     # Triton's interpreter

On CPU the real Triton kernels run in Triton's interpreter
(``FLEX_INDUCTOR_INTERPRET=1``, set below before flex_inductor is imported).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Before the import: the interpreter is chosen when kernels are first built.
    os.environ.setdefault("FLEX_INDUCTOR_INTERPRET", "1")

from flex_inductor import create_block_mask, flex_attention, mods  # noqa: E402
from flex_inductor.paged import PagedKVCache  # noqa: E402


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy model and of its cache."""

    vocab: int = 64
    dim: int = 32
    n_heads: int = 4
    # One kv head shared by four query heads (GQA): the decode kernel packs
    # the group into one program, which also keeps the interpreter quick.
    n_kv_heads: int = 1
    n_layers: int = 2
    page_size: int = 16
    max_pages_per_seq: int = 3
    # Fewer pages than slots * max_pages_per_seq: the pool is shared.
    n_pages: int = 7
    slots: int = 3
    # Prompts are padded to this length, so that every prefill has one shape
    # (one compiled kernel) rather than one per prompt length.
    prefill_len: int = 16

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_seq * self.page_size


# attend(layer, q, k, v, positions) -> attention output (B, Hq, L, head_dim)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ToyModel(torch.nn.Module):
    """Token embedding, a few attention + MLP blocks, an output projection.

    Positions enter only through the attention's ALiBi bias, which the
    ``attend`` callback applies: paged in the server, dense in the check.
    """

    def __init__(self, cfg: ToyConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) / math.sqrt(shape[-1]))

        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.embed = torch.nn.Parameter(torch.randn(cfg.vocab, cfg.dim, generator=gen))
        self.head = weight(cfg.vocab, cfg.dim)
        self.layers = torch.nn.ModuleList()
        for _ in range(cfg.n_layers):
            layer = torch.nn.ParameterDict(
                dict(
                    wq=weight(cfg.dim, cfg.dim),
                    wk=weight(kv_dim, cfg.dim),
                    wv=weight(kv_dim, cfg.dim),
                    wo=weight(cfg.dim, cfg.dim),
                    w1=weight(4 * cfg.dim, cfg.dim),
                    w2=weight(cfg.dim, 4 * cfg.dim),
                )
            )
            self.layers.append(layer)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend):
        """Logits ``(B, L, vocab)`` of ``tokens`` ``(B, L)`` at ``positions`` ``(B, L)``."""
        cfg = self.cfg
        B, L = tokens.shape
        x = self.embed[tokens]

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(B, L, n, cfg.head_dim).transpose(1, 2)

        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (cfg.dim,))
            q = heads(F.linear(h, layer["wq"]), cfg.n_heads)
            k = heads(F.linear(h, layer["wk"]), cfg.n_kv_heads)
            v = heads(F.linear(h, layer["wv"]), cfg.n_kv_heads)
            attn = attend(index, q, k, v, positions).transpose(1, 2).reshape(B, L, cfg.dim)
            x = x + F.linear(attn, layer["wo"])
            h = F.rms_norm(x, (cfg.dim,))
            x = x + F.linear(F.gelu(F.linear(h, layer["w1"])), layer["w2"])
        return F.linear(F.rms_norm(x, (cfg.dim,)), self.head)


# ----------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------


@dataclass
class Request:
    """A prompt, a token budget, and what serving it produced."""

    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    # Logits that chose each generated token, for the final check.
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens held in the cache once the last generated one is written."""
        return len(self.prompt) + len(self.generated)


class PagedServer:
    """Greedy decoding of queued requests in a fixed number of slots.

    One ``PagedKVCache`` per layer; all of them see the same reserve and erase
    calls, so each slot owns the same logical pages in every layer.
    """

    def __init__(self, model: ToyModel, device: torch.device) -> None:
        cfg = model.cfg
        self.model, self.cfg, self.device = model, cfg, device
        self.caches = [
            PagedKVCache(
                cfg.n_pages, cfg.page_size, cfg.slots, cfg.n_kv_heads, cfg.head_dim,
                max_pages_per_seq=cfg.max_pages_per_seq, device=device,
            )
            for _ in range(cfg.n_layers)
        ]
        self.alibi = mods.alibi(cfg.n_heads, device=device)
        self.slots: list[Request | None] = [None] * cfg.slots
        self.pages_handed_out: set[int] = set()
        self.pages_reused = 0

    # Bookkeeping, mirrored on every layer's cache.

    def reserve(self, slot: int, seq_len: int) -> None:
        before = set(self.caches[0].pages(slot))
        for cache in self.caches:
            cache.reserve(slot, seq_len)
        for page in set(self.caches[0].pages(slot)) - before:
            self.pages_reused += page in self.pages_handed_out
            self.pages_handed_out.add(page)

    def erase(self, slot: int) -> None:
        for cache in self.caches:
            cache.erase(slot)
        self.slots[slot] = None

    # One forward pass over the paged cache.

    def paged_attend(self, rows: torch.Tensor, lengths: torch.Tensor, write: torch.Tensor):
        """An ``attend`` callback for ``ToyModel``: write K/V, attend over the pages.

        Args:
            rows: ``(B,)`` slots of the batch entries.
            lengths: ``(B,)`` tokens each entry holds after this pass; query
                ``i`` of an ``L``-token pass sits at position ``lengths - L + i``.
            write: ``(B,)`` bool: which entries' K/V to store (empty slots
                in a decode batch write nothing).
        """
        cfg = self.cfg

        def attend(layer, q, k, v, positions):
            cache = self.caches[layer]
            B, L = positions.shape
            cache.write(rows[write], positions[write], k[write], v[write])
            offsets = lengths - L

            def causal_at_offset(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offsets[b]

            def alibi_at_offset(score, b, h, q_idx, kv_idx):
                return self.alibi(score, b, h, q_idx + offsets[b], kv_idx)

            # Logical: as if each sequence were contiguous, max_seq_len long.
            logical = create_block_mask(
                causal_at_offset, B, None, L, cfg.max_seq_len, device=self.device,
                BLOCK_SIZE=(cfg.prefill_len, cfg.page_size),
            )
            k_pages, v_pages = cache.physical_kv(B)
            return flex_attention(
                q, k_pages, v_pages,
                score_mod=cache.get_score_mod(alibi_at_offset, rows),
                block_mask=cache.convert_logical_block_mask(logical, rows),
                enable_gqa=True,
            )

        return attend

    def prefill(self, slot: int, request: Request) -> None:
        """Writes the prompt's K/V and picks the first token."""
        cfg = self.cfg
        n = len(request.prompt)
        self.slots[slot] = request
        # The padding tokens' K/V land past the prompt: never attended (the
        # mask is causal), and overwritten as decoding reaches those positions.
        self.reserve(slot, cfg.prefill_len)
        tokens = torch.zeros(1, cfg.prefill_len, dtype=torch.long, device=self.device)
        tokens[0, :n] = torch.tensor(request.prompt)
        positions = torch.arange(cfg.prefill_len, device=self.device)[None]
        rows = torch.tensor([slot], device=self.device)
        # All prefill_len queries sit at their own positions: offset 0.
        lengths = torch.tensor([cfg.prefill_len], device=self.device)
        write = torch.ones(1, dtype=torch.bool, device=self.device)
        logits = self.model(tokens, positions, self.paged_attend(rows, lengths, write))
        self.emit(request, logits[0, n - 1])

    def decode_step(self) -> None:
        """One token for every occupied slot, as one batch over all slots."""
        cfg, device = self.cfg, self.device
        active = [r is not None for r in self.slots]
        # Position of the token being fed: the last one generated.
        pos = [r.length - 1 if r is not None else 0 for r in self.slots]
        for slot, request in enumerate(self.slots):
            if request is not None:
                self.reserve(slot, request.length)
        tokens = torch.tensor(
            [[r.generated[-1] if r is not None else 0] for r in self.slots], device=device
        )
        positions = torch.tensor(pos, device=device)[:, None]
        rows = torch.arange(cfg.slots, device=device)
        lengths = positions[:, 0] + 1
        write = torch.tensor(active, device=device)
        logits = self.model(tokens, positions, self.paged_attend(rows, lengths, write))
        for slot, request in enumerate(self.slots):
            if request is not None:
                self.emit(request, logits[slot, 0])

    def emit(self, request: Request, logits: torch.Tensor) -> None:
        request.logits.append(logits.float().cpu())
        request.generated.append(int(logits.argmax()))

    def pages_needed(self, request: Request) -> int:
        """Pages a request holds at its longest: the padded prompt, or every token fed."""
        longest = max(self.cfg.prefill_len, len(request.prompt) + request.max_new_tokens - 1)
        return math.ceil(longest / self.cfg.page_size)

    def serve(self, queue: list[Request]) -> tuple[list[Request], int]:
        """Runs until every request is done; returns them and the decode steps taken.

        A request is admitted (first come, first served) when a slot is free
        and the pool can cover the pages it will need at its longest, on top
        of what the running sequences will need: so ``reserve`` never runs
        out of pages mid-sequence, and nothing has to be preempted.
        """
        queue, done, steps = list(queue), [], 0
        while queue or self.busy():
            committed = sum(self.pages_needed(r) for r in self.slots if r is not None)
            for slot in range(self.cfg.slots):
                if self.slots[slot] is None and queue:
                    need = self.pages_needed(queue[0])
                    if committed + need > self.cfg.n_pages:
                        break
                    committed += need
                    self.prefill(slot, queue.pop(0))
            self.retire(done)
            if self.busy():
                self.decode_step()
                steps += 1
                self.retire(done)
        return done, steps

    def busy(self) -> bool:
        return any(r is not None for r in self.slots)

    def retire(self, done: list[Request]) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None and len(request.generated) >= request.max_new_tokens:
                self.erase(slot)
                done.append(request)


# ----------------------------------------------------------------------
# The check: the same model, no cache, dense SDPA
# ----------------------------------------------------------------------


def dense_attend(layer, q, k, v, positions):
    """Causal attention with an additive ALiBi bias, by SDPA: the independent path."""
    n_heads, L = q.shape[1], q.shape[2]
    slopes = torch.tensor(mods.alibi_slopes(n_heads), device=q.device, dtype=q.dtype)
    distance = positions[0][None, :] - positions[0][:, None]  # kv - q
    bias = slopes[:, None, None] * distance
    bias = bias.masked_fill(distance > 0, -math.inf)
    group = n_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(1, n_heads, L, L))


def max_logit_error(model: ToyModel, requests: list[Request], device) -> float:
    """Largest difference between served logits and a no-cache forward pass."""
    worst = 0.0
    for request in requests:
        # The last generated token was never fed back, so it has no K/V.
        sequence = request.prompt + request.generated[:-1]
        tokens = torch.tensor([sequence], device=device)
        positions = torch.arange(len(sequence), device=device)[None]
        with torch.no_grad():
            logits = model(tokens, positions, dense_attend)[0, len(request.prompt) - 1 :]
        served = torch.stack(request.logits).to(device)
        # nan_to_num: a NaN must fail the check, and max() would skip it.
        error = (served - logits.float()).abs().nan_to_num(nan=math.inf).max().item()
        worst = max(worst, error)
    return worst


def make_requests(count: int, cfg: ToyConfig, seed: int) -> list[Request]:
    """Random prompts of 2 to prefill_len tokens; the first request runs 16 steps."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        n = int(torch.randint(2, cfg.prefill_len + 1, (1,), generator=gen))
        budget = 16 if i == 0 else int(torch.randint(3, 12, (1,), generator=gen))
        prompt = torch.randint(1, cfg.vocab, (n,), generator=gen).tolist()
        requests.append(Request(prompt, min(budget, cfg.max_seq_len - n + 1)))
    return requests


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = ToyConfig(n_layers=args.layers)
    model = ToyModel(cfg, args.seed).to(device)
    server = PagedServer(model, device)
    requests = make_requests(args.requests, cfg, args.seed)

    start = time.perf_counter()
    with torch.no_grad():
        done, steps = server.serve(requests)
    elapsed = time.perf_counter() - start
    for i, request in enumerate(requests):
        print(f"request {i}: prompt {len(request.prompt):2d} tokens -> {request.generated}")
    # TF32 and fused-kernel rounding on a GPU; float32 throughout on CPU.
    tolerance = 1e-2 if device.type == "cuda" else 1e-4
    error = max_logit_error(model, requests, device)
    print(
        f"{len(done)} requests, {steps} batched decode steps, {server.pages_reused} pages "
        f"handed out again after an erase, {elapsed:.1f} s on {device}"
    )
    if error > tolerance:
        raise SystemExit(f"served logits differ from the no-cache reference by {error:.3g}")
    print(f"served logits match the no-cache reference (max error {error:.2g})")
    return dict(
        finished=len(done), steps=steps, pages_reused=server.pages_reused,
        max_logit_error=error, tolerance=tolerance,
    )


if __name__ == "__main__":
    main()
