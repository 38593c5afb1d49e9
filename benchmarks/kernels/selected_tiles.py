"""The by-tile selected-attention forward (forward_by_tile.py) against the other schemes on the GPU.

First a check: each scheme's output and gradients against the by-query kernel's (max abs error) on
every timed case. Then medians (triton.testing.do_bench) of the forward and of forward+backward
(the backward keeps launch.choose_scheme's rule: only the forward's scheme changes) through
`selected_attention(backend="triton")`, bf16, causal, for:
  - the byte LM (8 query / 2 kv heads of 64: G = 4, 16 selected blocks of 64) on one packed row of
    65,536 tokens holding ~30 documents: schemes by query, by tile, by block (packed: new);
  - the paper shape (64 query / 4 kv heads of 128: G = 16, 16 blocks of 64) on plain rows of 8k, 16k
    and 64k: by query, by tile, by tile with the by-query backward's dQ kernel by tile ("by_tile+dq");
each with random selections (S distinct blocks before the query's own block, in its document) and
overlapping ones (each tile of 16 neighbouring queries draws its blocks from a pool of 20: what a
trained model's selections look like, benchmarks/RESULTS.md "Selection overlap").
TFLOP/s count the attended keys only (the selected blocks and the causal part of the own block):
forward 4 x D flops per (query head, key), forward+backward 3.5x that.

    python -m benchmarks.kernels.selected_tiles [--out benchmarks/results/kernels/selected_tiles.json]
    python -m benchmarks.kernels.selected_tiles --smoke   # CPU under TRITON_INTERPRET, tiny shapes

Dimension legend: T tokens, HQ / HKV query / kv heads, D head dim, S selected slots, NB blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.timing import median_ms


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    HQ: int
    HKV: int
    D: int
    block: int
    S: int
    docs: tuple[int, ...] | None  # packed document lengths, None: a plain row
    selection: str  # "random" or "overlap"
    schemes: tuple[str, ...]


def document_lengths(total: int, count: int, seed: int) -> list[int]:
    """About `count` documents filling `total` tokens, lengths uniform in [1, 2 * total / count]."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, 2 * total // count), total - sum(lengths)))
    return lengths


def cases(smoke: bool) -> list[Case]:
    if smoke:  # the interpreter runs a program at a time: a few dozen tokens
        return [Case("lm-packed", 48, 4, 1, 16, 16, 2, (15, 1, 0, 22, 10), "random", ("by_query", "by_tile")),
                Case("paper", 32, 16, 1, 16, 8, 2, None, "overlap", ("by_query", "by_tile+dq"))]
    out = []
    for selection in ("random", "overlap"):
        out.append(Case("lm-packed-64k", 65536, 8, 2, 64, 64, 16, tuple(document_lengths(65536, 30, seed=0)),
                        selection, ("by_query", "by_tile", "by_block")))
        for T in (8192, 16384, 65536):
            out.append(Case(f"paper-{T // 1024}k", T, 64, 4, 128, 64, 16, None, selection,
                            ("by_query", "by_tile", "by_tile+dq")))
    return out


def cumulative(docs, device) -> torch.Tensor:
    """cu_seqlens (N + 1,) int32 of documents of these lengths."""
    return torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)


def positions(case: Case, device) -> torch.Tensor:
    """(T,) each token's position in its document (a plain row: in the row)."""
    t = torch.arange(case.T, device=device)
    if case.docs is None:
        return t
    cu = cumulative(case.docs, device).long()
    return t - cu[torch.searchsorted(cu, t, right=True) - 1]


