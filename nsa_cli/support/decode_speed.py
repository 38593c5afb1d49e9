"""Timing decoding (`nsa bench --decode`): one decode step of a SparseAttention layer on its static
cache against a dense attention layer with a static KV cache, in one run, both CUDA-graphed on GPU
(eager on CPU); and generation tokens/s of small Transformers with each attention.

The caches are filled with random keys and values at the given context (timing only: filling them
by a real prefill of batch x context tokens would cost minutes and tens of GiB). NSA's step: the mean
over `stride` consecutive positions (one compression cycle: only the step whose token completes a
window runs the compression network), every row at the same position or (ragged) row b at
context - b % stride, so that some row completes a window on most steps. Dense side: the
same projections, SDPA over exactly the cached tokens (every SDPA backend is tried on CUDA; the
fastest is reported), the output projection. The attention alone: each step minus its projections
(norm, q / k / v or NSA's fused qkv and gates, output projection), timed the same way. Bytes: what one
step must read from the caches; their floor: those bytes at the copy bandwidth of the device,
measured in the same run.

Dimension legend: B batch, L context, H query heads, HKV kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nsa_cli.support.speed import median_ms
from nsa_core.config import NSAConfig
from nsa_core.cuda_graph import capture
from nsa_core.model.attention import SparseAttention
from nsa_core.model.cache import NSACache
from nsa_core.model.dense import DenseAttention
from nsa_core.model.generation import GraphedStep
from nsa_core.model.transformer import Transformer
from nsa_core.sampling import sample


@dataclass
class DecodeRow:
    context: int
    batch: int
    nsa_ms: float
    dense_ms: float
    dense_backend: str
    speedup: float
    nsa_cache_mb: float  # cache bytes one NSA step must read, per step (all sequences)
    dense_cache_mb: float
    nsa_floor_ms: float  # those bytes at the device's copy bandwidth measured in the same run
    dense_floor_ms: float
    nsa_projections_ms: float  # the step's parts that are not attention, timed alone
    dense_projections_ms: float

    @property
    def nsa_attention_ms(self) -> float:
        return self.nsa_ms - self.nsa_projections_ms

    @property
    def dense_attention_ms(self) -> float:
        return self.dense_ms - self.dense_projections_ms

    @property
    def attention_speedup(self) -> float:
        """Dense attention alone over NSA's (nan where timing noise leaves no attention time)."""
        nsa, dense = self.nsa_attention_ms, self.dense_attention_ms
        return dense / nsa if nsa > 0 and dense > 0 else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "nsa_attention_ms": self.nsa_attention_ms,
                "dense_attention_ms": self.dense_attention_ms, "attention_speedup": self.attention_speedup}


def nsa_bytes_per_step(cfg: NSAConfig, context: int, batch: int, element: int) -> float:
    """Cache bytes a step reads: compressed keys and values (memory tokens included), the selected
    blocks and the own block, the window (keys and values, kv heads, head dim)."""
    hk, d = cfg.num_kv_heads, cfg.dim_head
    tokens = (context // cfg.stride + cfg.num_compressed_mem_kv
              + (cfg.num_selected_blocks + 1) * cfg.selection_block_size + cfg.sliding_window_size)
    return batch * hk * d * element * 2 * tokens


