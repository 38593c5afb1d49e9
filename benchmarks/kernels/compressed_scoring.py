"""The compressed branch with its block selection (ops.compressed_selection) on the fused training
kernel (kernels/compressed_scoring.py + block_topk) against the two ops it replaces (compressed_attention
then select_blocks, each on its kernels), both with backend="triton", in one run: the two paths' outputs
and selections compared first, then forward and forward+backward medians at the paper shape
(64 q / 4 kv heads of 128, compression 32 / 16, 16 blocks of 64 with 1 initial + 2 local forced, bf16,
batch 1, causal), for both importance scores.

    python -m benchmarks.kernels.compressed_scoring [--seq-lens 8192,16384,65536] [--json FILE]
    python -m benchmarks.kernels.compressed_scoring --smoke   # tiny, on the CPU (the interpreter)
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from benchmarks.timing import median_ms
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.selection import SelectionRule


def paper_inputs(T: int, device: str, dtype: torch.dtype, heads: int = 64, kv_heads: int = 4, d: int = 128,
                 stride: int = 16, memory: int = 1):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, T, d, device=device, dtype=dtype, generator=g)
    ck, cv = (torch.randn(1, kv_heads, memory + T // stride, d, device=device, dtype=dtype, generator=g)
              for _ in range(2))
    return q, ck, cv


def paper_rule(importance: str, group: int, d: int = 128, selected: int = 16, block: int = 64) -> SelectionRule:
    return SelectionRule(num_selected=selected, selection_block_size=block, stride=16, group_size=group,
                         share_across_group=True, interpolated=False, use_diff_topk=False, causal=True,
                         scale=d ** -0.5, importance=importance, compress_block=32, forced_initial=1,
                         forced_local=2)


def paths(q, ck, cv, rule, memory: int):
    """fused, two_op: () -> (output, selection) of each path (the op fused for both scores here: it
    keeps the two ops for the scores that measured slower fused)."""
    op = importlib.import_module("nsa_core.ops.compressed_selection")
    op.FUSED_TRAINING_SCORES = frozenset({"mean_logits", "summed_probs"})

    def fused():
        return compressed_selection(q, ck, cv, None, rule, num_memory=memory, scale=rule.scale, backend="triton")

    def two_op():  # selection keys given: the op takes compressed_attention then select_blocks
        return compressed_selection(q, ck, cv, ck[:, :, memory:], rule, num_memory=memory, scale=rule.scale,
                                    backend="triton")
    return fused, two_op


def agreement(fused, two_op) -> dict:
    (out_f, sel_f), (out_t, sel_t) = fused(), two_op()
    rel = ((out_f.float() - out_t.float()).norm() / out_t.float().norm()).item()
    same = (sel_f.indices == sel_t.indices).float().mean().item()
    return {"output_rel_err": rel, "same_selected_slots": same}


def timed(fn, leaves, device: str) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn's output with autograd recording."""
    def fwd():
        return fn()[0]

    def fwd_bwd():
        out = fn()[0]
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return median_ms(fwd, device), median_ms(fwd_bwd, device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="8192,16384,65536")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lens = [256] if args.smoke else [int(t) for t in args.seq_lens.split(",")]
    heads, kv_heads, d = (6, 2, 16) if args.smoke else (64, 4, 128)
    rows = []
    for T in lens:
        for importance in ("mean_logits", "summed_probs"):
            q, ck, cv = (t.requires_grad_() for t in paper_inputs(T, device, dtype, heads, kv_heads, d))
            rule = paper_rule(importance, heads // kv_heads, d, selected=4 if args.smoke else 16,
                              block=32 if args.smoke else 64)
            fused, two_op = paths(q, ck, cv, rule, memory=1)
            with torch.no_grad():
                row = {"T": T, "importance": importance, **agreement(fused, two_op)}
            (row["fused_fwd_ms"], row["fused_fwd_bwd_ms"]) = timed(fused, (q, ck, cv), device)
            (row["two_op_fwd_ms"], row["two_op_fwd_bwd_ms"]) = timed(two_op, (q, ck, cv), device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("\n| T | importance | fused fwd / fwd+bwd (ms) | two ops fwd / fwd+bwd (ms) | fwd x | fwd+bwd x | out rel err | same slots |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['importance']} | {r['fused_fwd_ms']:.3f} / {r['fused_fwd_bwd_ms']:.3f} | "
              f"{r['two_op_fwd_ms']:.3f} / {r['two_op_fwd_bwd_ms']:.3f} | {r['two_op_fwd_ms'] / r['fused_fwd_ms']:.2f} | "
              f"{r['two_op_fwd_bwd_ms'] / r['fused_fwd_bwd_ms']:.2f} | {r['output_rel_err']:.1e} | {r['same_selected_slots']:.3f} |")


if __name__ == "__main__":
    main()
