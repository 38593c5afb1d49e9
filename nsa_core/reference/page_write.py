"""The twin of kernels/decode/page_write.py: a step's keys (rotated at their positions first, when
given the rotary frequencies) and values written into pages through a block table, by index puts."""

from __future__ import annotations

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
