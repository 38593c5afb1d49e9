"""The sequence descriptor every op takes: where the queries sit among the keys.

A plain batch (every row n queries over its own n keys), a decoding step (q_len new queries
after `q_offset` cached keys, so k_len = q_offset + q_len) and packed documents (one row of
`total` tokens holding documents one after the other, `cu_seqlens` their cumulative lengths, as in
flash-attention's varlen functions) are the same descriptor with different values. Query i of a
plain row sits at key position q_offset + i; a packed token t sits at position t - start(t) of its
document, and sees only its document's keys. A sequence-parallel shard is queries after other keys
(q_offset = its first token, k_len = the whole sequence). A decoding step over a cache
(`Seqs.step`) is q_len new tokens per row after a different number of cached tokens in every row:
the counts stay on the device (`cached`, (B,)), so nothing reads them on the host; token i of row b
sits at position cached[b] + i, and k_len is the cache's capacity per row. Its keys are read from the
cache's pages (nsa_core/ops/paged.py), never passed as token tensors.

Dimension legend: N documents, T tokens of the packed row, B rows of a decoding step, K new tokens per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

# Seqs.packed's recent descriptors, by cu_seqlens tensor: the layers of one forward (and its backward)
# share one descriptor and the layouts derived from it (Seqs.layout). Entries hold their tensor, so an
# id is never reused while its entry lives; an in-place change of the tensor (its version) misses.
_RECENT_PACKED: dict[int, tuple[Tensor, int, int, str, "Seqs"]] = {}
_RECENT_PACKED_SIZE = 4


@dataclass(frozen=True)
class Seqs:
    q_len: int  # queries per row
    k_len: int  # keys per row
    q_offset: int = 0  # key position of the first query
    # packed documents (batch 1, queries and keys alike): (N + 1,) int cumulative lengths on the
    # tensors' device, and the longest document (read once when the descriptor was made)
    cu_seqlens: Tensor | None = field(default=None, compare=False)
    max_seqlen: int | None = None
    _layouts: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    # a decoding step: (B,) int tokens already cached per row, on the tensors' device (never read on the host)
    cached: Tensor | None = field(default=None, compare=False)
    # and its queries' positions, (B, q_len) int64: cached[b] + i, made once with the descriptor
    step_positions: Tensor | None = field(default=None, compare=False, repr=False)

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
        if self.cu_seqlens is not None and not (self.q_offset == 0 and self.q_len == self.k_len):
            raise ValueError("packed documents (cu_seqlens) take queries over their own keys (no q_offset)")
        if self.cached is not None and (self.cu_seqlens is not None or self.q_offset):
            raise ValueError("a decoding step (cached) places its queries by the cached counts: no cu_seqlens, "
                             "no q_offset")
        if (self.cached is None) != (self.step_positions is None):
            raise ValueError("a decoding step's descriptor comes from Seqs.step (cached counts and their positions)")

    @classmethod
    def batch(cls, seq_len: int) -> "Seqs":
        """Every query over the keys of its own row, query i at position i."""
        return cls(seq_len, seq_len, 0)

    @classmethod
    def packed(cls, cu_seqlens: Tensor, total: int, device: torch.device | str | None = None) -> "Seqs":
        """Documents packed into one row of `total` tokens: cu_seqlens (N + 1,) int32 / int64, on
        `device` (the tokens' device), starting at 0, never decreasing, ending at total (empty
        documents allowed). Validating reads cu_seqlens once (one host sync per descriptor); the
        same tensor (unchanged) again gives the same descriptor, without a sync."""
        key = id(cu_seqlens)
        recent = _RECENT_PACKED.get(key)
        if (recent is not None and recent[0] is cu_seqlens and recent[1] == cu_seqlens._version and recent[2] == total
                and recent[3] == str(device)):
            return recent[4]
        seqs = cls._validated_packed(cu_seqlens, total, device)
        if not torch.compiler.is_compiling():
            if len(_RECENT_PACKED) >= _RECENT_PACKED_SIZE:
                del _RECENT_PACKED[next(iter(_RECENT_PACKED))]
            _RECENT_PACKED[key] = (cu_seqlens, cu_seqlens._version, total, str(device), seqs)
        return seqs

    @classmethod
    def _validated_packed(cls, cu_seqlens: Tensor, total: int, device: torch.device | str | None) -> "Seqs":
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"cu_seqlens must be an int32 or int64 torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with num_docs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if device is not None and not _same_device(cu_seqlens.device, torch.device(device)):
            raise ValueError(f"cu_seqlens must be on the input's device ({device}), got {cu_seqlens.device}")
        values = cu_seqlens.tolist()
        if values[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        if min(lengths) < 0:
            raise ValueError(f"cu_seqlens must never decrease, got {values}")
        if values[-1] != total:
            raise ValueError(f"cu_seqlens must end at the total length {total}, got {values[-1]}")
        return cls(total, total, 0, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))

    def layout(self, key: tuple, make: Callable[[], Any]) -> Any:
        """What `make()` derives from this descriptor's documents (block tables, masks, index
        tensors), built once per descriptor and `key` (its shape arguments): the layers share it."""
        if key not in self._layouts:
            self._layouts[key] = make()
        return self._layouts[key]

    @classmethod
    def step(cls, lengths: Tensor, new_tokens: int, capacity: int) -> "Seqs":
        """A decoding step: `new_tokens` queries per row after lengths[b] cached tokens of row b
        (lengths (B,) int32 / int64 on the tokens' device, read by the device only: no host
        synchronisation), in a cache of `capacity` tokens per row."""
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be an int32 or int64 torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")
        if lengths.ndim != 1 or lengths.numel() < 1:
            raise ValueError(f"lengths must be 1-D with one count per row (batch >= 1), got shape "
                             f"{tuple(lengths.shape)}")
        for name, value in (("new_tokens", new_tokens), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if new_tokens > capacity:
            raise ValueError(f"new_tokens={new_tokens} do not fit a cache of capacity={capacity} tokens per row")
        positions = lengths.to(torch.int64)[:, None] + torch.arange(new_tokens, device=lengths.device)
        return cls(new_tokens, capacity, 0, cached=lengths, step_positions=positions)

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def is_step(self) -> bool:
        """A decoding step over a cache (Seqs.step): per-row positions on the device."""
        return self.cached is not None

    @property
    def is_plain(self) -> bool:
        """One sequence per row, queries over their own keys (no offset, no packing)."""
        return self.q_offset == 0 and self.q_len == self.k_len and not self.is_packed and not self.is_step

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) token range of every document (a plain row: one). Reads cu_seqlens on the
        host: for the reference path and the oracle's per-sequence padding, never for kernels."""
        if self.is_step:
            raise ValueError("a decoding step's rows sit at device-side positions: it has no host-side spans")
        if self.cu_seqlens is None:
            return [(0, self.q_len)]
        values = self.cu_seqlens.tolist()
        return list(zip(values[:-1], values[1:]))

    @cached_property
    def token_doc_start(self) -> Tensor:
        """Packed only: (T,) int64, the first token of each token's document (on cu_seqlens' device, no sync)."""
        cu = self.cu_seqlens.long()
        tokens = torch.arange(self.k_len, device=cu.device)
        return cu[torch.searchsorted(cu, tokens, right=True) - 1]

    def query_positions(self, device: torch.device | str) -> Tensor:
        """Position of every query within its sequence (a packed token: within its document): (q_len,),
        or for a decoding step (B, q_len) int64, row b's tokens at cached[b] ... cached[b] + q_len - 1."""
        if self.is_step:
            return self.step_positions.to(device)
        if self.is_packed:
            return torch.arange(self.q_len, device=device) - self.token_doc_start.to(device)
        return torch.arange(self.q_offset, self.q_offset + self.q_len, device=device)

    def key_positions(self, device: torch.device | str) -> Tensor:
        """Position of every key within its sequence (a packed token: within its document)."""
        if self.is_step:
            raise ValueError("a decoding step's keys are in its cache: they have no token tensor to place")
        if self.is_packed:
            return self.query_positions(device)
        return torch.arange(self.k_len, device=device)

    def check(self, q: Tensor, k: Tensor) -> None:
        """q (..., q_len, d) and k (..., k_len, d) must match the descriptor (packed: batch 1)."""
        if q.shape[-2] != self.q_len or k.shape[-2] != self.k_len:
            raise ValueError(
                f"seqs describes {self.q_len} queries over {self.k_len} keys, got q with {q.shape[-2]} and "
                f"k with {k.shape[-2]} tokens"
            )
        check_rows(self, q)


def check_rows(seqs: Seqs, t: Tensor) -> None:
    """Packed documents: batch 1. A decoding step: one cached count per row, on t's device."""
    if seqs.is_packed and t.ndim >= 3 and t.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: the batch must be 1, got {t.shape[0]}")
    if seqs.is_step:
        if t.ndim < 3 or t.shape[0] != seqs.cached.shape[0]:
            raise ValueError(f"the decoding step's seqs holds {seqs.cached.shape[0]} rows (cached counts), got a "
                             f"tensor of shape {tuple(t.shape)}")
        if not _same_device(seqs.cached.device, t.device):
            raise ValueError(f"the decoding step's cached counts are on {seqs.cached.device}, the queries on "
                             f"{t.device}")


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
    check_rows(seqs, q)
    return seqs


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device when the current device is 0: compare types, and indices
    where both are given (an index-less device means the current one)."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index
