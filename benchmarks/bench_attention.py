"""Side-by-side attention benchmark: flex_inductor vs torch flex_attention vs SDPA.

Runs every peer in the same process on the same inputs, times with
``triton.testing.do_bench`` (median), and reports sparsity-aware TFLOP/s
(forward = 4·B·H·L·S·D·density; forward+backward = 3.5× that) and peak memory.
Prints a GitHub table with ratios and writes a CSV (one row per cell and
implementation, flushed after every cell) with the GPU, versions and date.

    python benchmarks/bench_attention.py --shapes all --variants all --mode fwd,fwdbwd
    python benchmarks/bench_attention.py --sweep --variants noop,causal --csv r.csv --append
    python benchmarks/bench_attention.py --dry-run      # one tiny cell on CPU, no GPU

Shapes are the names in ``SHAPES`` or any ``B4-H16-S8192-D128`` /
``B4-Hq32-Hkv8-S4096-D128``. ``--sweep`` adds one shape per ``--seq-lens`` entry at
H16 D128 with B·S = 32768 tokens. ``--time-budget`` stops starting new cells once
that many seconds have passed (the skipped cells are printed), and
``--skip-done`` skips the cells already in earlier CSVs, so that several short
runs build one results file.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields

import torch

import flex_inductor
from flex_inductor import masks, mods

SHAPES = {
    "B4-H16-S8192-D128": (4, 16, 16, 8192, 128),
    "B8-H16-S2048-D64": (8, 16, 16, 2048, 64),
    "B4-Hq32-Hkv8-S4096-D128": (4, 32, 8, 4096, 128),
}
SWEEP_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_TOKENS = 32768  # batch = max(1, SWEEP_TOKENS // seq_len)
SWEEP_HEADS = 16
SWEEP_HEAD_DIM = 128
MODES = ("fwd", "fwdbwd")
PEERS = ("torch_flex", "sdpa_cudnn", "sdpa_flash")
# Forward+backward FLOPs = forward + backward = (1 + 2.5) x forward.
FWDBWD_FLOP_FACTOR = 3.5
# Most (q, kv) positions whose mask is evaluated at once for the density:
# 64 MiB of bools, whatever the sequence length.
DENSITY_CHUNK_POSITIONS = 1 << 26
# The eager reference holds B·H·L·S float scores; above this it is not run.
REFERENCE_MAX_SCORES = 1 << 26
# The tiny cell that --dry-run runs on CPU, in Triton's interpreter.
DRY_RUN_SHAPE = "B1-H1-S256-D16"
DRY_RUN_VARIANTS = "causal,learnable_bias"
_INTERPRET_ENV = "FLEX_INDUCTOR_INTERPRET"
_START = time.monotonic()

_SHAPE_RE = re.compile(r"B(\d+)-(?:H(\d+)|Hq(\d+)-Hkv(\d+))-S(\d+)-D(\d+)$")


def parse_shape(name: str) -> tuple[int, int, int, int, int]:
    """(B, Hq, Hkv, S, D) of a shape name such as ``B4-Hq32-Hkv8-S4096-D128``."""
    if name in SHAPES:
        return SHAPES[name]
    match = _SHAPE_RE.match(name)
    if not match:
        raise ValueError(f"unknown shape {name!r}: use B<b>-H<h>-S<s>-D<d> or B-Hq-Hkv-S-D")
    b, h, hq, hkv, s, d = match.groups()
    heads = (int(h), int(h)) if h else (int(hq), int(hkv))
    return int(b), *heads, int(s), int(d)


def shape_name(B: int, Hq: int, Hkv: int, S: int, D: int) -> str:
    """The canonical name of a shape (the form ``parse_shape`` reads)."""
    heads = f"H{Hq}" if Hq == Hkv else f"Hq{Hq}-Hkv{Hkv}"
    return f"B{B}-{heads}-S{S}-D{D}"


def sweep_shapes(
    seq_lens: Iterable[int] = SWEEP_SEQ_LENS,
    tokens: int = SWEEP_TOKENS,
    heads: int = SWEEP_HEADS,
    head_dim: int = SWEEP_HEAD_DIM,
) -> list[str]:
    """One shape per sequence length, with the batch keeping B·S at ``tokens``."""
    return [shape_name(max(1, tokens // s), heads, heads, s, head_dim) for s in seq_lens]


@dataclass
class Variant:
    """One attention variant: its mods (for both libraries) and SDPA support."""

    name: str
    score_mod: Callable | None
    mask_mod: Callable | None
    sdpa_causal: bool | None  # None: SDPA cannot express it
    # Learnable tensors captured by score_mod: they get gradients in fwdbwd.
    params: tuple[torch.Tensor, ...] = ()
    # torch flex's score_mod, written inline as its users would (plain torch
    # ops): flex_inductor.mods may use ops of ours, such as softcap's fast tanh.
    torch_score_mod: Callable | None = None


VARIANT_NAMES = (
    "noop",
    "causal",
    "alibi",
    "softcap+causal",
    "sliding_window_1024",
    "document",
    "prefix_lm",
    "learnable_bias",
)


def variants(heads: int, seq_len: int, device: str) -> list[Variant]:
    """The issue's variants for one shape (``VARIANT_NAMES``, in that order).

    flex_inductor gets the mods of ``flex_inductor.mods`` and ``masks`` (its
    defaults: softcap's tanh is the fast approximation in bf16); torch flex
    gets the same mask_mods, which are plain torch code, and the same maths
    written inline as plain torch score_mods, capturing the same tensors.
    """
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < seq_len:
        n = min(
            int(torch.randint(seq_len // 16, seq_len // 2, (1,), generator=gen)), seq_len - total
        )
        lengths.append(n)
        total += n
    # T5-style learned bias, one scalar per head and signed distance, with a
    # random start (a zero table would make a weak correctness check).
    bias_mod, bias = mods.learnable_relative_bias(heads, seq_len, device=device)
    with torch.no_grad():
        bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    slopes = torch.tensor(mods.alibi_slopes(heads), dtype=torch.float32, device=device)
    cap = 20.0

    def torch_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def torch_softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    def torch_relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + (seq_len - 1)]

    found = [
        Variant("noop", None, None, False),
        Variant("causal", None, masks.causal(), True),
        Variant("alibi", mods.alibi(heads, device=device), None, None, torch_score_mod=torch_alibi),
        Variant(
            "softcap+causal", mods.softcap(cap), masks.causal(), None, torch_score_mod=torch_softcap
        ),
        Variant("sliding_window_1024", None, masks.sliding_window(1024), None),
        Variant("document", None, masks.document(lengths=lengths, device=device), None),
        Variant("prefix_lm", None, masks.prefix_lm(seq_len // 4), None),
        Variant(
            "learnable_bias",
            bias_mod,
            None,
            None,
            params=(bias,),
            torch_score_mod=torch_relative_bias,
        ),
    ]
    assert tuple(v.name for v in found) == VARIANT_NAMES
    return found


@dataclass
class Row:
    """One measured (cell, implementation); ms is None when it failed (see note)."""

    shape: str
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    variant: str
    mode: str
    impl: str
    ms: float | None
    tflops: float | None
    peak_mib: float | None
    density: float = 1.0
    first_call_s: float | None = None  # compile + first run, in this process
    rel_err: float | None = None  # max |ours - peer| / max |peer| over out and grads
    note: str = ""


META_FIELDS = ("gpu", "torch", "triton", "flex_inductor", "git", "code_version", "date")
CSV_FIELDS = (*META_FIELDS, *(f.name for f in fields(Row)))


@dataclass
class Config:
    """What one run measures."""

    shapes: list[str]
    variants: list[str]
    modes: list[str]
    block_size: int = 128
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    time_budget: float | None = None  # seconds since start; no new cell after it
    check: bool = True
    done: set[tuple[str, str, str]] = field(default_factory=set)  # (shape, variant, mode)


def _flex_call(fn, q, k, v, score_mod, block_mask, gqa) -> Callable[[], torch.Tensor]:
    return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)


def _sdpa_call(backend, q, k, v, causal: bool, gqa: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=gqa
            )

    return call


def _training_step(fn, inputs, grad_out) -> Callable[[], None]:
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bench(fn: Callable[[], object], device: str) -> tuple[float, float | None, float]:
    """Median ms, peak extra MiB (None off CUDA) and first-call seconds of ``fn``."""
    start = time.perf_counter()
    fn()  # compile and warm up outside the timing
    _sync(device)
    first_call = time.perf_counter() - start
    if not device.startswith("cuda"):
        # CPU smoke runs (the interpreter, seconds a call): one host-timed call.
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start), None, first_call
    import triton.testing

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak, first_call


def _density(mask_mod, seq_len: int, device: str) -> float:
    """Exact fraction of kept (q, kv) pairs, counted a chunk of query rows at a time.

    Chunks keep memory at ``DENSITY_CHUNK_POSITIONS`` bools, so a 32k or longer
    sequence never materialises its whole mask.
    """
    if mask_mod is None:
        return 1.0
    rows = max(1, DENSITY_CHUNK_POSITIONS // seq_len)
    kept = 0
    for q0 in range(0, seq_len, rows):

        def shifted(b, h, q_idx, kv_idx, q0=q0):
            return mask_mod(b, h, q_idx + q0, kv_idx)

        chunk = flex_inductor.create_mask(
            shifted, 1, 1, min(rows, seq_len - q0), seq_len, device=device
        )
        kept += int(chunk.sum(dtype=torch.int64))
    return kept / seq_len**2


def _outputs(fn, tensors, grad_out) -> list[torch.Tensor]:
    """The output of ``fn`` and, with ``grad_out``, the gradients of ``tensors``."""
    for t in tensors:
        t.grad = None
    out = fn()
    results = [out.detach().clone()]
    if grad_out is not None:
        out.backward(grad_out)
        results += [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
    return results


def _rel_err(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Largest max|a - b| / max|b| over the output and every gradient."""
    errors = []
    for a, b in zip(ours, theirs, strict=True):
        a, b = a.float(), b.float()
        errors.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def metadata(device: str) -> dict[str, str]:
    """GPU name, versions (with a git hash where a checkout is found) and date."""
    import importlib.metadata

    import triton

    from flex_inductor._version import CODE_VERSION

    try:
        version = importlib.metadata.version("flex_inductor")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flex_inductor": version,
        "git": git or "unknown",
        "code_version": CODE_VERSION,
        "date": datetime.date.today().isoformat(),
    }


