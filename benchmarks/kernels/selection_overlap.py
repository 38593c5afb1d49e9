"""How much the blocks that neighbouring queries select overlap in a trained NSA model.

A selection kernel whose program serves a tile of m consecutive queries (one kv head) can load each
distinct selected K/V block once for the whole tile; with random selections the tile's queries share
almost nothing, which is why the selection forward sits at the L2 gather floor. This script trains
the quality comparison's NSA byte-level model (benchmarks/quality_models.py, the standard library's
sources, benchmarks/quality_data.py) for a few minutes on this machine, then measures on validation
rows, per layer and tile size m:

    load fraction = sum over tiles of (distinct valid blocks the tile selects)
                    / sum over tiles of (valid selections in the tile)

the share of block loads a tile-shared kernel would still make (1.0: no sharing; 1/m: the m queries
select the same blocks). Reported for the trained model, the same model at initialisation, and
uniformly random selections of the same number of blocks among each query's visible blocks (what
the kernel benchmarks use).

    python -m benchmarks.kernels.selection_overlap [--minutes 5] [--context 1024]
        [--out benchmarks/results/kernels/selection_overlap.json]
    python -m benchmarks.kernels.selection_overlap --smoke     # seconds: a few steps of a tiny model

Dimension legend: B rows, H selection heads (kv heads), T queries, S selected slots, NB blocks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.quality_data import evenly_spaced_rows, load_stdlib_corpus, random_rows
from benchmarks.quality_models import ModelShape, build_language_model
from benchmarks.quality_training import learning_rate, make_optimizer, next_byte_loss, optimizer_step

TILES = (1, 16, 64, 128)
SHAPE = ModelShape(dim=128, depth=2, heads=4, kv_heads=1, dim_head=32, ff_mult=4, window=64, compress_block=16,
                   compress_stride=8, selection_block=16, num_selected=8, compress_hidden=32)
SMOKE_SHAPE = ModelShape(dim=32, depth=1, heads=2, kv_heads=1, dim_head=16, ff_mult=2, window=16, compress_block=8,
                         compress_stride=4, selection_block=8, num_selected=4, compress_hidden=16)


def tile_loads(indices: Tensor, valid: Tensor, tile: int, num_blocks: int) -> tuple[int, int] | None:
    """indices / valid (B, H, T, S) -> (distinct valid blocks summed over the tiles of `tile` consecutive
    queries, valid selections in those tiles), T cut to a multiple of the tile; None when no tile fits in T."""
    B, H, T, S = indices.shape
    T = T // tile * tile
    if T == 0:
        return None
    idx = torch.where(valid[:, :, :T], indices[:, :, :T].long(), num_blocks)  # invalid -> a spare column
    ids = idx.reshape(B, H, T // tile, tile * S).sort(dim=-1).values  # memory linear in T
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]  # the first of each distinct id in a tile
    return int((first & (ids < num_blocks)).sum()), int(valid[:, :, :T].sum())


def load_fraction(indices: Tensor, valid: Tensor, tile: int, num_blocks: int) -> float | None:
    """indices / valid (B, H, T, S) -> distinct valid blocks per tile of `tile` queries over valid
    selections (T cut to a multiple of the tile); None when no tile fits in T."""
    loads = tile_loads(indices, valid, tile, num_blocks)
    return None if loads is None else loads[0] / max(loads[1], 1)


def random_like(valid: Tensor, block: int, generator: torch.Generator) -> Tensor:
    """Uniformly random selections with each query's count of valid slots, among the blocks strictly
    before its own (what a causal selection may pick) -> indices (B, H, T, S); valid slots first."""
    B, H, T, S = valid.shape
    num_blocks = -(-T // block)
    visible = torch.arange(num_blocks)[None, :] < (torch.arange(T) // block)[:, None]  # (T, NB)
    scores = torch.rand(B, H, T, num_blocks, generator=generator).masked_fill(~visible, -1.0)
    picked = scores.topk(min(S, num_blocks), dim=-1).indices
    if picked.shape[-1] < S:
        picked = torch.cat((picked, picked.new_zeros(B, H, T, S - picked.shape[-1])), dim=-1)
    return picked


def selections(model, rows: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(indices, valid) of every NSA layer on rows (B, T): each layer's own input, captured by a hook."""
    inputs, hooks = [], [attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
                         for attn in model.attentions]
    try:
        with torch.no_grad():
            model(rows)
    finally:
        for hook in hooks:
            hook.remove()
    result = []
    for attn, x in zip(model.attentions, inputs):
        sel = attn.select(x)
        valid = sel.valid & (sel.indices >= 0)
        result.append((sel.indices, valid))
    return result


