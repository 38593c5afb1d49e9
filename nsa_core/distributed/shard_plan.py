"""What one rank of a sequence-parallel group owns, in numbers: its token spans, the compression
windows whose last token it holds, the halo of earlier tokens those windows reach back to, and the
sizes of the chunk-structured tensors it contributes to the all-gathers. Plain arithmetic over
python ints (no collective, no module, no host sync: index tensors are built with arange on the
device).

Every all-gather of the pass is chunk-structured: the sequence is cut into `num_chunks` equal
chunks (P contiguous, 2P balanced), rank r holds `pieces` of them (1 or 2), and contributes the
same number of rows per chunk it holds; `to_sequence_order` then puts the gathered rows in
sequence chunk order (distributed/sequence_parallel.py). Three such tensors per layer:
- the halo: the last `halo` unrotated compression keys / values of every chunk (the tokens a
  window ending in the next chunk reaches back to; `halo` <= compress block - 1, 0 when no window
  crosses a chunk start);
- the compressed tokens: `window_capacity` rows per chunk, the first `windows_of(chunk)` of them
  the compressed tokens of the windows ending in the chunk (the rest padding);
- the rotated keys and values of every token.

Compression windows (model/compression.py): window c covers tokens c * stride - (block - stride)
... (c + 1) * stride - 1; a chunk [s, e) owns windows s // stride ... e // stride - 1.

Dimension legend: n whole sequence, L tokens of a chunk, P ranks, c compressed tokens (n // stride).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from nsa_core.distributed.sequence_parallel import shard_spans


@dataclass(frozen=True)
class ShardPlan:
    seq_len: int  # n, the whole sequence
    world: int  # P
    rank: int
    layout: str
    block: int  # compress_block_size
    stride: int  # compression stride (<= block)

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """This rank's token ranges [start, end), in its shard's order."""
        return shard_spans(self.seq_len, self.world, self.rank, self.layout)

    @property
    def pieces(self) -> int:
        return len(self.spans)

    @property
    def chunk_len(self) -> int:
        return self.spans[0][1] - self.spans[0][0]

    @property
    def num_chunks(self) -> int:
        return self.world * self.pieces

    def chunk_windows(self, start: int, end: int) -> tuple[int, int]:
        """The windows [first, last) whose last token lies in [start, end)."""
        return start // self.stride, end // self.stride

    @property
    def num_windows(self) -> int:
        return self.seq_len // self.stride

    @cached_property
    def window_capacity(self) -> int:
        """Rows per chunk of the compressed tokens' all-gather: the most windows a chunk owns."""
        L = self.chunk_len
        return max(self.windows_of(j) for j in range(self.num_chunks)) if L else 0

    def windows_of(self, chunk: int) -> int:
        first, last = self.chunk_windows(chunk * self.chunk_len, (chunk + 1) * self.chunk_len)
        return last - first

    def reach(self, start: int) -> int:
        """Tokens before `start` that the first window ending at or after it covers (0 at the sequence start)."""
        first_window_start = (start // self.stride) * self.stride - (self.block - self.stride)
        return max(0, start - max(first_window_start, 0))

    @cached_property
    def halo(self) -> int:
        """Rows per chunk of the halo all-gather: a chunk's last `halo` tokens (the whole chunk when
        windows reach further back than one chunk)."""
        need = max(self.reach(j * self.chunk_len) for j in range(self.num_chunks))
        return min(need, self.chunk_len)

    def halo_index(self, start: int, device) -> Tensor:
        """Rows of the ordered halo tensor (chunk j's last `halo` tokens at rows j * halo ...) holding
        the tokens start - reach(start) ... start - 1, in order."""
        L, H = self.chunk_len, self.halo
        p = torch.arange(start - self.reach(start), start, device=device)
        j = p // L
        return j * H + p - (j + 1) * L + H

    def compressed_index(self, device) -> Tensor:
        """Rows of the ordered compressed tokens' all-gather (window_capacity rows per chunk) holding
        windows 0 ... n // stride - 1, in order: window c ends in chunk ((c + 1) stride - 1) // L."""
        c = torch.arange(self.num_windows, device=device)
        j = ((c + 1) * self.stride - 1) // self.chunk_len
        return j * self.window_capacity + c - (j * self.chunk_len) // self.stride

    def positions(self, device) -> Tensor:
        """The positions of this rank's tokens, in its shard's order (nl,)."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.spans])

    def gathered_elements_per_row(self) -> dict[str, int]:
        """Tokens each all-gather delivers to a rank per kv-head row (x kv heads x head dim x
        tensors stacked = elements): halo, compressed, keys (the whole sequence)."""
        return dict(halo=self.num_chunks * self.halo, compressed=self.num_chunks * self.window_capacity,
                    keys=self.seq_len)
