"""What one GPU says about sequence parallelism (paper preset, one SparseAttention layer, bf16, batch 1,
forward + backward).

1. The longest sequence whose forward + backward fits on this GPU (whole sequence, no parallelism):
   doubling from --start, then bisecting between the last fit and the first failure (multiples of --step),
   up to the length the kernels' 32-bit offsets take (steps.kernel_cap).
2. One rank's compute at P = 2, 4, 8 in each shard layout (--layouts), against the whole sequence.
   A rank runs exactly what it runs under torch.distributed (nsa_core/distributed/sequence_parallel.py's
   `shard_forward`), with the all-gather replaced by a concatenation with leaf tensors holding the
   other ranks' keys and values (whose gradients stand for the reduce-scatter): compute only, no
   communication. Contiguous shards: rank 0's queries see few keys, the last rank's all of them (the
   causal compressed branch grows with the position), so rank 0 and the last rank are timed, the
   extremes. Balanced shards (rank r: chunks r and 2P - 1 - r of 2P): every rank is timed. The
   slowest over the fastest rank is the compute imbalance; the slowest rank x P over the whole
   sequence is how far the slowest rank's compute is from perfect scaling.

    python -m benchmarks.distributed.one_gpu [--seq-len 131072] [--ranks 2 4 8] [--layouts ...] [--skip-fit]
    python -m benchmarks.distributed.one_gpu --smoke      # tiny preset on the CPU, float32 (checks the script)

Prints a table; run by the lead on the one-GPU machine (the results go to benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.distributed import steps
from benchmarks.timing import median_ms
from nsa_core import SparseAttention
from nsa_core.config import get_preset
from nsa_core.distributed import LAYOUTS

DTYPE = torch.bfloat16
DEVICE = "cuda"


def make_module(smoke: bool = False) -> SparseAttention:
    torch.manual_seed(0)
    return SparseAttention.from_config(get_preset("tiny" if smoke else "paper")).to(DEVICE, DTYPE)


def ms(fn) -> float:
    """Median ms: do_bench with 3 ms of warm-up and 20 of repeats; --smoke (CPU): one warm-up, two runs."""
    return median_ms(fn, DEVICE, warmup_ms=3, rep_ms=20, cpu_warmup=1, cpu_reps=2)


def whole_step(module: SparseAttention, n: int):
    return steps.whole_step(module, n, DEVICE, DTYPE)


def shard_step(module: SparseAttention, n: int, world: int, rank: int, layout: str = "contiguous"):
    return steps.shard_step(module, n, world, rank, layout, DEVICE, DTYPE)


def ranks_timed(world: int, layout: str) -> list[int]:
    """Contiguous: rank 0 and the last (the extremes); balanced: every rank."""
    return sorted({0, world - 1}) if layout == "contiguous" else list(range(world))


def balance_row(module: SparseAttention, n: int, world: int, layout: str, whole: float) -> str:
    """One table row: the fastest and the slowest timed rank of `layout` at P = world."""
    pieces = 2 if layout == "balanced" else 1
    if n % (pieces * world):
        return f"| {layout} | {world} | {n} is not divisible by {pieces * world} | | | | | |"
    ranks = ranks_timed(world, layout)
    times = {rank: ms(shard_step(module, n, world, rank, layout)) for rank in ranks}
    slow, fast = max(times, key=times.get), min(times, key=times.get)
    which = "0, last" if layout == "contiguous" else "all"
    return (f"| {layout} | {world} | {n // world} | {which} | {times[fast]:.1f} (rank {fast}) | "
            f"{times[slow]:.1f} (rank {slow}) | {times[slow] / times[fast]:.2f} | {times[slow] * world / whole:.2f} |")


def main(argv=None) -> list[str]:
    global DTYPE, DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=131072, help="whole sequence of the compute-balance table")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="shard layouts to time")
    p.add_argument("--start", type=int, default=65536, help="first length of the fit search")
    p.add_argument("--step", type=int, default=16384, help="resolution of the fit search")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, float32, 128 tokens, no fit search")
    args = p.parse_args(argv)
    if args.smoke:
        DTYPE, DEVICE = torch.float32, "cpu"
        args.seq_len, args.skip_fit = 128, True
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    module = make_module(args.smoke)
    where = "CPU (smoke), tiny preset" if args.smoke else f"{torch.cuda.get_device_name()}, paper preset"
    print(f"# {where}, one layer, {str(DTYPE).split('.')[-1]}, batch 1, forward + backward")

    if not args.skip_fit:
        n, by_memory = steps.longest(lambda n: steps.fits(whole_step(module, n), DEVICE), args.start, args.step,
                                     steps.kernel_cap(module.config, 1))
        gib = steps.peak_gib(whole_step(module, n), DEVICE) if n else 0.0
        limit = "memory" if by_memory else "the kernels' 32-bit offsets"
        print(f"longest whole sequence that fits: {n} tokens (limited by {limit}; peak {gib:.1f} GiB)")

    n = args.seq_len
    whole = ms(whole_step(module, n))
    rows = ["| layout | P | shard | ranks timed | fastest ms | slowest ms | slowest / fastest | slowest x P / whole |",
            "|---|---|---|---|---|---|---|---|",
            f"| (one GPU) | 1 | {n} | | {whole:.1f} | {whole:.1f} | 1.00 | 1.00 |"]
    print("", *rows, sep="\n", flush=True)
    for layout in dict.fromkeys(args.layouts):
        for world in args.ranks:
            rows.append(balance_row(module, n, world, layout, whole))
            print(rows[-1], flush=True)
    print("\n(slowest x P / whole: 1.00 = perfect scaling of the slowest rank's compute, communication excluded)")
    return rows


if __name__ == "__main__":
    main()
