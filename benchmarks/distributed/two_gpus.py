"""The two-GPU run of sequence-parallel NSA, ready for `nvidia-h200-x2`.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.distributed.two_gpus            # NCCL, bf16
    torchrun --standalone --nproc-per-node 2 -m benchmarks.distributed.two_gpus --smoke    # CPU, gloo

Every shard layout of --layouts is measured (default both: "contiguous", rank r holding tokens
r n/P ...; "balanced", rank r holding chunks r and 2P-1-r of 2P: equal compressed-branch work).

1. Correctness, per layout: the paper preset (one SparseAttention layer, random weights) on the whole
   sequence in float32 on one device is the truth. The error of the sharded bf16 run (outputs put
   back in sequence order, input gradients, parameter gradients summed over the ranks) must stay
   within 2x the error of the single-device bf16 run against the same truth: PyTorch's own bf16
   error sets the tolerance.
2. Fit: the longest sequence whose forward + backward fits on one GPU, and on P GPUs (each rank
   its shard). A rank tests its memory with the communication replaced by a concatenation with
   leaf tensors holding the other ranks' keys and values (no collective, so an out-of-memory rank
   cannot leave its peer waiting); the ranks agree on the answer, then run one real step there
   (the search uses the first layout of --layouts; the real step runs in each).
3. Scaling at the one-GPU length, a row per layout: forward + backward of the whole sequence on one
   GPU against the sharded step on P GPUs (the slowest rank); the communication alone (the pass's
   three all-gathers: the compression halo, the compressed tokens and the rotated keys and values,
   balanced: put in sequence order, and the reduce-scatters of their gradients) and each rank's compute alone (the slowest rank, and the fastest over the slowest:
   the balance), to read the communication share and whether compute and communication overlap
   (today they do not: the all-gather runs before the layer's attention, the reduce-scatter after
   its backward).

Prints a short table last (rank 0). --smoke: a tiny config, float64 truth, float32 run, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from benchmarks.distributed import steps
from benchmarks.timing import synchronize
from nsa_core import SparseAttention
from nsa_core.config import get_preset
from nsa_core.distributed import LAYOUTS, gather_sequence, shard_sequence, unshard_sequence
from nsa_core.model.sequence_parallel import shard_plan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check-len", type=int, default=8192, help="whole sequence of the correctness check")
    p.add_argument("--fit-start", type=int, default=65536)
    p.add_argument("--fit-step", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=0, help="length of the scaling table; 0: search the longest that fits on one GPU and on all, then time the one-GPU length")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="shard layouts to measure")
    p.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                   help="tiny config on CPU over gloo (checks the script)")
    return p.parse_args(argv)


def make_module(args, device, dtype) -> SparseAttention:
    torch.manual_seed(0)
    cfg = get_preset("tiny" if args.smoke else "paper")
    module = SparseAttention.from_config(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere: zero inits hide bugs
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if args.smoke else 0.02))
    return module.to(device, dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def run_whole(module, x, grad):
    xx = x.clone().requires_grad_()
    out = module(xx)
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), xx.grad, grads


def check_len(args) -> int:
    return 48 if args.smoke else args.check_len


def check(args, device, dtype, truth_dtype, group, layouts) -> dict[str, list[tuple[str, float, float]]]:
    """Per layout: (quantity, single-device error, sharded error) against the truth_dtype whole-sequence run."""
    world = dist.get_world_size(group)
    n = check_len(args)
    dim = make_module(args, "cpu", torch.float32).config.dim
    gen = torch.Generator().manual_seed(2)
    x, grad = (torch.randn(1, n, dim, generator=gen).to(device) for _ in range(2))
    truth = run_whole(make_module(args, device, truth_dtype), x.to(truth_dtype), grad.to(truth_dtype))
    module = make_module(args, device, dtype)
    single = run_whole(module, x.to(dtype), grad.to(dtype))

    results = {}
    for layout in layouts:
        xs = shard_sequence(x, group, layout).to(dtype).clone().requires_grad_()
        out = module(xs, sequence_parallel_group=group, sequence_parallel_layout=layout)
        out.backward(shard_sequence(grad, group, layout).to(dtype))
        outs = [torch.empty_like(out) for _ in range(world)]
        dx = [torch.empty_like(xs.grad) for _ in range(world)]
        dist.all_gather(outs, out.detach().contiguous(), group=group)
        dist.all_gather(dx, xs.grad.contiguous(), group=group)
        sharded_grads = {}
        for name, p in module.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g, group=group)
            sharded_grads[name] = g
        module.zero_grad(set_to_none=True)
        rows = [("output", rel_err(single[0], truth[0]), rel_err(unshard_sequence(outs, layout), truth[0])),
                ("input gradient", rel_err(single[1], truth[1]), rel_err(unshard_sequence(dx, layout), truth[1]))]
        params = [(name, rel_err(single[2][name], expected), rel_err(sharded_grads[name], expected))
                  for name, expected in truth[2].items()]
        name, s, sh = max(params, key=lambda row: row[2] / max(row[1], 1e-12))  # the closest to failing
        rows.append((f"parameter gradient, worst of {len(params)} ({name})", s, sh))
        results[layout] = rows
    return results


def shard_step(module, n, group, device, dtype, communicate: bool, layout: str = "contiguous"):
    """This rank's forward + backward of its shard; communicate=False stands the all-gather in by a
    concatenation with leaves of the other ranks' keys and values (compute and memory alone)."""
    gather = (lambda kv: gather_sequence(kv, group, layout)) if communicate else None
    return steps.shard_step(module, n, dist.get_world_size(group), dist.get_rank(group), layout, device, dtype, gather)