class CsvSink:
    """Appends rows to a CSV, flushed after every write, header written once."""

    def __init__(self, path: str, append: bool, meta: dict[str, str]) -> None:
        self.meta = meta
        exists = append and os.path.exists(path) and os.path.getsize(path) > 0
        if exists:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CSV_FIELDS:
                raise SystemExit(f"{path}: its columns differ from this version's; use a new file")
        self.file = open(path, "a" if exists else "w", newline="")  # noqa: SIM115
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        if not exists:
            self.writer.writeheader()
            self.file.flush()

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.writer.writerow({**self.meta, **asdict(row)})
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _optional_float(text: str) -> float | None:
    return float(text) if text not in ("", "None", "nan") else None


def read_csv(paths: Iterable[str]) -> list[Row]:
    """The rows of results CSVs; a later (cell, impl) row replaces an earlier one."""
    rows: dict[tuple[str, str, str, str], Row] = {}
    for path in paths:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                row = Row(
                    shape=record["shape"],
                    B=int(record["B"]),
                    Hq=int(record["Hq"]),
                    Hkv=int(record["Hkv"]),
                    S=int(record["S"]),
                    D=int(record["D"]),
                    variant=record["variant"],
                    mode=record["mode"],
                    impl=record["impl"],
                    ms=_optional_float(record["ms"]),
                    tflops=_optional_float(record["tflops"]),
                    peak_mib=_optional_float(record["peak_mib"]),
                    density=float(record["density"]),
                    first_call_s=_optional_float(record["first_call_s"]),
                    rel_err=_optional_float(record["rel_err"]),
                    note=record["note"],
                )
                rows[row.shape, row.variant, row.mode, row.impl] = row
    return list(rows.values())


