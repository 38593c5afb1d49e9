"""Two launches of a decoding step timed over their warps: the selection's merge (the compressed branch's
partials merged, the block scores, the top-k; kernels/decode/selection_kernel.py), also with its top-k as one
sort of packed keys (compressed_selection.SORTED_TOP_K), and the fused combine with the gates' linear layer in it
(kernels/decode/fine_window.py), with the width of the gates' input tile.

    python -m benchmarks.decode.step_warps --json out.json
    python -m benchmarks.decode.step_warps --smoke      # CPU (Triton's interpreter): a small layer, two variants each

The paper layer (64 q / 4 kv heads of 128, compression stride 16 and windows of 32, blocks of 64, 16 selected with
1 + 2 forced, window 512, dim 2048), bf16, one new token, contexts x batches as given. Each variant's launches are
captured in one CUDA graph and timed by the median of its replays (benchmarks/timing.py); the selected branch's
split launch is in the combine's time (the two run together in a step). Every variant is checked against the
default first: the same selected blocks, the combine within 2e-2 relative error (bf16 roundings of the gates).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from benchmarks.quality_report import environment
from benchmarks.timing import median_ms
from nsa_core.cuda_graph import capture
from nsa_core.kernels.decode import compressed_selection, fine_window


@dataclass(frozen=True)
class Layer:
    heads: int
    kv_heads: int
    dim_head: int
    dim: int
    stride: int
    window: int  # compression window
    block: int  # selection block = page
    selected: int
    sliding: int


PAPER = Layer(heads=64, kv_heads=4, dim_head=128, dim=2048, stride=16, window=32, block=64, selected=16, sliding=512)
SMOKE = Layer(heads=6, kv_heads=2, dim_head=16, dim=40, stride=4, window=8, block=16, selected=3, sliding=20)
MERGE_WARPS = (1, 2, 4, 8)
# (warps, gate inputs per step) besides the launch's own; None: the launch's
COMBINE_VARIANTS = ((2, None), (4, None), (4, 2048), (8, 2048))


def selection_inputs(layer: Layer, context: int, batch: int, device, dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    compressed = context // layer.stride
    pages_per_row = -(-(1 + compressed + 1) // layer.block)
    cast = lambda t: t.to(device=device, dtype=dtype)
    pool = (batch * pages_per_row, layer.kv_heads, layer.block, layer.dim_head)
    return dict(q=cast(torch.randn(batch, layer.heads, 1, layer.dim_head, generator=gen)),
                ck_pages=cast(torch.randn(pool, generator=gen)), cv_pages=cast(torch.randn(pool, generator=gen)),
                table=torch.arange(batch * pages_per_row, dtype=torch.int32).view(batch, -1).to(device),
                positions=torch.full((batch, 1), context - 1, dtype=torch.long, device=device),
                num_memory=1, num_compressed=compressed, stride=layer.stride, selection_block_size=layer.block,
                compress_block=layer.window, importance="mean_logits", interpolated=False, share=True,
                slots=layer.selected, forced_initial=1, forced_local=2, scale=layer.dim_head ** -0.5,
                null_logit=-1e4, threshold=1e-3)


def combine_inputs(layer: Layer, context: int, batch: int, device, dtype, seed: int = 1) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    pages_per_row = -(-context // layer.block)
    own = (context - 1) // layer.block
    cast = lambda t: t.to(device=device, dtype=dtype)
    pool = (batch * pages_per_row, layer.kv_heads, layer.block, layer.dim_head)
    k_pages, v_pages = cast(torch.randn(pool, generator=gen)), cast(torch.randn(pool, generator=gen))
    table = torch.arange(batch * pages_per_row, dtype=torch.int32).view(batch, -1).to(device)
    listed = min(layer.selected, own)
    blocks = torch.rand(batch, layer.kv_heads, 1, max(own, 1), generator=gen).argsort(-1)[..., :listed].to(device)
    valid = torch.ones_like(blocks, dtype=torch.bool)
    hi = torch.full((batch, 1), context - 1, dtype=torch.long, device=device)
    q = cast(torch.randn(batch, layer.heads, 1, layer.dim_head, generator=gen))
    compressed = cast(torch.randn(batch, layer.heads, 1, layer.dim_head, generator=gen))
    x = cast(torch.randn(batch, 1, layer.dim, generator=gen))
    w = cast(torch.randn(3 * layer.heads, layer.dim, generator=gen) * layer.dim ** -0.5)
    b = cast(torch.randn(3 * layer.heads, generator=gen))
    args = (q, k_pages, v_pages, k_pages, v_pages, table, blocks, valid, hi, compressed, None, x, w, b)
    return args, dict(scale=layer.dim_head ** -0.5, window=layer.sliding)


def timed(fn, device) -> tuple[float, object]:
    """(median ms of fn graphed on CUDA, or of fn itself elsewhere; fn's output)."""
    if device.type != "cuda":
        out = fn()
        return median_ms(fn, device, cpu_reps=2), out
    graph, out = capture(fn)
    return median_ms(graph.replay, device, warmup_ms=10, rep_ms=50), out


def sweep_merge(layer, context, batch, device, dtype, warps) -> list[dict]:
    inputs = selection_inputs(layer, context, batch, device, dtype)
    rule, sorted_top, rows, want = compressed_selection.merge_kernel_warps, compressed_selection.SORTED_TOP_K, [], None
    for w, sort in ((None, False), *((w, False) for w in warps), (None, True)):
        if w is not None:
            compressed_selection.merge_kernel_warps = lambda big_rows, big_scores, w=w: w
        compressed_selection.SORTED_TOP_K = sort
        row = dict(launch="selection, sorted top-k" if sort else "selection", context=context, batch=batch,
                   warps=w or "default")
        try:
            ms, (o, indices, valid, probs) = timed(lambda: compressed_selection.compressed_selection_step(**inputs),
                                                   device)
        except Exception as error:  # a Triton without tl.topk: recorded, the sweep goes on
            rows.append(dict(row, error=f"{type(error).__name__}: {error}"[:200]))
            print(rows[-1], flush=True)
            continue
        finally:
            compressed_selection.merge_kernel_warps, compressed_selection.SORTED_TOP_K = rule, sorted_top
        if want is None:
            want = indices.clone()
        rows.append(dict(row, us=ms * 1e3, same_blocks=bool(torch.equal(indices, want))))
        print(rows[-1], flush=True)
    return rows


def sweep_combine(layer, context, batch, device, dtype, variants) -> list[dict]:
    args, kwargs = combine_inputs(layer, context, batch, device, dtype)
    rule, width, rows, want = fine_window.combine_warps, fine_window.GATE_INPUTS_PER_STEP, [], None
    for w, x_width in ((None, None), *variants):
        if w is not None:
            fine_window.combine_warps = lambda block_dv, splits_p, linear, w=w: w
        if x_width is not None:
            fine_window.GATE_INPUTS_PER_STEP = x_width
        try:
            ms, out = timed(lambda: fine_window.fine_window_fwd(*args, **kwargs), device)
        finally:
            fine_window.combine_warps, fine_window.GATE_INPUTS_PER_STEP = rule, width
        out = out.float().clone()
        want = out if want is None else want
        rows.append(dict(launch="split + combine with gates", context=context, batch=batch, warps=w or "default",
                         gate_inputs_per_step=x_width or width, us=ms * 1e3,
                         rel_err=float((out - want).norm() / want.norm())))
        print(rows[-1], flush=True)
    gates = torch.sigmoid(torch.nn.functional.linear(args[11], args[12], args[13])).unflatten(-1, (-1, 3)).transpose(1, 2)
    tensor_args = args[:10] + (gates.contiguous(), None, None, None)
    ms, _ = timed(lambda: fine_window.fine_window_fwd(*tensor_args, **kwargs), device)
    rows.append(dict(launch="split + combine, gates given", context=context, batch=batch, warps="default", us=ms * 1e3))
    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,65536,131072")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="a check of the script on the CPU: a small layer, 200 tokens, two variants per launch")
    args = ap.parse_args(argv)
    if args.smoke:
        layer, device, dtype, shapes = SMOKE, torch.device("cpu"), torch.float32, [(200, 2)]
        merge_warps, variants = (2,), ((2, 32),)
    else:
        layer, device, dtype = PAPER, torch.device("cuda"), torch.bfloat16
        shapes = [(int(c), int(b)) for c in args.contexts.split(",") for b in args.batches.split(",")]
        merge_warps, variants = MERGE_WARPS, COMBINE_VARIANTS
    rows = []
    for context, batch in shapes:
        rows += sweep_merge(layer, context, batch, device, dtype, merge_warps)
        rows += sweep_combine(layer, context, batch, device, dtype, variants)
    results = dict(environment=environment(device, str(dtype)), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| launch | context | batch | warps | gate inputs per step | us | check |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['launch']} | {r['context']} | {r['batch']} | {r['warps']} | | {r['error'][:60]} | |")
            continue
        check = r.get("same_blocks", r.get("rel_err", ""))
        check = f"{check:.1e}" if isinstance(check, float) else check
        print(f"| {r['launch']} | {r['context']} | {r['batch']} | {r['warps']} | {r.get('gate_inputs_per_step', '')} | "
              f"{r['us']:.1f} | {check} |")
    return results


if __name__ == "__main__":
    main()
