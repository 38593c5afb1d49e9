"""write_pages: a decoding step's (or a prefill's) keys and values into a cache's pages through its
block table, the keys rotated at their positions on the way when given the rotary frequencies
(validation + dispatch). Kernel: kernels/decode/page_write.py (one launch); reference:
reference/page_write.py (index puts)."""

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
