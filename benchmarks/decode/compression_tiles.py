"""The decoding step's window compression (kernels/decode/window_compression.py) timed over its tilings.

    python -m benchmarks.decode.compression_tiles --json out.json
    python -m benchmarks.decode.compression_tiles --smoke   # CPU (Triton's interpreter): 2 rows, 2 tilings, fp32

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
from dataclasses import dataclass

import torch

from benchmarks.quality_report import environment
from benchmarks.timing import median_ms
from nsa_core import SparseAttention
from nsa_core.kernels.decode import window_compression
from nsa_core.kernels.decode.window_compression import MLPTiles
from nsa_core.ops.window_compression import append_compressed_windows

CPAGE = 64


@dataclass(frozen=True)
class Shape:
    """The compression's shape: kv heads, head dim, window (compress_block_size) and stride."""

    kv_heads: int
    dim_head: int
    window: int
    stride: int

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """The two first-layer weights (window x head dim inputs and hidden units each)."""
        return 2 * (self.window * self.dim_head) ** 2 * dtype.itemsize


PAPER = Shape(kv_heads=4, dim_head=128, window=32, stride=16)
SMOKE = Shape(kv_heads=2, dim_head=16, window=8, stride=4)


def compression_problem(shape: Shape, batch: int, completing: int, capacity: int, device, dtype, seed: int = 0):
    """The layer's networks and a step's tensors: `completing` rows end a window at their new token."""
    torch.manual_seed(seed)
    HKV, D, R, STRIDE = shape.kv_heads, shape.dim_head, shape.window, shape.stride
    attn = SparseAttention(dim=4 * HKV * D, dim_head=D, heads=16 * HKV, kv_heads=HKV, sliding_window_size=4 * R,
                           compress_block_size=R, compress_block_sliding_stride=STRIDE, selection_block_size=2 * R,
                           num_selected_blocks=4, causal=True).to(device, dtype)
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="a check of the script on the CPU: a small layer, 2 rows, 2 tilings, float32")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, batch, capacity, shape = torch.device("cpu"), torch.float32, 2, 256, SMOKE
        candidates = [MLPTiles(), MLPTiles(block_n=16, k_width=32, num_stages=1)]
    else:
        device, dtype, batch, capacity, shape = torch.device("cuda"), torch.bfloat16, args.batch, args.capacity, PAPER
        candidates = tilings()
    weight_bytes = shape.weight_bytes(dtype)
    default, rows = window_compression.TILES, []
    print(f"{environment(device, str(dtype))['device']} torch {torch.__version__}; default {default}", flush=True)
    for case, completing in (("ragged", 1), ("in step", batch)):
        attn, t, scratch = compression_problem(shape, batch, completing, capacity, device, dtype)
        for tiles in candidates:
            window_compression.TILES = tiles
            try:
                err = max_error(attn, t, scratch)
                with torch.no_grad():
                    ms = median_ms(lambda: step(attn, t, scratch, "triton"), device, warmup_ms=10, rep_ms=40)
            except Exception as e:  # a tiling that needs more shared memory than the GPU has
                print(f"{case} {tiles}: {type(e).__name__} {str(e)[:80]}", flush=True)
                continue
            finally:
                window_compression.TILES = default
            row = dict(case=case, **tiles.__dict__, us=ms * 1e3, weight_gb_s=weight_bytes / ms / 1e6, max_error=err)
            rows.append(row)
            print(row, flush=True)
    results = dict(environment=environment(device, str(dtype)), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| case | block_n | k_width | warps | stages | us | weight GB/s | max error |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["case"], r["us"])):
        print(f"| {r['case']} | {r['block_n']} | {r['k_width']} | {r['num_warps']} | {r['num_stages']} | {r['us']:.1f} | "
              f"{r['weight_gb_s']:.0f} | {r['max_error']:.2e} |")
    return results


if __name__ == "__main__":
    main()
