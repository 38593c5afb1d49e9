"""How far the selected-attention forward is from its memory floor (GPU, paper shape, T=64k).

1. Gather floor, G = 16: a kernel that only reads, for every (token, kv head), the same 17 K and
   V blocks the forward reads (16 random + own block, 2 blocks per step), and sums them: no
   softmax, no dot products. Its time is what any token-centric kernel (ours, fla's) needs.
2. By-block forward for G = 1 and 4: time of the CSR build alone and of the whole pass, with
   entry tiles of 32 / 64 / 128 rows and 4 / 8 warps.

    python -m benchmarks.kernels.selection_floor --seq-len 65536
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.kernels.protocol import BLOCK, D, HKV, S, kernel_indices
from benchmarks.timing import median_ms
from nsa_core.kernels.selected_attention import launch


@triton.jit
def gather_only_kernel(k, v, idx, out, T, S: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_n = tl.arange(0, 2 * BLOCK)
    o_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    p_k = k + i_h.to(tl.int64) * T * D
    p_v = v + i_h.to(tl.int64) * T * D
    p_sel = (i_h * T + i_t) * S
    for step in range(0, S + 2, 2):  # S selected blocks, then the own block (and one masked slot)
        slot = step + o_n // BLOCK
        blk = tl.load(idx + p_sel + slot, mask=slot < S, other=-1)
        blk = tl.where(slot == S, i_t // BLOCK, blk)
        key = blk * BLOCK + o_n % BLOCK
        m = (blk >= 0) & (key < T)
        b_k = tl.load(p_k + key[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0)
        b_v = tl.load(p_v + key[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0)
        acc += tl.sum(b_k.to(tl.float32) + b_v.to(tl.float32), axis=0)
    tl.store(out + (i_h * T + i_t) * D + o_d, acc)


def ms(fn) -> float:
    return median_ms(fn, warmup_ms=10, rep_ms=50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    T = ap.parse_args().seq_len
    torch.manual_seed(0)
    k, v = (torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    idx32 = kernel_indices(T, HKV)
    out = torch.empty(1, HKV, T, D, device="cuda", dtype=torch.float32)
    floor = ms(lambda: gather_only_kernel[(T, HKV)](k, v, idx32, out, T, S=S, BLOCK=BLOCK, D=D, num_warps=4))
    q16 = torch.randn(1, 16 * HKV, T, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5
    fwd16 = ms(lambda: launch.selected_attention_fwd(q16, k, v, idx32, None, BLOCK, True, scale, scheme="by_query"))
    gbytes = T * HKV * (S + 1) * BLOCK * D * 2 * 2 / 1e9
    print(f"T={T}: bytes gathered by a token-centric forward {gbytes:.0f} GB")
    print(f"gather only {floor:.2f} ms ({gbytes / floor:.2f} TB/s) | G=16 forward by query {fwd16:.2f} ms "
          f"({fwd16 / floor:.2f}x the gather)")
    for G in (1, 4):
        q = torch.randn(1, G * HKV, T, D, device="cuda", dtype=torch.bfloat16)
        csr = ms(lambda: launch.build_csr(idx32, HKV, T // BLOCK, G))
        print(f"G={G}: CSR build {csr:.2f} ms")
        for block_m, warps, stages in ((64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 3), (256, 8, 2)):
            try:
                t = ms(lambda: launch.selected_attention_fwd(q, k, v, idx32, None, BLOCK, True, scale, scheme="by_block",
                                                             num_warps=warps, block_m=block_m, num_stages=stages))
            except triton.runtime.errors.OutOfResources:
                t = float("nan")
            print(f"G={G} by-block forward, {block_m}-row tiles, {warps} warps, {stages} stages: {t:.2f} ms", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            launch.selected_attention_fwd(q, k, v, idx32, None, BLOCK, True, scale, scheme="by_block", num_warps=4,
                                          block_m=128)
            torch.cuda.synchronize()
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            print(f"   G={G} kernel {e.key[:60]:60s} {e.device_time_total / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
