"""The selected-attention backward on the GPU, scheme by scheme: by query (dQ kernel re-gathering
each query's blocks + CSR dK/dV kernel), by block with float32 dq partials merged in one pass,
by block with dq added atomically (not deterministic). Each variant is checked against the first
variant's gradients (auto), timed (median), and profiled kernel by kernel. Random-index protocol of
protocol.py (paper shape: bf16, 4 kv heads, head dim 128, 16 blocks of 64).

    python -m benchmarks.kernels.selection_backward --seq-len 65536 --groups 16,4,1 \
        --out benchmarks/results/kernels/selection_backward.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from benchmarks.kernels.protocol import BLOCK, HKV, D, kernel_indices, rel
from benchmarks.timing import median_ms, peak_gib
from nsa_core.kernels.selected_attention import launch

VARIANTS = {  # launch keyword arguments; "sum_tokens": tokens per program of the dq-partials merge
    "auto": dict(),
    "by_query": dict(scheme="by_query"),
    "partial_m128_w4": dict(scheme="by_block", dq_atomic=False, dkdv_block_m=128, dkdv_warps=4),
    "partial_m128_w8": dict(scheme="by_block", dq_atomic=False, dkdv_block_m=128, dkdv_warps=8),
    "partial_m128_w8_sum32": dict(scheme="by_block", dq_atomic=False, dkdv_block_m=128, dkdv_warps=8, sum_tokens=32),
    "atomic_m64_w8": dict(scheme="by_block", dq_atomic=True, dkdv_block_m=64, dkdv_warps=8),
    "atomic_m128_w4": dict(scheme="by_block", dq_atomic=True, dkdv_block_m=128, dkdv_warps=4),
    "atomic_m128_w8": dict(scheme="by_block", dq_atomic=True, dkdv_block_m=128, dkdv_warps=8),
    "atomic_m128_w8_s1": dict(scheme="by_block", dq_atomic=True, dkdv_block_m=128, dkdv_warps=8, num_stages=1),
}
# by-block forward tiles: (entry rows, warps, stages)
FWD_TILES = [(128, 4, 2), (128, 8, 2), (256, 8, 2), (64, 4, 2), (128, 4, 1)]
MAX_PARTIAL_BYTES = 24 * 2**30


def kernel_times(fn, top: int = 6) -> list[tuple[str, float]]:
    """GPU time per kernel name (ms) over one call, largest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:60]] += e.device_time / 1e3
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def run_group(G: int, T: int, variants: list[str]) -> list[dict]:
    HQ, S = G * HKV, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    idx = kernel_indices(T, HKV)
    scale = D**-0.5
    o, lse = launch.selected_attention_fwd(q, k, v, idx, None, BLOCK, True, scale)
    fwd_ms = median_ms(lambda: launch.selected_attention_fwd(q, k, v, idx, None, BLOCK, True, scale),
                       warmup_ms=10, rep_ms=50)
    do = torch.randn_like(o)
    rows, ref = [], None
    if G <= launch.BY_BLOCK_MAX_ROWS_FWD:
        for block_m, warps, stages in FWD_TILES:
            fn = lambda: launch.selected_attention_fwd(q, k, v, idx, None, BLOCK, True, scale, scheme="by_block",  # noqa: E731
                                                       num_warps=warps, block_m=block_m, num_stages=stages)
            try:
                same = torch.equal(fn()[0], o)
                ms = median_ms(fn, warmup_ms=10, rep_ms=50)
            except triton.runtime.errors.OutOfResources:
                continue
            print(json.dumps(dict(G=G, T=T, fwd_tile=[block_m, warps, stages], ms=ms, equal_to_default=same,
                                  kernels=kernel_times(fn, top=3))), flush=True)
    for name in variants:
        kw = dict(VARIANTS[name])
        if kw.get("scheme") == "by_block" and kw.get("dq_atomic") is False and HQ * T * (S + 1) * D * 4 > MAX_PARTIAL_BYTES:
            continue
        if G >= 16 and kw.get("scheme") == "by_block":
            continue  # measured: by block loses at G=16 (67 vs 50 ms at 64k, atomic dq)
        launch.SUM_DQ_TOKENS = kw.pop("sum_tokens", 16)

        def bwd(kw=kw):
            return launch.selected_attention_bwd(do, q, k, v, o, lse, idx, None, BLOCK, True, scale, **kw)
        try:
            grads = bwd()
        except triton.runtime.errors.OutOfResources as e:  # a tile too large for shared memory
            print(f"G={G} {name}: {e}", flush=True)
            continue
        if ref is None:
            ref = grads
        err = {n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads[:3], ref[:3])}
        rerun = bwd()
        identical = all(torch.equal(a, b) for a, b in zip(grads[:3], rerun[:3]))
        del grads, rerun
        peak = peak_gib(bwd)[1]
        ms = median_ms(bwd, warmup_ms=5, rep_ms=40)
        rows.append(dict(G=G, T=T, variant=name, fwd_ms=fwd_ms, bwd_ms=ms, fwdbwd_ms=fwd_ms + ms, peak_gib=peak,
                         identical_reruns=identical, rel_vs_first=err, kernels=kernel_times(bwd)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--groups", default="16,8,4,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for G in (int(g) for g in args.groups.split(",")):
        rows += run_group(G, args.seq_len, args.variants.split(","))
    g16 = {r["variant"]: r for r in rows if r["G"] == 16}
    base = g16.get("auto")
    print(f"\n{'G':>3} {'variant':<26} {'fwd':>7} {'bwd':>7} {'f+b':>7} {'per-key vs G16':>14} {'peak GiB':>8} {'det':>4}  "
          "dq/dk/dv rel vs auto")
    for r in rows:
        per_key = r["fwdbwd_ms"] / (r["G"] * HKV) / (base["fwdbwd_ms"] / 64) if base else float("nan")
        e = r["rel_vs_first"]
        print(f"{r['G']:>3} {r['variant']:<26} {r['fwd_ms']:7.2f} {r['bwd_ms']:7.2f} {r['fwdbwd_ms']:7.2f} {per_key:14.2f} "
              f"{r['peak_gib']:8.2f} {str(r['identical_reruns'])[0]:>4}  {e['dq']:.1e}/{e['dk']:.1e}/{e['dv']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
