"""The error of ``tanh_approx`` in a compiled CUDA kernel (PTX ``tanh.approx.f32``).

Compiles ``flex_inductor.fast_math.tanh_approx`` with Inductor, evaluates it
on a uniform float32 grid of 2^24 points in [-20, 20] (spacing 2.4e-6: the
curved range and the saturated tails) and compares with float64 ``torch.tanh``;
float32 ``torch.tanh`` (libdevice) is measured beside it. Prints one markdown
row for docs/score_mod.md; the header too with ``--header``.

    python benchmarks/tanh_error.py --header
"""

from __future__ import annotations

import argparse
import sys

import torch

from flex_inductor.fast_math import tanh_approx

POINTS = 1 << 24
LIMIT = 20.0


def measure(points: int = POINTS, limit: float = LIMIT) -> dict[str, float]:
    """Max absolute and relative error of the compiled op and of float32 torch.tanh."""
    x = torch.linspace(-limit, limit, points, device="cuda", dtype=torch.float32)
    compiled = torch.compile(tanh_approx, fullgraph=True)
    exact = torch.tanh(x.double())
    # Relative error where tanh is not ~0 (x = 0 gives 0 / 0).
    nonzero = exact.abs() > 1e-30

    def errors(y: torch.Tensor) -> tuple[float, float]:
        diff = (y.double() - exact).abs()
        rel = diff[nonzero] / exact[nonzero].abs()
        return diff.max().item(), rel.max().item()

    approx_abs, approx_rel = errors(compiled(x))
    libdevice_abs, libdevice_rel = errors(torch.tanh(x))
    return dict(
        approx_abs=approx_abs, approx_rel=approx_rel,
        libdevice_abs=libdevice_abs, libdevice_rel=libdevice_rel,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=POINTS)
    parser.add_argument("--limit", type=float, default=LIMIT)
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tanh_error.py: needs a CUDA device", file=sys.stderr)
        return 1
    e = measure(args.points, args.limit)
    if args.header:
        print("| GPU | points in [-L, L] | tanh_approx max abs | max rel "
              "| torch.tanh fp32 max abs | max rel |")
        print("|---|---|---|---|---|---|")
    print(
        f"| {torch.cuda.get_device_name()} | 2^{args.points.bit_length() - 1} in "
        f"[-{args.limit:g}, {args.limit:g}] | {e['approx_abs']:.3g} | {e['approx_rel']:.3g} "
        f"| {e['libdevice_abs']:.3g} | {e['libdevice_rel']:.3g} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
