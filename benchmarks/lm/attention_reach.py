"""How far the trained models' attention reaches, and whether NSA's selection finds what lies beyond its window.

On whole validation documents (one document per forward, cut at the context), for every query at least
`far_from` tokens into its document, per attention layer:
- far_mass: the share of the layer's exact softmax attention (its own rotated q and k over every key of
  the document; for NSA the selected branch's q and keys, i.e. what that branch would attend to if it
  could see everything) on keys at least `window` tokens back, beyond the sliding window's reach;
- NSA only, of that far mass: `captured`, the share inside the blocks the layer's selection picked for the
  query; `ideal`, the share the best as many blocks would hold; `random`, the share a uniform choice of as
  many blocks holds on average (picked far blocks / blocks holding far keys).
A selection that finds the distant keys its branch wants has captured near ideal; one scored by a branch
that learned nothing to point with sits near random. Dense models report far_mass only (a window model has
none by construction and gives no record).
NSA layers also report, over every query of the documents, `load_fraction_4q` / `load_fraction_16q`: the
distinct blocks that tiles of 4 / 16 consecutive queries select over their selections (1.0: nothing shared),
what decides a by-tile selection kernel's loads against a by-query one's (tiles of 16 queries x 4 heads at
this comparison's G = 4, 4 x 16 at the paper's G = 16; benchmarks/NOTES.md "By tile"): a trained model's
selections, where the kernel benchmarks have random or synthetic ones.

Dimension legend: h query heads, hk kv heads, H selection heads (hk when a group shares its selection),
c queries of a chunk, n keys, nb selection blocks, S selected slots.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from benchmarks.kernels.selection_overlap import tile_loads
from benchmarks.lm.corpus import SEPARATOR
from benchmarks.quality_training import autocast
from nsa_core import SparseAttention
from nsa_core.model.dense import DenseAttention
from nsa_core.ops.rotary import rotary

QUERY_CHUNK = 256
TILE_QUERIES = (4, 16)


def long_documents(val: Tensor, min_length: int, count: int, context: int) -> list[Tensor]:
    """The first `count` validation documents longer than min_length bytes, each cut to `context` bytes."""
    ends = (val == SEPARATOR).nonzero().flatten().tolist()
    docs, start = [], 0
    for end in ends + [len(val)]:
        if end - start > min_length:
            docs.append(val[start:min(end, start + context)])
            if len(docs) == count:
                break
        start = end + 1
    return docs


@contextmanager
def layer_inputs(layers: list[nn.Module]):
    """While inside: inputs[i] is layer i's input (b, n, dim) of the last forward."""
    inputs: list[Tensor | None] = [None] * len(layers)
    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(layers)]
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


def rotated_qk(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, float] | None:
    """The layer's rotated q (1, h, n, d) and keys (1, hk, n, d) and its scale, for one document x (1, n, dim):
    the selected branch's keys for SparseAttention, the only ones for DenseAttention; None for other layers."""
    positions = torch.arange(x.shape[1], device=x.device)
    if isinstance(layer, SparseAttention):
        q, k, v = layer.project(layer.norm(x))
        (_, _), (ks, _), _ = layer.branch_kv(k, v)
        return layer.rotate(q, positions), layer.rotate(ks, positions), layer.scale
    if isinstance(layer, DenseAttention):
        q, k, _ = layer.project(layer.norm(x))
        cos, sin = layer.rotary_embed.tables(positions, q.dtype)
        return rotary(q, cos, sin, backend="torch"), rotary(k, cos, sin, backend="torch"), q.shape[-1] ** -0.5
    return None


