"""selected_window_combine_step: a decoding step's selected and window branches and the gated combine of
the three branches as one op (validation + dispatch), so the step spends two launches on them
(kernels/decode/fine_window.py) where the branch ops and combine take five.

It serves a causal decoding step (`Seqs.step`) whose keys are in a cache's pages (ops/paged.py) and
returns None for every other call, which then runs the branch ops and `combine` (the module's
selected_branch / window_branch hooks, and so the PyTorch twin of the fused launches: decode_attention
for each branch, then combine). Forward only.

Dimension legend: B rows, HQ query heads, HKV kv heads, HI lists of the selection (HKV or HQ), K new
tokens per row, S selected blocks, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.combine_gates import CombineGates
from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.paged import Pages, paged_call
from nsa_core.seqs import Seqs
from nsa_core.selection import Selection


def selected_window_combine_step(q: Tensor, k: Tensor | Pages, v: Tensor | Pages, window_k: Tensor | Pages,
                                 window_v: Tensor | Pages, selection: Selection | None, compressed: Tensor,
                                 gates: Tensor | CombineGates, *, block_size: int, window: int, scale: float,
                                 seqs: Seqs, backend: str = "auto") -> Tensor | None:
    """q (B, HQ, K, D) rotated; k / v the selected branch's pages, window_k / window_v the window's;
    selection's indices / valid (B, HI, K, S) (None: no blocks, only each query's own); compressed
    (B, HQ, K, Dv) the compressed branch's output; gates (B, HQ, K, 3), or a CombineGates (computed in
    the combine launch where it gives its linear layer, else by its network) -> combine(compressed,
    selected, window, gates): (B, K, HQ, Dv); or None where the fused launches do not serve the call
    (not a decoding step over pages, the PyTorch path, or inputs the kernels do not take)."""
    if not paged_call(seqs, k=k, v=v, window_k=window_k, window_v=window_v):
        return None
    B, HQ, K, D = q.shape
    Dv = v.pool.shape[-1]
    if compressed.shape != (B, HQ, K, Dv):
        raise ValueError(f"compressed must be (B, HQ, K, Dv) = {(B, HQ, K, Dv)}, got {tuple(compressed.shape)}")
    linear = isinstance(gates, CombineGates) and _linear_gates_reason(gates, q, HQ) is None
    if isinstance(gates, CombineGates) and not linear:
        gates = gates.tensor()
    if not linear and gates.shape != (B, HQ, K, 3):
        raise ValueError(f"gates must be (B, HQ, K, 3) = {(B, HQ, K, 3)}, got {tuple(gates.shape)}")
    gates_dtype = gates.x.dtype if linear else gates.dtype

    def structural() -> str | None:
        """Calls the branch ops serve instead, on purpose."""
        if selection is not None and selection.gates is not None:
            return "selection gates (use_diff_topk)"
        if len({q.dtype, compressed.dtype, gates_dtype, k.pool.dtype, window_k.pool.dtype}) > 1:
            return "branches and gates of different dtypes (autocast)"
        if window_k.pool.shape[1:3] != k.pool.shape[1:3] or window_v.pool.shape[-1] != Dv:
            return "window pages of another page size or head count than the selected branch's"
        if any(pages.table is not k.table for pages in (v, window_k, window_v)):  # identity: no device read
            return "pages behind more than one block table (the fused launches read one)"
        return None

    def unsupported() -> str | None:
        from nsa_core.kernels.decode.launch import PAGE_SIZES
        from nsa_core.kernels.limits import dtype_reason, head_dim_reason

        if k.page_size != block_size or k.page_size not in PAGE_SIZES:
            return f"the decode kernels take pages of {PAGE_SIZES} tokens equal to block_size, got {k.page_size}"
        return dtype_reason(q) or head_dim_reason(D, Dv)

    if not use_kernels(backend, q.device, "selected_window_combine_step", unsupported, by_design=structural()):
        return None
    if selection is None:
        indices = torch.zeros(B, k.heads, K, 0, dtype=torch.long, device=q.device)
        valid = torch.zeros(B, k.heads, K, 0, dtype=torch.bool, device=q.device)
    else:
        indices, valid = selection.indices, selection.valid
    if indices.ndim != 4 or indices.shape[0] != B or indices.shape[2] != K or indices.shape[1] not in (k.heads, HQ):
        raise ValueError(f"selection indices must be (B={B}, {k.heads} or {HQ}, K={K}, S), got {tuple(indices.shape)}")
    from nsa_core.kernels.decode.fine_window import fine_window_fwd

    positions = seqs.query_positions(q.device)
    if linear:
        return fine_window_fwd(q, k.pool, v.pool, window_k.pool, window_v.pool, k.table, indices, valid, positions,
                               compressed, None, gates.x, gates.weight, gates.bias, scale=scale, window=window)
    return fine_window_fwd(q, k.pool, v.pool, window_k.pool, window_v.pool, k.table, indices, valid, positions,
                           compressed, gates, scale=scale, window=window)


def _linear_gates_reason(gates: CombineGates, q: Tensor, heads: int) -> str | None:
    """Why the combine launch cannot compute these gates itself (then the network does), or None."""
    x, w, b = gates.x, gates.weight, gates.bias
    if w is None:
        return "the gate network is not one linear layer and a sigmoid"
    B, _, K, _ = q.shape
    if x.shape[:2] != (B, K) or x.ndim != 3 or w.shape != (3 * heads, x.shape[-1]):
        return f"gate input {tuple(x.shape)} / weight {tuple(w.shape)} do not match {B} rows, {K} tokens, {heads} heads"
    if b is not None and b.shape != (3 * heads,):
        return f"gate bias of shape {tuple(b.shape)}"
    if len({x.dtype, w.dtype, q.dtype} | ({b.dtype} if b is not None else set())) > 1 or x.device != w.device:
        return "gate input and weights of other dtypes or devices than the queries (autocast)"
    if w.requires_grad and torch.is_grad_enabled():
        return "a gradient through the gates (the fused launch is forward only)"
    return None
