"""compressed_selection: the compressed branch and the block selection that scores its keys, one op
(validation + dispatch, decided once per call).

Whole sequences and sequence-parallel shards whose selection scores the compressed keys themselves
(selection_keys=None), on the kernels, for the importance scores in FUSED_TRAINING_SCORES below
(where it measured faster): the fused Triton kernel (kernels/compressed_scoring.py: the compressed attention's output and
the selection blocks' scores in one launch, then kernels/block_topk.py's top-k, query chunk by query chunk; its output's
backward is the staircase SDPA's, as on the two-op path). Everything else takes compressed_attention
then select_blocks (each its own kernels or reference), by design: packed documents (the fused kernel
reads no document bounds), other selection keys, use_diff_topk (its gates need the scores' gradient),
selection blocks not a multiple of the stride, a rule whose causality or scale is not the attention's.

A decoding step (`Seqs.step`, ck / cv in a cache's pages: ops/paged.py): on the kernels the fused
Triton kernel (kernels/decode/compressed_selection.py: per row, token and selection list, the
compressed attention over the visible compressed slots, the block scores from that attention's
logits and the top-k, one launch; on an H200 a graphed layer step takes 0.33-0.48 ms against the
twin's 0.46-6.5 ms: benchmarks/RESULTS.md "Fused decode step"), or its PyTorch twin
(reference/step_selection.py: the paged compressed attention and the step selection over the
cache's selection keys). Forward only for a step. With importance "selected_keys" a step's compressed
branch is a plain paged launch and the same fused kernel picks the blocks from the cache's block keys,
one key per block at a stride of one block (its PyTorch twin: ops/step_selection.py).
With selected_key_slots (rule.splits_slots) both run on every pass: the forced blocks and the importance's
slots as without the option, then the block keys' slots, merged (ops/selection_merge.py).

Dimension legend: B batch, HQ query heads, HKV kv heads, K queries per row, M memory tokens,
C compressed blocks in the cache's capacity, NB selection blocks in it, S selected slots, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.block_selection import select_blocks
from nsa_core.ops.compressed_attention import compressed_attention
from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.paged import Pages, PooledBlockKeys, _check_paged, paged_call
from nsa_core.ops.selection_merge import merge_selection_slots
from nsa_core.ops.validation import check_positive_int, check_same_device_dtype
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.reference.selection import NULL_SLOT_LOGIT, VALID_THRESHOLD, num_scored_blocks
from nsa_core.reference.step_selection import step_compressed_selection_reference
from nsa_core.selection import Selection, SelectionRule
from nsa_core.seqs import Seqs, check_rows, query_seqs

# the importance scores whose whole sequences take the fused training kernel on the kernels (H200, paper
# shape, fwd+bwd: summed_probs 8.8x the two ops at 8k, 13.5x at 64k; mean_logits 0.52x / 0.32x, so it keeps
# the two ops: benchmarks/RESULTS.md "Fused compressed scoring"). The kernel takes both scores.
FUSED_TRAINING_SCORES = frozenset({"summed_probs"})
SCORE_BUDGET = 1 << 27  # score elements (B x H x queries x NB) of one query chunk on the fused training path


def compressed_selection(q: Tensor, ck: Tensor | Pages, cv: Tensor | Pages,
                         selection_keys: Tensor | PooledBlockKeys | None, rule: SelectionRule, *, num_memory: int,
                         causal: bool = True, scale: float | None = None, seqs: Seqs | None = None,
                         backend: str = "auto", selection_q: Tensor | None = None) -> tuple[Tensor, Selection | None]:
    """q (B, HQ, T, D) unrotated; ck / cv the compressed keys and values with the M = num_memory memory
    tokens first (compressed_attention's arguments, at rule.stride); selection_keys: what select_blocks
    scores when it is not ck's keys after the memory tokens (None: those keys, which lets whole
    sequences take the fused kernel; for a decoding step pooled keys, PooledBlockKeys, when
    rule.pooled, or None: read from ck's pages). -> (the compressed branch's
    output (B, HQ, T, Dv), select_blocks' Selection or None).
    With importance "selected_keys" (rule.scores_selected_keys) the selection is the selected branch's
    own: selection_q, the rotated queries (B, HQ, T, D), score selection_keys, the selected branch's
    block keys (model/selection_keys.py), both required; selection_q is unused otherwise."""
    stride = rule.stride
    if rule.splits_slots:
        return _split_selection(q, ck, cv, selection_keys, selection_q, rule, num_memory=num_memory, causal=causal,
                                scale=scale, seqs=seqs, backend=backend)
    if rule.scores_selected_keys:
        return _selected_key_selection(q, ck, cv, selection_keys, selection_q, rule, num_memory=num_memory,
                                       causal=causal, scale=scale, seqs=seqs, backend=backend)
    if not paged_call(seqs, ck=ck, cv=cv):
        if selection_keys is None and _fused_training(q, ck, cv, rule, num_memory, causal, scale, seqs, backend):
            return _fused_whole(q, ck, cv, rule, num_memory, query_seqs(q, seqs).q_offset)
        keys = ck[:, :, num_memory:] if selection_keys is None else selection_keys
        out = compressed_attention(q, ck, cv, num_memory=num_memory, stride=stride, causal=causal, scale=scale,
                                   seqs=seqs, backend=backend)
        return out, select_blocks(q, keys, rule, seqs=seqs, backend=backend)
    check_positive_int("num_memory", num_memory)
    if not causal or not rule.causal:
        raise ValueError("a decoding step (Seqs.step) is causal: pass causal=True and a causal rule")
    if rule.pooled != isinstance(selection_keys, PooledBlockKeys) and selection_keys is not None:
        raise TypeError(f"a decoding step's selection with this rule scores "
                        f"{'PooledBlockKeys' if rule.pooled else 'compressed keys'}: got {type(selection_keys).__name__}")
    _check_paged(q, ck, cv, seqs)
    check_same_device_dtype(q=q, ck=ck.pool, cv=cv.pool)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    C = seqs.k_len // stride  # the compressed blocks of the capacity
    nb = num_scored_blocks(C, stride, rule.selection_block_size)
    k = min(rule.num_selected, nb)
    if k == 0:  # nothing to select: the compressed branch alone
        out = compressed_attention(q, ck, cv, num_memory=num_memory, stride=stride, scale=scale, seqs=seqs,
                                   backend=backend)
        return out, None
    def unsupported() -> str | None:
        from nsa_core.kernels.decode.compressed_selection import too_large_reason
        from nsa_core.kernels.limits import dtype_reason, head_dim_reason

        return (dtype_reason(q) or head_dim_reason(q.shape[-1], cv.pool.shape[-1])
                or too_large_reason(C, stride, rule.selection_block_size, rule.compress_block, rule.importance,
                                    rule.interpolated))

    positions = seqs.query_positions(q.device)
    if use_kernels(backend, q.device, "compressed_selection (decoding step)", unsupported):
        from nsa_core.kernels.decode.compressed_selection import compressed_selection_step

        out, indices, valid, probs = compressed_selection_step(
            q, ck.pool, cv.pool, ck.table, positions, num_memory=num_memory, num_compressed=C, stride=stride,
            selection_block_size=rule.selection_block_size, compress_block=rule.compress_block,
            importance=rule.importance, interpolated=rule.interpolated, share=rule.share_across_group,
            slots=max(k, rule.forced_initial + rule.forced_local), forced_initial=rule.forced_initial,
            forced_local=rule.forced_local, scale=scale, null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD)
        return out, Selection(indices=indices, valid=valid, probs=probs, gates=None)
    keys = selection_keys.keys if isinstance(selection_keys, PooledBlockKeys) else selection_keys
    return step_compressed_selection_reference(q, ck.pool, cv.pool, ck.table, positions, rule, num_memory=num_memory,
                                               num_compressed=C, scale=scale, selection_keys=keys)


def _selected_key_selection(q: Tensor, ck: Tensor | Pages, cv: Tensor | Pages, selection_keys, selection_q,
                            rule: SelectionRule, *, num_memory: int, causal: bool, scale: float | None,
                            seqs: Seqs | None, backend: str) -> tuple[Tensor, Selection | None]:
    """Importance "selected_keys": the compressed branch alone, then the selection of selection_q over the
    selected branch's block keys (a cache's PooledBlockKeys for a decoding step)."""
    _check_block_key_inputs(q, ck, cv, selection_keys, selection_q, seqs)
    out = compressed_attention(q, ck, cv, num_memory=num_memory, stride=rule.stride, causal=causal, scale=scale,
                               seqs=seqs, backend=backend)
    return out, _block_key_selection(selection_q, selection_keys, rule.block_key_rule(), seqs, backend)


def _split_selection(q: Tensor, ck: Tensor | Pages, cv: Tensor | Pages, selection_keys, selection_q,
                     rule: SelectionRule, *, num_memory: int, causal: bool, scale: float | None,
                     seqs: Seqs | None, backend: str) -> tuple[Tensor, Selection | None]:
    """selected_key_slots: the compressed branch with the forced blocks and the importance's slots, as
    without the option (its kernels), then the block keys' slots; a block both pick is attended once."""
    _check_block_key_inputs(q, ck, cv, selection_keys, selection_q, seqs)
    out, first = compressed_selection(q, ck, cv, None, rule.importance_part(), num_memory=num_memory, causal=causal,
                                      scale=scale, seqs=seqs, backend=backend)
    second = _block_key_selection(selection_q, selection_keys, rule.block_key_part(), seqs, backend)
    return out, merge_selection_slots(first, second, backend=backend)


