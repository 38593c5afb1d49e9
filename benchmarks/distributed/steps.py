"""The steps and the fit search that the sequence-parallel benchmarks share
(one_gpu.py on one GPU, two_gpus.py on several): a whole sequence's
forward + backward, one rank's forward + backward of its shard, whether a step fits in memory, and
the longest length that fits, capped where the kernels' 32-bit in-row offsets end (T x dim_head < 2**31).

A rank's step runs exactly what it runs under torch.distributed (`shard_forward`); without a
`gather`, every all-gather (halo, compressed tokens, rotated keys and values) is replaced by a
concatenation with leaf tensors holding the other ranks' rows (`StandInGather`, whose gradients
stand for the reduce-scatter): compute and memory alone, on one device.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks import timing
from nsa_core import SparseAttention
from nsa_core.kernels.outputs import MAX_PER_ROW_EXTENT
from nsa_core.model.sequence_parallel import StandInGather, shard_forward, shard_plan


def whole_step(module: SparseAttention, n: int, device, dtype) -> Callable[[], None]:
    """Forward + backward of the whole sequence (batch 1)."""
    x = torch.randn(1, n, module.config.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def run() -> None:
        module(x).backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)
    return run


def shard_step(module: SparseAttention, n: int, world: int, rank: int, layout: str, device, dtype,
               gather: Callable | None = None) -> Callable[[], None]:
    """Forward + backward of rank `rank` of `world`: its shard's queries over the whole sequence's
    keys. gather: the collective (chunk-structured rows -> every chunk's, in sequence order:
    model/sequence_parallel.py), or None for the one-device stand-in."""
    cfg = module.config
    plan = shard_plan(module, n, world, rank, layout)
    x = torch.randn(1, n // world, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    stand_in = None
    if gather is None:
        stand_in = StandInGather(plan, lambda shape: torch.randn(shape, device=device, dtype=dtype, requires_grad=True))
        gather = stand_in

    def run() -> None:
        shard_forward(module, x, plan, gather).backward(grad)
        for t in (x, *(stand_in.leaves if stand_in else ())):
            t.grad = None
        module.zero_grad(set_to_none=True)
    return run


def fits(step: Callable[[], None], device) -> bool:
    """Whether one call of the step runs without running out of GPU memory (always on the CPU)."""
    if torch.device(device).type != "cuda":
        return True
    torch.cuda.empty_cache()
    try:
        step()
        timing.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def peak_gib(step: Callable[[], None], device) -> float:
    """Peak GPU memory of one call of the step (0 on the CPU)."""
    if torch.device(device).type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    return timing.peak_gib(step, device)[0]


def kernel_cap(cfg, ranks: int) -> int:
    """The longest whole sequence whose per-rank tensors the kernels' offsets take: 64-bit across
    (batch, head) rows, 32-bit within one (T x dim_head elements < 2**31, 16M tokens at 128); beyond
    it the attention branches fall back to the PyTorch reference, which is not what a user would run."""
    return MAX_PER_ROW_EXTENT // cfg.dim_head * ranks


def longest(fits_at: Callable[[int], bool], start: int, step: int, cap: int) -> tuple[int, bool]:
    """The longest multiple of `step` up to `cap` for which fits_at(n) holds (doubling from `start`,
    then bisecting), and whether memory (True) or the cap (False) stopped it."""
    cap -= cap % step
    good, bad = 0, min(start, cap)
    while fits_at(bad):
        good = bad
        if bad == cap:
            return cap, False
        bad = min(bad * 2, cap)
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        good, bad = (mid, bad) if fits_at(mid) else (good, mid)
    return good, True
