"""What a block selection is and how it is made, shared by the ops, the reference, the model and the
decoding cache: `Selection` (the chosen blocks of every query) and `SelectionRule` (the selection's
part of NSAConfig), with the one rule of how blocks are scored (`pooled_scoring`).

Dimension legend: B batch, H heads of the selection (kv heads or query heads), T queries, S selected slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def pooled_scoring(selection_block_size: int, stride: int, importance: str = "mean_logits") -> bool:
    """Whether blocks are scored from pooled keys (the mean of each selection block's compressed keys,
    before the dot product): when selection blocks are a multiple of the stride and the score is the
    mean of logits (linear in the keys). Otherwise the exact compressed logits are brought to block
    resolution (reference/selection.py)."""
    return selection_block_size % stride == 0 and importance == "mean_logits"


@dataclass
class Selection:
    indices: Tensor  # (B, H, T, S) int64
    valid: Tensor  # (B, H, T, S) bool
    probs: Tensor  # (B, H, T, S): the importance of each selected block
    gates: Tensor | None  # (B, H, T, S): straight-through gates (1 forward) with use_diff_topk


@dataclass(frozen=True)
class SelectionRule:
    """How blocks are scored and chosen (the selection's part of NSAConfig)."""

    num_selected: int
    selection_block_size: int
    stride: int
    group_size: int
    share_across_group: bool
    interpolated: bool
    use_diff_topk: bool
    causal: bool
    scale: float
    forced_initial: int = 0
    forced_local: int = 0
    importance: str = "mean_logits"  # NSAConfig.importance_score
    compress_block: int = 0  # compression window (tokens); "summed_probs" needs it for the overlaps
    selected_key_slots: int = 0  # NSAConfig.selected_key_slots: slots the selected branch's block keys fill

    @property
    def scores_selected_keys(self) -> bool:
        """Blocks scored by the selected branch's own pooled keys (importance "selected_keys")."""
        return self.importance == "selected_keys"

    def block_key_rule(self) -> SelectionRule:
        """With importance "selected_keys": the rule that scores the selected branch's block keys, one
        key per selection block (block_mean_keys): the mean-logit rule at a stride of one selection block
        (a block is visible once complete; the own block never is). Any other rule: itself."""
        if not self.scores_selected_keys:
            return self
        return replace(self, stride=self.selection_block_size, importance="mean_logits", interpolated=False)

    @property
    def splits_slots(self) -> bool:
        """Some slots scored by importance, the rest by the selected branch's block keys (selected_key_slots)."""
        return self.selected_key_slots > 0

    def importance_part(self) -> SelectionRule:
        """With selected_key_slots: the rule of the forced blocks and the slots `importance` scores."""
        return replace(self, num_selected=self.num_selected - self.selected_key_slots, selected_key_slots=0)

    def block_key_part(self) -> SelectionRule:
        """With selected_key_slots: the rule of the slots the block keys score (no forced blocks;
        block_key_rule's scoring)."""
        return replace(self, num_selected=self.selected_key_slots, forced_initial=0, forced_local=0,
                       importance="selected_keys", selected_key_slots=0).block_key_rule()

    def scored_parts(self) -> list[tuple[SelectionRule, bool]]:
        """The parts of the selection, each (its rule, whether it scores the selected branch's block keys):
        one, or with selected_key_slots the importance's slots then the block keys' slots (merge_selections)."""
        if self.splits_slots:
            return [(self.importance_part(), False), (self.block_key_part(), True)]
        return [(self, self.scores_selected_keys)]

    @property
    def has_forced_blocks(self) -> bool:
        return self.forced_initial + self.forced_local > 0

    @property
    def pooled(self) -> bool:
        """Blocks scored from pooled keys (pooled_scoring)."""
        return pooled_scoring(self.selection_block_size, self.stride, self.importance)

    def forced(self, query_pos: Tensor) -> tuple[int, int, int, Tensor] | None:
        """select_top_blocks' `forced` argument for queries at query_pos, or None."""
        if not self.has_forced_blocks:
            return None
        return (self.selection_block_size, self.forced_initial, self.forced_local, query_pos)


def merge_selections(first: Selection | None, second: Selection | None) -> Selection | None:
    """The slots of `first` then those of `second` (same B, H, T), a slot of `second` whose block a valid
    slot of `first` holds marked invalid (each block attended once). None stands for no slots."""
    if first is None or second is None:
        return second if first is None else first
    if first.gates is not None or second.gates is not None:
        raise ValueError("selections with use_diff_topk gates cannot be merged")
    if first.indices.shape[:-1] != second.indices.shape[:-1]:
        raise ValueError(f"selections to merge must share (B, H, T), got {tuple(first.indices.shape[:-1])} and "
                         f"{tuple(second.indices.shape[:-1])}")
    # (B, H, T, S2, S1): which valid slot of first holds each slot's block of second
    held = (second.indices.unsqueeze(-1) == first.indices.unsqueeze(-2)) & first.valid.unsqueeze(-2)
    valid = second.valid & ~held.any(dim=-1)
    return Selection(indices=torch.cat([first.indices, second.indices], dim=-1),
                     valid=torch.cat([first.valid, valid], dim=-1),
                     probs=torch.cat([first.probs, second.probs], dim=-1), gates=None)
