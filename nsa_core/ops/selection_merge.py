"""merge_selection_slots: two selections of the same queries as one, the second's slots after the
first's, each block attended once (validation + dispatch). Kernel: kernels/selection_merge.py (one
launch); reference: nsa_core.selection.merge_selections."""

from __future__ import annotations

from nsa_core.ops.dispatch import use_kernels
from nsa_core.selection import Selection, merge_selections


def merge_selection_slots(first: Selection | None, second: Selection | None, *, backend: str = "auto") -> Selection | None:
    """The slots of `first` then those of `second` (same B, H, T), a slot of `second` whose block a valid
    slot of `first` holds marked invalid. None stands for no slots."""
    if first is None or second is None:
        return merge_selections(first, second)
    if first.gates is not None or second.gates is not None or first.indices.shape[:-1] != second.indices.shape[:-1]:
        return merge_selections(first, second)  # it names what does not fit

    def unsupported() -> str | None:
        if first.indices.dtype != second.indices.dtype or first.probs.dtype != second.probs.dtype:
            return "selections of different index or probability dtypes"
        return None

    if use_kernels(backend, first.indices.device, "merge_selection_slots", unsupported):
        from nsa_core.kernels.selection_merge import merge_selections_triton

        indices, valid, probs = merge_selections_triton(first.indices, first.valid, first.probs, second.indices,
                                                        second.valid, second.probs)
        return Selection(indices=indices, valid=valid, probs=probs, gates=None)
    return merge_selections(first, second)
