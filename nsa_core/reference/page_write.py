"""The twin of kernels/decode/page_write.py: a step's keys (rotated at their positions first, when
given the rotary frequencies) and values written into pages through a block table, by index puts;
the mean key of every page written to, by a gather and a mean."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.rotary import rotary_at_positions_reference


def write_pages_reference(k_pages: Tensor, v_pages: Tensor, table: Tensor, positions: Tensor, k: Tensor, v: Tensor,
                          freqs: Tensor | None) -> None:
    """k / v (B, HKV, K, D / Dv) into k_pages / v_pages (NP, HKV, PAGE, D / Dv) at positions (B, K)."""
    if freqs is not None:
        k = rotary_at_positions_reference(k, positions, freqs)
    page = k_pages.shape[2]
    physical = table.gather(1, positions // page)
    slot = positions % page
    for pages, t in ((k_pages, k), (v_pages, v)):
        pages[physical, :, slot] = t.transpose(1, 2).to(pages.dtype)


def refresh_page_means_reference(means: Tensor, k_pages: Tensor, table: Tensor, positions: Tensor) -> None:
    """means (NP, HKV, D) of the pages of k_pages (NP, HKV, PAGE, D) the tokens at positions (B, K) were
    written to. A row's positions are consecutive, so every PAGE-th of them and the last name each
    page written (repeats write the same mean)."""
    page = k_pages.shape[2]
    logical = torch.cat([positions[:, ::page], positions[:, -1:]], dim=1) // page  # (B, J)
    physical = table.gather(1, logical.long()).long().flatten()
    means[physical] = k_pages[physical].mean(dim=2).to(means.dtype)
