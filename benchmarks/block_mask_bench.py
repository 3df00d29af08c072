"""Time create_block_mask on a document mask (or another), next to torch's, with peak memory.

Each case runs in a fresh process, so that the peak resident set size
(``ru_maxrss``) it reports belongs to that case alone; on CUDA the extra peak
GPU memory comes from the caching allocator. Times are the median of
``--repeats`` runs after a warm-up run (a full-size one up to
``--warmup-max-len``; above it the run takes seconds and a small warm-up
suffices), with fewer runs when they would take longer than ``--case-budget``
seconds. torch's create_block_mask, which materialises the dense mask (about 10
bytes a position at its peak), is skipped past ``TORCH_PEER_MAX_LEN``. Prints a
GitHub-style table; ``--csv`` also writes the rows with torch version, device
and date.

    python benchmarks/block_mask_bench.py                # 8k, 32k, 131072 on cpu
    python benchmarks/block_mask_bench.py --device cuda  # 8k, 32k, 128k and 1M tokens
    python benchmarks/block_mask_bench.py --device cuda --lengths 8192 32768
    python benchmarks/block_mask_bench.py --mask causal sliding_window --no-torch
    python benchmarks/block_mask_bench.py --device cuda --index-dtypes int32,int16
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import itertools
import multiprocessing
import resource
import statistics
import sys
import time

# torch's create_block_mask holds the dense Q_LEN x KV_LEN mask (and copies
# of it): past this length it needs more memory than a 24 GiB CPU machine
# (10 GiB at 32768), or an 80 GiB GPU (out of memory at 131072).
# --torch-max-len overrides.
TORCH_PEER_MAX_LEN = {"cpu": 32768, "cuda": 65536}
# torch's measured peak, in bytes per (q, kv) position (10 GiB at 32768 on
# both devices, 40 GiB at 65536 on the H100): the dense bool mask and its copies.
TORCH_PEAK_BYTES_PER_POSITION = 10
DEFAULT_LENGTHS = {"cpu": [8192, 32768, 131072], "cuda": [8192, 32768, 131072, 1048576]}
# Longest length warmed up by a full-size run (one run at 131072 takes ~0.3 s
# on an H100, ~25 s on a 2-core CPU).
WARMUP_MAX_LEN = {"cpu": 32768, "cuda": 131072}
MEAN_DOCUMENT_LEN = 2048
SLIDING_WINDOW = 4096
PREFIX_LEN = 8192
MASKS = ("document", "causal", "sliding_window", "prefix_lm", "document_causal_window")


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "flex_inductor" or "torch"
    seq_len: int
    device: str
    mask: str = "document"  # one of MASKS
    block_size: int = 128
    threads: int | None = None  # torch's default when None
    torch_max_len: int | None = None  # TORCH_PEER_MAX_LEN of the device when None
    repeats: int = 1
    seed: int = 0
    warmup_max_len: int = 131072  # full-size warm-up run up to this length
    case_budget: float = 60.0  # seconds of timed runs after which no new run starts
    index_dtype: str = "int32"  # flex_inductor's index_dtype ("int32" or "int16")

    @property
    def label(self) -> str:
        """The impl, with a non-default index dtype."""
        return self.impl if self.index_dtype == "int32" else f"{self.impl} ({self.index_dtype})"


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    seconds: float | None
    peak_rss_delta_mib: float | None
    sparsity: float | None
    peak_device_mib: float | None = None
    note: str = ""
    runs: int = 0


def _max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes; not supported here).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def document_ids(seq_len: int, seed: int):
    """Document id of each position, for random document lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    num_docs = max(1, seq_len // MEAN_DOCUMENT_LEN)
    cuts = torch.randperm(seq_len - 1, generator=gen)[: num_docs - 1] + 1
    starts = torch.zeros(seq_len, dtype=torch.int64)
    starts[cuts] = 1
    return starts.cumsum(0)


def make_mask(name: str, seq_len: int, seed: int, device: str):
    """The mask_mod ``name`` (see MASKS) for ``seq_len`` positions."""
    doc = document_ids(seq_len, seed).to(device)

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= SLIDING_WINDOW)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < PREFIX_LEN) | (q_idx >= kv_idx)

    def document_causal_window(b, h, q_idx, kv_idx):
        return document(b, h, q_idx, kv_idx) & sliding_window(b, h, q_idx, kv_idx)

    return locals()[name]


def _run_case(config: Config, queue) -> None:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.impl == "torch":
        from torch.nn.attention.flex_attention import create_block_mask
    else:
        from flex_inductor.block_mask import create_block_mask as ours

        create_block_mask = functools.partial(ours, index_dtype=getattr(torch, config.index_dtype))

    mask_mod = make_mask(config.mask, config.seq_len, config.seed, config.device)
    # Warm up the machinery (vmap, kernels, allocator) outside the timing: on a
    # small case, then at full size where one run is short enough.
    create_block_mask(mask_mod, 1, 1, 256, 256, device=config.device)
    # ru_maxrss is a high-water mark, so the full-size warm-up is inside it.
    before = _max_rss_mib()
    if config.seq_len <= config.warmup_max_len:
        create_block_mask(
            mask_mod, 1, 1, config.seq_len, config.seq_len, config.device, config.block_size
        )
    on_cuda = config.device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    times = []
    while len(times) < config.repeats and sum(times) < config.case_budget:
        start = time.perf_counter()
        bm = create_block_mask(
            mask_mod,
            1,
            1,
            config.seq_len,
            config.seq_len,
            device=config.device,
            BLOCK_SIZE=config.block_size,
        )
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        sparsity = bm.sparsity()
        del bm
    device_mib = (torch.cuda.max_memory_allocated() - allocated) / 2**20 if on_cuda else None
    queue.put(
        Result(
            config,
            statistics.median(times),
            _max_rss_mib() - before,
            sparsity,
            device_mib,
            runs=len(times),
        )
    )


