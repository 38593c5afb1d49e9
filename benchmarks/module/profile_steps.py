"""Where the time of NSA attention goes (GPU): each step of SparseAttention.attend timed alone,
then a kernel-level profile of one forward+backward. Paper preset, bf16, batch 1.

    python -m benchmarks.module.profile_steps --seq-len 65536 [--kv-heads 4 --heads 64] [--top 30]
    python -m benchmarks.module.profile_steps --packed    # kernel profiles: one packed row vs its documents alone

--packed: the row is packed from documents of 1k-16k tokens (packed.py's lengths, seed 0); the
kernel-level profile of one packed forward+backward is printed beside that of the same documents run
one call each (where a packed path costs more than its documents alone).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.module.packed import cumulative, document_lengths, nsa_paths, projected
from benchmarks.timing import median_ms, with_backward
from nsa_core import SparseAttention
from nsa_core.config import get_preset
from nsa_core.model.attention import BranchKeys
from nsa_core.ops.block_selection import select_blocks
from nsa_core.ops.combine import combine
from nsa_core.ops.compressed_attention import compressed_attention
from nsa_core.seqs import Seqs


def ms(fn) -> float:
    return median_ms(fn, warmup_ms=10, rep_ms=50)


def fwd_bwd(fn, *inputs):
    """fn, then the backward of its output (a tuple's first) with a random gradient; inputs' grads cleared."""
    return with_backward(fn, True, inputs, grad=torch.randn_like)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--forward-only", action=argparse.BooleanOptionalAction, default=False,
                    help="profile a forward (default: forward+backward)")
    ap.add_argument("--host", action=argparse.BooleanOptionalAction, default=False,
                    help="also record host (CPU) time per op: where launches go")
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=False,
                    help="profile a packed row against its documents alone")
    args = ap.parse_args()
    if args.packed:
        return profile_packed(args)
    cfg = get_preset("paper").replace(heads=args.heads, kv_heads=args.kv_heads)
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg).to(dev, dt)
    x = torch.randn(1, args.seq_len, cfg.dim, device=dev, dtype=dt)
    with torch.no_grad():
        xn = nsa.norm(x)
        q, k, v = (t.contiguous() for t in nsa.project(xn))
        keys = nsa.keys_of(k, v)
        ck_all, cv_all = keys.compressed_k, keys.compressed_v
        mem = cfg.num_compressed_mem_kv
        selection = select_blocks(q, ck_all[:, :, mem:], nsa.selection_rule)
        positions = torch.arange(args.seq_len, device=dev)
        q_rot, k_rot = nsa.rotate(q, positions), keys.rotated_k
        out_c = torch.randn_like(q)
    for t in (xn, q, k, v, q_rot, k_rot, ck_all, cv_all):
        t.requires_grad_(True)
    seqs = Seqs.batch(args.seq_len)
    branch_keys = BranchKeys(ck_all, cv_all, k_rot, v)

    steps = {
        "compress (MLP)": lambda: nsa.compress(k, v)[0],
        "compressed attn": lambda: compressed_attention(q, ck_all, cv_all, num_memory=mem, stride=cfg.stride,
                                                        scale=nsa.scale),
        "block selection": lambda: select_blocks(q, ck_all[:, :, mem:], nsa.selection_rule).probs,
        "rotary q": lambda: nsa.rotate(q, positions),
        "fine branch": lambda: nsa.selected_branch(q_rot, branch_keys, selection, seqs),
        "sliding branch": lambda: nsa.window_branch(q_rot, branch_keys, seqs),
        "combine + out proj": lambda: nsa.combine_heads(combine(out_c, q_rot, q_rot, nsa.to_strategy_combine(xn)).flatten(-2)),
        "attend (all)": lambda: nsa.attend_projected(xn, q, k, v),
    }
    print(f"T={args.seq_len} heads={args.heads} kv_heads={args.kv_heads} {torch.cuda.get_device_name()}")
    print(f"{'step':28s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
    for name, fn in steps.items():
        with torch.no_grad():
            f = ms(fn)
        out = fn()
        if (out[0] if isinstance(out, tuple) else out).requires_grad:
            fb = f"{ms(fwd_bwd(fn, xn, q, k, v, q_rot, k_rot, ck_all, cv_all)):11.2f}"
        else:  # no gradient flows through this step (the hard top-k selection): the forward is all of it
            fb = f"{'(no bwd)':>11s}"
        print(f"{name:28s} {f:9.2f} {fb}", flush=True)

    run = fwd_bwd(steps["attend (all)"], xn, q, k, v)
    if args.forward_only:
        def run():
            with torch.no_grad():
                steps["attend (all)"]()
    run()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])
    with profile(activities=activities, with_stack=False) as prof:
        run()
        torch.cuda.synchronize()
    sort_by = "self_cpu_time_total" if args.host else "cuda_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=70))
    if args.host:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            run()
        host_ms = (time.perf_counter() - start) * 100  # per call, without waiting for the GPU
        torch.cuda.synchronize()
        print(f"host time per call (launch only, GPU not awaited): {host_ms:.2f} ms")


def kernel_table(run, top: int) -> str:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def profile_packed(args) -> None:
    cfg = get_preset("paper").replace(heads=args.heads, kv_heads=args.kv_heads)
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    nsa = SparseAttention.from_config(cfg).to(dev, dt)
    lengths = document_lengths(args.seq_len, 1024, 16384, seed=0)
    cu = cumulative(lengths, dev)
    seqs = Seqs.packed(cu, args.seq_len, dev)
    leaves = projected(nsa, args.seq_len, dev, dt, grad=True)
    (packed, packed_leaves), (per_doc, doc_leaves) = nsa_paths(nsa, leaves, seqs.spans(), seqs)

    def as_one(fn):
        def out():
            outs = fn()
            return torch.cat(outs, dim=1) if isinstance(outs, list) else outs
        return out

    print(f"T={args.seq_len} documents {lengths} {torch.cuda.get_device_name()}")
    for name, fn, inputs in (("packed", as_one(packed), packed_leaves), ("per document", as_one(per_doc), doc_leaves)):
        step = fwd_bwd(fn, *inputs)
        print(f"\n== {name}: fwd+bwd {ms(step):.2f} ms", flush=True)
        print(kernel_table(step, args.top), flush=True)


if __name__ == "__main__":
    main()
