"""A tour of flex_inductor: ``python -m flex_inductor.demo``.

Builds a few masks and score mods, prints a BlockMask, runs compiled
``flex_attention`` for each variant and checks it against the dense
reference. On a GPU the kernels run on CUDA at a realistic size; without
one, the same generated Triton kernels run on CPU tensors in Triton's
interpreter, on small shapes. For each variant it prints the template kernel
that ran (read from the generated code) and the config the lowering chose
(read from the ``flex_inductor`` log). Exits with status 1 on a mismatch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import torch

import flex_inductor
from flex_inductor import _compat, create_block_mask, flex_attention, masks, mods

_KERNEL_DEF = re.compile(r"^def (triton_tem_\w+)\(", re.MULTILINE)


@dataclass(frozen=True)
class Setting:
    """Where and at what size the demo runs."""

    device: str
    dtype: torch.dtype
    B: int
    H: int
    L: int
    E: int
    block: int
    # Allowed max |compiled - reference|: the reference runs in float64, the
    # kernel accumulates in float32 and rounds its output to ``dtype``.
    atol: float

    def describe(self) -> str:
        where = "CUDA" if self.device == "cuda" else "CPU, Triton interpreter"
        return (f"{where}: B={self.B} H={self.H} L=S={self.L} E={self.E} "
                f"{str(self.dtype).replace('torch.', '')}")


def setting() -> Setting:
    """CUDA at a realistic size, else small shapes for the interpreter."""
    if torch.cuda.is_available():
        return Setting("cuda", torch.float16, B=2, H=8, L=2048, E=64, block=128, atol=2e-2)
    return Setting("cpu", torch.float32, B=1, H=4, L=96, E=16, block=32, atol=1e-4)


def _rerun_in_interpreter() -> None:
    """Start this demo again with FLEX_INDUCTOR_INTERPRET=1 (never returns).

    ``python -m flex_inductor.demo`` imports flex_inductor, and with it
    triton, before this module runs; Triton's interpreter must be chosen
    before that, so the choice is made in the environment of a fresh process.
    """
    env = dict(os.environ, FLEX_INDUCTOR_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "flex_inductor.demo", *sys.argv[1:]], env)


class _Records(logging.Handler):
    """Collects the lowering's log lines while one variant compiles."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def variants(s: Setting) -> list[tuple[str, object, object]]:
    """``(name, score_mod, block_mask)`` for each demonstrated variant."""
    lengths = [s.L // 3, s.L // 6, s.L - s.L // 3 - s.L // 6]  # three documents

    def mask(mask_mod):
        return create_block_mask(mask_mod, None, None, s.L, s.L, device=s.device,
                                 BLOCK_SIZE=s.block)

    return [
        ("causal", None, mask(masks.causal())),
        ("sliding window", None, mask(masks.sliding_window(s.L // 4))),
        ("document", None, mask(masks.document(lengths, device=s.device))),
        ("alibi", mods.alibi(s.H, device=s.device), None),
        ("softcap + causal", mods.softcap(20.0), mask(masks.causal())),
    ]


def run_variant(s: Setting, name: str, score_mod, block_mask, q, k, v) -> bool:
    """Compile and run one variant; print what ran; True if it matches the reference."""

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    records = _Records()
    logger = logging.getLogger("flex_inductor")
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        compiled = torch.compile(attention, backend="inductor", fullgraph=True)
        with torch.no_grad():
            out, sources = _compat.run_and_get_code(compiled, q, k, v)
        seconds = time.perf_counter() - started
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous_level)

    kernels = sorted({k for src in sources for k in _KERNEL_DEF.findall(src) if "flex" in k})
    configs = [line.split(": ", 1)[1] for line in records.lines
               if line.startswith("flex_inductor_fwd: BLOCK_M=")]
    reference = flex_inductor.flex_attention_reference(
        q.double(), k.double(), v.double(), score_mod=score_mod, block_mask=block_mask
    )
    error = (out.double() - reference).abs().max().item()
    ok = error <= s.atol
    print(f"{name:<17} {', '.join(kernels) or 'no template kernel'}")
    if configs:
        print(f"{'':<17} config {configs[0].split(' for ')[0]}")
    print(f"{'':<17} max|out - reference| = {error:.2e} (allowed {s.atol:g})  "
          f"{'ok' if ok else 'MISMATCH'}  [{seconds:.1f} s incl. compile]")
    return ok


def main() -> int:
    if not torch.cuda.is_available() and not _compat.interpreter_active():
        if os.environ.get("FLEX_INDUCTOR_INTERPRET") == "1":
            print("flex_inductor demo: the Triton interpreter did not start", file=sys.stderr)
            return 1
        _rerun_in_interpreter()
    # torch's notes about our op's subgraph arguments and the interpreter's
    # missing driver say nothing about the results.
    warnings.filterwarnings("ignore", message="Please add support for subgraph args")
    warnings.filterwarnings("ignore", message="Could not find an active CPU backend")
    s = setting()
    print(f"flex_inductor demo -- {s.describe()}")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(s.B, s.H, s.L, s.E, generator=gen).to(device=s.device, dtype=s.dtype)
        for _ in range(3)
    )
    cases = variants(s)

    shown = cases[1][2]
    print("\nA BlockMask (sliding window): full blocks skip mask_mod, partial ones run it.")
    print(repr(shown))
    print(shown.to_string(grid_size=12))
    print()

    results = [run_variant(s, name, score_mod, bm, q, k, v) for name, score_mod, bm in cases]
    if all(results):
        print("\nall variants match the dense reference")
        return 0
    print(f"\n{results.count(False)} variant(s) do not match the dense reference")
    return 1


if __name__ == "__main__":
    sys.exit(main())