def _check_block_key_inputs(q: Tensor, ck, cv, selection_keys, selection_q, seqs: Seqs | None) -> None:
    if selection_keys is None or selection_q is None:
        raise ValueError("a selection scored by the selected branch's block keys (importance 'selected_keys' or "
                         "selected_key_slots) needs selection_keys (model/selection_keys.py) and selection_q "
                         "(the rotated queries)")
    if not isinstance(selection_q, Tensor) or selection_q.shape != q.shape:
        raise ValueError(f"selection_q must be the rotated queries, shaped as q {tuple(q.shape)}, got "
                         f"{getattr(selection_q, 'shape', type(selection_q).__name__)}")
    if not paged_call(seqs, ck=ck, cv=cv) and isinstance(selection_keys, PooledBlockKeys):
        raise TypeError("selection_keys as PooledBlockKeys (a cache's block keys) need a decoding-step seqs")


def _block_key_selection(selection_q: Tensor, selection_keys, rule: SelectionRule, seqs: Seqs | None,
                         backend: str) -> Selection | None:
    """The selection of selection_q over the block keys by `rule` (a block-key rule: block_key_rule)."""
    if (isinstance(seqs, Seqs) and seqs.is_step
            and _step_block_keys_on_kernels(selection_q, selection_keys, rule, backend)):
        return _step_block_key_selection(selection_q, selection_keys, rule, seqs)
    return select_blocks(selection_q, selection_keys, rule, seqs=seqs, backend=backend)


