"""Three optimizer steps of a small compiled transformer block, against the eager spec.

A pre-norm block (LayerNorm -> qkv projection -> ``flex_attention`` with a
learnable relative-position bias and a causal BlockMask -> output projection
-> LayerNorm -> MLP) is trained for three SGD steps three times from the same
initial weights and batch:

* compiled with Inductor: our forward and backward Triton templates (in
  Triton's interpreter on CPU);
* eagerly in float32, with ``flex_inductor.flex_attention_reference`` (the
  written spec) as the attention;
* eagerly in float64 with the reference: the oracle.

The tolerance is the shared rule, derived from float32 itself: at every step,
the compiled loss and every compiled parameter may be off the float64 run by
at most twice what the eager float32 run is off, plus one float32 ulp at the
tensor's scale. The eager float32 run is the same maths done plainly in
float32, so its distance from float64 is what float32 costs over these three
steps; the ulp is the rounding of storing the value in float32 at all (the
float64 run starts from the same float32 weights, so early on the plain run
can be exact where any other float32 summation order is one ulp off). A
wrong gradient anywhere in the attention (q, k, v or the bias) moves the
parameters by ``lr * error`` at the first step, far beyond this.
"""

from __future__ import annotations

import copy

import torch
from compile_utils import compile_and_run
from oracle import assert_close_to_oracle

from flex_inductor import create_block_mask, flex_attention, flex_attention_reference, masks

B, H, L, HEAD_DIM = 1, 2, 32, 16
DIM = H * HEAD_DIM
STEPS = 3
LR = 0.5


class Block(torch.nn.Module):
    """A pre-norm transformer block whose attention is a swappable function."""

    def __init__(self, attention, block_mask):
        super().__init__()
        self.attention = attention
        self.block_mask = block_mask
        self.norm1 = torch.nn.LayerNorm(DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        # One learned scalar per head and signed distance q - kv in (-L, L).
        self.rel_bias = torch.nn.Parameter(0.5 * torch.randn(H, 2 * L - 1))
        self.proj = torch.nn.Linear(DIM, DIM)
        self.norm2 = torch.nn.LayerNorm(DIM)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(), torch.nn.Linear(4 * DIM, DIM)
        )

    def forward(self, x):
        bias = self.rel_bias

        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx - kv_idx + (L - 1)]

        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, H, HEAD_DIM)).permute(2, 0, 3, 1, 4)
        attended = self.attention(q, k, v, score_mod=relative_bias, block_mask=self.block_mask)
        x = x + self.proj(attended.transpose(1, 2).flatten(-2))
        return x + self.mlp(self.norm2(x))


def _loss(model, x, target):
    return torch.nn.functional.mse_loss(model(x), target)


def _train(model, x, target, step_loss):
    """Three SGD steps; the loss and a copy of every parameter after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = step_loss(x, target)
        optimizer.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        history.append((loss.detach(), params))
    return history


def _eager_step(model):
    def step(x, target):
        loss = _loss(model, x, target)
        loss.backward()
        return loss

    return step


def test_three_training_steps_match_the_reference(device):
    torch.manual_seed(0)
    block_mask = create_block_mask(masks.causal(), 1, 1, L, L, device=device, BLOCK_SIZE=16)
    compiled_model = Block(flex_attention, block_mask).to(device)
    eager_model = copy.deepcopy(compiled_model)
    eager_model.attention = flex_attention_reference
    oracle_model = copy.deepcopy(eager_model).double()
    x = torch.randn(B, L, DIM, device=device)
    target = torch.randn(B, L, DIM, device=device)
    initial_bias = compiled_model.rel_bias.detach().clone()

    first = {}

    def compiled_step(x, target):
        # The first step compiles (code captured); the others reuse it.
        if not first:
            first["result"] = compile_and_run(
                _loss, compiled_model, x, target, grad_outputs=torch.ones((), device=device)
            )
            return first["result"].output
        loss = first["result"].compiled(compiled_model, x, target)
        loss.backward()
        return loss

    compiled = _train(compiled_model, x, target, compiled_step)
    eager = _train(eager_model, x, target, _eager_step(eager_model))
    oracle = _train(oracle_model, x.double(), target.double(), _eager_step(oracle_model))

    result = first["result"]
    assert result.frame_count == 1
    templates = [n for n in result.kernels("") if n.startswith("triton_tem_")]
    assert len([n for n in templates if "flex_inductor_fwd" in n]) == 1, templates
    assert len([n for n in templates if "flex_inductor_bwd" in n]) == 2, templates
    assert "dense_attention" not in result.source

    eps = torch.finfo(torch.float32).eps
    for step, ((loss, params), (eager_loss, eager_params), (oracle_loss, oracle_params)) in (
        enumerate(zip(compiled, eager, oracle, strict=True))
    ):
        assert_close_to_oracle(
            loss, oracle_loss, eager_loss, f"step {step} loss", atol=eps * abs(oracle_loss.item())
        )
        for name, value in params.items():
            want = oracle_params[name]
            assert_close_to_oracle(
                value, want, eager_params[name], f"step {step} {name}",
                atol=eps * want.abs().max().item(),
            )
    # The bias did learn, far beyond the tolerance: the comparison above is
    # not one of untouched weights.
    moved = (compiled[-1][1]["rel_bias"] - initial_bias).abs().max().item()
    assert moved > 1e3 * eps * initial_bias.abs().max().item(), moved
