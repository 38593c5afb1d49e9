"""The PyTorch path on a CPU: a tiny NSA layer's forward + backward on the fast path
(reference/fast_*.py, what backend="auto" / "torch" runs on CPU tensors), on the loop reference
(the exact twin, as before the fast path), and dense causal attention of the same size.

The layer: batch 32 x 256 tokens, dim 64, 2 query heads / 1 kv head of 32, window 16, compression
16 / stride 8, selection blocks of 16 (4 or 16 selected), causal. Dense attention: SDPA on
q, k, v of (32, 2, 256, 32). Times are the best of `--repeats` runs after one warm-up.

    python -m benchmarks.cpu.fast_path [--selected 4 16] [--threads 2] [--repeats 3] [--no-loop]
    python -m benchmarks.cpu.fast_path --smoke     # seconds: tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib

import torch
import torch.nn.functional as F

from benchmarks.timing import fastest_s
from nsa_core import SparseAttention
from nsa_core.reference.compressed_attention import compressed_attention_chunked
from nsa_core.reference.selected_attention import selected_attention_reference
from nsa_core.reference.sliding_window import sliding_window_reference


@contextlib.contextmanager
def loop_reference():
    """The ops' PyTorch side swapped back to the loop reference (what ran before the fast path)."""
    ops = {name: importlib.import_module(f"nsa_core.ops.{name}") for name in
           ("selected_attention", "sliding_window", "compressed_attention")}
    saved = [(ops["selected_attention"], "_torch_path"), (ops["sliding_window"], "sliding_window_fast"),
             (ops["compressed_attention"], "_torch_path")]
    old = [getattr(m, n) for m, n in saved]

    def selected(q, k, v, indices, block_size, valid, gates, causal, scale, window, q_offset=0):
        return selected_attention_reference(q, k, v, indices, block_size, valid, gates, causal, scale, window,
                                            q_offset=q_offset)

    for (m, n), new in zip(saved, (selected, sliding_window_reference, compressed_attention_chunked)):
        setattr(m, n, new)
    try:
        yield
    finally:
        for (m, n), fn in zip(saved, old):
            setattr(m, n, fn)


def measure(selected: int, batch: int = 32, seq_len: int = 256, repeats: int = 3, loop: bool = True) -> dict:
    """Seconds of one forward + backward: the NSA layer (fast path, loop reference) and dense SDPA."""
    torch.manual_seed(0)
    layer = SparseAttention(dim=64, dim_head=32, heads=2, kv_heads=1, sliding_window_size=16, compress_block_size=16,
                            compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=selected,
                            causal=True, backend="torch")
    x = torch.randn(batch, seq_len, 64, requires_grad=True)
    q, k, v = (torch.randn(batch, 2, seq_len, 32, requires_grad=True) for _ in range(3))

    def nsa():
        layer(x).sum().backward()

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    result = {"selected": selected, "fast": fastest_s(nsa, repeats), "dense": fastest_s(dense, repeats)}
    if loop:
        with loop_reference():
            result["loop"] = fastest_s(nsa, repeats)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selected", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = dict(batch=2, seq_len=40, repeats=1) if args.smoke else dict(repeats=args.repeats)
    results = []
    for selected in ([2] if args.smoke else args.selected):
        r = measure(selected, loop=args.loop, **sizes)
        results.append(r)
        loop = f", loop reference {r['loop']:.3f} s ({r['loop'] / r['dense']:.1f}x)" if "loop" in r else ""
        print(f"{selected} selected blocks: fast path {r['fast']:.3f} s ({r['fast'] / r['dense']:.1f}x dense), "
              f"dense {r['dense']:.3f} s{loop}")
    return results


if __name__ == "__main__":
    main()
