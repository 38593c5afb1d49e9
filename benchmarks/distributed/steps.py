"""The steps and the fit search that the sequence-parallel benchmarks share
(one_gpu.py on one GPU, two_gpus.py on several): a whole sequence's
forward + backward, one rank's forward + backward of its shard, whether a step fits in memory, and
the longest length that fits, capped where the kernels' 32-bit offsets end.

A rank's step runs exactly what it runs under torch.distributed (`shard_forward`); without a
`gather`, the all-gather is replaced by a concatenation with leaf tensors holding the other ranks'
keys and values (whose gradients stand for the reduce-scatter): compute and memory alone, on one device.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks import timing
from nsa_core import SparseAttention
from nsa_core.distributed import shard_spans
from nsa_core.model.sequence_parallel import place_shard, shard_forward, shard_gaps, shard_seqs
from nsa_core.kernels.outputs import MAX_PER_BATCH_EXTENT


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
    keys. gather: the collective ((2, 1, hk, nl, d) -> (2, 1, hk, n, d) in sequence order), or None
    for the stand-in concatenation."""
    cfg = module.config
    spans = shard_spans(n, world, rank, layout)
    x = torch.randn(1, n // world, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    others = [] if gather is not None else [
        torch.randn(2, 1, cfg.num_kv_heads, e - s, cfg.dim_head, device=device, dtype=dtype, requires_grad=True)
        for s, e in shard_gaps(spans, n)]
    gather = gather or (lambda kv: place_shard(kv, spans, others))
    seqs = shard_seqs(n, world, rank, layout)

    def run() -> None:
        shard_forward(module, x, gather, seqs).backward(grad)
        for t in (x, *others):
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
    """The longest whole sequence whose per-rank queries the kernels' 32-bit offsets take (a query
    tensor spans heads x tokens x dim_head elements): beyond it every branch falls back to the
    PyTorch reference, which is not what a user would run."""
    return MAX_PER_BATCH_EXTENT // (cfg.heads * cfg.dim_head) * ranks


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
