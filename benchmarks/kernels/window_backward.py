"""The sliding window's backward kernels timed over their launch settings: dK/dV (its warps, tiles, stages)
with dQ at the launch's own, then dQ's with dK/dV at the launch's own; the forward beside them.

    python -m benchmarks.kernels.window_backward --seq-lens 8192,65536 --groups 16,4 --json out.json
    python -m benchmarks.kernels.window_backward --smoke     # CPU (Triton's interpreter): a small shape

Paper shape: bf16, 4 kv heads, d 128, window 512, batch 1, causal (kernels/sliding_window). A variant's time is
the whole backward launch (row sums, dQ, dK/dV; launch.sliding_window_bwd) by do_bench's median; each is checked
against the launch's own settings first (max |difference| over the gradient's max: a different tile adds the
same terms in another order).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.quality_report import environment
from benchmarks.timing import median_ms
from nsa_core.kernels.sliding_window import launch

HKV, D, WINDOW = 4, 128, 512
DKDV_VARIANTS = {  # name -> DKDV_OVERRIDES; the first is the launch's own
    "own tiles": {},
    "3 stages": {"num_stages": 3},
    "8 warps": {"num_warps": 8},
    "keys 128, 8 warps": {"BLOCK_N": 128, "num_warps": 8},
    "queries 32": {"BLOCK_M": 32},
    "1 stage": {"num_stages": 1},
}
DQ_VARIANTS = {  # name -> changes to tile_config's backward for dQ (dK/dV keeps its own through DKDV_OVERRIDES)
    "own tiles": {},
    "8 warps": {"num_warps": 8},
    "queries 128, 8 warps": {"BLOCK_M": 128, "num_warps": 8},
    "3 stages": {"num_stages": 3},
    "1 stage": {"num_stages": 1},
}
SMOKE_DKDV = ("own tiles", "3 stages")
SMOKE_DQ = ("own tiles", "1 stage")


def problem(T: int, G: int, dim: int, device, dtype, seed: int = 0):
    """q, k, v, do of one row: (1, heads, T, dim), HKV kv heads of G query heads each."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, T, dim, generator=gen).to(device, dtype) for h in (HKV * G, HKV, HKV, HKV * G))


def run_variant(q, k, v, do, o, lse, window, scale, dkdv: dict, dq: dict):
    own_config, own_overrides = launch.tile_config, launch.DKDV_OVERRIDES

    def config(qq, vv, backward, first=None):
        cfg = own_config(qq, vv, backward, first)
        return {**cfg, **dq} if backward else cfg

    own = own_config(q, v, True)
    dkdv_full = {key: own[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    launch.tile_config, launch.DKDV_OVERRIDES = config, {**dkdv_full, **dkdv}  # dK/dV not moved by dQ's changes
    try:
        fn = lambda: launch.sliding_window_bwd(do, q, k, v, o, lse, window, scale)  # noqa: E731
        grads = fn()
        ms = median_ms(fn, q.device, warmup_ms=10, rep_ms=60, cpu_reps=1)
    finally:
        launch.tile_config, launch.DKDV_OVERRIDES = own_config, own_overrides
    return ms, grads


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="8192,65536")
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="a check of the script on the CPU: 120 tokens, window 40, head dim 16, two variants each")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, shapes, window, dim = torch.device("cpu"), torch.float32, [(120, 3)], 40, 16
        dkdv_variants = {n: DKDV_VARIANTS[n] for n in SMOKE_DKDV}
        dq_variants = {n: DQ_VARIANTS[n] for n in SMOKE_DQ}
    else:
        device, dtype, window, dim = torch.device("cuda"), torch.bfloat16, WINDOW, D
        shapes = [(int(t), int(g)) for t in args.seq_lens.split(",") for g in args.groups.split(",")]
        dkdv_variants, dq_variants = DKDV_VARIANTS, DQ_VARIANTS
    rows = []
    for T, G in shapes:
        q, k, v, do = problem(T, G, dim, device, dtype, seed=T + G)
        scale = q.shape[-1] ** -0.5
        o, lse = launch.sliding_window_fwd(q, k, v, window, scale)
        fwd_ms = median_ms(lambda: launch.sliding_window_fwd(q, k, v, window, scale), device, warmup_ms=10,
                           rep_ms=60, cpu_reps=1)
        want = None
        cases = [("dk/dv", name, overrides, {}) for name, overrides in dkdv_variants.items()]
        cases += [("dq", name, {}, changes) for name, changes in dq_variants.items()]
        for kernel, name, dkdv, dq in cases:
            try:
                ms, grads = run_variant(q, k, v, do, o, lse, window, scale, dkdv, dq)
            except Exception as error:  # a tile that does not fit (shared memory, registers): recorded, not fatal
                rows.append(dict(T=T, G=G, kernel=kernel, variant=name, error=f"{type(error).__name__}: {error}"[:200]))
                print(rows[-1], flush=True)
                continue
            want = grads if want is None else want
            diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                       for a, b in zip(grads, want))
            rows.append(dict(T=T, G=G, kernel=kernel, variant=name, backward_ms=ms, forward_ms=fwd_ms,
                             backward_over_forward=ms / fwd_ms, max_rel_diff=diff))
            print(rows[-1], flush=True)
    results = dict(environment=environment(device, str(dtype)), window=window, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| T | G | varied | variant | backward ms | x forward | max rel. diff |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['T']} | {r['G']} | {r['kernel']} | {r['variant']} | {r['error'][:60]} | | |")
            continue
        print(f"| {r['T']} | {r['G']} | {r['kernel']} | {r['variant']} | {r['backward_ms']:.3f} | "
              f"{r['backward_over_forward']:.2f} | {r['max_rel_diff']:.1e} |")
    return results


if __name__ == "__main__":
    main()
