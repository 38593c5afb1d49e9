"""The decoding step's window compression (kernels/decode/window_compression.py) timed over its tilings.

    python -m benchmarks.decode.compression_tiles --json out.json

The paper layer's compression (4 kv heads of 128, windows of 32 every 16, the default MLP's 4096 hidden units,
bf16) on a batch of 16 rows and one new token: "ragged" (one row completes a window, as in a serving batch
of rows at different positions) and "in step" (every row completes one). Every tiling is checked against the
PyTorch path first (the compressed tokens it writes); the time is the median of the op's call, and "weight
GB/s" the two first-layer weights (the bytes any compressing step must read) over that time.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.quality_report import environment
from benchmarks.timing import median_ms
from nsa_core import SparseAttention
from nsa_core.kernels.decode import window_compression
from nsa_core.kernels.decode.window_compression import MLPTiles
from nsa_core.ops.window_compression import append_compressed_windows

HKV, D, R, STRIDE, CPAGE = 4, 128, 32, 16, 64


def compression_problem(batch: int, completing: int, capacity: int, device, dtype, seed: int = 0):
    """The layer's networks and a step's tensors: `completing` rows end a window at their new token."""
    torch.manual_seed(seed)
    attn = SparseAttention(dim=2048, dim_head=D, heads=16 * HKV, kv_heads=HKV, sliding_window_size=512,
                           compress_block_size=R, compress_block_sliding_stride=STRIDE, selection_block_size=64,
                           num_selected_blocks=16, causal=True).to(device, dtype)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    slots = 1 + capacity // STRIDE + 1
    scratch = slots - 1
    pages_per_row = -(-slots // CPAGE)
    table = torch.arange(batch * pages_per_row, device=device, dtype=torch.int32).view(batch, pages_per_row)
    ends = torch.arange(1, capacity + 1, device=device)
    slot_of = torch.where(ends % STRIDE == 0, ends // STRIDE, scratch)
    # row b's new token sits at a position that ends a window (15 mod 16) for the first `completing` rows
    lengths = [capacity // 2 + (STRIDE - 1 if b < completing else b % (STRIDE - 1)) for b in range(batch)]
    t = dict(ring_k=torch.randn(batch, HKV, R, D), ring_v=torch.randn(batch, HKV, R, D),
             k=torch.randn(batch, HKV, 1, D), v=torch.randn(batch, HKV, 1, D),
             positions=torch.tensor(lengths)[:, None],
             ck_pages=torch.zeros(batch * pages_per_row, HKV, CPAGE, D),
             cv_pages=torch.zeros(batch * pages_per_row, HKV, CPAGE, D))
    t = {n: x.to(device, dtype) if x.is_floating_point() else x.to(device) for n, x in t.items()}
    return attn, dict(t, slot_of=slot_of, table=table), scratch


def step(attn, t, scratch, backend):
    append_compressed_windows(t["ring_k"], t["ring_v"], t["k"], t["v"], t["positions"], slot_of=t["slot_of"],
                              scratch=scratch, ck_pages=t["ck_pages"], cv_pages=t["cv_pages"], table=t["table"],
                              compress=attn.compress_windows, mlp=attn.mlp_compression(), backend=backend)


def max_error(attn, t, scratch) -> float:
    """Largest difference between the kernels' compressed tokens and the PyTorch path's, one step."""
    got, want = ({n: x.clone() for n, x in t.items()} for _ in range(2))
    with torch.no_grad():
        step(attn, got, scratch, "triton")
        step(attn, want, scratch, "torch")
    def slots(pages):  # (B, HKV, slots, D) without the scratch slot, which only the PyTorch path writes
        batch = t["table"].shape[0]
        return pages.view(batch, -1, *pages.shape[1:]).permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :scratch].float()

    return max((slots(got[n]) - slots(want[n])).abs().max().item() for n in ("ck_pages", "cv_pages"))


def tilings() -> list[MLPTiles]:
    grid = itertools.product((16, 32, 64), (128, 256), ((4, 1), (4, 2), (4, 3), (8, 2)))
    return [MLPTiles(block_n=n, k_width=w, num_warps=nw, num_stages=ns) for n, w, (nw, ns) in grid]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    weight_bytes = 2 * (R * D) * (R * D) * dtype.itemsize
    default, rows = window_compression.TILES, []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; default {default}", flush=True)
    for case, completing in (("ragged", 1), ("in step", args.batch)):
        attn, t, scratch = compression_problem(args.batch, completing, args.capacity, device, dtype)
        for tiles in tilings():
            window_compression.TILES = tiles
            try:
                err = max_error(attn, t, scratch)
                with torch.no_grad():
                    ms = median_ms(lambda: step(attn, t, scratch, "triton"), warmup_ms=10, rep_ms=40)
            except Exception as e:  # a tiling that needs more shared memory than the GPU has
                print(f"{case} {tiles}: {type(e).__name__} {str(e)[:80]}", flush=True)
                continue
            finally:
                window_compression.TILES = default
            row = dict(case=case, **tiles.__dict__, us=ms * 1e3, weight_gb_s=weight_bytes / ms / 1e6, max_error=err)
            rows.append(row)
            print(row, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(environment=environment(device, "bf16"), rows=rows), f, indent=1)
    print("\n| case | block_n | k_width | warps | stages | us | weight GB/s | max error |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["case"], r["us"])):
        print(f"| {r['case']} | {r['block_n']} | {r['k_width']} | {r['num_warps']} | {r['num_stages']} | {r['us']:.1f} | "
              f"{r['weight_gb_s']:.0f} | {r['max_error']:.2e} |")


if __name__ == "__main__":
    main()
