"""NSAGenerationCache: what HF `generate` carries between the NSA model's steps.

One nsa_core decoding cache per layer (NSACache for sparse layers, DenseCache for dense ones, both
growing as needed), plus the count of input_ids columns already consumed (`seen`: padding
included), so that `prepare_inputs_for_generation` passes only the new tokens. The layer caches
hold every row's tokens compacted (left or right padding dropped at the prefill); a step's tokens go
after each row's own last token.

It is not a transformers `Cache` (whose layer classes hold dense keys and values): the model tells
generate it supplies its own cache (`_supports_default_dynamic_cache` is False), as the
state-space models of transformers do, and returns it in its output. Beam search, which reorders a
cache, is not supported with it (pass use_cache=False).
"""

from __future__ import annotations


class NSAGenerationCache:
    is_compileable = False  # generate asks before deciding to compile the step

    def __init__(self, layers: list, seen: int):
        self.layers = layers
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of input_ids consumed so far (padding included)."""
        return self.seen

    def __len__(self) -> int:
        return len(self.layers)

    def reorder_cache(self, beam_idx):
        raise ValueError("the NSA generation cache cannot be reordered: beam search needs use_cache=False")
