"""Host time per call: flex_inductor vs torch flex_attention, compiled, at a small shape.

At small shapes a training step can be bound by the host (Python, guards,
AOTAutograd's wrappers, kernel launches) rather than the GPU. For each
implementation and mode this prints:

- host ms: wall time to issue 50 calls without synchronising (the GPU queue is
  deep enough that issuing does not wait for the GPU), per call;
- GPU ms: CUDA-event time of the same 50 calls, per call. It includes the GPU's
  idle gaps, so when the host is the bottleneck it is close to host ms;
- kernel ms: the summed durations of the kernels of one call (torch.profiler),
  the GPU's own share;
- kernels: those kernels, by name.

    python benchmarks/host_overhead.py --shape B2-H8-S2048-D64
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import bench_attention as ba
import torch
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flex_inductor as fi

CALLS = 50


def _step(attention, q, k, v, grad_out):
    gqa = q.shape[1] != k.shape[1]

    def step():
        out = attention(q, k, v, enable_gqa=gqa)
        if grad_out is not None:
            out.backward(grad_out)

    return step


def _measure(step):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start_event, end_event = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    start = time.perf_counter()
    start_event.record()
    for _ in range(CALLS):
        step()
    end_event.record()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * host / CALLS, start_event.elapsed_time(end_event) / CALLS


def _kernels(step):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = collections.Counter(e.name for e in kernels)
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    return busy_ms, names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="B2-H8-S2048-D64")
    args = parser.parse_args(argv)
    B, Hq, Hkv, S, D = ba.parse_shape(args.shape)
    print("| impl | mode | host ms/call | GPU ms/call | kernel ms/call | kernels per call |")
    print("|---|---|---|---|---|---|")
    for mode in ("fwd", "fwdbwd"):
        grad = mode == "fwdbwd"
        q, k, v = (
            torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
            for h in (Hq, Hkv, Hkv)
        )
        grad_out = torch.randn_like(q) if grad else None
        for name, attention in (
            ("flex_inductor", fi.flex_attention),
            ("torch_flex", torch_flex_attention),
        ):
            torch._dynamo.reset()
            step = _step(torch.compile(attention), q, k, v, grad_out)
            host, gpu = _measure(step)
            busy, names = _kernels(step)
            count = sum(names.values())
            print(
                f"| {name} | {mode} | {host:.3f} | {gpu:.3f} | {busy:.3f} | {count} |", flush=True
            )
            for kernel, n in names.most_common():
                print(f"    {n} x {kernel[:100]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