def read_csv_meta(paths: Iterable[str], column: str) -> list[str]:
    """The distinct values of one metadata column (``gpu``, ``torch``...) of results CSVs."""
    values: dict[str, None] = {}
    for path in paths:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                values.setdefault(record.get(column) or "unknown")
    return list(values)


def _impls(cfg: Config, variant, our_mask, torch_mask, q, k, v, gqa) -> dict[str, Callable]:
    """The implementations of one cell, each a zero-argument call."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    # Fresh compiled wrappers per cell (after a Dynamo reset): one shared
    # wrapper would hit Dynamo's recompile limit after 8 cells and silently
    # fall back to eager, for us and for the peer alike.
    torch._dynamo.reset()
    ours = torch.compile(flex_inductor.flex_attention)
    torch_flex = torch.compile(torch_flex_attention)
    impls = {
        "flex_inductor": _flex_call(ours, q, k, v, variant.score_mod, our_mask, gqa),
        "torch_flex": _flex_call(
            torch_flex, q, k, v, variant.torch_score_mod or variant.score_mod, torch_mask, gqa
        ),
    }
    if variant.sdpa_causal is not None and cfg.device.startswith("cuda"):
        from torch.nn.attention import SDPBackend

        for name, backend in (
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ):
            impls[name] = _sdpa_call(backend, q, k, v, variant.sdpa_causal, gqa)
    return impls


def measure_cell(cfg, shape, variant, mode, density, our_mask, torch_mask) -> list[Row]:
    """Every implementation of one (shape, variant, mode) cell, then a cross-check."""
    B, Hq, Hkv, S, D = parse_shape(shape)
    grad = mode == "fwdbwd"
    dev, dtype = cfg.device, cfg.dtype
    q = torch.randn(B, Hq, S, D, device=dev, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=grad)
    for p in variant.params:
        # Forward cells must not record autograd for the captured parameter.
        p.requires_grad_(grad)
        p.grad = None
    tensors = (q, k, v, *variant.params)
    grad_out = torch.randn(B, Hq, S, D, device=dev, dtype=dtype) if grad else None
    gqa = Hq != Hkv
    impls = _impls(cfg, variant, our_mask, torch_mask, q, k, v, gqa)
    flops = 4 * B * Hq * S * S * D * density * (FWDBWD_FLOP_FACTOR if grad else 1.0)
    rows, ok = [], set()
    for impl_name, fn in impls.items():
        row = Row(shape, B, Hq, Hkv, S, D, variant.name, mode, impl_name, None, None, None, density)
        call = _training_step(fn, tensors, grad_out) if grad else fn
        try:
            row.ms, row.peak_mib, row.first_call_s = _bench(call, dev)
            row.tflops = flops / row.ms / 1e9
            ok.add(impl_name)
        except Exception as error:  # report and go on: one failing peer
            row.note = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        rows.append(row)
        _print_row(row)
    if cfg.check and "flex_inductor" in ok:
        _check(rows, impls, ok, tensors, grad_out, variant, our_mask, gqa)
    return rows


def _check(rows, impls, ok, tensors, grad_out, variant, our_mask, gqa) -> None:
    """Compares our output and gradients with torch flex's (else the eager reference)."""
    q, k, v = tensors[:3]
    peer_name = "torch_flex" if "torch_flex" in ok else None
    if peer_name is None and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= (
        REFERENCE_MAX_SCORES
    ):
        peer_name = "reference"
        impls = {
            **impls,
            "reference": _flex_call(
                flex_inductor.flex_attention_reference,
                q,
                k,
                v,
                variant.score_mod,
                our_mask,
                gqa,
            ),
        }
    if peer_name is None:
        return
    ours_row = next(r for r in rows if r.impl == "flex_inductor")
    try:
        ours = _outputs(impls["flex_inductor"], tensors, grad_out)
        theirs = _outputs(impls[peer_name], tensors, grad_out)
        ours_row.rel_err = _rel_err(ours, theirs)
        ours_row.note = f"rel_err vs {peer_name}"
        print(f"{'':>24} check vs {peer_name}: max rel err {ours_row.rel_err:.2e}", flush=True)
    except Exception as error:  # the check must not lose the timings
        ours_row.note = f"check failed: {type(error).__name__}: {error}"[:300]


