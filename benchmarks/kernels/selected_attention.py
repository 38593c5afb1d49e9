"""Selected-block attention on the GPU: our Triton kernels against dense SDPA (flash) and
fla-core's parallel_nsa (selection only, given indices), in one run.

Protocol (../shared/BENCHMARKS.md): bf16, batch 1, 4 kv heads, head dim 128, selection block 64,
16 selected blocks per query drawn at random among the blocks before its own (causal), query
groups G = 16 (64 query heads), 4 and 1. Ours also attends each query's own block (NSA's causal
rule); fla's protocol does not. Medians of triton.testing.do_bench; peak memory per call.

    python -m benchmarks.kernels.selected_attention --seq-lens 8192,65536 --groups 16,4,1 \
        --out benchmarks/results/kernels/selected_attention.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.kernels.protocol import BLOCK, HKV, D, S, kernel_indices, random_indices, rel
from benchmarks.timing import median_ms, peak_gib, with_backward
from nsa_core import selected_attention
from nsa_core.kernels.selected_attention import launch


def bench(fn, backward_of=None):
    """(median ms, GiB above the start at the peak) of fn, followed by the backward of its output with
    backward_of(output) when given."""
    run = with_backward(fn, backward_of is not None, grad=backward_of)
    return median_ms(run), peak_gib(run)[1]


def check(G: int, T: int) -> dict:
    """Ours (bf16) and PyTorch's reference at bf16, both against the fp32 reference."""
    HQ = G * HKV
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, HQ, T, D, device="cuda", generator=gen)
    k = torch.randn(1, HKV, T, D, device="cuda", generator=gen)
    v = torch.randn(1, HKV, T, D, device="cuda", generator=gen)
    idx, valid = random_indices(T, HKV, seed=1)
    g = torch.randn(1, HQ, T, D, device="cuda", generator=gen)

    def run(dtype, backend):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = selected_attention(*ins, idx, block_size=BLOCK, valid=valid, backend=backend)
        out.backward(g.to(dtype))
        return [out.detach()] + [t.grad for t in ins]

    exact, torch_bf16, ours = run(torch.float32, "torch"), run(torch.bfloat16, "torch"), run(torch.bfloat16, "triton")
    names = ("out", "dq", "dk", "dv")
    res = {f"{n}_ours": rel(o, e) for n, o, e in zip(names, ours, exact)}
    res.update({f"{n}_torch_bf16": rel(t, e) for n, t, e in zip(names, torch_bf16, exact)})
    res["ok"] = all(res[f"{n}_ours"] <= 2 * res[f"{n}_torch_bf16"] + 1e-3 and math.isfinite(res[f"{n}_ours"]) for n in names)
    # bit-identical reruns under torch.use_deterministic_algorithms (the default backward may add dq atomically)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, again = run(torch.bfloat16, "triton"), run(torch.bfloat16, "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    res["deterministic"] = all(torch.equal(a, b) for a, b in zip(first, again))
    res.update({f"{n}_deterministic_mode": rel(o, e) for n, o, e in zip(names, first, exact)})
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="8192,16384,32768,65536")
    ap.add_argument("--groups", default="16,4,1")
    ap.add_argument("--variants", default="", help="fwd variants as sps:warps:stages;... timed at G=16 and the largest length")
    ap.add_argument("--bwd-variants", default="", help="bwd variants as sps:warps:stages:block_m;...")
    ap.add_argument("--check-len", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lens = [int(x) for x in args.seq_lens.split(",")]
    groups = [int(x) for x in args.groups.split(",")]
    try:
        from fla.ops.nsa.parallel import parallel_nsa
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception as err:  # fla-core is carried as a wheel; run without it if absent
        parallel_nsa, fla_version = None, f"unavailable ({type(err).__name__})"

    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version}
    print(info, flush=True)
    checks = {G: check(G, args.check_len) for G in groups}
    for G, c in checks.items():
        print(f"check G={G}: {c}", flush=True)

    rows = []
    for G in groups:
        HQ = G * HKV
        for T in lens:
            torch.cuda.empty_cache()
            q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            idx, valid = random_indices(T, HKV)
            grad = lambda o: torch.randn_like(o)
            ours = lambda: selected_attention(q, k, v, idx, block_size=BLOCK, valid=valid, backend="triton")
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                d_f, d_fm = bench(dense)
                d_fb, d_fbm = bench(dense, grad)
            row = dict(G=G, T=T, dense_fwd=d_f, dense_fwdbwd=d_fb, dense_fwdbwd_gib=d_fbm,
                       auto_scheme=f"{launch.choose_scheme(q, k, idx)}/{launch.choose_scheme(q, k, idx, backward=True)}")
            for scheme in ("auto", "by_query", "by_block"):
                partial_gib = HQ * T * (S + 1) * D * 6 / 2**30
                if scheme == "by_block" and partial_gib > 24:
                    continue
                original = launch.choose_scheme
                if scheme != "auto":
                    launch.choose_scheme = lambda *a, _s=scheme, **kw: _s
                try:
                    o_f, o_fm = bench(ours)
                    o_fb, o_fbm = bench(ours, grad)
                finally:
                    launch.choose_scheme = original
                row.update({f"{scheme}_fwd": o_f, f"{scheme}_fwdbwd": o_fb, f"{scheme}_fwd_gib": o_fm, f"{scheme}_fwdbwd_gib": o_fbm})
            row.update(ours_fwd=row["auto_fwd"], ours_fwdbwd=row["auto_fwdbwd"], ours_fwdbwd_gib=row["auto_fwdbwd_gib"])
            o_f = row["ours_fwd"]
            if parallel_nsa is not None and G >= 16:
                qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                idx_f = torch.where(valid, idx, -1).transpose(1, 2).contiguous()
                fla_fn = lambda: parallel_nsa(qf, kf, vf, block_indices=idx_f, block_counts=S, block_size=BLOCK)
                row["fla_fwd"], _ = bench(fla_fn)
                row["fla_fwdbwd"], row["fla_fwdbwd_gib"] = bench(fla_fn, grad)
                del qf, kf, vf, idx_f
            # time per selected key (ours): (S + own) blocks per query head
            keys = HQ * T * (valid.float().sum().item() / (HKV * T) + (BLOCK + 1) / 2 / BLOCK * 1) * BLOCK
            row["ours_fwd_ns_per_kkey"] = o_f * 1e6 / keys * 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, v, idx, valid

    variants = []
    if args.variants or args.bwd_variants:
        T, G = max(lens), 16
        HQ = G * HKV
        q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        idx32 = kernel_indices(T, HKV)
        scale = D ** -0.5
        for spec in filter(None, args.variants.split(";")):
            sps, warps, stages = (int(x) for x in spec.split(":"))
            try:
                ms = median_ms(lambda: launch.selected_attention_fwd(q, k, v, idx32, None, BLOCK, True, scale, slots_per_step=sps, num_warps=warps, num_stages=stages))
            except Exception as err:
                ms = f"failed: {type(err).__name__}"
            variants.append({"kind": "fwd", "spec": spec, "ms": ms})
            print(variants[-1], flush=True)
        o, lse = launch.selected_attention_fwd(q, k, v, idx32, None, BLOCK, True, scale)
        do = torch.randn_like(o)
        for spec in filter(None, args.bwd_variants.split(";")):
            sps, warps, stages, bm = (int(x) for x in spec.split(":"))
            try:
                ms = median_ms(lambda: launch.selected_attention_bwd(do, q, k, v, o, lse, idx32, None, BLOCK, True, scale, slots_per_step=sps, num_warps=warps, num_stages=stages, dkdv_block_m=bm))
            except Exception as err:
                ms = f"failed: {type(err).__name__}"
            variants.append({"kind": "bwd", "spec": spec, "ms": ms})
            print(variants[-1], flush=True)

    result = {"info": info, "checks": {str(k): v for k, v in checks.items()}, "rows": rows, "variants": variants}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print("\nG     T  auto scheme fwd/bwd   by_query fwd f+b | by_block fwd f+b")
    for r in rows:
        bq = f"{r.get('by_query_fwd', float('nan')):8.2f} {r.get('by_query_fwdbwd', float('nan')):8.2f}"
        bb = f"{r.get('by_block_fwd', float('nan')):8.2f} {r.get('by_block_fwdbwd', float('nan')):8.2f}"
        print(f"{r['G']:2d} {r['T']:6d} {r['auto_scheme']:>20} {bq} | {bb}")
    print("\nG     T   dense fwd  ours fwd  fla fwd | dense f+b  ours f+b  fla f+b | ours/dense fwd  f+b | fla/ours fwd  f+b | peak GiB")
    for r in rows:
        fla_f, fla_fb = r.get("fla_fwd"), r.get("fla_fwdbwd")
        fmt = lambda x: f"{x:8.2f}" if isinstance(x, float) else "       -"
        print(f"{r['G']:2d} {r['T']:6d} {r['dense_fwd']:9.2f} {r['ours_fwd']:9.2f} {fmt(fla_f)} | {r['dense_fwdbwd']:9.2f} {r['ours_fwdbwd']:9.2f} {fmt(fla_fb)} | "
              f"{r['dense_fwd'] / r['ours_fwd']:8.2f}x {r['dense_fwdbwd'] / r['ours_fwdbwd']:6.2f}x | "
              + (f"{fla_f / r['ours_fwd']:8.2f}x {fla_fb / r['ours_fwdbwd']:6.2f}x" if fla_f else "        -       -")
              + f" | {r['ours_fwdbwd_gib']:.2f}")


if __name__ == "__main__":
    main()
