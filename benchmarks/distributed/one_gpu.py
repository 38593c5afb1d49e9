"""What one GPU says about sequence parallelism (paper preset, one SparseAttention layer, bf16, batch 1,
forward + backward).

1. Scaling of the pass (model/sequence_parallel.py): one rank's compute at P = 2, 4, 8 in each shard
   layout (--layouts, default balanced then contiguous) for each --seq-lens (default 128k and 512k),
   against the whole sequence on one GPU. A rank runs exactly what it runs under torch.distributed
   (`shard_forward`: it compresses its own windows, rotates its own keys), with every all-gather
   (halo, compressed tokens, rotated keys and values) replaced by its result: a concatenation with
   leaf tensors holding the other ranks' rows (`StandInGather`; their gradients stand for the
   reduce-scatter): compute only, no communication. Contiguous shards: rank 0 and the last rank
   are timed (the extremes: the causal compressed branch grows with the position); balanced: every
   rank. slowest / fastest is the compute imbalance; slowest x P / whole how far the slowest rank's
   compute is from perfect scaling (issue 29: <= 1.10 / 1.15 / 1.25 at P = 2 / 4 / 8, 128k).
2. Bytes communicated per layer (arithmetic from the shard plan, not timed) at --bytes-lens
   (default 128k and 1M): the three all-gathers' gathered tensors and what a rank receives of them
   in a ring ((P - 1) / P); the backward's reduce-scatters move the same.
3. --fit: the longest sequence one GPU trains forward + backward (whole sequence, no parallelism):
   doubling from --start, then bisecting between the last fit and the first failure (multiples of
   --step), up to --max-len.

    python -m benchmarks.distributed.one_gpu --out $OUT/sp_one_gpu.json [--fit] [--seq-lens ...]
    python -m benchmarks.distributed.one_gpu --smoke --out /tmp/sp.json   # tiny preset on the CPU (checks the script)

Writes JSON to --out and prints a short table; run by the lead on an H200 (results: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.distributed import steps
from benchmarks.timing import median_ms
from nsa_core import SparseAttention
from nsa_core.config import get_preset
from nsa_core.distributed import DEFAULT_LAYOUT, LAYOUTS
from nsa_core.model.sequence_parallel import shard_plan

DTYPE = torch.bfloat16
DEVICE = "cuda"


def make_module(smoke: bool = False) -> SparseAttention:
    torch.manual_seed(0)
    return SparseAttention.from_config(get_preset("tiny" if smoke else "paper")).to(DEVICE, DTYPE)


def ms(fn) -> float:
    """Median ms: do_bench with 3 ms of warm-up and 20 of repeats; --smoke (CPU): one warm-up, two runs."""
    return median_ms(fn, DEVICE, warmup_ms=3, rep_ms=20, cpu_warmup=1, cpu_reps=2)


def ranks_timed(world: int, layout: str) -> list[int]:
    """Contiguous: rank 0 and the last (the extremes); balanced: every rank."""
    return sorted({0, world - 1}) if layout == "contiguous" else list(range(world))


def balance(module: SparseAttention, n: int, world: int, layout: str, whole: float) -> dict:
    """The timed ranks of `layout` at P = world: ms per rank, slowest / fastest, slowest x P / whole."""
    pieces = 2 if layout == "balanced" else 1
    row = dict(layout=layout, P=world, seq_len=n, shard=n // world)
    if n % (pieces * world):
        return {**row, "skipped": f"{n} is not divisible by {pieces * world}"}
    times = {rank: ms(steps.shard_step(module, n, world, rank, layout, DEVICE, DTYPE)) for rank in ranks_timed(world, layout)}
    slow, fast = max(times, key=times.get), min(times, key=times.get)
    return {**row, "ms_per_rank": times, "slowest_rank": slow, "slowest_ms": times[slow], "fastest_ms": times[fast],
            "imbalance": times[slow] / times[fast], "scaling": times[slow] * world / whole}


def bytes_per_layer(module: SparseAttention, n: int, world: int, layout: str, element_bytes: int = 2) -> dict:
    """The all-gathers of one layer's forward (the backward's reduce-scatters move the same)."""
    cfg = module.config
    plan = shard_plan(module, n, world, 0, layout)
    rows = plan.gathered_elements_per_row()
    kv_tensors = 4 if cfg.independent_kv else 2
    stacked = dict(halo=2, compressed=2, keys=kv_tensors)
    gathered = {name: stacked[name] * tokens * cfg.num_kv_heads * cfg.dim_head * element_bytes for name, tokens in rows.items()}
    total = sum(gathered.values())
    return dict(layout=layout, P=world, seq_len=n, gathered_bytes=gathered, gathered_total=total,
                received_per_rank=total * (world - 1) // world)


def _gib(b: float) -> str:
    return f"{b / 2**30:.3f}"


def main(argv=None) -> dict:
    global DTYPE, DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 524288], help="whole sequences of the scaling table")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=[DEFAULT_LAYOUT, "contiguous"])
    p.add_argument("--bytes-lens", type=int, nargs="+", default=[131072, 1048576], help="lengths of the bytes table")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=False,
                   help="also search the longest sequence one GPU trains")
    p.add_argument("--start", type=int, default=262144, help="first length of the fit search")
    p.add_argument("--step", type=int, default=32768, help="resolution of the fit search")
    p.add_argument("--max-len", type=int, default=2**21, help="the fit search's cap")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                   help="tiny preset on the CPU, float32, 128 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        DTYPE, DEVICE = torch.float32, "cpu"
        args.seq_lens, args.bytes_lens, args.fit = [128], [128, 256], False
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    module = make_module(args.smoke)
    where = "CPU (smoke), tiny preset" if args.smoke else f"{torch.cuda.get_device_name()}, paper preset"
    results: dict = dict(device=where, dtype=str(DTYPE).split(".")[-1], scaling=[], whole_ms={}, bytes=[])
    print(f"# {where}, one layer, {results['dtype']}, batch 1, forward + backward")

    print("\n| seq | layout | P | fastest ms | slowest ms | slowest / fastest | slowest x P / whole |\n|---|---|---|---|---|---|---|")
    for n in args.seq_lens:
        whole = ms(steps.whole_step(module, n, DEVICE, DTYPE))
        results["whole_ms"][n] = whole
        print(f"| {n} | (one GPU) | 1 | {whole:.1f} | {whole:.1f} | 1.00 | 1.00 |", flush=True)
        for layout in dict.fromkeys(args.layouts):
            for world in args.ranks:
                row = balance(module, n, world, layout, whole)
                results["scaling"].append(row)
                if "skipped" in row:
                    print(f"| {n} | {layout} | {world} | {row['skipped']} | | | |")
                else:
                    print(f"| {n} | {layout} | {world} | {row['fastest_ms']:.1f} | {row['slowest_ms']:.1f} (rank "
                          f"{row['slowest_rank']}) | {row['imbalance']:.2f} | {row['scaling']:.2f} |", flush=True)

    print("\n| seq | P | halo GiB | compressed GiB | keys + values GiB | received per rank GiB |\n|---|---|---|---|---|---|")
    element = torch.tensor([], dtype=DTYPE).element_size()
    for n in args.bytes_lens:
        for world in args.ranks:
            layout = args.layouts[0]
            if n % ((2 if layout == "balanced" else 1) * world):
                continue
            row = bytes_per_layer(module, n, world, layout, element)
            results["bytes"].append(row)
            g = row["gathered_bytes"]
            print(f"| {n} | {world} | {_gib(g['halo'])} | {_gib(g['compressed'])} | {_gib(g['keys'])} | "
                  f"{_gib(row['received_per_rank'])} |")

    if args.fit:
        n, by_memory = steps.longest(lambda n: steps.fits(steps.whole_step(module, n, DEVICE, DTYPE), DEVICE),
                                     args.start, args.step, min(args.max_len, steps.kernel_cap(module.config, 1)))
        gib = steps.peak_gib(steps.whole_step(module, n, DEVICE, DTYPE), DEVICE) if n else 0.0
        limit = "memory" if by_memory else f"the search cap ({args.max_len})"
        results["fit"] = dict(longest=n, limited_by=limit, peak_gib=gib)
        print(f"\nlongest whole sequence one GPU trains: {n} tokens (limited by {limit}; peak {gib:.1f} GiB)")
    print("\n(slowest x P / whole: 1.00 = perfect scaling of the slowest rank's compute, communication excluded)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