def _print_row(row: Row) -> None:
    if row.ms is None:
        print(f"# {row.shape} {row.variant} {row.mode} {row.impl}: {row.note}"[:400], flush=True)
        return
    peak = "" if row.peak_mib is None else f"{row.peak_mib:9.1f} MiB"
    print(
        f"{row.shape:>24} {row.variant:>20} {row.mode:>7} {row.impl:>14} "
        f"{row.ms:8.3f} ms {row.tflops:7.1f} TF/s {peak} (first call {row.first_call_s:.1f} s)",
        flush=True,
    )


def _over_budget(cfg: Config) -> bool:
    return cfg.time_budget is not None and time.monotonic() - _START > cfg.time_budget


def run(cfg: Config, sink: CsvSink | None = None) -> tuple[list[Row], list[tuple]]:
    """Measures every (shape, variant, mode, implementation) cell.

    Returns:
        The rows, and the (shape, variant, mode) cells skipped for the time budget.
    """
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    torch._dynamo.config.recompile_limit = 64
    rows: list[Row] = []
    skipped: list[tuple] = []
    for shape in cfg.shapes:
        B, Hq, Hkv, S, D = parse_shape(shape)
        for variant in variants(Hq, S, cfg.device):
            if cfg.variants != ["all"] and variant.name not in cfg.variants:
                continue
            modes = [m for m in cfg.modes if (shape, variant.name, m) not in cfg.done]
            if not modes:
                continue
            if _over_budget(cfg):
                skipped += [(shape, variant.name, m) for m in modes]
                continue
            our_mask = torch_mask = None
            try:
                density = _density(variant.mask_mod, S, cfg.device)
                if variant.mask_mod:
                    args = (variant.mask_mod, None, None, S, S, cfg.device, cfg.block_size)
                    our_mask = flex_inductor.create_block_mask(*args)
                    torch_mask = torch_create_block_mask(*args)
            except Exception as error:  # e.g. out of memory: record it, go on
                note = f"block mask: {type(error).__name__}: {error}"[:300]
                failed = [
                    Row(shape, B, Hq, Hkv, S, D, variant.name, m, "flex_inductor", None, None, None)
                    for m in modes
                ]
                for row in failed:
                    row.note = note
                    _print_row(row)
                rows += failed
                if sink:
                    sink.write(failed)
                continue
            for mode in modes:
                if _over_budget(cfg):
                    skipped.append((shape, variant.name, mode))
                    continue
                cell = measure_cell(cfg, shape, variant, mode, density, our_mask, torch_mask)
                rows += cell
                if sink:
                    sink.write(cell)
                if cfg.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            del our_mask, torch_mask
    return rows, skipped