def copy_bandwidth_bytes_per_ms(device: torch.device) -> float:
    """Bytes per ms one device-to-device copy moves (read + write), measured: the byte floor's bandwidth."""
    numel = (256 << 20) if device.type == "cuda" else (16 << 20)
    src = torch.empty(numel, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * numel / ms


def _graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """fn captured in a CUDA graph (after a warm-up) on CUDA; fn itself elsewhere."""
    if device.type != "cuda":
        return fn
    graph, out = capture(fn)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _nsa_steps(nsa: SparseAttention, cache: NSACache, x: torch.Tensor, compile: bool = False) -> Callable[[], torch.Tensor]:
    """`stride` steps of x at consecutive positions, then back to the context: a step compresses a
    window only when its token completes one (one step in `stride`), so a replay times one whole
    cycle of the compression (the caller divides by `stride`)."""
    forward = (lambda: nsa(x, cache=cache))
    if compile:  # the step's glue fused by inductor (the decode kernels are custom ops with fakes)
        forward = torch.compile(forward, dynamic=False)
    steps = nsa.config.stride

    def cycle() -> torch.Tensor:
        for _ in range(steps):
            out = forward()
        cache.rewind(steps * x.shape[1])  # back to the context: every replay decodes the same positions
        return out

    return cycle


def _dense_step(dense: DenseAttention, keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                context: int) -> Callable[[], torch.Tensor]:
    positions = torch.full((1,), context, device=x.device)

    def step() -> torch.Tensor:
        xn = dense.norm(x)
        q, k, v = dense.project(xn)
        cos, sin = dense.rotary_embed.tables(positions, q.dtype)
        from nsa_core.ops.rotary import rotary

        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        keys[:, :, context : context + 1] = k
        values[:, :, context : context + 1] = v
        out = F.scaled_dot_product_attention(q, keys[:, :, : context + 1], values[:, :, : context + 1],
                                             enable_gqa=dense.heads != dense.kv_heads)
        return dense.to_out(out.transpose(1, 2).flatten(-2))

    return step


def projections_ms(nsa: SparseAttention, dense: DenseAttention, x: torch.Tensor) -> tuple[float, float]:
    """The parts of one decode step of x (B, 1, dim) that are not attention, timed alone (graphed on
    CUDA): NSA's norm, fused qkv, gates and output projection; dense's norm, q / k / v and output
    projection."""
    cfg = nsa.config
    o = torch.randn(x.shape[0], 1, cfg.heads * cfg.dim_head, device=x.device, dtype=x.dtype)

    def nsa_projections():
        xn = nsa.norm(x)
        return nsa.to_qkv(xn), nsa.to_strategy_combine(xn), nsa.combine_heads(o)

    def dense_projections():
        xn = dense.norm(x)
        return dense.project(xn), dense.to_out(o)

    with torch.no_grad():
        return (median_ms(_graphed(nsa_projections, x.device), x.device),
                median_ms(_graphed(dense_projections, x.device), x.device))


def _fastest_dense(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        with torch.no_grad():
            return median_ms(step, device), "math"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (math.inf, "none")
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with torch.no_grad(), sdpa_kernel([getattr(SDPBackend, name)]):
                ms = median_ms(_graphed(step, device), device)
        except RuntimeError:  # this backend does not take these shapes
            continue
        best = min(best, (ms, name.split("_")[0].lower()))
    return best


def decode_benchmark(cfg: NSAConfig, contexts: list[int], batches: list[int], *, device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, on_row: Callable[[DecodeRow], None] | None = None,
                     seed: int = 0, compile: bool = False, ragged: bool = False) -> list[DecodeRow]:
    """One DecodeRow per (context, batch). ragged: the rows of a batch at positions context - b % stride
    (as a serving batch's rows are), so a step where any row completes a window runs the compression;
    default: every row at the same position."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    nsa = SparseAttention.from_config(cfg).to(dev, dtype).eval()
    dense = DenseAttention(cfg.dim, cfg.dim_head, cfg.heads, True, cfg.num_kv_heads).to(dev, dtype).eval()
    element = torch.finfo(dtype).bits // 8
    bandwidth = copy_bandwidth_bytes_per_ms(dev)
    rows = []
    projections = {b: projections_ms(nsa, dense, torch.randn(b, 1, cfg.dim, device=dev, dtype=dtype)) for b in batches}
    for context in contexts:
        for batch in batches:
            x = torch.randn(batch, 1, cfg.dim, device=dev, dtype=dtype)
            cache = nsa.new_cache(batch, context + cfg.stride)
            cache.fill_random(context, ragged=cfg.stride if ragged else 0)
            with torch.no_grad():
                nsa_ms = median_ms(_graphed(_nsa_steps(nsa, cache, x, compile), dev), dev) / cfg.stride
            del cache
            shape = (batch, cfg.num_kv_heads, context + 1, cfg.dim_head)
            keys, values = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(2))
            dense_ms, backend = _fastest_dense(_dense_step(dense, keys, values, x, context), dev)
            del keys, values
            dense_bytes = 2 * batch * cfg.num_kv_heads * (context + 1) * cfg.dim_head * element
            nsa_bytes = nsa_bytes_per_step(cfg, context, batch, element)
            row = DecodeRow(context, batch, nsa_ms, dense_ms, backend, dense_ms / nsa_ms, nsa_bytes / 1e6,
                            dense_bytes / 1e6, nsa_bytes / bandwidth, dense_bytes / bandwidth, *projections[batch])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def generation_tokens_per_s(cfg: NSAConfig, *, depth: int, context: int, batch: int, steps: int, device: str,
                            dtype: torch.dtype, sparse: bool, seed: int = 0) -> float:
    """Tokens/s of the decode loop (steps tokens per sequence) of a depth-layer Transformer whose caches
    hold `context` random tokens, the step CUDA-graphed on GPU."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_dict().items()
              if k in ("sliding_window_size", "compress_block_size", "selection_block_size", "num_selected_blocks",
                       "compress_block_sliding_stride", "num_compressed_mem_kv")}
    model = Transformer(num_tokens=256, dim=cfg.dim, depth=depth, dim_head=cfg.dim_head, heads=cfg.heads,
                        kv_heads=cfg.num_kv_heads, use_sparse_attn=sparse, sparse_attn_kwargs=kwargs).to(dev, dtype).eval()
    caches = model.new_cache(batch, context + steps + 2)
    for cache in caches:
        cache.fill_random(context)
    token = torch.randint(0, 256, (batch, 1), device=dev)
    with torch.no_grad():
        step = GraphedStep(model, caches, token) if dev.type == "cuda" else (lambda ids: model(ids, cache=caches)[:, -1])
        token = sample(step(token), 0.0, None)  # warm
        if dev.type == "cuda":
            torch.cuda.synchronize()
        import time

        start = time.perf_counter()
        for _ in range(steps):
            token = sample(step(token), 0.0, None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)
