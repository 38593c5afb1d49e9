"""Sliding-window attention on the GPU: the band kernels (kernels/sliding_window) against the
earlier path (the selected-block kernels with the 8 preceding blocks selected and a window mask)
and dense SDPA (cuDNN and flash), with a sweep of the band kernels' tile configurations. Paper shape:
bf16, 4 kv heads, d 128, window 512.

    python -m benchmarks.kernels.sliding_window --seq-len 65536 --groups 16,4 [--no-sweep]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.timing import median_ms, with_backward
from nsa_core import selected_attention, sliding_window_attention
from nsa_core.kernels.sliding_window import launch

HKV, D, WINDOW = 4, 128, 512
CONFIGS = {  # (fwd BLOCK_M, BLOCK_N, warps, stages), (bwd BLOCK_M, BLOCK_N, warps, stages); first = launch's choice
    "64x64 w4 / 64x64 w4": ((64, 64, 4, None), (64, 64, 4, None)),
    "128x64 w8 / 64x64 w8": ((128, 64, 8, None), (64, 64, 8, None)),
    "128x128 w8 / 64x64 w8 s1": ((128, 128, 8, None), (64, 64, 8, 1)),
    "128x64 w4 / 64x128 w8": ((128, 64, 4, None), (64, 128, 8, None)),
    "64x32 w4 / 32x64 w4": ((64, 32, 4, None), (32, 64, 4, None)),
    "64x64 w4 s3 / 64x64 w4 s3": ((64, 64, 4, 3), (64, 64, 4, 3)),
}


def by_selection(q, k, v):
    T = q.shape[2]
    before = math.ceil(WINDOW / 64)
    own = torch.arange(T, device=q.device) // 64
    idx = own[:, None] - torch.arange(before, 0, -1, device=q.device)[None, :]
    valid = idx >= 0
    idx, valid = (t.view(1, 1, T, before).expand(1, HKV, T, before) for t in (idx.clamp(min=0), valid))
    return selected_attention(q, k, v, idx, block_size=64, valid=valid, window=WINDOW, backend="triton")


def timed(fn, backward):
    return median_ms(with_backward(fn, backward, grad=torch.ones_like), warmup_ms=10, rep_ms=50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="time every tile configuration of the band kernels (--no-sweep: the launch's own)")
    args = ap.parse_args()
    original = launch.tile_config
    for G in (int(g) for g in args.groups.split(",")):
        T = args.seq_len
        gen = torch.Generator(device="cuda").manual_seed(G)
        q, k, v = (torch.randn(1, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
                   for h in (HKV * G, HKV, HKV))
        small = [t[:, :, :4096].detach().float().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(small[0])
        ref = sliding_window_attention(*small, window=WINDOW, backend="torch")
        ref_grads = torch.autograd.grad(ref, small, grad)
        halves = [t.detach().bfloat16().requires_grad_() for t in small]
        ours = sliding_window_attention(*halves, window=WINDOW, backend="triton")
        grads = torch.autograd.grad(ours, halves, grad.bfloat16())
        errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((ours, *grads), (ref, *ref_grads))]
        print(f"G={G} T=4096 bf16 band kernels rel. error vs fp32 reference (out, dq, dk, dv): "
              + ", ".join(f"{e:.2e}" for e in errors), flush=True)
        rows = []
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            with sdpa_kernel(backend):
                dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)  # noqa: E731
                try:
                    rows.append((f"dense SDPA {backend.name} (causal, full)", timed(dense, False), timed(dense, True)))
                except RuntimeError:  # the backend refused the shape
                    rows.append((f"dense SDPA {backend.name} (causal, full)", float("nan"), float("nan")))
        rows.append(("selected-block kernels + window mask", timed(lambda: by_selection(q, k, v), False),
                     timed(lambda: by_selection(q, k, v), True)))
        for name, (fwd, bwd) in (CONFIGS.items() if args.sweep else list(CONFIGS.items())[:1]):
            def config(qq, vv, backward, first=None, fwd=fwd, bwd=bwd):
                cfg = original(qq, vv, backward, first)
                bm, bn, warps, stages = bwd if backward else fwd
                cfg.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
                if stages:
                    cfg["num_stages"] = stages
                return cfg
            launch.tile_config = config
            fn = lambda: sliding_window_attention(q, k, v, window=WINDOW, backend="triton")  # noqa: E731
            try:
                rows.append((f"band kernels {name}", timed(fn, False), timed(fn, True)))
            except triton.runtime.errors.OutOfResources:
                rows.append((f"band kernels {name}", float("nan"), float("nan")))
        launch.tile_config = original
        print(f"G={G} (HQ={HKV * G}) T={T}")
        print(f"{'path':44s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
        for name, f, fb in rows:
            print(f"{name:44s} {f:8.2f} {fb:11.2f}", flush=True)


if __name__ == "__main__":
    main()
