"""`nsa check`'s "cached decoding equals parallel": the last tokens decoded one at a time on the cache
after a prefill, compared with the parallel pass, position by position.

What it can promise. Both paths score the compressed blocks and take a hard top-k of the scores,
each with its own summation order. Where two blocks' scores are closer than the dtype's rounding
error (long rows with random weights make near-uniform scores), the two paths may pick different
blocks, and that position's output legitimately moves by a whole block's contribution. So the
check compares outputs position by position: every position must agree within the tolerance,
except positions whose selection is a near-tie, which are reported (count, score margins), not
failed. A near-tie is decided from the float64 block logits of that query (the reference's
scoring rule): the gap between the last selected and the first unselected block is below the
rounding error the check's dtype makes on those logits (measured on the spot, not assumed). A real
decoding bug (a wrong position, a stale cache entry, a missing block) moves positions whose
selection is not tied, and fails.

Dimension legend: B batch, H heads of the selection, P compared positions, NB scored blocks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nsa_core.model.attention import SparseAttention
from nsa_core.reference.compressed_attention import compressed_scores
from nsa_core.reference.pooled_selection import pooled_block_logits
from nsa_core.reference.selection import block_importance
from nsa_core.selection import SelectionRule

MAX_DECODED = 128  # tokens decoded one at a time; the rest of the row is the prefill
TIE_FACTOR = 8.0  # a gap below TIE_FACTOR x the measured logit rounding error is a near-tie
NAME = "cached decoding equals parallel"


@dataclass
class DecodeComparison:
    passed: bool
    value: str
    detail: str
    figures: dict


def decoded_span(seq_len: int) -> tuple[int, int]:
    """(prefill length, tokens decoded after it): a third of the row as the prefill when the rest is
    short, else the row but its last MAX_DECODED tokens (time bounded at any length)."""
    prefill = max(1, seq_len // 3)
    if seq_len - prefill > MAX_DECODED:
        prefill = seq_len - MAX_DECODED
    return prefill, seq_len - prefill


def decode_outputs(module: SparseAttention, x: Tensor, prefill: int,
                   on_step: Callable[[float], None] | None = None) -> Tensor:
    """Outputs (B, n - prefill, dim) of the tokens after the prefill, decoded one at a time."""
    _, cache = module(x[:, :prefill], return_cache=True)
    outs = []
    for t in range(prefill, x.shape[1]):
        if on_step is not None and (t - prefill) % 16 == 0:
            on_step((t - prefill) / max(1, x.shape[1] - prefill))
        out_t, cache = module(x[:, t : t + 1], cache=cache, return_cache=True)
        outs.append(out_t)
    return torch.cat(outs, dim=1)


def block_logits(module: SparseAttention, x: Tensor, positions: Tensor, rule: SelectionRule,
                 block_keys: bool) -> Tensor | None:
    """(B, H, P, NB) block logits of the queries at `positions` by `rule` (a part of the module's rule:
    SelectionRule.scored_parts), by the reference's rule, in the module's dtype; None when no block can
    be selected."""
    with torch.no_grad():
        q, k, v = module.project(module.norm(x[:, : int(positions.max()) + 1]))
        (kc, vc), (ks, _), _ = module.branch_kv(k, v)
        if block_keys:  # the selected branch's rotated queries against its block keys
            every = torch.arange(q.shape[-2], device=q.device)
            keys = module.selection_keys_of(module.rotate(ks, every))
            blocks = rule.block_key_rule()
            logits = pooled_block_logits(module.rotate(q, every)[:, :, positions], keys, group_size=rule.group_size,
                                         share_across_group=rule.share_across_group, stride=blocks.stride,
                                         selection_block_size=blocks.selection_block_size, causal=True,
                                         scale=rule.scale, query_pos=positions)
            return logits if logits.shape[-1] > 0 else None
        ck, _ = module.compress(kc, vc)
        if ck.shape[-2] == 0:
            return None
        scores = compressed_scores(q[:, :, positions], ck, rule.stride, True, rule.scale, positions)
        logits = block_importance(scores, group_size=rule.group_size, share_across_group=rule.share_across_group,
                                  stride=rule.stride, selection_block_size=rule.selection_block_size,
                                  interpolated=rule.interpolated, causal=True, query_pos=positions,
                                  importance=rule.importance, compress_block=rule.compress_block)
    return logits if logits.shape[-1] > 0 else None


def selection_margins(module: SparseAttention, x: Tensor, positions: Tensor) -> tuple[Tensor, float]:
    """Per (batch, position) (B, P): the float64 gap between the last selected and the first
    unselected block logit (smallest over the heads and over the selection's parts; inf when every
    block is selected), and the tie tolerance: TIE_FACTOR x the largest error of the module's dtype on
    those logits."""
    B, P = x.shape[0], positions.numel()
    wide = copy.deepcopy(module).double()
    gaps, tolerance = torch.full((B, P), float("inf"), dtype=torch.float64), 0.0
    for rule, block_keys in module.selection_rule.scored_parts():
        exact = block_logits(wide, x.double(), positions, rule, block_keys)
        rounded = block_logits(module, x, positions, rule, block_keys)
        k = rule.num_selected
        if exact is None or exact.shape[-1] <= k or k == 0:
            continue
        visible = exact > torch.finfo(torch.float32).min  # masked blocks hold huge negative logits
        error = torch.where(visible, (rounded.double() - exact).abs(), torch.zeros_like(exact)).amax().item()
        top = exact.topk(k + 1, dim=-1).values
        gap = torch.where(top[..., k] > torch.finfo(torch.float32).min, top[..., k - 1] - top[..., k],
                          torch.full_like(top[..., k], float("inf")))
        gaps = torch.minimum(gaps, gap.amin(dim=1).cpu())
        tolerance = max(tolerance, TIE_FACTOR * error)
    return gaps, tolerance


def compare_decoding(module: SparseAttention, x: Tensor, parallel: Tensor, tol: float,
                     on_step: Callable[[float], None] | None = None) -> DecodeComparison:
    """Decode the end of x (B, n, dim) on the cache and compare with `parallel`, the module's
    parallel output on x, position by position (near-tied selections reported, not failed)."""
    n = x.shape[1]
    prefill, steps = decoded_span(n)
    decoded = decode_outputs(module, x, prefill, on_step)
    reference = parallel[:, prefill:]
    error = (decoded - reference).abs().amax(dim=-1).float()  # (B, P)
    limit = tol * max(1.0, parallel.abs().max().item())
    off = error > limit
    positions = torch.arange(prefill, n, device=x.device)
    comparison = (f"tokens {prefill}-{n - 1} decoded one by one after a {prefill}-token prefill vs the parallel pass "
                  f"({str(x.dtype).removeprefix('torch.')})")
    figures = {"comparison": comparison, "prefill": prefill, "decoded": steps, "limit": limit}
    if not off.any():
        err = error.max().item()
        return DecodeComparison(True, f"max abs error {err:.1e}", f"{comparison}", {**figures, "max_abs_error": err,
                                "flipped_positions": 0})
    columns = off.any(dim=0).nonzero().flatten()
    margins, tie_tol = selection_margins(module, x, positions[columns])
    off_margins = margins.to(off.device)[off[:, columns]]  # the margins of the disagreeing (batch, position)s
    ties = bool((off_margins <= tie_tol).all())
    agreeing = error[~off]
    err = agreeing.max().item() if agreeing.numel() else 0.0
    worst = error[off].max().item()
    count = int(off.sum())
    largest_margin = off_margins.max().item()
    figures.update(max_abs_error=err, flipped_positions=count if ties else 0, disagreeing_positions=count,
                   disagreeing_max_abs_error=worst, largest_margin=largest_margin, tie_tolerance=tie_tol,
                   margins=sorted(off_margins.tolist())[:20])
    if ties:
        value = f"max abs error {err:.1e}; {count} near-tied selection(s) flipped"
        detail = (f"{comparison}; at {count} (batch, position)s the selection is a near-tie (block logit margins "
                  f"<= {largest_margin:.1e}, within {x.dtype}'s rounding {tie_tol:.1e}), so the paths may pick "
                  f"different blocks (error there {worst:.1e})")
        return DecodeComparison(True, value, detail, figures)
    value = f"max abs error {worst:.1e} at {count} (batch, position)s"
    detail = (f"{comparison}; selection margins up to {largest_margin:.1e}, above {x.dtype}'s rounding "
              f"{tie_tol:.1e}: not a near-tie, a decoding error")
    return DecodeComparison(False, value, detail, figures)
