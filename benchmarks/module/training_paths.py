"""What the training-speed benchmark's sections share: how a path is timed and its peak taken, how a
path that cannot run records why (the run goes on), the kernel-or-reference choice, and the SDPA
backends the dense side runs under."""

from __future__ import annotations

import gc
from contextlib import nullcontext

import torch

from benchmarks.timing import median_ms, peak_gib
from nsa_core.ops.dispatch import kernel_unavailable_reason


def time_ms(fn, dev) -> float:
    """Median ms: do_bench on CUDA (10 ms of warm-up, 50 of repeats: the budget of one device run), else
    one warm-up call and the median of three."""
    return median_ms(fn, dev, warmup_ms=10, rep_ms=50, cpu_warmup=1, cpu_reps=3)


def peak_record(fn, dev) -> dict:
    """Peak allocated over one call of fn, and how far it rose above what was allocated before (CUDA;
    nothing elsewhere)."""
    measured = peak_gib(fn, dev)
    return {} if measured is None else {"peak_gib": measured[0], "peak_above_start_gib": measured[1]}


class Skipped(Exception):
    """A path that cannot run here (a graph on the CPU, a peer that did not import): its reason is the cell."""


def describe(error: Exception) -> dict:
    """{"skipped": why} or {"error": type and first line} of an exception."""
    if isinstance(error, Skipped):
        return {"skipped": str(error)}
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0][:300] if lines else ''}"}


def release(dev) -> None:
    gc.collect()  # a graphed module's forward refers to the module: a cycle
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def attempt(record: dict, key: str, measure, dev) -> None:
    """record[key] = measure() (a dict: merged into record), or record[key + '_error'] = why."""
    try:
        value = measure()
        if isinstance(value, dict):
            record.update(value)
        else:
            record[key] = value
    except Exception as error:  # one path's OOM or refusal is a cell that says why, not the end of the run
        record[f"{key}_error"] = next(iter(describe(error).values()))
    release(dev)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def kernel_backend(dev, timed: bool = True) -> str:
    """'triton' where kernels run (so a fallback raises instead of timing the reference), else 'torch'.
    Timed modules on the CPU take the reference: Triton's interpreter (as the tests run) takes minutes."""
    return "triton" if kernel_unavailable_reason(dev) is None and (dev.type == "cuda" or not timed) else "torch"


def dense_backends(dev) -> dict:
    """The SDPA backends timed: cuDNN and flash on CUDA; the CPU's own SDPA (None: no context)."""
    if dev.type != "cuda":
        return {"SDPA (CPU)": None}
    from torch.nn.attention import SDPBackend

    return {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_context(backend):
    """sdpa_kernel([backend]) (backend None: no context)."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend]) if backend is not None else nullcontext()


def sdpa_under(backend, fn):
    """fn run inside sdpa_context(backend)."""
    def run():
        with sdpa_context(backend):
            return fn()
    return run
