"""combine: the gated sum of the three branches, token-major for the output projection
(validation + dispatch). Kernel: kernels/combine.py (one pass each way); reference: reference/combine.py."""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.dispatch import use_kernels


def combine(compressed: Tensor, fine: Tensor, sliding: Tensor, gates: Tensor, *, backend: str = "auto") -> Tensor:
    """Branches (B, H, N, Dv), gates (B, H, N, 3) in the branches' order -> (B, N, H, Dv)."""
    shape = compressed.shape
    if fine.shape != shape or sliding.shape != shape or gates.shape != (*shape[:3], 3):
        raise ValueError(f"combine needs three branches of one shape (B, H, N, Dv) and gates (B, H, N, 3), got "
                         f"{tuple(shape)}, {tuple(fine.shape)}, {tuple(sliding.shape)}, {tuple(gates.shape)}")

    def unsupported() -> str | None:
        from nsa_core.kernels.limits import dtype_reason

        return dtype_reason(compressed)  # offsets are 64-bit: any size

    mixed = len({t.dtype for t in (compressed, fine, sliding, gates)}) > 1
    by_design = "branches and gates of different dtypes (autocast) combine on the reference" if mixed else None
    if use_kernels(backend, compressed.device, "combine", unsupported, by_design=by_design):
        from nsa_core.kernels.combine import combine_triton

        return combine_triton(compressed, fine, sliding, gates)
    from nsa_core.reference.combine import combine_reference

    return combine_reference(compressed, fine, sliding, gates)
