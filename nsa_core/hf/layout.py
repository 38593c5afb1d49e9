"""Which tokens of an HF batch form which sequence: `attention_mask` (1 a token, 0 padding, on
either side) and `position_ids` (a document starts wherever the position does not follow the
previous token's, as HF's packing collators make them: restarting at 0) become packed documents
(nsa_core's cu_seqlens) when the batch is not plain.

Every document is attended alone and its rotary positions start at 0, whatever values position_ids
hold; the outputs of padding positions are zeros.

Dimension legend: b batch, n tokens per row, T tokens kept (not padding), D features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # the label of a term that does not count (HF's convention)


@dataclass
class TokenLayout:
    """index (T,): the kept tokens' flat positions in the (b, n) batch, in order; cu_seqlens (docs + 1,)
    int32 over them; starts (b, n) bool: a token that begins a document. index None: a plain batch
    (every row one whole sequence)."""

    shape: tuple[int, int]
    index: Tensor | None = None
    cu_seqlens: Tensor | None = None
    starts: Tensor | None = None
    valid: Tensor | None = None

    @property
    def is_plain(self) -> bool:
        return self.index is None

    def pack(self, x: Tensor) -> Tensor:
        """x (b, n, D) -> (1, T, D) (a plain layout: x itself)."""
        return x if self.is_plain else x.flatten(0, 1)[self.index][None]

    def unpack(self, y: Tensor) -> Tensor:
        """y (1, T, D) -> (b, n, D), zeros at padding (a plain layout: y itself)."""
        if self.is_plain:
            return y
        b, n = self.shape
        out = y.new_zeros(b * n, y.shape[-1])
        return out.index_copy(0, self.index, y[0]).view(b, n, -1)

    def labels_within_documents(self, labels: Tensor) -> Tensor:
        """labels (b, n) with IGNORE wherever the target's predecessor is not in its document (it
        starts a document, or either token is padding): no document predicts another's tokens."""
        if self.is_plain:
            return labels
        cut = self.starts | ~self.valid
        cut[:, 1:] |= ~self.valid[:, :-1]
        return labels.masked_fill(cut, IGNORE)


def _check_2d(name: str, t: Tensor | None, shape: tuple[int, int]) -> None:
    if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
        raise ValueError(f"{name} must be a tensor of shape (batch, seq) = {shape}, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def token_layout(shape: tuple[int, int], attention_mask: Tensor | None, position_ids: Tensor | None,
                 device: torch.device) -> TokenLayout:
    """The layout of a (b, n) batch (module docstring). Reads the mask and positions on the host once
    (when there are any)."""
    b, n = shape
    if attention_mask is None and position_ids is None:
        return TokenLayout(shape)  # a plain batch, without reading anything on the host
    _check_2d("attention_mask", attention_mask, shape)
    if position_ids is not None and position_ids.ndim == 2 and position_ids.shape[0] == 1 and b > 1:
        position_ids = position_ids.expand(b, n)
    _check_2d("position_ids", position_ids, shape)
    valid = torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.to(device).bool()
    index = valid.flatten().nonzero().squeeze(1)
    row = index // n
    new_doc = torch.ones_like(index, dtype=torch.bool)
    new_doc[1:] = row[1:] != row[:-1]
    if position_ids is not None:
        pos = position_ids.to(device).flatten()[index]
        new_doc[1:] |= pos[1:] != pos[:-1] + 1
    first = new_doc.nonzero().squeeze(1)
    if index.numel() == b * n and first.numel() == b:
        return TokenLayout(shape)
    cu = torch.cat((first, first.new_tensor([index.numel()]))).to(torch.int32)
    starts = torch.zeros(b * n, dtype=torch.bool, device=device)
    starts[index[first]] = True
    return TokenLayout(shape, index, cu, starts.view(b, n), valid)


def compact_rows(valid: Tensor) -> tuple[Tensor, Tensor]:
    """valid (b, n) bool -> order (b, n): per row the kept tokens' columns first (in order), then the
    padding's; lengths (b,) the kept tokens per row. Gathering with order right-pads every row."""
    n = valid.shape[1]
    columns = torch.arange(n, device=valid.device).expand_as(valid)
    order = torch.where(valid, columns, columns + n).argsort(dim=1)
    return order, valid.sum(dim=1)
