"""By-block forward: time against the number of programs sharing a key block's entries.

    python -m benchmarks.kernels.by_block_splits --seq-len 65536 --groups 4,1 --splits 1,2,4,8
"""

import argparse

import torch

from benchmarks.kernels.protocol import BLOCK, D, HKV, kernel_indices
from benchmarks.timing import median_ms
from nsa_core.kernels.selected_attention import launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--groups", default="4,1")
    ap.add_argument("--splits", default="1,2,4,8")
    args = ap.parse_args()
    T = args.seq_len
    for G in (int(g) for g in args.groups.split(",")):
        q = torch.randn(1, HKV * G, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        idx32 = kernel_indices(T, HKV)
        ref = None
        for splits in (int(s) for s in args.splits.split(",")):
            fn = lambda: launch.selected_attention_fwd(q, k, v, idx32, None, BLOCK, True, D ** -0.5, scheme="by_block", splits=splits)
            out = fn()[0]
            ref = out if ref is None else ref
            ms = median_ms(fn)
            print(f"G={G} T={T} splits={splits}: {ms:.3f} ms, equal to splits=1: {torch.equal(out, ref)}", flush=True)


if __name__ == "__main__":
    main()
