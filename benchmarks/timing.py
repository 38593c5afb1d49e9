"""How the benchmarks time and measure a call: its median in milliseconds (triton.testing.do_bench on
CUDA, a timed loop elsewhere), the fastest of a few runs (the CPU benchmarks), the peak memory of one
call, a call followed by its backward, and a device synchronisation that does nothing off CUDA.

Every script under benchmarks/ times through this module, each with its own warm-up and repeat
budget (do_bench's are milliseconds of warm-up and of repeats).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the GPU (CUDA devices only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device | str = "cuda", *, warmup_ms: int = 25,
              rep_ms: int = 100, cpu_warmup: int = 1, cpu_reps: int = 5) -> float:
    """Median milliseconds of one call of fn: on CUDA triton.testing.do_bench (warmup_ms of warm-up,
    rep_ms of repeats); elsewhere cpu_warmup calls, then the median of cpu_reps timed calls."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(cpu_warmup):
        fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fastest_s(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Seconds of the fastest of `repeats` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def first_call_s(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one call of fn, the GPU awaited (what a first call, compiling, pays)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_gib(fn: Callable[[], object], device: torch.device | str = "cuda") -> tuple[float, float] | None:
    """(peak GiB allocated over one call of fn, how far it rose above what was allocated before the
    call); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**30, (peak - before) / 2**30


def with_backward(fn: Callable[[], torch.Tensor], backward: bool = True, leaves: Iterable[torch.Tensor] = (),
                  grad: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """A call of fn followed (when `backward`) by the backward of its output (a tuple's first item)
    with grad(output) (default: ones x 1e-3), the gradients of `leaves` then cleared."""
    leaves = list(leaves)

    def run() -> None:
        out = fn()
        if backward:
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad(out) if grad is not None else torch.ones_like(out) * 1e-3)
            for t in leaves:
                t.grad = None

    return run
