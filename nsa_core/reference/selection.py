"""Block selection: from compressed-attention logits to the top-n key blocks of each query.

Steps, as the oracle (native-sparse-attention-pytorch 0.2.3) takes them, plus the seed-era path
for selection blocks smaller than the compression stride:
1. average the logits over the query heads of each kv group (when heads share selection);
2. bring them to selection-block resolution:
   - selection block = r x stride: mean over each r consecutive compressed blocks (incomplete
     trailing groups dropped);
   - selection block = stride / f: each compressed score is repeated f times, or with
     `interpolated` linearly interpolated to token resolution (align_corners=False) and
     averaged over each selection block. In causal mode one invisible block is appended on the
     right first, so a query's scores never depend on how many tokens follow it;
3. when selection block != stride, a query's own block gets -finfo.max;
4. softmax with a null slot of logit -1000 in front, top-n (ties: lowest block index first);
   a slot whose probability is <= 1e-10 is invalid.
   With forced blocks (the paper's "1 initial block and 2 local blocks"; causal only), the first
   slots hold the forced blocks that exist (initial blocks 0 .. I - 1 and the L blocks just before
   the query's own block, each once), whatever their probability; top-(n - I - L) over the other
   blocks fills the rest.

With importance "summed_probs" (the paper's eq. 8-10) steps 1-3 are instead: the softmax of each
head's compressed logits over its visible blocks; for each selection block the sum of the
probabilities of the compressed blocks that overlap it (summed_block_probs); the sum over the heads
of a group; the query's own block excluded; step 4 then ranks the logarithms of these sums.

`select_blocks_reference` runs these steps from the queries and compressed keys over chunks of
queries (memory linear in T).

Dimension legend: B batch, H heads of the selection (kv heads or query heads), T queries,
C compressed blocks, NB selection blocks that can be scored, S selected slots, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.compressed_attention import compressed_scores, masked_score, position_column
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.selection import Selection, SelectionRule

NULL_SLOT_LOGIT = -1e3
VALID_THRESHOLD = 1e-10
TINY_PROBABILITY = 1e-30


def linear_upsample(x: Tensor, factor: int) -> Tensor:
    """(..., C) -> (..., C * factor) by linear interpolation with align_corners=False,
    as torch.nn.functional.interpolate(mode='bilinear') along one axis."""
    C = x.shape[-1]
    dst = torch.arange(C * factor, device=x.device, dtype=torch.float64)
    src = ((dst + 0.5) / factor - 0.5).clamp(min=0)
    i0 = src.floor().long()
    i1 = torch.clamp(i0 + 1, max=C - 1)
    lam = (src - i0).to(x.dtype)
    return x[..., i0] * (1 - lam) + x[..., i1] * lam


def num_scored_blocks(num_compressed: int, stride: int, selection_block_size: int) -> int:
    if selection_block_size >= stride:
        return num_compressed // (selection_block_size // stride)
    return num_compressed * (stride // selection_block_size)


def block_importance(
    scores: Tensor,  # (B, HQ, T, C) compressed logits, invisible entries masked
    *,
    group_size: int,
    share_across_group: bool,
    stride: int,
    selection_block_size: int,
    interpolated: bool,
    causal: bool,
    query_pos: Tensor,  # (T,), or per row (B, T)
    importance: str = "mean_logits",
    compress_block: int = 0,
) -> Tensor:
    """Returns (B, H, T, NB) block logits before the softmax. With importance "summed_probs" they are
    the logarithms of the summed probabilities (summed_block_probs): the softmax over blocks then gives
    those probabilities normalised, and a block no visible compressed block overlaps gets -inf."""
    B, HQ, T, C = scores.shape
    if importance == "summed_probs":
        return _summed_importance(scores, group_size=group_size, share_across_group=share_across_group,
                                  stride=stride, selection_block_size=selection_block_size,
                                  compress_block=compress_block, query_pos=query_pos)
    if share_across_group:
        scores = scores.view(B, HQ // group_size, group_size, T, C).mean(dim=2)
    sel = selection_block_size
    if sel >= stride:
        ratio = sel // stride
        if ratio > 1:
            nb = C // ratio
            scores = scores[..., : nb * ratio].unflatten(-1, (nb, ratio)).mean(dim=-1)
    else:
        factor = stride // sel
        if interpolated and C > 0:
            padded = scores
            if causal:
                pad = torch.full_like(scores[..., :1], masked_score(scores.dtype))
                padded = torch.cat((scores, pad), dim=-1)
            tokens = linear_upsample(padded, stride)[..., : C * stride]
            scores = tokens.unflatten(-1, (C * factor, sel)).mean(dim=-1)
        else:
            scores = scores.repeat_interleave(factor, dim=-1)
    if sel != stride and scores.shape[-1] > 0:
        own = position_column(query_pos // sel) == torch.arange(scores.shape[-1], device=scores.device)
        scores = scores.masked_fill(own, -torch.finfo(scores.dtype).max)
    return scores


def overlapping_compressed_blocks(num_blocks: int, num_compressed: int, compress_block: int, stride: int,
                                  selection_block_size: int, device=None) -> tuple[Tensor, Tensor]:
    """For each selection block j (tokens j * sel ... (j + 1) * sel - 1), the compressed blocks that
    overlap it: compressed block c covers tokens (c + 1) * stride - compress_block ... (c + 1) * stride - 1
    (model/compression.py). -> (indices (NB, W) int64, valid (NB, W) bool), W the most any block has."""
    sel, length, d = selection_block_size, compress_block, stride
    j = torch.arange(num_blocks, device=device)
    first = (j * sel) // d  # (c + 1) * d > j * sel
    last = ((j + 1) * sel + length + d - 1) // d - 2  # (c + 1) * d - length < (j + 1) * sel
    width = max(1, -(-(sel + length) // d) + 1)
    indices = first[:, None] + torch.arange(width, device=device)
    valid = (indices <= last[:, None]) & (indices < num_compressed)
    return indices.clamp(max=max(num_compressed - 1, 0)), valid


def summed_block_probs(scores: Tensor, *, compress_block: int, stride: int, selection_block_size: int) -> Tensor:
    """Paper eq. 8-9: scores (B, H, T, C) compressed logits (invisible entries masked) -> (B, H, T, NB)
    in float32 (float64 for float64 scores): the compressed attention's probabilities (softmax over
    the visible compressed blocks; 0 where none is visible) summed over the compressed blocks that
    overlap each selection block (each counted once)."""
    C = scores.shape[-1]
    nb = num_scored_blocks(C, stride, selection_block_size)
    visible = scores != masked_score(scores.dtype)
    logits = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing visible: all 0
    indices, valid = overlapping_compressed_blocks(nb, C, compress_block, stride, selection_block_size, scores.device)
    if C == 0 or nb == 0:
        return probs.new_zeros(*probs.shape[:-1], nb)
    gathered = probs[..., indices.flatten()].unflatten(-1, indices.shape)  # (B, H, T, NB, W)
    return (gathered * valid).sum(dim=-1)


def _summed_importance(scores: Tensor, *, group_size: int, share_across_group: bool, stride: int,
                       selection_block_size: int, compress_block: int, query_pos: Tensor) -> Tensor:
    """Paper eq. 10 over eq. 8-9: the log of the summed probabilities, summed over the heads of a group
    when the group shares its selection; the query's own block excluded where block_importance
    excludes it (selection blocks other than the stride; with equal ones a causal query sees nothing
    of its own block)."""
    if compress_block < 1:
        raise ValueError(f"importance 'summed_probs' needs the compression block size, got {compress_block!r}")
    B, HQ, T, _ = scores.shape
    probs = summed_block_probs(scores, compress_block=compress_block, stride=stride,
                               selection_block_size=selection_block_size)
    if share_across_group:
        probs = probs.view(B, HQ // group_size, group_size, T, probs.shape[-1]).sum(dim=2)
    # log of 0 is -inf; clamped first so that use_diff_topk's backward through the log never divides by 0
    logits = probs.clamp_min(TINY_PROBABILITY).log().masked_fill(probs == 0, float("-inf")).to(scores.dtype)
    if selection_block_size != stride and logits.shape[-1] > 0:
        own = position_column(query_pos // selection_block_size) == torch.arange(logits.shape[-1], device=scores.device)
        logits = logits.masked_fill(own, float("-inf"))
    return logits


LOW_BITS_BLOCKS = 1 << 15  # blocks a 16-bit probability's int32 key can tell apart


def top_indices_lowest_first(probs: Tensor, k: int) -> Tensor:
    """Indices of the k largest probabilities, ties going to the lowest block index, so the
    parallel pass and cached decoding (which sees fewer trailing blocks) pick the same blocks.

    One exact top-k over integer keys: the bit pattern of a non-negative float orders like the
    float, and the block index is subtracted in the low bits (cheaper than a stable sort). 16-bit
    probabilities over fewer than 2**15 blocks fit int32 keys (half the bytes to select over),
    others int64."""
    if probs.dtype in (torch.bfloat16, torch.float16) and probs.shape[-1] <= LOW_BITS_BLOCKS:
        bits = probs.detach().view(torch.int16).to(torch.int32)
        block = torch.arange(probs.shape[-1], device=probs.device, dtype=torch.int32)
        return (bits * LOW_BITS_BLOCKS + (LOW_BITS_BLOCKS - 1 - block)).topk(k, dim=-1).indices
    bits = probs.detach().float().view(torch.int32).to(torch.int64)
    block = torch.arange(probs.shape[-1], device=probs.device, dtype=torch.int64)
    key = bits * (1 << 32) - block
    return key.topk(k, dim=-1).indices


def forced_blocks(query_pos: Tensor, selection_block_size: int, initial: int, local: int) -> tuple[Tensor, Tensor]:
    """The forced blocks of queries at query_pos (T,) or (B, T): indices and validity (..., T, I + L)
    (a block exists when it lies before the query's own block; a local block that is also an
    initial one is marked invalid, so each block is attended once)."""
    own = (query_pos // selection_block_size)[..., None]
    first = torch.arange(initial, device=query_pos.device)
    before = own - 1 - torch.arange(local, device=query_pos.device)
    indices = torch.cat((first.expand(own.shape[:-1] + (initial,)), before), dim=-1)
    valid = torch.cat((first < own, (before >= 0) & (before >= initial)), dim=-1)
    return indices.clamp(min=0), valid


def _is_forced(num_blocks: int, query_pos: Tensor, selection_block_size: int, initial: int, local: int) -> Tensor:
    """(..., T, NB) bool: the blocks a query is made to select."""
    own = (query_pos // selection_block_size)[..., None]
    blocks = torch.arange(num_blocks, device=query_pos.device)
    return ((blocks < initial) | (blocks >= own - local)) & (blocks < own)


def select_top_blocks(block_logits: Tensor, num_selected: int, use_diff_topk: bool, *,
                      forced: tuple[int, int, int, Tensor] | None = None) -> Selection | None:
    """Softmax with a null slot, top-n. None when nothing can be selected.
    forced: (selection_block_size, initial, local, query_pos) when blocks are forced (module docstring)."""
    nb = block_logits.shape[-1]
    k = min(num_selected, nb)
    if k == 0:
        return None
    null = torch.full_like(block_logits[..., :1], NULL_SLOT_LOGIT)
    probs = torch.cat((null, block_logits), dim=-1).softmax(dim=-1)[..., 1:]
    if forced is None or forced[1] + forced[2] == 0:
        indices = top_indices_lowest_first(probs, k)
        values = probs.gather(-1, indices)
        valid = values > VALID_THRESHOLD
    else:
        sel, initial, local, query_pos = forced
        if query_pos.ndim == 2:  # per row (B, T): broadcast over the heads
            query_pos = query_pos[:, None]
        forced_idx, forced_valid = forced_blocks(query_pos, sel, initial, local)
        forced_idx = forced_idx.clamp(max=nb - 1)  # an initial block past a short row's blocks: invalid anyway
        shape = probs.shape[:-1]
        forced_idx, forced_valid = forced_idx.expand(shape + forced_idx.shape[-1:]), forced_valid.expand(
            shape + forced_valid.shape[-1:])
        # the other slots rank the unforced blocks; one that is forced counts 0 there (never twice)
        unforced = probs.masked_fill(_is_forced(nb, query_pos, sel, initial, local), 0.0)
        rest = top_indices_lowest_first(unforced, max(k - initial - local, 0))
        indices = torch.cat((forced_idx, rest), dim=-1)
        values = torch.cat((probs.gather(-1, forced_idx), unforced.gather(-1, rest)), dim=-1)
        valid = torch.cat((forced_valid, values[..., initial + local:] > VALID_THRESHOLD), dim=-1)
    gates = values + (1.0 - values).detach() if use_diff_topk else None
    return Selection(indices=indices, valid=valid, probs=values, gates=gates)


def selection_fields(selection: Selection | None) -> tuple:
    """What a chunk returns to the chunk loop: (indices, valid, probs, gates) or four Nones."""
    if selection is None:
        return None, None, None, None
    return selection.indices, selection.valid, selection.probs, selection.gates


def select_blocks_reference(q: Tensor, ck: Tensor, rule: SelectionRule, q_offset: int = 0) -> Selection | None:
    """q (B, HQ, T, D) at positions q_offset ..., compressed keys ck (B, HKV, C, D) without memory
    tokens -> the Selection of every query (None when no block can be selected)."""
    B, HQ, T, _ = q.shape
    nb = num_scored_blocks(ck.shape[-2], rule.stride, rule.selection_block_size)
    if min(rule.num_selected, nb) == 0:
        return None
    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)

    def part(start: int, end: int) -> tuple:
        pos = torch.arange(q_offset + start, q_offset + end, device=q.device)
        scores = compressed_scores(q[:, :, start:end], ck, rule.stride, rule.causal, rule.scale, pos)
        logits = block_importance(
            scores, group_size=rule.group_size, share_across_group=rule.share_across_group, stride=rule.stride,
            selection_block_size=rule.selection_block_size, interpolated=rule.interpolated, causal=rule.causal,
            query_pos=pos, importance=rule.importance, compress_block=rule.compress_block,
        )
        return selection_fields(select_top_blocks(logits, rule.num_selected, rule.use_diff_topk,
                                                  forced=rule.forced(pos)))

    chunk = query_chunk_size(T, max(1, ck.shape[-2]), HQ, B, budget=1 << 24)
    with torch.set_grad_enabled(needs_grad):
        return Selection(*map_query_chunks(part, T, chunk, needs_grad))