def far_block_mass(q: Tensor, k: Tensor, scale: float, start: int, window: int, block: int) -> tuple[Tensor, Tensor]:
    """Queries start.. of q (1, h, n, d) against k (1, hk, n, d), causal -> the attention mass on keys at
    least `window` back, per head, query and key block (h, c, nb), and the total far mass per (h, c)."""
    h, hk, n = q.shape[1], k.shape[1], k.shape[2]
    keys = k[0].float().repeat_interleave(h // hk, dim=0)  # (h, n, d)
    rows = torch.arange(start, q.shape[2], device=q.device)
    logits = torch.einsum("hcd,hnd->hcn", q[0, :, start:].float(), keys) * scale
    distance = rows[:, None] - torch.arange(n, device=q.device)[None, :]
    probs = logits.masked_fill(distance < 0, float("-inf")).softmax(-1)
    far = probs * (distance >= window)
    nb = -(-n // block)
    blocks = nn.functional.pad(far, (0, nb * block - n)).unflatten(-1, (nb, block)).sum(-1)
    return blocks, far.sum(-1)


def selection_shares(blocks: Tensor, indices: Tensor, valid: Tensor, heads_per_selection: int) -> dict[str, Tensor]:
    """blocks (h, c, nb) far mass per block, the chunk's selection indices / valid (H, c, S) -> per (H, c): the
    far mass in the picked blocks, in the best as many, a uniform choice's expected share, and the total."""
    per_selection = blocks.unflatten(0, (-1, heads_per_selection)).mean(1)  # (H, c, nb)
    picked = per_selection.gather(-1, indices.clamp(0, per_selection.shape[-1] - 1)) * valid
    count = valid.sum(-1, keepdim=True)  # (H, c, 1)
    ordered = per_selection.sort(-1, descending=True).values
    best = (ordered * (torch.arange(ordered.shape[-1], device=blocks.device) < count)).sum(-1)
    holding = (per_selection > 0).sum(-1).clamp(min=1)
    total = per_selection.sum(-1)
    # a uniform choice of `count` blocks among those holding far mass holds count / holding of it
    random = total * (count[..., 0] / holding).clamp(max=1)
    return {"captured": picked.sum(-1), "ideal": best, "random": random, "total": total}


@torch.no_grad()
def attention_reach(model: nn.Module, documents: list[Tensor], far_from: int, window: int,
                    device: torch.device, precision: str = "fp32") -> dict | None:
    """Per layer of `model` (a PackedByteLM), over `documents`: far_mass and, for NSA layers, the
    selection's captured / ideal / random shares of it (see the module docstring); None when no layer
    has q and k to read (the window model) or no document is long enough. The forward and the selection
    run at `precision` (as in training); the exact attention of the probe in fp32."""
    layers = list(model.attentions)
    if not documents or all(not isinstance(m, (SparseAttention, DenseAttention)) for m in layers):
        return None
    sums = [{"far": 0.0, "queries": 0, "captured": 0.0, "ideal": 0.0, "random": 0.0, "selection_total": 0.0,
             "tiles": {m: [0, 0] for m in TILE_QUERIES}} for _ in layers]
    model.eval()
    for doc in documents:
        ids = doc.long()[None].to(device)
        cu_seqlens = torch.tensor([0, ids.shape[1]], dtype=torch.int32, device=device)
        with layer_inputs(layers) as inputs, autocast(device, precision):
            model(ids, cu_seqlens)
        for layer, x, acc in zip(layers, inputs, sums):
            qk = rotated_qk(layer, x.float())
            if qk is None:
                continue
            q, k, scale = qk
            with autocast(device, precision):
                selection = layer.select(x) if isinstance(layer, SparseAttention) else None
            # a dense layer has no blocks: only its far total is read, any block size gives it
            block = layer.config.selection_block_size if selection is not None else window
            if selection is not None:
                chosen = selection.valid & (selection.indices >= 0)
                for m, acc_tile in acc["tiles"].items():
                    loads = tile_loads(selection.indices, chosen, m, -(-q.shape[2] // block))
                    if loads is not None:
                        acc_tile[0] += loads[0]
                        acc_tile[1] += loads[1]
            for start in range(far_from, q.shape[2], QUERY_CHUNK):
                stop = min(start + QUERY_CHUNK, q.shape[2])
                blocks, far = far_block_mass(q[:, :, :stop], k[:, :, :stop], scale, start, window, block)
                acc["far"] += float(far.mean(0).sum())
                acc["queries"] += stop - start
                if selection is not None:
                    shares = selection_shares(blocks, selection.indices[0, :, start:stop], selection.valid[0, :, start:stop],
                                              q.shape[1] // selection.indices.shape[1])
                    for key in ("captured", "ideal", "random"):
                        acc[key] += float(shares[key].sum())
                    acc["selection_total"] += float(shares["total"].sum())
    model.train()
    out = []
    for acc in sums:
        if not acc["queries"]:
            out.append(None)
            continue
        layer_result = {"far_mass": round(acc["far"] / acc["queries"], 4)}
        if acc["selection_total"] > 0:
            layer_result |= {key: round(acc[key] / acc["selection_total"], 4) for key in ("captured", "ideal", "random")}
        layer_result |= {f"load_fraction_{m}q": round(distinct / selections, 4)
                         for m, (distinct, selections) in acc["tiles"].items() if selections}
        out.append(layer_result)
    if all(r is None for r in out):
        return None
    return {"far_from": far_from, "window": window, "documents": len(documents),
            "queries": sums[0]["queries"], "per_layer": out}
