"""The non-causal selected and window branches as the oracle (native-sparse-attention-pytorch 0.2.3)
computes them: each sequence zero-padded to a multiple of the block (the window) and the zero keys
attended where they fall within reach. Each sequence alone: a plain row, every packed document of
`seqs` (reference/documents.each_sequence, on the host bounds), or a sequence-parallel shard's
queries over the whole sequence's keys. Both run on selected_attention / sliding_window_attention,
which decide kernels or reference.

Dimension legend: b batch, h query heads, hk kv heads, n queries, s keys, d head dim, S selected slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.ops.selected_attention import selected_attention
from nsa_core.ops.sliding_window import sliding_window_attention
from nsa_core.reference.documents import each_sequence
from nsa_core.reference.selection import num_scored_blocks
from nsa_core.selection import Selection
from nsa_core.seqs import Seqs


def _pad_seq(t: Tensor, multiple: int) -> Tensor:
    """Zero-pad dim -2 up to a multiple (the oracle's padding, whose zero keys it attends)."""
    remainder = -t.shape[-2] % multiple
    return F.pad(t, (0, 0, 0, remainder)) if remainder else t


def _pad_keys(q: Tensor, k: Tensor, v: Tensor, seqs: Seqs, multiple: int) -> tuple[Tensor, Tensor, Tensor, Seqs]:
    """The oracle's non-causal padding of the whole key sequence to a multiple: zero keys appended.
    A plain batch pads its queries too (and stays plain); queries among other keys (a sequence-parallel
    shard) keep theirs and see the longer keys. Returns (q, k, v, their descriptor)."""
    if seqs.is_plain:
        qp, kp, vp = (_pad_seq(t, multiple) for t in (q, k, v))
        return qp, kp, vp, Seqs.batch(qp.shape[-2])
    kp, vp = _pad_seq(k, multiple), _pad_seq(v, multiple)
    return q, kp, vp, Seqs(seqs.q_len, kp.shape[-2], seqs.q_offset)


def padded_selected_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection | None, *, num_selected: int,
                              block_size: int, stride: int, scale: float, seqs: Seqs, backend: str = "auto") -> Tensor:
    """The non-causal fine branch: rotated q (b, h, n, d) over k, v (b, hk, s, d) and the selection
    (b, H, n, S) of select_blocks (None: nothing selectable) -> (b, h, n, d)."""
    common = dict(block_size=block_size, scale=scale, backend=backend, causal=False)

    def alone(q: Tensor, k: Tensor, v: Tensor, selection: Selection | None, seqs: Seqs) -> Tensor:
        b, hk, n = q.shape[0], k.shape[1], q.shape[-2]
        num_slots = min(num_selected, num_scored_blocks(k.shape[-2] // stride, stride, block_size))
        if selection is None or num_slots == 0:
            # the oracle attends each query's whole own block, zero padding included
            qp, kp, vp, padded = _pad_keys(q, k, v, seqs, block_size)
            own = (padded.query_positions(q.device) // block_size).view(1, 1, -1, 1).expand(b, hk, -1, 1)
            return selected_attention(qp, kp, vp, own, seqs=padded, **common)[..., :n, :]
        # a packed selection has slots for the longest document: this one has num_slots of them
        indices, valid, probs = (t[..., :num_slots] for t in (selection.indices, selection.valid, selection.probs))
        gates = None if selection.gates is None else selection.gates[..., :num_slots]
        # a query none of whose slots is valid: the oracle averages the selected blocks' values
        any_valid = valid.any(dim=-1, keepdim=True)
        ones = torch.ones_like(probs)
        gates = torch.where(any_valid, ones if gates is None else gates, torch.zeros_like(ones))
        return selected_attention(q, k, v, indices, valid=valid | ~any_valid, gates=gates, seqs=seqs, **common)

    return each_sequence(alone, seqs, q, k, v, selection)


def padded_window_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int, scale: float, seqs: Seqs,
                            backend: str = "auto") -> Tensor:
    """The non-causal window branch: rotated q (b, h, n, d) over k, v (b, hk, s, d) -> (b, h, n, d)."""

    def alone(q: Tensor, k: Tensor, v: Tensor, _selection, seqs: Seqs) -> Tensor:
        # the oracle pads to a multiple of the window and attends the zero keys within reach
        qp, kp, vp, padded = _pad_keys(q, k, v, seqs, window)
        return sliding_window_attention(qp, kp, vp, window=window, causal=False, scale=scale, seqs=padded,
                                        backend=backend)[..., : q.shape[-2], :]

    return each_sequence(alone, seqs, q, k, v, None)
