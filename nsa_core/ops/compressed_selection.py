"""compressed_selection: the compressed branch and the block selection that scores its keys, one op
(validation + dispatch), so a decoding step runs them as one kernel.

Whole sequences, packed documents, a sequence-parallel shard: compressed_attention, then
select_blocks (each its own kernels or reference). A decoding step (`Seqs.step`, ck / cv in a
cache's pages: ops/paged.py): with backend="triton" (FUSED_STEP_BY_DEFAULT below) the fused Triton
kernel (kernels/decode/compressed_selection.py: per row, token and selection list, the compressed attention over the visible compressed slots, the
block scores from that attention's logits and the top-k, one launch), or its PyTorch twin
(reference/step_selection.py: the paged compressed attention and the step selection over the
cache's selection keys). Forward only for a step.

Dimension legend: B batch, HQ query heads, HKV kv heads, K queries per row, M memory tokens,
C compressed blocks in the cache's capacity, NB selection blocks in it, S selected slots, D head dim.
"""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.block_selection import select_blocks
from nsa_core.ops.compressed_attention import compressed_attention
from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.paged import Pages, PooledBlockKeys, _check_paged, paged_call
from nsa_core.ops.validation import check_positive_int, check_same_device_dtype
from nsa_core.reference.selection import NULL_SLOT_LOGIT, VALID_THRESHOLD, num_scored_blocks
from nsa_core.reference.step_selection import step_compressed_selection_reference
from nsa_core.selection import Selection, SelectionRule
from nsa_core.seqs import Seqs

# backend="auto" on a GPU runs the twin until the fused kernel's GPU tests have passed on a device and it
# is measured against the paged split-K kernels it replaces (its grid is B x HKV x K programs: 4 at
# batch 1 on the paper layer); backend="triton" runs it.
FUSED_STEP_BY_DEFAULT = False


def compressed_selection(q: Tensor, ck: Tensor | Pages, cv: Tensor | Pages,
                         selection_keys: Tensor | PooledBlockKeys | None, rule: SelectionRule, *, num_memory: int,
                         causal: bool = True, scale: float | None = None, seqs: Seqs | None = None,
                         backend: str = "auto") -> tuple[Tensor, Selection | None]:
    """q (B, HQ, T, D) unrotated; ck / cv the compressed keys and values with the M = num_memory memory
    tokens first (compressed_attention's arguments, at rule.stride); selection_keys: what select_blocks
    scores (the compressed keys without memory tokens; for a decoding step the cache's pooled keys,
    PooledBlockKeys, when rule.pooled, or None: read from ck's pages). -> (the compressed branch's
    output (B, HQ, T, Dv), select_blocks' Selection or None)."""
    stride = rule.stride
    if not paged_call(seqs, ck=ck, cv=cv):
        out = compressed_attention(q, ck, cv, num_memory=num_memory, stride=stride, causal=causal, scale=scale,
                                   seqs=seqs, backend=backend)
        return out, select_blocks(q, selection_keys, rule, seqs=seqs, backend=backend)
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
    opt_in = None if backend == "triton" or FUSED_STEP_BY_DEFAULT else "the fused step kernel is opt-in for now"
    if use_kernels(backend, q.device, "compressed_selection (decoding step)", unsupported, by_design=opt_in):
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