def comm_step(module, n, group, device, dtype, layout: str = "contiguous"):
    """The layer's communication alone, as the pass does it (model/sequence_parallel.py): the halo of
    unrotated compression keys / values, the compressed tokens, and the stacked rotated keys and
    values (2 tensors, 4 with independent_kv) all-gathered, each reduce-scattered back."""
    cfg = module.config
    plan = shard_plan(module, n, dist.get_world_size(group), dist.get_rank(group), layout)
    rows = {"halo": plan.pieces * plan.halo, "compressed": plan.pieces * plan.window_capacity,
            "keys": n // plan.world}
    stacked = {"halo": 2, "compressed": 2, "keys": 4 if cfg.independent_kv else 2}
    mine = [torch.randn(stacked[name], 1, cfg.num_kv_heads, count, cfg.dim_head, device=device, dtype=dtype,
                        requires_grad=True) for name, count in rows.items() if count > 0]

    def run() -> None:
        for t in mine:
            full = gather_sequence(t, group, layout)
            full.backward(torch.ones_like(full))
            t.grad = None
    return run


def agree(flag: bool, group, device) -> bool:
    """True only when every rank's flag is."""
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() == 0


def seconds(fn, reps: int, group, device, fastest: bool = False):
    """Mean seconds per call on this rank after two warm-up calls, the slowest rank's (all ranks start
    together); with fastest, (the slowest rank's, the fastest rank's)."""
    for _ in range(2):
        fn()
    synchronize(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    mine = (time.perf_counter() - start) / reps
    slow, fast = (torch.tensor([mine], device=device, dtype=torch.float64) for _ in range(2))
    dist.all_reduce(slow, op=dist.ReduceOp.MAX, group=group)
    if not fastest:
        return slow.item()
    dist.all_reduce(fast, op=dist.ReduceOp.MIN, group=group)
    return slow.item(), fast.item()


def longest(make_step, start: int, step: int, cap: int, group, device) -> tuple[int, bool]:
    """steps.longest where a length fits only when make_step(n)() fits on every rank."""
    return steps.longest(lambda n: agree(steps.fits(make_step(n), device), group, device), start, step, cap)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype, truth_dtype = (torch.bfloat16, torch.float32) if use_cuda else (torch.float32, torch.float64)

    def say(*lines: str) -> None:  # rank 0 prints as it goes: a run cut short still shows its first tables
        if rank == 0:
            print("\n".join(lines), flush=True)

    say(f"# {torch.cuda.get_device_name() if use_cuda else 'CPU'} x {world}, torch {torch.__version__}, "
        f"{'paper preset' if not args.smoke else 'tiny preset'}, one layer, {str(dtype).split('.')[-1]}, batch 1")

    layouts = list(dict.fromkeys(args.layouts))
    for layout, rows in check(args, device, dtype, truth_dtype, group, layouts).items():
        ok = all(sharded <= 2 * single + 1e-6 for _, single, sharded in rows)
        say("", f"correctness at {check_len(args)} tokens, {layout} layout: {'PASS' if ok else 'FAIL'}",
            "| quantity | single-device error | sharded error |", "|---|---|---|",
            *[f"| {name} | {single:.2e} | {sharded:.2e} |" for name, single, sharded in rows])

    module = make_module(args, device, dtype)
    multiple = 2 * world if "balanced" in layouts else world  # balanced: 2P chunks
    if args.smoke or args.seq_len:  # the scaling table alone, at the given length
        one = 64 * world
    else:
        cfg = module.config
        one, one_mem = longest(lambda n: steps.whole_step(module, n, device, dtype), args.fit_start, args.fit_step,
                               steps.kernel_cap(cfg, 1), group, device)
        many, many_mem = longest(lambda n: shard_step(module, n, group, device, dtype, False, layouts[0]),
                                 args.fit_start, args.fit_step * multiple, steps.kernel_cap(cfg, world), group, device)
        real = {layout: agree(steps.fits(shard_step(module, many, group, device, dtype, True, layout), device), group, device)
                for layout in layouts}
        why = {True: "memory", False: "the kernels' 32-bit in-row offsets (steps.kernel_cap)"}
        say("", f"longest sequence, forward + backward: one GPU {one} tokens (limited by {why[one_mem]}, peak "
                f"{steps.peak_gib(steps.whole_step(module, one, device, dtype), device):.1f} GiB); {world} GPUs {many} tokens "
                f"({layouts[0]} layout, limited by {why[many_mem]}; a real sharded step there: "
                + ", ".join(f"{layout} {'fits' if ok else 'does NOT fit'}" for layout, ok in real.items()) + ")")
    n = args.seq_len or one
    n -= n % multiple
    whole = seconds(steps.whole_step(module, n, device, dtype), args.reps, group, device)  # every rank alone, at once
    say("", f"scaling at {n} tokens (ms, the slowest rank; compute balance: the fastest rank's compute over the "
            "slowest's)",
        f"| layout | one device | {world} ranks | speed-up | compute alone | compute balance | communication alone | "
        "communication share | overlap |", "|---|---|---|---|---|---|---|---|---|")
    for layout in layouts:
        sharded = seconds(shard_step(module, n, group, device, dtype, True, layout), args.reps, group, device)
        compute, fastest = seconds(shard_step(module, n, group, device, dtype, False, layout), args.reps, group,
                                   device, fastest=True)
        comm = seconds(comm_step(module, n, group, device, dtype, layout), args.reps, group, device)
        say(f"| {layout} | {whole * 1e3:.1f} | {sharded * 1e3:.1f} | {whole / sharded:.2f}x | {compute * 1e3:.1f} | "
            f"{fastest / compute:.2f} | {comm * 1e3:.1f} | {comm / sharded:.0%} | "
            f"{max(0.0, compute + comm - sharded) * 1e3:.1f} ms hidden |")
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