def _step_block_keys_on_kernels(selection_q: Tensor, selection_keys, rule: SelectionRule, backend: str) -> bool:
    """Whether a decoding step's selection over a cache's block keys takes the fused step kernel."""
    if not isinstance(selection_keys, PooledBlockKeys):
        return False  # select_blocks names the wrong type
    keys = selection_keys  # PooledBlockKeys: shape, device and dtype without gathering a cache's keys
    block = rule.selection_block_size

    def unsupported() -> str | None:
        from nsa_core.kernels.decode.compressed_selection import too_large_reason
        from nsa_core.kernels.limits import dtype_reason, head_dim_reason

        return (dtype_reason(selection_q) or head_dim_reason(keys.shape[-1], keys.shape[-1])
                or too_large_reason(keys.shape[-2], block, block, block, "mean_logits"))

    if keys.device != selection_q.device or keys.dtype != selection_q.dtype or len(keys.shape) != 4:
        return False  # select_blocks names the mismatch
    return min(rule.num_selected, keys.shape[-2]) > 0 and use_kernels(
        backend, selection_q.device, "block selection over block keys (decoding step)", unsupported)


def _step_block_key_selection(selection_q: Tensor, keys: PooledBlockKeys, rule: SelectionRule,
                              seqs: Seqs) -> Selection:
    """The fused step kernel's scoring and top-k over the block keys (B, HKV, NB, D), one key per block:
    the block-key rule is the mean-logit rule at a stride of one block, so each key is a compressed slot of
    its own block, no memory tokens (the kernel's attention output over them is not used). The keys
    are read as pages of one slot: a cache's own pages behind its table, or the given keys behind an
    identity table."""
    from nsa_core.kernels.decode.compressed_selection import compressed_selection_step

    B, HKV, NB, D = keys.shape
    if selection_q.shape[0] != B or selection_q.shape[-1] != D or selection_q.shape[-2] != seqs.q_len:
        raise ValueError(f"the block keys must be (B={selection_q.shape[0]}, HKV, NB, D={selection_q.shape[-1]}) and "
                         f"selection_q hold seqs' {seqs.q_len} queries, got keys {tuple(keys.shape)}, "
                         f"selection_q {tuple(selection_q.shape)}")
    check_rows(seqs, selection_q)
    if keys.pages is not None:
        pages, table = keys.pages.unsqueeze(2), keys.table  # (P, HKV, 1, D) behind (B, NB)
    else:
        pages = keys.keys.transpose(1, 2).reshape(B * NB, HKV, 1, D)
        table = torch.arange(B * NB, device=keys.device).view(B, NB)
    block = rule.selection_block_size
    _, indices, valid, probs = compressed_selection_step(
        selection_q, pages, pages, table, seqs.query_positions(selection_q.device), num_memory=0, num_compressed=NB,
        stride=block, selection_block_size=block, compress_block=block, importance="mean_logits", interpolated=False,
        share=rule.share_across_group, slots=max(min(rule.num_selected, NB), rule.forced_initial + rule.forced_local),
        forced_initial=rule.forced_initial, forced_local=rule.forced_local, scale=rule.scale,
        null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD)
    return Selection(indices=indices, valid=valid, probs=probs, gates=None)