def _peak(impls: dict, name: str) -> str:
    row = impls.get(name)
    return f"{row.peak_mib:.0f}" if row is not None and row.peak_mib is not None else ""


def geomean(values: list[float]) -> float:
    """The geometric mean of positive numbers."""
    return math.exp(sum(math.log(x) for x in values) / len(values))


def markdown(rows: list[Row]) -> str:
    """A GitHub table: TF/s per implementation and our ratio to each peer.

    Rows that failed (no time) are left out. Ends with the geometric mean of
    ours / torch flex over all cells and per mode.
    """
    cells: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        if row.tflops is not None:
            cells.setdefault((row.shape, row.variant, row.mode), {})[row.impl] = row
    lines = [
        "| shape | variant | mode | flex_inductor TF/s | torch flex TF/s | cuDNN TF/s | FA2 TF/s "
        "| vs torch flex | vs cuDNN | vs FA2 | ours peak MiB | torch flex peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for (shape, variant, mode), impls in cells.items():
        ours = impls.get("flex_inductor")

        def tf(name, impls=impls):
            return f"{impls[name].tflops:.0f}" if name in impls else ""

        def ratio(name, impls=impls, ours=ours):
            if ours is None or name not in impls:
                return ""
            return f"{ours.tflops / impls[name].tflops:.2f}x"

        if ours is not None and "torch_flex" in impls:
            ratios.setdefault(mode, []).append(ours.tflops / impls["torch_flex"].tflops)
        peak = functools.partial(_peak, impls)
        lines.append(
            f"| {shape} | {variant} | {mode} | {tf('flex_inductor')} | {tf(PEERS[0])} | "
            f"{tf(PEERS[1])} | {tf(PEERS[2])} | {ratio(PEERS[0])} | {ratio(PEERS[1])} | "
            f"{ratio(PEERS[2])} | {peak('flex_inductor')} | {peak('torch_flex')} |"
        )
    every = [r for values in ratios.values() for r in values]
    if every:
        lines.append(
            f"\nGeometric mean vs torch flex over {len(every)} cells: {geomean(every):.2f}x"
        )
        for mode, values in ratios.items():
            lines.append(f"- {mode}: {geomean(values):.2f}x over {len(values)} cells")
    return "\n".join(lines)


def _reexec_in_interpreter() -> None:
    """Restarts this script with our kernels in Triton's interpreter (CPU smoke run).

    The interpreter is chosen when triton is first imported, which this
    module's imports already did, so only a fresh process can switch.
    """
    os.environ[_INTERPRET_ENV] = "1"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        help="comma list of " + ", ".join(SHAPES) + ", 'all' or B-H-S-D names "
        "(default: all, or none with --sweep)",
    )
    parser.add_argument(
        "--variants", default="all", help="'all' or a comma list of " + ",".join(VARIANT_NAMES)
    )
    parser.add_argument("--mode", default="fwd,fwdbwd")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="add the sequence-length sweep")
    parser.add_argument("--seq-lens", default=",".join(map(str, SWEEP_SEQ_LENS)))
    parser.add_argument("--sweep-tokens", type=int, default=SWEEP_TOKENS)
    parser.add_argument("--sweep-heads", type=int, default=SWEEP_HEADS)
    parser.add_argument("--sweep-dim", type=int, default=SWEEP_HEAD_DIM)
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "bench.csv"))
    parser.add_argument("--append", action="store_true", help="add to --csv instead of replacing")
    parser.add_argument(
        "--skip-done", default="", help="comma list of CSVs whose cells are not measured again"
    )
    parser.add_argument(
        "--time-budget", type=float, help="seconds after which no new cell is started"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the cross-check")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"one tiny cell ({DRY_RUN_SHAPE}, {DRY_RUN_VARIANTS}) on CPU, kernels interpreted",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get(_INTERPRET_ENV) != "1":
            _reexec_in_interpreter()
        device, dtype = "cpu", torch.float32
        shapes = (args.shapes or ("" if args.sweep else DRY_RUN_SHAPE)).split(",")
        shapes = [s for s in shapes if s]
        if args.variants == "all":
            args.variants = DRY_RUN_VARIANTS
    else:
        if not torch.cuda.is_available():
            print("bench_attention needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
        shapes = []
        if args.shapes == "all" or (args.shapes is None and not args.sweep):
            shapes = list(SHAPES)
        elif args.shapes:
            shapes = args.shapes.split(",")
    if args.sweep:
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        shapes += sweep_shapes(seq_lens, args.sweep_tokens, args.sweep_heads, args.sweep_dim)
    for name in shapes:
        parse_shape(name)  # fail early on a typo
    done_paths = [p for p in args.skip_done.split(",") if p and os.path.exists(p)]
    done = {(r.shape, r.variant, r.mode) for r in read_csv(done_paths)}
    cfg = Config(
        shapes=list(dict.fromkeys(shapes)),
        variants=args.variants.split(","),
        modes=args.mode.split(","),
        block_size=args.block_size,
        device=device,
        dtype=dtype,
        time_budget=args.time_budget,
        check=not args.no_check,
        done=done,
    )
    sink = CsvSink(args.csv, args.append, metadata(device)) if args.csv else None
    try:
        rows, skipped = run(cfg, sink)
    finally:
        if sink:
            sink.close()
    print()
    print(markdown(rows))
    if done:
        print(f"\n{len(done)} cells were already in {', '.join(done_paths)}")
    if skipped:
        print(f"\nSkipped for the time budget ({len(skipped)} cells; rerun with --skip-done):")
        for cell in skipped:
            print("  skipped", *cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
