"""Cold compile time of one selected-attention configuration (forward and backward, one dtype), and
how many kernel variants (specializations) its calls compile, with what multiplies them.

The launches are recorded from the launchers on meta tensors (tools/aot.py) and compiled for
an H100 (sm_90) into a fresh, empty Triton cache: what the first call of a new configuration pays
(on this machine's CPU; no GPU needed). The paper shape by default: D 128, block 64, G 16, bf16.

    python -m tools.compile_time --dim 128 --block 64 --group 16 --dtype bf16
    python -m tools.compile_time --variants   # distinct specializations over varied calls
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nsa-cold-cache-")  # before Triton reads it

import torch  # noqa: E402

from tools.aot import captured_launches, compile_launch, prepare  # noqa: E402
from nsa_core.kernels.selected_attention import launch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def calls(D: int, block: int, G: int, dtype: torch.dtype, T: int = 4096, S: int = 16, gates: bool = False,
          causal: bool = True, per_head: bool = False, window: int = 0):
    """The launches of one forward and backward as the op makes them (the schemes launch.py picks)."""
    HKV = 4
    HQ, meta = HKV * G, dict(device="meta", dtype=dtype)
    HI = HQ if per_head else HKV
    q, k, v = torch.empty(1, HQ, T, D, **meta), torch.empty(1, HKV, T, D, **meta), torch.empty(1, HKV, T, D, **meta)
    idx = torch.empty(1, HI, T, S, device="meta", dtype=torch.int32)
    g = torch.empty(1, HI, T, S, device="meta") if gates else None
    with captured_launches() as launches:
        o, lse, entries, offsets = launch.selected_attention_fwd_with_csr(q, k, v, idx, g, block, causal, 0.125, window)
        launch.selected_attention_bwd(o, q, k, v, o, lse, idx, g, block, causal, 0.125, window, csr=(entries, offsets))
    return launches


def cold_compile(args) -> None:
    launches = calls(args.dim, args.block, args.group, DTYPES[args.dtype], T=args.seq_len)
    print(f"D {args.dim}, block {args.block}, G {args.group}, {args.dtype}, T {args.seq_len}: "
          f"{len(launches)} launches; cold cache {os.environ['TRITON_CACHE_DIR']}")
    total, seen = 0.0, set()
    for x in launches:
        p = prepare(x)
        if p.key in seen:
            continue
        seen.add(p.key)
        start = time.perf_counter()
        kernel = compile_launch(p)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"  {x.name:40s} {seconds:6.1f} s  shared {kernel.metadata.shared:6d}  "
              f"warps {kernel.metadata.num_warps} stages {kernel.metadata.num_stages}")
    print(f"total {total:.1f} s for {len(seen)} kernels")


def variants(args) -> None:
    """Distinct compiled variants over calls that differ in sequence length, slots, gates, causality,
    window and group, and the constexprs / specialized arguments whose values differ among them."""
    dtype = DTYPES[args.dtype]
    grid = [dict(T=T) for T in (1, 100, 640, 4096)] + [dict(S=8), dict(gates=True), dict(causal=False),
                                                       dict(window=512), dict(G=4), dict(per_head=True)]
    keys, values = defaultdict(set), defaultdict(lambda: defaultdict(set))
    for change in grid:
        kw = dict(D=args.dim, block=args.block, G=args.group, dtype=dtype) | change
        for x in calls(**kw):
            p = prepare(x)
            keys[x.name].add(p.key)
            names = x.kernel.arg_names
            for path, value in p.source.constants.items():
                values[x.name][names[path[0]]].add(repr(value))
            for path, attr in p.source.attrs.items():
                values[x.name][names[path[0]] + " (attrs)"].add(repr(attr))
    for name, ks in keys.items():
        varying = {n: len(v) for n, v in values[name].items() if len(v) > 1}
        print(f"{name:40s} {len(ks):3d} variants; varying: {varying}")
    print("calls:", grid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=False,
                    help="count specializations instead of compiling")
    args = ap.parse_args()
    variants(args) if args.variants else cold_compile(args)


if __name__ == "__main__":
    main()