def measure(model, rows: Tensor, block: int, generator: torch.Generator) -> list[dict]:
    """Per layer: mean valid selections per query and the load fraction at each tile size, for the
    model's selections and for random ones of the same counts."""
    layers = []
    for indices, valid in selections(model, rows):
        num_blocks = -(-rows.shape[1] // block)
        rand = random_like(valid, block, generator)
        rand_valid = torch.arange(valid.shape[-1]) < valid.sum(-1, keepdim=True)
        layers.append({
            "valid_per_query": valid.sum(-1).float().mean().item(),
            "load_fraction": {m: load_fraction(indices, valid, m, num_blocks) for m in TILES},
            "random_load_fraction": {m: load_fraction(rand, rand_valid, m, num_blocks) for m in TILES},
        })
    return layers


def train(model, corpus, context: int, batch: int, minutes: float, max_steps: int, lr: float,
          generator: torch.Generator, log) -> dict:
    optimizer = make_optimizer(model, lr, 0.1, torch.device("cpu"))
    losses, start, step = [], time.perf_counter(), 0
    budget_steps = max_steps
    while step < budget_steps and time.perf_counter() - start < minutes * 60:
        rows = random_rows(corpus.train, batch, context, generator)
        loss = next_byte_loss(model, rows, torch.device("cpu"), "fp32")
        optimizer_step(model, optimizer, loss, learning_rate(step, lr, 20, budget_steps, 0.1), 1.0)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"step {step}: loss {sum(losses[-25:]) / len(losses[-25:]):.3f} nats/byte "
                f"({time.perf_counter() - start:.0f} s)")
    return {"steps": step, "seconds": time.perf_counter() - start, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def print_table(results: dict) -> None:
    print(f"\nload fraction (distinct blocks a tile of m queries selects / its selections; random: uniform "
          f"selections, same counts), context {results['context']}, selection block {results['shape']['selection_block']}")
    header = " | ".join(f"m={m}" for m in TILES)
    print(f"| model | layer | valid / query | {header} | random {header} |")
    print("|" + "---|" * (3 + 2 * len(TILES)))
    for name in ("initial", "trained"):
        for i, layer in enumerate(results[name]):
            fmt = lambda value: "-" if value is None else f"{value:.3f}"
            own = " | ".join(fmt(layer["load_fraction"][m]) for m in TILES)
            rnd = " | ".join(fmt(layer["random_load_fraction"][m]) for m in TILES)
            print(f"| {name} | {i} | {layer['valid_per_query']:.2f} | {own} | {rnd} |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="a tiny model, a few steps, short rows")
    args = ap.parse_args(argv)
    for name in ("context", "batch", "eval_rows", "max_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    if args.smoke:
        args.minutes, args.max_steps, args.context, args.batch, args.eval_rows = 1.0, 3, 64, 2, 2
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corpus = load_stdlib_corpus(0.05)
    model = build_language_model("nsa", shape, args.seed, backend="torch")
    rows = evenly_spaced_rows(corpus.val, args.eval_rows, args.context)[:, :-1]
    results = {"shape": shape.__dict__, "context": args.context, "tiles": list(TILES),
               "initial": measure(model, rows, shape.selection_block, generator)}
    log = lambda text: print(text, flush=True)
    results["training"] = train(model, corpus, args.context, args.batch, args.minutes, args.max_steps, args.lr,
                                generator, log)
    results["trained"] = measure(model, rows, shape.selection_block, generator)
    results["environment"] = {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()}
    log(f"trained {results['training']['steps']} steps in {results['training']['seconds']:.0f} s: loss "
        f"{results['training']['first_loss']:.3f} -> {results['training']['last_loss']:.3f} nats/byte")
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