def _training_by_design(q: Tensor, rule: SelectionRule, causal: bool, scale: float | None,
                        seqs: Seqs | None) -> str | None:
    """Why whole sequences take the two ops on purpose (module docstring), or None."""
    if rule.importance not in FUSED_TRAINING_SCORES:
        return "the two ops measure faster for this importance score"
    if isinstance(seqs, Seqs) and seqs.is_packed:
        return "packed documents take the compressed flex and packed top-k kernels"
    if rule.use_diff_topk:
        return "use_diff_topk's gates need the scores' gradient"
    if rule.selection_block_size % rule.stride:
        return "selection blocks that are not a multiple of the stride"
    if (rule.causal, rule.scale) != (causal, q.shape[-1] ** -0.5 if scale is None else scale):
        return "the rule's causality or scale is not the attention's"
    return None


def _fused_training(q: Tensor, ck: Tensor, cv: Tensor, rule: SelectionRule, num_memory: int, causal: bool,
                    scale: float | None, seqs: Seqs | None, backend: str) -> bool:
    """Whether whole sequences take the fused training kernel (checked inputs), decided once per call."""
    if (_training_by_design(q, rule, causal, scale, seqs) is not None
            or not use_kernels(backend, q.device, "compressed_selection (fused)")):
        return False
    check_positive_int("num_memory", num_memory)
    check_same_device_dtype(q=q, ck=ck, cv=cv)
    if ck.shape[-2] < num_memory:
        raise ValueError(f"ck must hold the {num_memory} memory tokens first, got {ck.shape[-2]} tokens")
    B, HQ, _, D = q.shape
    if ck.shape[0] != B or ck.shape[-1] != D or cv.shape[:3] != ck.shape[:3] or HQ % ck.shape[1]:
        raise ValueError(f"ck (B, HKV, M + C, D) and cv (B, HKV, M + C, Dv) must match q (B, HQ, T, D) with HQ a "
                         f"multiple of HKV, got q {tuple(q.shape)}, ck {tuple(ck.shape)}, cv {tuple(cv.shape)}")
    if rule.group_size != HQ // ck.shape[1]:
        raise ValueError(f"rule.group_size must be HQ // HKV = {HQ // ck.shape[1]}, got {rule.group_size}")

    def unsupported() -> str | None:
        from nsa_core.kernels.block_topk import MAX_BLOCKS
        from nsa_core.kernels.compressed_scoring_launch import scoring_unsupported_reason

        nb = num_scored_blocks(ck.shape[-2] - num_memory, rule.stride, rule.selection_block_size)
        if nb > MAX_BLOCKS:
            return f"the top-k kernel holds at most {MAX_BLOCKS} blocks per query, got {nb}"
        return scoring_unsupported_reason(q, ck, cv, stride=rule.stride, selection_block_size=rule.selection_block_size,
                                          compress_block=rule.compress_block,
                                          summed=rule.importance == "summed_probs")

    return unsupported() is None  # inputs the fused kernel does not take go to the two ops, which decide


def _fused_whole(q: Tensor, ck: Tensor, cv: Tensor, rule: SelectionRule, num_memory: int,
                 q_offset: int) -> tuple[Tensor, Selection | None]:
    """The fused training kernel, then block_topk, one query chunk at a time (scores linear in T)."""
    from nsa_core.kernels.block_topk import block_topk
    from nsa_core.kernels.compressed_scoring_launch import compressed_scoring

    B, HQ, T, _ = q.shape
    nb = num_scored_blocks(ck.shape[-2] - num_memory, rule.stride, rule.selection_block_size)
    k = min(rule.num_selected, nb)
    summed = rule.importance == "summed_probs"
    heads = ck.shape[1] if rule.share_across_group else HQ
    chunk = query_chunk_size(T, max(1, nb), heads, B, budget=SCORE_BUDGET)
    mask_own = rule.selection_block_size != rule.stride

    def part(start: int, end: int) -> tuple:
        out, _, scores = compressed_scoring(
            q[:, :, start:end], ck, cv, num_memory=num_memory, stride=rule.stride,
            selection_block_size=rule.selection_block_size, compress_block=rule.compress_block, causal=rule.causal,
            scale=rule.scale, q_offset=q_offset + start, summed=summed, share=rule.share_across_group,
            mask_own=mask_own)
        if k == 0:
            return out, None, None, None
        indices, valid, probs = block_topk(
            scores, k, scale=1.0 if summed else rule.scale, first_pos=q_offset + start, causal=rule.causal,
            selection_block_size=rule.selection_block_size, mask_own=mask_own, null_logit=NULL_SLOT_LOGIT,
            threshold=VALID_THRESHOLD, forced_initial=rule.forced_initial, forced_local=rule.forced_local)
        return out, indices, valid, probs

    out, indices, valid, probs = map_query_chunks(part, T, chunk, needs_grad=False)
    return out, None if indices is None else Selection(indices, valid, probs, None)
