"""Decoding on the GPU: correctness of prefill + decode against the parallel pass in bf16,
then one decode step of a paper-preset layer against dense attention with a static cache (both
CUDA-graphed, the fastest SDPA backend), the attention alone (the step minus its projections),
generation tokens/s of 4-layer Transformers, and prefill against the parallel forward.

python -m benchmarks.decode.speed [--contexts 8192,32768,65536] [--batches 1,16]
    [--importance selected_keys] [--json benchmarks/results/decode/decode.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.quality_report import environment
from benchmarks.timing import median_ms
from nsa_cli.support.decode_speed import decode_benchmark, generation_tokens_per_s
from nsa_core import SparseAttention, get_preset
from nsa_core.config import IMPORTANCE_SCORES


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_correctness(cfg, dev) -> dict:
    """bf16 kernels: prefill 1000 tokens, decode 1 + 3 + 60 tokens; against the parallel pass in bf16
    and in float32 (the reference's own bf16 error is the tolerance)."""
    torch.manual_seed(0)
    small = cfg.replace(dim=512, heads=16, kv_heads=4)
    ref = SparseAttention.from_config(small).to(dev)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1064, small.dim, device=dev)
    with torch.no_grad():
        exact = ref(x)
        bf = SparseAttention.from_config(small).to(dev, torch.bfloat16)
        bf.load_state_dict(ref.state_dict())
        xb = x.bfloat16()
        parallel_bf16 = bf(xb)
        cache = bf.new_cache(2, 1100)
        outs = [bf(xb[:, :1000], cache=cache), bf(xb[:, 1000:1001], cache=cache), bf(xb[:, 1001:1004], cache=cache)]
        outs += [bf(xb[:, t : t + 1], cache=cache) for t in range(1004, 1064)]
        decoded = torch.cat(outs, dim=1)
    result = {"parallel_bf16_vs_fp32": rel(parallel_bf16, exact), "decoded_bf16_vs_fp32": rel(decoded, exact),
              "decoded_vs_parallel_bf16": rel(decoded, parallel_bf16),
              "decode_steps_only_vs_fp32": rel(decoded[:, 1000:], exact[:, 1000:])}
    print("correctness (relative errors):", json.dumps(result), flush=True)
    return result


def prefill_vs_forward(cfg, context, dev, dtype) -> tuple[float, float]:
    nsa = SparseAttention.from_config(cfg).to(dev, dtype)
    x = torch.randn(1, context, cfg.dim, device=dev, dtype=dtype)
    with torch.no_grad():
        forward = median_ms(lambda: nsa(x), dev)

        def prefill():
            nsa(x, cache=nsa.new_cache(1, context + 16))

        return forward, median_ms(prefill, dev)


def profile_step(cfg, context, batch, dev, dtype) -> None:
    """Kernels of one compression cycle of eager decode steps (`stride` steps from the context, what the
    timed CUDA graph replays), by total GPU time; divide by the stride for one step."""
    from torch.profiler import ProfilerActivity, profile

    nsa = SparseAttention.from_config(cfg).to(dev, dtype)
    steps = cfg.stride
    cache = nsa.new_cache(batch, context + steps)
    cache.fill_random(context)
    x = torch.randn(batch, 1, cfg.dim, device=dev, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            nsa(x, cache=cache)
            cache.rewind(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                nsa(x, cache=cache)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    print(f"profile of {steps} steps (one compression cycle) from {context} x {batch}: {len(kernels)} GPU kernels "
          f"({len(kernels) / steps:.1f} a step)", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768,65536")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--generation-context", type=int, default=32768)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="also time the step compiled (torch.compile)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                    help="kernel table of one graphed decode step")
    ap.add_argument("--skip", default="", help="comma list of: correctness,generation,prefill")
    ap.add_argument("--importance", default=None, choices=IMPORTANCE_SCORES,
                    help="block importance score of the layer (default: the paper preset's)")
    ap.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=False,
                    help="also time the step with a batch's rows at different positions (context - b %% stride)")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg = get_preset("paper")
    if args.importance is not None:
        cfg = cfg.replace(importance_score=args.importance)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "environment": environment(dev, "bf16"),
               "importance_score": cfg.importance_score,
               "correctness": None if "correctness" in args.skip else check_correctness(cfg, dev)}
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = decode_benchmark(cfg, contexts, batches, device="cuda", dtype=dtype,
                            on_row=lambda r: print("step", r.to_dict(), flush=True))
    results["steps"] = [r.to_dict() for r in rows]
    if args.ragged:
        ragged = decode_benchmark(cfg, contexts, batches, device="cuda", dtype=dtype, ragged=True,
                                  on_row=lambda r: print("ragged step", r.to_dict(), flush=True))
        results["steps_ragged"] = [r.to_dict() for r in ragged]
    if args.compile:
        compiled = decode_benchmark(cfg, contexts, batches, device="cuda", dtype=dtype, compile=True,
                                    on_row=lambda r: print("compiled step", r.to_dict(), flush=True))
        results["steps_compiled"] = [r.to_dict() for r in compiled]
        rows = [min(a, b, key=lambda r: r.nsa_ms) for a, b in zip(rows, compiled)]
    if args.profile:
        profile_step(cfg, max(contexts), max(batches), dev, dtype)
    gen = {"nsa": float("nan"), "dense": float("nan")}
    for sparse in (() if "generation" in args.skip else (True, False)):
        tps = generation_tokens_per_s(cfg, depth=4, context=args.generation_context, batch=16, steps=64, device="cuda",
                                      dtype=dtype, sparse=sparse)
        gen["nsa" if sparse else "dense"] = tps
        print("generation tokens/s", "nsa" if sparse else "dense", round(tps, 1), flush=True)
    results["generation_tokens_per_s"] = gen
    fwd, pre = (float("nan"),) * 2 if "prefill" in args.skip else prefill_vs_forward(cfg, 65536, dev, dtype)
    results["prefill_64k"] = {"forward_ms": fwd, "prefill_ms": pre}
    print(f"64k prefill {pre:.2f} ms vs parallel forward {fwd:.2f} ms", flush=True)

    print("\n| context | batch | nsa step ms | dense step ms (backend) | x dense | nsa attn ms | dense attn ms | attn x dense |"
          " cache MB nsa / dense | byte floor ms nsa / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.context} | {r.batch} | {r.nsa_ms:.3f} | {r.dense_ms:.3f} ({r.dense_backend}) | {r.speedup:.2f} | "
              f"{r.nsa_attention_ms:.3f} | {r.dense_attention_ms:.3f} | {r.attention_speedup:.2f} | "
              f"{r.nsa_cache_mb:.1f} / {r.dense_cache_mb:.1f} | "
              f"{r.nsa_floor_ms:.4f} / {r.dense_floor_ms:.4f} |")
    print(f"generation tokens/s at {args.generation_context} context, batch 16, 4 layers: nsa {gen['nsa']:.0f}, "
          f"dense {gen['dense']:.0f} ({gen['nsa'] / gen['dense']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
