"""The sequence descriptor every op takes: where the queries sit among the keys.

A plain batch (every row n queries over its own n keys) and a decoding step (q_len new queries
after `q_offset` cached keys, so k_len = q_offset + q_len) are the same descriptor with different
values; query i of a row sits at key position q_offset + i. The packing issue adds cumulative
lengths (`cu_seqlens`) to this class and the sequence-parallel issue a shard's offset; every op
already takes it, so those become new values here, not new arguments everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Seqs:
    q_len: int  # queries per row
    k_len: int  # keys per row
    q_offset: int = 0  # key position of the first query

    def __post_init__(self) -> None:
        for name in ("q_len", "k_len", "q_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Seqs.{name} must be an int >= 0, got {value!r}")
        if self.q_offset + self.q_len > self.k_len:
            raise ValueError(
                f"queries at positions {self.q_offset} ... {self.q_offset + self.q_len - 1} need that many keys, "
                f"got k_len={self.k_len}"
            )

    @classmethod
    def batch(cls, seq_len: int) -> "Seqs":
        """Every query over the keys of its own row, query i at position i."""
        return cls(seq_len, seq_len, 0)

    @classmethod
    def step(cls, num_new: int, num_cached: int) -> "Seqs":
        """num_new queries appended after num_cached keys (decoding, chunked prefill)."""
        return cls(num_new, num_cached + num_new, num_cached)

    @property
    def is_plain(self) -> bool:
        return self.q_offset == 0 and self.q_len == self.k_len

    def query_positions(self, device: torch.device | str) -> Tensor:
        return torch.arange(self.q_offset, self.q_offset + self.q_len, device=device)

    def check(self, q: Tensor, k: Tensor) -> None:
        """q (..., q_len, d) and k (..., k_len, d) must match the descriptor."""
        if q.shape[-2] != self.q_len or k.shape[-2] != self.k_len:
            raise ValueError(
                f"seqs describes {self.q_len} queries over {self.k_len} keys, got q with {q.shape[-2]} and "
                f"k with {k.shape[-2]} tokens"
            )


def seqs_for(q: Tensor, k: Tensor, seqs: Seqs | None) -> Seqs:
    """The descriptor of an op call: the given one (checked) or, when None, a plain batch."""
    if seqs is None:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"q and k must share the sequence length without a seqs descriptor, got {q.shape[-2]} and {k.shape[-2]}"
            )
        return Seqs.batch(q.shape[-2])
    if not isinstance(seqs, Seqs):
        raise TypeError(f"seqs must be a nsa_core.ops.Seqs or None, got {type(seqs).__name__}")
    seqs.check(q, k)
    return seqs


def query_seqs(q: Tensor, seqs: Seqs | None) -> Seqs:
    """The descriptor of an op whose keys are not token-level (compressed keys): checks q only."""
    if seqs is None:
        return Seqs.batch(q.shape[-2])
    if not isinstance(seqs, Seqs):
        raise TypeError(f"seqs must be a nsa_core.ops.Seqs or None, got {type(seqs).__name__}")
    if q.shape[-2] != seqs.q_len:
        raise ValueError(f"seqs describes {seqs.q_len} queries, got q with {q.shape[-2]} tokens")
    return seqs


LAYOUT_REASON = "the kernels take plain batches (queries over their own keys, no offset)"


def plain_layout_reason(seqs: Seqs) -> str | None:
    """Why a kernel that takes only plain batches does not take this layout (None if it does)."""
    return None if seqs.is_plain else LAYOUT_REASON
