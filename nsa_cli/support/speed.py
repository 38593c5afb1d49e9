"""Timing NSA against dense attention in one run (the CLI's `nsa bench`).

Attention mode times what happens between the projections and the output: NSA's three branches,
the compression MLP and the gated combine with the output projection, against dense SDPA
(flash on CUDA) followed by the same output projection. Module mode times whole modules:
SparseAttention against a dense attention layer of the same shape. Medians after warm-up;
peak memory of each side measured separately (CUDA only). On the CPU one warm-up and five
runs per median: a quick comparison, not a measurement to publish.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nsa_cli.support.checks import DTYPES as CHECK_DTYPES
from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention
from nsa_core.model.dense import DenseAttention

DTYPES = {name: dtype for name, dtype in CHECK_DTYPES.items() if name != "fp64"}  # what bench times


@dataclass
class BenchRow:
    seq_len: int
    nsa_ms: float
    dense_ms: float  # the fastest dense attention PyTorch offers here (every SDPA backend tried)
    speedup: float  # dense_ms / nsa_ms
    nsa_peak_gib: float | None
    dense_peak_gib: float | None
    dense_backend: str = "math"
    dense_flash_ms: float | None = None  # flash SDPA, reported beside the fastest (CUDA)

    def to_dict(self) -> dict:
        return asdict(self)


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int = 1, reps: int = 5) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_gib(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _dense_backends(dense_fn: Callable[[], None], dev: torch.device) -> dict[str, tuple[float, float | None]]:
    """(median ms, peak GiB) of the dense step under each SDPA backend that takes it (cuDNN wins on
    the H100; flash is reported too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timings = {}
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                timings[name.split("_")[0].lower()] = median_ms(dense_fn, dev), _peak_gib(dense_fn, dev)
        except RuntimeError:  # this backend does not take these shapes
            continue
    return timings


def _step(fn: Callable[[], torch.Tensor], backward: bool, grad_inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        if backward:
            out.backward(torch.ones_like(out) * 1e-3)
            for t in grad_inputs:
                t.grad = None

    return run


def benchmark(cfg: NSAConfig, seq_lens: list[int], *, batch: int = 1, dtype: str = "bf16", backward: bool = True,
              module_mode: bool = False, device: str = "cuda", on_row: Callable[[BenchRow], None] | None = None,
              on_progress: Callable[[int, int, str], None] | None = None) -> list[BenchRow]:
    """One row per length. on_progress(steps done, steps in all, what runs now) before each of the
    two timings of a length (dense, then NSA)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: benchmarks need one (or --device cpu for a small CPU comparison)")
    for n in seq_lens:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sequence lengths must be positive ints, got {n!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")

    def report(done: int, what: str) -> None:
        if on_progress is not None:
            on_progress(done, 2 * len(seq_lens), what)
    dev, dt = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg).to(dev, dt)
    dense = DenseAttention(cfg.dim, cfg.dim_head, cfg.heads, cfg.causal, cfg.num_kv_heads).to(dev, dt)
    rows = []
    for i, n in enumerate(seq_lens):
        x = torch.randn(batch, n, cfg.dim, device=dev, dtype=dt, requires_grad=backward)
        if module_mode:
            nsa_fn = _step(lambda: nsa(x), backward, [x])
            dense_fn = _step(lambda: dense(x), backward, [x])
        else:
            with torch.no_grad():
                xn = nsa.norm(x)
                q, k, v = (t.detach().contiguous().requires_grad_(backward) for t in nsa.project(xn))
                xn = xn.detach().requires_grad_(backward)
            group = cfg.group_size

            def dense_core() -> torch.Tensor:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=group > 1)
                return nsa.combine_heads(o.transpose(1, 2).flatten(-2))

            nsa_fn = _step(lambda: nsa.attend_projected(xn, q, k, v), backward, [xn, q, k, v])
            dense_fn = _step(dense_core, backward, [xn, q, k, v])
        report(2 * i, f"seq_len {n}: dense")
        if dev.type == "cuda":
            timings = _dense_backends(dense_fn, dev)
            backend = min(timings, key=lambda name: timings[name][0])
            (dense_ms, dense_peak), flash_ms = timings[backend], timings.get("flash", (None,))[0]
        else:
            dense_ms, dense_peak, backend, flash_ms = median_ms(dense_fn, dev), None, "math", None
        report(2 * i + 1, f"seq_len {n}: nsa")
        nsa_ms, nsa_peak = median_ms(nsa_fn, dev), _peak_gib(nsa_fn, dev)
        row = BenchRow(n, nsa_ms, dense_ms, dense_ms / nsa_ms, nsa_peak, dense_peak, backend, flash_ms)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    report(2 * len(seq_lens), "done")
    return rows
