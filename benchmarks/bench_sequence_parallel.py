"""What one GPU says about sequence parallelism (paper preset, one SparseAttention layer, bf16, batch 1,
forward + backward).

1. The longest sequence whose forward + backward fits on this GPU (whole sequence, no parallelism):
   doubling from --start, then bisecting between the last fit and the first failure (multiples of --step).
2. One rank's compute at P = 2, 4, 8 for the first and the last rank, against the whole sequence.
   A rank runs exactly what it runs under torch.distributed (nsa_core/distributed/sequence_parallel.py's
   `shard_forward`), with the all-gather replaced by a concatenation with leaf tensors holding the
   other ranks' keys and values (whose gradients stand for the reduce-scatter): compute only, no
   communication. Rank 0's queries see few keys; the last rank's see all of them (the causal
   compressed branch grows with the position): the ratio is the compute imbalance.

    python benchmarks/bench_sequence_parallel.py [--seq-len 131072] [--ranks 2 4 8] [--skip-fit]

Prints a table; run by the lead on the one-GPU machine (the results go to benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

sys.path.insert(0, ".")
from nsa_core import SparseAttention  # noqa: E402
from nsa_core.config import get_preset  # noqa: E402
from nsa_core.distributed.sequence_parallel import shard_forward  # noqa: E402
from nsa_core.ops.seqs import Seqs  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"


def make_module() -> SparseAttention:
    torch.manual_seed(0)
    return SparseAttention.from_config(get_preset("paper")).to(DEVICE, DTYPE)


def ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median"))


def whole_step(module: SparseAttention, n: int):
    """Forward + backward of the whole sequence (b = 1)."""
    x = torch.randn(1, n, module.config.dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(x)

    def run() -> None:
        module(x).backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)
    return run


def shard_step(module: SparseAttention, n: int, world: int, rank: int):
    """Forward + backward of rank `rank` of `world`: its shard's queries over the whole sequence's keys."""
    cfg = module.config
    nl = n // world
    x = torch.randn(1, nl, cfg.dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(x)
    before, after = (torch.randn(2, 1, cfg.num_kv_heads, length, cfg.dim_head, device=DEVICE, dtype=DTYPE,
                                 requires_grad=True) for length in (rank * nl, (world - 1 - rank) * nl))
    seqs = Seqs(q_len=nl, k_len=n, q_offset=rank * nl)

    def gather(kv: torch.Tensor) -> torch.Tensor:  # (2, 1, hk, nl, d) -> (2, 1, hk, n, d), as the all-gather
        return torch.cat((before, kv, after), dim=-2)

    def run() -> None:
        shard_forward(module, x, gather, seqs).backward(grad)
        for t in (x, before, after):
            t.grad = None
        module.zero_grad(set_to_none=True)
    return run


def fits(module: SparseAttention, n: int) -> bool:
    torch.cuda.empty_cache()
    try:
        whole_step(module, n)()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def longest_fit(module: SparseAttention, start: int, step: int) -> tuple[int, float]:
    """The longest multiple of `step` that fits, and its peak memory (GiB)."""
    good, bad = 0, start
    while fits(module, bad):
        good, bad = bad, bad * 2
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        good, bad = (mid, bad) if fits(module, mid) else (good, mid)
    if good == 0:
        return 0, 0.0
    torch.cuda.reset_peak_memory_stats()
    fits(module, good)
    return good, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=131072, help="whole sequence of the compute-balance table")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--start", type=int, default=65536, help="first length of the fit search")
    p.add_argument("--step", type=int, default=16384, help="resolution of the fit search")
    p.add_argument("--skip-fit", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    module = make_module()
    print(f"# {torch.cuda.get_device_name()}, paper preset, one layer, bf16, batch 1, forward + backward")

    if not args.skip_fit:
        n, gib = longest_fit(module, args.start, args.step)
        print(f"longest whole sequence that fits: {n} tokens (peak {gib:.1f} GiB)")

    n = args.seq_len
    whole = ms(whole_step(module, n))
    print("\n| P | shard | rank 0 ms | last rank ms | last / rank 0 | last rank x P / whole |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 | {n} | {whole:.1f} | {whole:.1f} | 1.00 | 1.00 |")
    for world in args.ranks:
        if n % world:
            print(f"| {world} | {n} is not divisible by {world} | | | | |")
            continue
        first = ms(shard_step(module, n, world, 0))
        last = ms(shard_step(module, n, world, world - 1))
        print(f"| {world} | {n // world} | {first:.1f} | {last:.1f} | {last / first:.2f} | {last * world / whole:.2f} |")
    print("\n(last rank x P / whole: 1.00 = perfect scaling of the slowest rank's compute, communication excluded)")


if __name__ == "__main__":
    main()
