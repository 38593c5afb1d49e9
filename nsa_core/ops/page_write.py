"""write_pages: a decoding step's (or a prefill's) keys and values into a cache's pages through its
block table, the keys rotated at their positions on the way when given the rotary frequencies;
refresh_page_means: the mean key of every page such a write touched (validation + dispatch).
Kernels: kernels/decode/page_write.py (one launch each); reference: reference/page_write.py (index puts,
a gather and a mean)."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels


def write_pages(k_pages: Tensor, v_pages: Tensor, table: Tensor, positions: Tensor, k: Tensor, v: Tensor, *,
                rotary_freqs: Tensor | None = None, backend: str = "auto") -> None:
    """k (B, HKV, K, D) and v (B, HKV, K, Dv) of the tokens at positions (B, K) into k_pages
    (NP, HKV, PAGE, D) / v_pages (NP, HKV, PAGE, Dv): token i of row b to page table[b, p // PAGE],
    slot p % PAGE (p = positions[b, i]), in place. rotary_freqs (P,), 2P <= D: k is rotated at its
    positions first (as ops.rotary_at_positions); None: k is stored as given."""
    B, HKV, K, D = k.shape if k.ndim == 4 else (None,) * 4
    if (k.ndim != 4 or v.ndim != 4 or v.shape[:3] != k.shape[:3] or positions.shape != (B, K)
            or k_pages.ndim != 4 or k_pages.shape[1] != HKV or k_pages.shape[-1] != D
            or v_pages.shape[:3] != k_pages.shape[:3] or v_pages.shape[-1] != v.shape[-1]
            or table.ndim != 2 or table.shape[0] != B):
        raise ValueError(f"write_pages needs k (B, HKV, K, D), v (B, HKV, K, Dv), positions (B, K), pages (NP, HKV, PAGE, "
                         f"D / Dv) and a table (B, pages per row), got k {tuple(k.shape)}, v {tuple(v.shape)}, positions "
                         f"{tuple(positions.shape)}, k_pages {tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)}, "
                         f"table {tuple(table.shape)}")
    for name, t in (("positions", positions), ("table", table)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"write_pages needs int32 or int64 {name}, got {t.dtype}")
    if k.dtype != k_pages.dtype or v.dtype != v_pages.dtype:
        raise TypeError(f"write_pages stores k / v as the pages hold them: got k {k.dtype} into {k_pages.dtype}, "
                        f"v {v.dtype} into {v_pages.dtype}")
    if rotary_freqs is not None and (rotary_freqs.ndim != 1 or 2 * rotary_freqs.shape[0] > D):
        raise ValueError(f"rotary_freqs must be (P,) with 2P <= D={D}, got {tuple(rotary_freqs.shape)}")
    freqs = None if rotary_freqs is None else rotary_freqs.to(torch.promote_types(k.dtype, torch.float32))

    def unsupported() -> str | None:
        if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
            return "pages without unit stride on the head dim"
        return None

    if use_kernels(backend, k.device, "write_pages", unsupported):
        from nsa_core.kernels.decode.page_write import write_pages_triton

        write_pages_triton(k_pages, v_pages, table, positions, k, v, freqs)
        return
    from nsa_core.reference.page_write import write_pages_reference

    write_pages_reference(k_pages, v_pages, table, positions, k, v, freqs)


def refresh_page_means(means: Tensor, k_pages: Tensor, table: Tensor, positions: Tensor, *,
                       backend: str = "auto") -> None:
    """means (NP, HKV, D) := the mean over its PAGE slots of every page of k_pages (NP, HKV, PAGE, D)
    that the tokens at positions (B, K) were written to through table (B, pages per row), in place.
    A row's positions must be consecutive (a step's or a prompt's). A page not complete yet averages
    its stale or empty slots too (a selection never scores it before its last token refreshes it)."""
    if (k_pages.ndim != 4 or means.shape != (k_pages.shape[0], k_pages.shape[1], k_pages.shape[3])
            or positions.ndim != 2 or table.ndim != 2 or table.shape[0] != positions.shape[0]):
        raise ValueError(f"refresh_page_means needs means (NP, HKV, D) of k_pages (NP, HKV, PAGE, D), positions (B, K) "
                         f"and a table (B, pages per row), got means {tuple(means.shape)}, k_pages "
                         f"{tuple(k_pages.shape)}, positions {tuple(positions.shape)}, table {tuple(table.shape)}")
    if means.dtype != k_pages.dtype:
        raise TypeError(f"refresh_page_means keeps the means in the pages' dtype {k_pages.dtype}, got {means.dtype}")

    def unsupported() -> str | None:
        if k_pages.stride(-1) != 1 or means.stride(-1) != 1:
            return "pages or means without unit stride on the head dim"
        return None

    if use_kernels(backend, k_pages.device, "refresh_page_means", unsupported):
        from nsa_core.kernels.decode.page_write import refresh_page_means_triton

        refresh_page_means_triton(means, k_pages, table, positions)
        return
    from nsa_core.reference.page_write import refresh_page_means_reference

    refresh_page_means_reference(means, k_pages, table, positions)