def run(config: Config) -> Result:
    """Runs one case in a fresh process and returns its measurements."""
    max_len = config.torch_max_len or TORCH_PEER_MAX_LEN.get(config.device.split(":")[0], 0)
    if config.impl == "torch" and config.seq_len > max_len:
        gib = config.seq_len**2 / 2**30
        peak = TORCH_PEAK_BYTES_PER_POSITION * gib
        return Result(
            config,
            None,
            None,
            None,
            note=f"skipped: dense mask alone is {gib:.0f} GiB, ~{peak:.0f} GiB at its peak",
        )
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_case, args=(config, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return Result(config, None, None, None, note=f"failed (exit code {proc.exitcode})")
    return queue.get()


def torch_threads() -> int:
    """torch's default intra-op thread count in this environment."""
    import torch

    return torch.get_num_threads()


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    """GitHub-style table; the ratio column is torch time / our time."""
    ours = {
        (r.config.mask, r.config.seq_len): r
        for r in results
        if r.config.impl == "flex_inductor" and r.config.index_dtype == "int32"
    }
    rows = [
        "| impl | mask | seq_len | device | threads | median time (s) | runs "
        "| peak RSS delta (MiB) | peak device memory (MiB) | sparsity (%) | torch time / ours "
        "| note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = None
        base = ours.get((r.config.mask, r.config.seq_len))
        if r.config.impl == "torch" and r.seconds and base and base.seconds:
            ratio = r.seconds / base.seconds
        rows.append(
            f"| {r.config.label} | {r.config.mask} | {r.config.seq_len} | {r.config.device} "
            f"| {r.config.threads or torch_threads()} "
            f"| {_fmt(r.seconds, '.3f')} | {r.runs} | {_fmt(r.peak_rss_delta_mib, '.0f')} "
            f"| {_fmt(r.peak_device_mib, '.0f')} "
            f"| {_fmt(r.sparsity, '.2f')} | {_fmt(ratio, '.2f')} | {r.note} |"
        )
    return "\n".join(rows)


def write_csv(path: str, results: list[Result]) -> None:
    """Writes the results with the torch version, device and date."""
    import torch

    device_name = "cpu"
    if results and results[0].config.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "impl",
                "mask",
                "seq_len",
                "device",
                "device_name",
                "seconds",
                "runs",
                "peak_rss_delta_mib",
                "peak_device_mib",
                "sparsity",
                "note",
                "torch",
                "python",
                "date",
            ]
        )
        for r in results:
            writer.writerow(
                [
                    r.config.label,
                    r.config.mask,
                    r.config.seq_len,
                    r.config.device,
                    device_name,
                    r.seconds,
                    r.runs,
                    r.peak_rss_delta_mib,
                    r.peak_device_mib,
                    r.sparsity,
                    r.note,
                    torch.__version__,
                    sys.version.split()[0],
                    datetime.date.today().isoformat(),
                ]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--lengths", type=int, nargs="+", help="default: 8k, 32k, 128k (and 1M on cuda)"
    )
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--mask", nargs="+", choices=MASKS, default=["document"], help="mask_mods to time"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each case")
    parser.add_argument("--repeats", type=int, default=3, help="report the median of N runs")
    parser.add_argument(
        "--case-budget", type=float, default=60.0, help="no new timed run after this many s"
    )
    parser.add_argument("--warmup-max-len", type=int, help="longest full-size warm-up run")
    parser.add_argument("--no-torch", action="store_true", help="skip torch's create_block_mask")
    parser.add_argument(
        "--torch-max-len", type=int, help="longest length to run torch's at (default by device)"
    )
    parser.add_argument("--csv", help="also write the results to this CSV file")
    parser.add_argument(
        "--index-dtypes",
        default="int32",
        help="comma list of our create_block_mask's index_dtype to time (int32, int16)",
    )
    args = parser.parse_args()

    ours = [("flex_inductor", d) for d in args.index_dtypes.split(",")]
    impls = ours if args.no_torch else [*ours, ("torch", "int32")]
    kind = "cpu" if args.device == "cpu" else "cuda"
    lengths = args.lengths or DEFAULT_LENGTHS[kind]
    warmup_max_len = args.warmup_max_len or WARMUP_MAX_LEN[kind]
    results = []
    for mask, seq_len, (impl, index_dtype) in itertools.product(args.mask, lengths, impls):
        config = Config(
            impl,
            seq_len,
            args.device,
            mask,
            args.block_size,
            threads=args.threads,
            torch_max_len=args.torch_max_len,
            repeats=args.repeats,
            warmup_max_len=warmup_max_len,
            case_budget=args.case_budget,
            index_dtype=index_dtype,
        )
        result = run(config)
        print(f"{config.label} {mask} {seq_len}: {result.seconds} s", file=sys.stderr, flush=True)
        results.append(result)
    print(markdown_table(results))
    if args.csv:
        write_csv(args.csv, results)


if __name__ == "__main__":
    main()