def selections(case: Case, device, seed: int = 0, tile: int = 16, pool: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, valid) (1, HKV, T, S): distinct document-relative blocks strictly before each token's
    own block. random: uniform among those; overlap: among a pool of `pool` blocks drawn per tile of
    `tile` tokens (and kv head) below the tile's largest own block."""
    gen = torch.Generator(device=device).manual_seed(seed)
    T, H, S = case.T, case.HKV, case.S
    own = positions(case, device) // case.block  # (T,)
    nb = int(own.max().item()) + 1
    if case.selection == "random":
        scores = torch.rand(1, H, T, nb, device=device, generator=gen)
        scores = scores.masked_fill(torch.arange(nb, device=device) >= own[:, None], -1.0)
        top = scores.topk(min(S, nb), dim=-1)
        return top.indices, top.values >= 0
    nt = -(-T // tile)
    tile_own = torch.nn.functional.pad(own, (0, nt * tile - T)).view(nt, tile).max(dim=1).values  # (nt,)
    pool_scores = torch.rand(1, H, nt, nb, device=device, generator=gen)
    pool_scores = pool_scores.masked_fill(torch.arange(nb, device=device) >= tile_own[:, None], -1.0)
    picked = pool_scores.topk(min(pool, nb), dim=-1)
    blocks = picked.indices.repeat_interleave(tile, dim=2)[:, :, :T]  # (1, H, T, pool)
    ok = picked.values.repeat_interleave(tile, dim=2)[:, :, :T] >= 0
    scores = torch.rand(blocks.shape, device=device, generator=gen)
    scores = scores.masked_fill(~ok | (blocks >= own.view(1, 1, T, 1)), -1.0)
    top = scores.topk(min(S, blocks.shape[-1]), dim=-1)
    return blocks.gather(-1, top.indices), top.values >= 0


def attended_keys(case: Case, valid: torch.Tensor) -> int:
    """Keys the selection attends per kv head, summed over tokens: full selected blocks plus the
    causal part of the own block."""
    pos = positions(case, valid.device)
    return int(valid.sum().item()) * case.block // case.HKV + int((pos % case.block + 1).sum().item())


def make_inputs(case: Case, device, dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, case.HQ, case.T, case.D, device=device, generator=gen).to(dtype)
    k = torch.randn(1, case.HKV, case.T, case.D, device=device, generator=gen).to(dtype)
    v = torch.randn(1, case.HKV, case.T, case.D, device=device, generator=gen).to(dtype)
    g = torch.randn(1, case.HQ, case.T, case.D, device=device, generator=gen).to(dtype)
    return q, k, v, g


@contextmanager
def forced(scheme: str):
    """The forward's scheme ("by_tile+dq": and the by-query backward's dQ kernel by tile) for the block."""
    from nsa_core.kernels.selected_attention import launch

    before = launch.FWD_SCHEME, launch.DQ_SCHEME
    launch.FWD_SCHEME, launch.DQ_SCHEME = scheme.removesuffix("+dq"), "by_tile" if scheme.endswith("+dq") else None
    try:
        yield
    finally:
        launch.FWD_SCHEME, launch.DQ_SCHEME = before


def call(case: Case, q, k, v, indices, valid, seqs):
    from nsa_core import selected_attention

    return selected_attention(q, k, v, indices, block_size=case.block, valid=valid, causal=True, seqs=seqs,
                              backend="triton")


def outputs_and_grads(case, q, k, v, g, indices, valid, seqs):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = call(case, *leaves, indices, valid, seqs)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


def run_case(case: Case, device, dtype, warmup_ms: int, rep_ms: int) -> list[dict]:
    from nsa_core.ops import Seqs

    seqs = None
    if case.docs is not None:
        seqs = Seqs.packed(cumulative(case.docs, device), case.T, device=device)
    indices, valid = selections(case, device)
    q, k, v, g = make_inputs(case, device, dtype)
    fwd_flops = 4 * case.D * (case.HQ // case.HKV) * case.HKV * attended_keys(case, valid)
    with forced("by_query"):
        ref = outputs_and_grads(case, q, k, v, g, indices, valid, seqs)
    union_blocks = tile_union_size(case, indices, valid)
    rows = []
    for scheme in case.schemes:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def fwd():
            with torch.no_grad():
                call(case, q, k, v, indices, valid, seqs)

        def fwd_bwd():
            out = call(case, *leaves, indices, valid, seqs)
            out.backward(g)
            for t in leaves:
                t.grad = None

        kw = dict(warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_warmup=0, cpu_reps=1)
        with forced(scheme):
            got = outputs_and_grads(case, q, k, v, g, indices, valid, seqs)
            errors = {name: (a.double() - b.double()).abs().max().item()
                      for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
            del got
            fwd_ms, fwd_bwd_ms = median_ms(fwd, device, **kw), median_ms(fwd_bwd, device, **kw)
        rows.append(dict(case=asdict(case), scheme=scheme, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                         fwd_tflops=fwd_flops / fwd_ms / 1e9, fwd_bwd_tflops=3.5 * fwd_flops / fwd_bwd_ms / 1e9,
                         max_err_vs_by_query=errors, union_blocks_per_tile=union_blocks))
    return rows


def tile_union_size(case: Case, indices, valid) -> float:
    """Mean distinct blocks (own blocks included) per by-tile tile of this shape."""
    from nsa_core.kernels.selected_attention import launch, tile_union

    rows = case.HQ // case.HKV
    tokens = launch.tile_shape(rows, max(16, case.block))["TOKENS"]
    idx = torch.where(valid, indices, -1).to(torch.int32)
    tbl = None
    if case.docs is not None:  # virtual blocks, as the kernels see them
        idx, tbl = launch.packed_block_table(idx, cumulative(case.docs, idx.device), case.block)
    own = tile_union.own_blocks(case.T, case.block, 0, tbl, idx.device)
    _, count = tile_union.tile_union(tile_union.tile_slots(idx, own, tokens), tokens)
    return count.float().mean().item()


def table(rows: list[dict]) -> str:
    lines = ["| scheme | shape | selection | union/tile | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | max err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['case']['name']} | {r['case']['selection']} | {r['union_blocks_per_tile']:.1f} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f} | "
                     f"{max(r['max_err_vs_by_query'].values()):.2e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="tiny shapes on the CPU (Triton's interpreter), fp32")
    ap.add_argument("--out", default="benchmarks/results/kernels/selected_tiles.json")
    ap.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is compiled
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rows = []
    for case in cases(args.smoke):
        if args.only and case.name not in args.only.split(","):
            continue
        rows.extend(run_case(case, device, dtype, warmup_ms=25, rep_ms=100))
    results = dict(device=torch.cuda.get_device_name() if cuda else "cpu (interpreter)", dtype=str(dtype), rows=rows)
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
