"""rotary: rotate interleaved pairs of q or k by position tables, or at per-row positions from the
frequencies (validation + dispatch). Kernels: kernels/rotary.py (one pass each way); reference:
reference/rotary.py (same arithmetic)."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels


def rotary(t: Tensor, cos: Tensor, sin: Tensor, *, backend: str = "auto") -> Tensor:
    """t (..., n, d); cos / sin (n, P) the pair tables of the n tokens' positions (2P <= d), or tables
    per row broadcasting against t's leading dims, e.g. (B, 1, n, P) for sequences at different
    positions (decoding; the reference runs those by design).
    Pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32 (float64 for float64 inputs)."""
    pairs = cos.shape[-1]
    if t.ndim < 2 or t.shape[-1] < 2 * pairs or cos.shape != sin.shape or cos.shape[-2] != t.shape[-2]:
        raise ValueError(f"rotary needs t (..., n, d >= {2 * pairs}) and tables (..., n, {pairs}), got t "
                         f"{tuple(t.shape)}, tables {tuple(cos.shape)}")

    def unsupported() -> str | None:  # every floating dtype (float64 computes in float64), any size (64-bit offsets)
        return None

    by_design = None if cos.ndim == 2 else "tables per row (sequences at different positions)"
    if use_kernels(backend, t.device, "rotary", unsupported, by_design=by_design):
        from nsa_core.kernels.rotary import rotary_triton

        return rotary_triton(t, cos, sin)
    from nsa_core.reference.rotary import rotary_reference

    return rotary_reference(t, cos, sin)


def rotary_at_positions(t: Tensor, positions: Tensor, freqs: Tensor, *, backend: str = "auto") -> Tensor:
    """t (B, H, n, d) whose row b's tokens sit at positions[b] (B, n) int; freqs (P,) the pairs'
    frequencies (2P <= d): pair i of a token at position p turns by p * freqs[i], the angle computed in
    float32 (float64 for float64 inputs), then as `rotary`. One kernel launch (a decoding step's rows)."""
    if t.ndim != 4 or positions.shape != (t.shape[0], t.shape[2]) or freqs.ndim != 1 or t.shape[-1] < 2 * freqs.shape[0]:
        raise ValueError(f"rotary_at_positions needs t (B, H, n, d), positions (B, n) and freqs (P,) with 2P <= d, got "
                         f"t {tuple(t.shape)}, positions {tuple(positions.shape)}, freqs {tuple(freqs.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rotary_at_positions needs int32 or int64 positions, got {positions.dtype}")
    wide = torch.promote_types(t.dtype, torch.float32)
    if use_kernels(backend, t.device, "rotary"):
        from nsa_core.kernels.rotary import rotary_at_positions_triton

        return rotary_at_positions_triton(t, positions, freqs.to(wide))
    from nsa_core.reference.rotary import rotary_at_positions_reference

    return rotary_at_positions_reference(t, positions, freqs)
