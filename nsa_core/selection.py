"""What a block selection is and how it is made, shared by the ops, the reference, the model and the
decoding cache: `Selection` (the chosen blocks of every query) and `SelectionRule` (the selection's
part of NSAConfig), with the one rule of how blocks are scored (`pooled_scoring`).

Dimension legend: B batch, H heads of the selection (kv heads or query heads), T queries, S selected slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
